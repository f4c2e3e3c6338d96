"""The Python side of the JS interop tests (clients/js/test/interop.test.mjs), on the
Python SDK (openred.client). One JSON object per line on stdout.

    peer.py talk URL TO GROUP_KEY      to the JS node TO: plain, signed, encrypted QoS 1,
                                       a group-key topic, a request
    peer.py listen URL KEY_FILE GROUP_KEY N   receive N messages (direct and js/topic),
                                       answer requests
    peer.py send1 URL TO BODY          one QoS 1 message (the recipient may be offline)
    peer.py recv1 URL KEY_FILE         receive one direct message, ack it
    peer.py outbox PATH TO BODY...     leave QoS 1 sends to TO in an outbox file, unsent
"""

from __future__ import annotations

import asyncio
import json
import sys

from openred.client import Client, GroupKeys, Identity, Message, Outbox, OutboxEntry


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def view(kind: str, m: Message) -> dict[str, object]:
    try:
        text = m.body.decode()
    except Exception as exc:  # DecryptError
        text = f"<{type(exc).__name__}>"
    return {"kind": kind, "text": text, "qos": m.qos, "mid": m.mid, "sender": m.sender,
            "verified": m.verified, "enc": m.enc, "decrypted": m.decrypted, "meta": m.meta,
            "seq": m.seq}


async def talk(url: str, to: str, gk_hex: str) -> None:
    keys = GroupKeys()
    keys.add("py/topic", "g1", bytes.fromhex(gk_hex))
    async with Client(url, identity=Identity.generate(), group_keys=keys,
                      reconnect=False) as c:
        out(node=c.node_id)
        await c.send(to, b"py-plain")
        await c.send(to, b"py-signed", sign=True)
        await c.send(to, b"py-secret", qos=1, encrypt=True, sign=True, meta={"k": "v"})
        await c.publish("py/topic", b"py-group", sign=True)
        reply = await c.request(to, b"py-asks", timeout_s=10)
        out(reply=reply.body.decode(), verified=reply.verified, enc=reply.enc)


async def listen(url: str, key_file: str, gk_hex: str, n: int) -> None:
    keys = GroupKeys()
    keys.add("js/topic", "g2", bytes.fromhex(gk_hex))

    def on_request(msg: Message) -> bytes:
        return b"py-echo:" + bytes(msg.body)

    async with Client(url, key_file=key_file, group_keys=keys, on_request=on_request,
                      reconnect=False) as c:
        sub = await c.subscribe("js/topic")
        out(ready=c.node_id)
        got: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        async def direct() -> None:
            async for m in c:
                await got.put(view("direct", m))

        async def topic() -> None:
            async for m in sub:
                await got.put(view("topic", m))

        tasks = [asyncio.create_task(direct()), asyncio.create_task(topic())]
        for _ in range(n):
            out(**await got.get())
        for t in tasks:
            t.cancel()
        await asyncio.sleep(0.3)  # let the acks of the last messages go out


async def send1(url: str, to: str, body: str) -> None:
    async with Client(url, identity=Identity.generate(), reconnect=False) as c:
        mid = await c.send(to, body.encode(), qos=1, sign=True)
        out(mid=mid, node=c.node_id)


async def recv1(url: str, key_file: str) -> None:
    async with Client(url, key_file=key_file, reconnect=False) as c:
        out(ready=c.node_id, pending=c.welcome.pending if c.welcome else None)
        async for m in c:
            out(**view("direct", m))
            await m.ack()
            break
        await asyncio.sleep(0.3)


async def outbox(path: str, to: str, bodies: list[str]) -> None:
    box = Outbox(path=path)
    for i, body in enumerate(bodies):
        box.add(OutboxEntry(f"py-outbox-{i}", to, body.encode(), meta={"from": "python"}))
    await box.persist()
    out(kept=len(box))


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "talk":
        asyncio.run(talk(args[0], args[1], args[2]))
    elif mode == "listen":
        asyncio.run(listen(args[0], args[1], args[2], int(args[3])))
    elif mode == "send1":
        asyncio.run(send1(args[0], args[1], args[2]))
    elif mode == "recv1":
        asyncio.run(recv1(args[0], args[1]))
    elif mode == "outbox":
        asyncio.run(outbox(args[0], args[1], args[2:]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
