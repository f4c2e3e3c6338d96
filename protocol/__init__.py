"""The OpenRed wire protocol v1, sans-I/O: frames, codec, identity, tokens, handshake.

The node client SDK (`protocol.client`) is the one module here that uses asyncio.
"""
