"""`python -m bench.floor`: what one small socket write costs on this machine, with no
relay at all: one process writes an 80-byte frame to each of N loopback TCP sockets in
turn (CPU 0) while another reads them all (CPU 1), as a fan-out does. A fan-out to N
subscribers cannot leave a single-threaded server faster than N times this.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import time


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    p.add_argument("--sockets", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    frame = b"x" * 80
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(a.sockets)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the reader
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(a.sockets)]
        sel = selectors.DefaultSelector()
        for c in conns:
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
        want, got = a.sockets * a.rounds * len(frame), 0
        while got < want:
            for key, _ in sel.select(5):
                try:
                    got += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
                except BlockingIOError:
                    pass
        os._exit(0)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    peers = [srv.accept()[0] for _ in range(a.sockets)]
    for s in peers:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        for s in peers:
            s.send(frame)
    per_write = (time.perf_counter() - t0) / (a.sockets * a.rounds)
    os.waitpid(pid, 0)
    print(f"{per_write * 1e6:.2f} us per write ({a.sockets:,} sockets x {a.rounds} rounds): "
          f"a fan-out to 10,000 takes at least {per_write * 1e4 * 1e3:.0f} ms to write")


if __name__ == "__main__":
    main()
