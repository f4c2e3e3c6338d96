"""A node that sends every direct message back to its sender, with the same QoS.

    python examples/echo_node.py [--url ws://127.0.0.1:8765/v1/ws] [--key echo.key]

The key file is created (mode 0600) when it does not exist; the node id is printed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from openred.client import Client, HubError
from openred.protocol.identity import Identity, save_key_file


async def echo(url: str, key_file: str) -> None:
    async with Client(url, key_file=key_file) as node:
        print(f"echo node {node.node_id} on {url}", flush=True)
        async for msg in node:  # direct messages
            async with msg:  # QoS 1: acked once echoed; a failure leaves it to come again
                try:
                    await node.send(msg.sender, msg.body, qos=msg.qos)
                except (HubError, ValueError) as exc:  # offline sender, or $admin
                    print(f"echo to {msg.sender[:8]}.. failed: {exc}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description="Echo direct messages back to their sender.")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/ws")
    p.add_argument("--key", default="echo.key", help="key file (created if missing)")
    args = p.parse_args()
    if not Path(args.key).exists():
        save_key_file(Identity.generate(), args.key)
    try:
        asyncio.run(echo(args.url, args.key))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
