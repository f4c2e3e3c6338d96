"""Tests for protocol.ids: message ids, ULID-like and time-ordered (docs/protocol.md §4)."""

from __future__ import annotations

import itertools
import time

import pytest
from openred.protocol.ids import MidGenerator, mid_time_ms

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
N = 200_000
T0 = 1_700_000_000_000


def assert_strictly_increasing(ids: list[str]) -> None:
    bad = next((i for i in range(1, len(ids)) if not ids[i - 1] < ids[i]), None)
    assert bad is None, (bad, ids[bad - 1], ids[bad])


def assert_wellformed(mid: str) -> None:
    assert type(mid) is str
    assert len(mid) == 26
    assert set(mid) <= CROCKFORD, mid


def test_shape() -> None:
    gen = MidGenerator()
    for mid in (gen() for _ in range(1000)):
        assert_wellformed(mid)


def test_alphabet_is_used_beyond_the_time_part() -> None:
    # The random part draws from all 32 digits (catches a bad b32 -> Crockford mapping).
    gen = MidGenerator()
    seen: set[str] = set()
    for i in range(2000):
        seen.update(gen(T0 + i)[10:22])
    assert seen == CROCKFORD


def test_strictly_increasing_with_the_real_clock() -> None:
    gen = MidGenerator()
    ids = [gen() for _ in range(N)]
    assert_strictly_increasing(ids)
    assert len(set(ids)) == N


def test_strictly_increasing_within_one_ms() -> None:
    gen = MidGenerator()
    ids = [gen(T0) for _ in range(N)]
    assert_strictly_increasing(ids)
    assert {mid_time_ms(m) for m in ids[::997]} == {T0}


def test_strictly_increasing_when_the_clock_goes_backwards() -> None:
    gen = MidGenerator()
    ids = [gen(T0 + N - i) for i in range(N)]
    assert_strictly_increasing(ids)
    # The clock never runs backwards in the ids: they keep the first (latest) time.
    assert mid_time_ms(ids[-1]) == T0 + N


def test_strictly_increasing_with_a_jittering_clock() -> None:
    gen = MidGenerator()
    offsets = [0, 5, 3, 3, 10, 1, 10, 11, 2, 11]
    ids = [gen(T0 + 100 * (i // 10) + offsets[i % 10]) for i in range(N // 4)]
    assert_strictly_increasing(ids)


def test_counter_overflow_within_one_ms_stays_ordered() -> None:
    # More than 2**20 ids in one ms: the counter runs out and the time part advances.
    gen = MidGenerator()
    ids = [gen(T0) for _ in range(1_100_000)]
    assert_strictly_increasing(ids)
    assert mid_time_ms(ids[0]) == T0
    assert mid_time_ms(ids[-1]) == T0 + 1
    nxt = gen(T0 + 1)
    assert ids[-1] < nxt
    assert gen(T0 + 2) > nxt


@pytest.mark.parametrize("ms", [0, 1, 31, 32, 1023, T0, 2**47, 2**48 - 1])
def test_mid_time_ms_round_trips(ms: int) -> None:
    mid = MidGenerator()(ms)
    assert_wellformed(mid)
    assert mid_time_ms(mid) == ms


def test_mid_time_ms_of_the_real_clock() -> None:
    before = time.time_ns() // 1_000_000
    mid = MidGenerator()()
    after = time.time_ns() // 1_000_000
    assert before <= mid_time_ms(mid) <= after


def test_ids_sort_by_time_across_generators() -> None:
    times = [T0 + d for d in (0, 1, 2, 10, 1000, 86_400_000)]
    for a, b in itertools.pairwise(times):
        assert MidGenerator()(a) < MidGenerator()(b)
        assert MidGenerator()(a) < MidGenerator()(b)


def test_generators_in_the_same_ms_do_not_collide() -> None:
    ids = {MidGenerator()(T0) for _ in range(5000)}
    assert len(ids) == 5000


def test_time_prefix_is_the_first_ten_chars() -> None:
    a, b = MidGenerator()(T0), MidGenerator()(T0)
    assert a[:10] == b[:10]
    assert MidGenerator()(T0 + 1)[:10] > a[:10]
