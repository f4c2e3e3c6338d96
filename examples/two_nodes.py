"""Two nodes talking through a running hub: a self-contained demo of the client SDK.

Node B subscribes to the topic "demo/chat"; node A sends B a QoS 0 and a QoS 1 direct
message and publishes to the topic. B prints what it receives and the script exits 0
once all three arrived within 10 s, 1 otherwise.

    python examples/two_nodes.py [--url ws://127.0.0.1:8765/v1/ws] [A.key B.key]

Without key files both identities are generated for this run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from openred.client import Client, ClientError, Message
from openred.protocol.identity import Identity, load_key_file

TOPIC = "demo/chat"
DEADLINE_S = 10.0


def show(kind: str, msg: Message) -> None:
    print(f"B got {kind} from {msg.sender[:8]}..: {msg.body.decode()}")


async def run(url: str, a_id: Identity, b_id: Identity) -> int:
    expected = {"direct qos0", "direct qos1", f"topic {TOPIC}"}
    got: set[str] = set()
    try:
        async with asyncio.timeout(DEADLINE_S):
            async with Client(url, identity=b_id) as b, Client(url, identity=a_id) as a:
                b_node = b.node_id
                assert b_node is not None
                room = await b.subscribe(TOPIC)  # its messages come through `room`
                await a.send(b_node, b"hello")  # QoS 0: B must be online
                await a.send(b_node, b"hello, stored first", qos=1)  # exactly once
                await a.publish(TOPIC, b"hello, topic")
                async for msg in b:  # direct messages
                    async with msg:  # a QoS 1 message is acked when the block ends
                        show(f"direct qos{msg.qos}", msg)
                        got.add(f"direct qos{msg.qos}")
                    if got >= {"direct qos0", "direct qos1"}:
                        break
                item = await anext(room)
                assert isinstance(item, Message)
                show(f"topic {item.topic}", item)
                got.add(f"topic {item.topic}")
    except TimeoutError:
        print(f"timed out after {DEADLINE_S:g} s; missing: {sorted(expected - got)}",
              file=sys.stderr)
        return 1
    except ClientError as exc:  # hub down, refused, an error reply: say so, exit 1
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("all three arrived")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/ws")
    p.add_argument("keys", nargs="*", metavar="KEY_FILE", help="A's then B's key file")
    args = p.parse_args()
    if len(args.keys) not in (0, 2):
        p.error("give no key file or two (A's, then B's)")
    if args.keys:
        a_id, b_id = load_key_file(args.keys[0]), load_key_file(args.keys[1])
    else:
        a_id, b_id = Identity.generate(), Identity.generate()
    return asyncio.run(run(args.url, a_id, b_id))


if __name__ == "__main__":
    sys.exit(main())
