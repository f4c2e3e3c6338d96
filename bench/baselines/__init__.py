"""Minimal relays measured in the same run as the hub (docs/benchmarks.md): no authentication, no
validation, no limits, no metrics. A node says who it is with one tiny first frame
(`{"t":"hello","node":ID}`, answered by `{"t":"welcome","node":ID}`); then `send`
(`to`, `body`) is forwarded as `{"t":"msg","from","body"}`, `sub` (`topic`, `id`) is
answered `{"t":"ok","id"}` and `pub` (`topic`, `body`) goes to every other subscriber.
A message may hold a batch (a msgpack array of such frames).

- `ws_relay`: websockets' asyncio server + uvloop, one `await send()` per frame; with
  `--redis` two of them joined by Redis pub/sub (one channel per node, publishes of one
  loop turn pipelined), the cluster baseline.
- `picows_relay`: picows + uvloop, one `send()` per frame, or with `--coalesce` every
  frame bound for one connection during a loop iteration written at once: the fastest
  relay here, used to show the load generator's ceiling.
"""
