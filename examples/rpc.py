"""Request and reply between two nodes (docs/protocol.md §4.3): a responder that answers
every request, and a requester that calls it.

    python examples/rpc.py serve --key responder.key           # prints its node id
    python examples/rpc.py call NODE_ID "some text" [--qos 1]   # prints the reply
    python examples/rpc.py demo                                 # both, in one process

The responder upper-cases the request's body; a body starting with `fail` makes its
handler raise, which the SDK sends back as `meta.err` and the requester gets as
`RemoteError`. `demo` exits 0 when both cases behave, 1 otherwise. Every command
takes `--url` (default ws://127.0.0.1:8765/v1/ws).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from openred.client import Client, ClientError, Identity, Message, RemoteError
from openred.protocol.identity import save_key_file

DEFAULT_URL = "ws://127.0.0.1:8765/v1/ws"


def handle(msg: Message) -> bytes:
    """The service: what a request's body becomes. Raising is answered `meta.err`."""
    if msg.body.startswith(b"fail"):
        raise ValueError("refusing to do that")
    return msg.body.upper()


async def serve(url: str, key_file: str) -> None:
    async with Client(url, key_file=key_file, on_request=handle,
                      on_state=lambda ev: print(f"[{type(ev).__name__}] {ev}",
                                                flush=True)) as node:
        print(f"responder {node.node_id} on {url}", flush=True)
        await asyncio.Event().wait()  # requests are handled by on_request until Ctrl-C


async def call(url: str, to: str, body: str, qos: int, timeout_s: float) -> int:
    async with Client(url, identity=Identity.generate()) as node:
        try:
            reply = await node.request(to, body.encode(), qos=qos, timeout_s=timeout_s)
        except RemoteError as exc:
            print(f"the responder failed: {exc.err}", file=sys.stderr)
            return 2
        except ClientError as exc:  # offline (no_route), timeout, connection trouble
            print(f"call failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(reply.body.decode(errors="replace"))
        return 0


async def demo(url: str) -> int:
    try:
        async with Client(url, identity=Identity.generate(), on_request=handle) as responder, \
                Client(url, identity=Identity.generate()) as requester:
            to = responder.node_id
            assert to is not None
            replies = await asyncio.gather(*(requester.request(to, b"hello %d" % i)
                                             for i in range(5)))
            for r in replies:
                print(f"reply from {r.sender[:8]}..: {r.body.decode()}")
            stored = await requester.request(to, b"stored first", qos=1)
            print(f"qos 1 reply: {stored.body.decode()}")
            try:
                await requester.request(to, b"fail please")
            except RemoteError as exc:
                print(f"remote error, as expected: {exc.err}")
            else:
                print("no error where one was expected", file=sys.stderr)
                return 1
    except ClientError as exc:
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("rpc demo ok")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="Request and reply between two nodes.")
    p.add_argument("--url", default=DEFAULT_URL)
    cmd = p.add_subparsers(dest="cmd", required=True)
    s = cmd.add_parser("serve", help="answer requests until Ctrl-C")
    s.add_argument("--key", default="responder.key", help="key file (created if missing)")
    c = cmd.add_parser("call", help="send one request and print the reply")
    c.add_argument("to", help="the responder's node id")
    c.add_argument("body")
    c.add_argument("--qos", type=int, choices=(0, 1), default=0)
    c.add_argument("--timeout-s", type=float, default=10.0)
    cmd.add_parser("demo", help="a responder and a requester in one process")
    args = p.parse_args()
    try:
        if args.cmd == "serve":
            if not Path(args.key).exists():
                save_key_file(Identity.generate(), args.key)
            asyncio.run(serve(args.url, args.key))
            return 0
        if args.cmd == "call":
            return asyncio.run(call(args.url, args.to, args.body, args.qos, args.timeout_s))
        return asyncio.run(demo(args.url))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
