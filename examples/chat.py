"""A chat room on a topic (docs/protocol.md §5, §5.2, §6.1, §12): the last messages
from history, then live ones, who joins and leaves, signed lines, optionally encrypted
for the members who share the room key.

    python examples/chat.py --key alice.key --room lobby --name alice
    python examples/chat.py --key bob.key --room lobby --name bob --room-key HEX64

Type a line and Enter to say it; Ctrl-D or Ctrl-C to leave. Every line is signed
(`sign=True`) and shown with a mark: `✓` verified against the sender's key, `✗` a
signature that does not match, `?` unsigned. With `--room-key` (32 bytes in hex, the
same for every member; `--new-room-key` prints one) lines are encrypted with it
(§12 `secretbox`); members without it see `[encrypted]`. Lines lost across a reconnect
(history no longer held them) are reported as a gap. For scripts: `--say TEXT`
(repeatable) says lines at start, and `--for-s S` leaves after S seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import threading
from pathlib import Path

from openred.client import (
    Client,
    ClientError,
    DecryptError,
    Disconnected,
    GroupKeys,
    Identity,
    Message,
    PresenceChanged,
    PresenceWatch,
    StateEvent,
    Subscription,
    TopicGap,
)
from openred.protocol.identity import load_key_file, save_key_file

DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"
KID = "room-key"


def line_of(msg: Message) -> str:
    who = msg.meta.get("name") or msg.sender[:8]
    mark = {True: "✓", False: "✗", None: "?"}[msg.verified]
    try:
        text = msg.body.decode(errors="replace")
    except DecryptError:
        text = "[encrypted]"
    return f"{mark} {who}: {text}"


async def show_room(sub: Subscription) -> None:
    async for item in sub:
        if isinstance(item, TopicGap):
            print(f"-- lines {item.from_seq}..{item.to_seq} were lost while away --",
                  flush=True)
        else:
            print(line_of(item), flush=True)


async def show_presence(watch: PresenceWatch) -> None:
    ev: PresenceChanged
    async for ev in watch:
        print(f"-- {ev.node[:8]} {'joined' if ev.online else 'left'} --", flush=True)


def on_state(ev: StateEvent) -> None:
    if isinstance(ev, Disconnected) and ev.will_retry:
        print(f"-- connection lost ({ev.code}), retrying in {ev.delay_s:.1f} s --",
              flush=True)


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed, from a daemon thread (a blocking read must not hold the exit)."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    return lines


async def chat(url: str, identity: Identity, room: str, name: str, history: int,
               room_key: bytes | None, say: list[str], for_s: float | None) -> int:
    keys = GroupKeys()
    if room_key is not None:
        keys.add(room, KID, room_key)
    async with Client(url, identity=identity, sign=True, group_keys=keys,
                      on_state=on_state) as node:
        print(f"-- {name} ({node.node_id}) in {room} --", flush=True)
        if history:
            for msg in (await node.history(room, limit=history)).messages:
                print(line_of(msg), flush=True)
        tasks = [asyncio.create_task(show_room(await node.subscribe(room))),
                 asyncio.create_task(show_presence(await node.watch(topic=room)))]
        meta = {"name": name}
        for said in say:
            await node.publish(room, said.encode(), meta=meta)
        try:
            if for_s is not None:
                await asyncio.sleep(for_s)
            else:
                lines = stdin_lines(asyncio.get_running_loop())
                while (typed := await lines.get()) is not None:
                    if typed:
                        await node.publish(room, typed.encode(), meta=meta)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="A chat room on a topic.")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--key", default="chat.key", help="key file (created if missing)")
    p.add_argument("--room", default="chat/lobby")
    p.add_argument("--name", default="")
    p.add_argument("--history", type=int, default=20, help="lines of history shown first")
    p.add_argument("--room-key", help="32-byte room key in hex: encrypt the room")
    p.add_argument("--new-room-key", action="store_true", help="print a room key, exit")
    p.add_argument("--say", action="append", default=[], help="say this at start")
    p.add_argument("--for-s", type=float, help="leave after this many seconds")
    args = p.parse_args()
    if args.new_room_key:
        print(secrets.token_hex(32))
        return 0
    if not Path(args.key).exists():
        save_key_file(Identity.generate(), args.key)
    identity = load_key_file(args.key)
    room_key = bytes.fromhex(args.room_key) if args.room_key else None
    try:
        return asyncio.run(chat(args.url, identity, args.room,
                                args.name or identity.node_id[:8], args.history,
                                room_key, args.say, args.for_s))
    except KeyboardInterrupt:
        return 0
    except ClientError as exc:
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
