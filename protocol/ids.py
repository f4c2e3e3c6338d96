"""Message ids: ULID-like, 26 chars of Crockford base32, time-ordered (docs/protocol.md §4).

48 bits of milliseconds then 80 bits that start random each millisecond and count up
within it, so ids made by one generator sort in creation order even within one ms.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Final

__all__ = ["MidGenerator", "mid_time_ms"]

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# b32encode's alphabet is not in value order; map each digit to Crockford's, which is.
_TO_CROCKFORD: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())


def _time_prefix(ms: int) -> str:
    out = []
    for _ in range(10):
        out.append(_CROCKFORD[ms & 31])
        ms >>= 5
    return "".join(reversed(out))


def mid_time_ms(mid: str) -> int:
    """The creation time (ms) encoded in a mid."""
    ms = 0
    for ch in mid[:10]:
        ms = (ms << 5) | _CROCKFORD.index(ch)
    return ms


_PAIRS: Final = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 1024 two-char digits


class MidGenerator:
    """Not thread-safe: one per event loop.

    The per-ms part (time and 60 random bits) is encoded once per millisecond; a call
    within the same ms only encodes a 20-bit counter with two table look-ups, because
    this runs once per routed message.
    """

    __slots__ = ("_count", "_last_ms", "_prefix")

    def __init__(self) -> None:
        self._last_ms = -1
        self._prefix = ""
        self._count = 0

    def _new_prefix(self, ms: int) -> None:
        hi = base64.b32encode(os.urandom(10)).translate(_TO_CROCKFORD)[:12].decode()
        self._prefix = _time_prefix(ms) + hi
        # Start the counter in its lower half so counting up never wraps within one ms
        # (half a million ids per ms before a new random part is drawn).
        self._count = int.from_bytes(os.urandom(3), "big") & 0x7FFFF

    def __call__(self, now_ms: int | None = None) -> str:
        ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if ms > self._last_ms:
            self._last_ms = ms
            self._new_prefix(ms)
        else:
            # Same ms (or the clock stepped back): count up so ids stay increasing.
            c = self._count + 1
            if c > 0xFFFFF:
                # Extremely rare: advance the time part by one ms to stay ordered.
                self._last_ms += 1
                self._new_prefix(self._last_ms)
            else:
                self._count = c
        c = self._count
        return self._prefix + _PAIRS[c >> 10] + _PAIRS[c & 1023]
