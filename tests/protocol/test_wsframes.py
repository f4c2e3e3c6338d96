"""protocol.wsframes by bytes: every RFC 6455 / RFC 7692 rule the reader enforces as a
named test, streams cut at every byte, hypothesis-generated streams compared event for
event with websockets' own parser (the reference implementation) in both directions, and
a bounded fuzz run (docs/protocol.md §1 "Sizes", §11 "WebSocket framing")."""

from __future__ import annotations

import random
import tracemalloc
import zlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openred.protocol import wsframes
from openred.protocol.wsframes import (
    DEFAULT_MAX_FRAGMENTS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ZERO_MASK_KEY,
    Close,
    Deflate,
    Event,
    Failure,
    FrameReader,
    FrameWriter,
    Ping,
    Pong,
    Text,
    apply_mask,
    binary_header,
    client_message,
    close_body,
    frame_header,
    valid_close_code,
)
from websockets import frames as ws_frames
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

KEY = b"\x37\xfa\x21\x3d"  # RFC 6455 §5.7's example masking key
LIMIT = 1000

# No example database written to the checkout; hundreds of examples, seconds in all.
PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings(PROPS, max_examples=300)


def frame(b0: int, payload: bytes = b"", *, masked: bool = True, key: bytes = KEY) -> bytes:
    """Any client frame, valid or not: first byte `b0`, the payload masked with `key`."""
    if not masked:
        return frame_header(b0, len(payload)) + payload
    return frame_header(b0, len(payload), masked=True) + key + apply_mask(payload, key)


def reader(**kw: Any) -> FrameReader:
    kw.setdefault("max_message_bytes", LIMIT)
    return FrameReader(**kw)


def feed_all(data: bytes, **kw: Any) -> list[Event]:
    return reader(**kw).feed(data)


def failure(data: bytes, **kw: Any) -> Failure:
    r = reader(**kw)
    events = r.feed(data)
    assert events and type(events[-1]) is Failure, events
    assert r.done and r.buffered == 0
    return events[-1]


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(0x88, code.to_bytes(2, "big") + reason)


# -- whole messages -------------------------------------------------------------------


def test_binary_message_is_plain_bytes() -> None:
    events = feed_all(frame(0x82, b"hello"))
    assert events == [b"hello"] and type(events[0]) is bytes


def test_several_whole_frames_in_one_read_hold_nothing() -> None:
    r = reader()
    data = b"".join(frame(0x82, bytes([i]) * i) for i in range(60))
    assert r.feed(data) == [bytes([i]) * i for i in range(60)]
    assert r.buffered == 0 and not r.done


def test_lengths_around_the_header_forms() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = random.Random(n).randbytes(n)
        assert feed_all(frame(0x82, payload), max_message_bytes=70000) == [payload]


def test_text_message() -> None:
    assert feed_all(frame(0x81, "héllo €".encode())) == [Text("héllo €".encode())]


def test_text_not_utf8_fails_1007() -> None:
    assert failure(frame(0x81, b"\xff\xfe")).code == 1007


def test_fragmented_text_not_utf8_when_complete_fails_1007() -> None:
    assert failure(frame(0x01, b"ok") + frame(0x80, b"\xc3")).code == 1007


def test_fragmented_text_split_inside_a_character() -> None:
    raw = "€".encode()
    assert feed_all(frame(0x01, raw[:1]) + frame(0x00, raw[1:2]) + frame(0x80, raw[2:])) \
        == [Text(raw)]


def test_ping_and_pong() -> None:
    assert feed_all(frame(0x89, b"p") + frame(0x8A, b"q") + frame(0x89)) == [
        Ping(b"p"), Pong(b"q"), Ping(b"")]


def test_bytearray_input_is_not_kept() -> None:
    r = reader()
    whole = frame(0x82, b"abcdef")
    part = bytearray(whole[:5])
    assert r.feed(part) == []
    part[:] = b"\x00" * 5  # the caller reuses its buffer
    assert r.feed(whole[5:]) == [b"abcdef"]


# -- masking (RFC 6455 §5.1, §5.3) ----------------------------------------------------


def test_unmasked_client_frame_fails_1002() -> None:
    assert failure(frame(0x82, b"x", masked=False)).code == 1002


def test_unmasked_empty_client_frame_fails_1002() -> None:
    assert failure(b"\x82\x00").code == 1002


def test_masked_server_frame_fails_1002() -> None:
    assert failure(frame(0x82, b"x"), server=False).code == 1002


def test_client_side_reads_unmasked_frames() -> None:
    r = reader(server=False)
    assert r.feed(frame(0x82, b"x", masked=False) + frame(0x89, b"", masked=False)) == [
        b"x", Ping(b"")]


def test_pure_python_mask_is_the_same_function() -> None:
    rng = random.Random(7)
    for n in [*range(12), 125, 1000, 4099]:
        data, key = rng.randbytes(n), rng.randbytes(4)
        assert wsframes._py_apply_mask(data, key) == apply_mask(data, key)
        assert wsframes._py_apply_mask(bytearray(data), bytearray(key)) == apply_mask(data, key)


def test_reader_without_the_c_mask() -> None:
    data = frame(0x82, b"a" * 200) + frame(0x82, b"b" * 20) + frame(0x01, b"t")
    with patch.object(wsframes, "apply_mask", wsframes._py_apply_mask):
        assert reader().feed(data) == [b"a" * 200, b"b" * 20]


# -- reserved bits (§5.2, RFC 7692 §6) ------------------------------------------------


def test_rsv2_fails_1002() -> None:
    assert failure(frame(0xA2, b"x")).code == 1002


def test_rsv3_fails_1002() -> None:
    assert failure(frame(0x92, b"x")).code == 1002


def test_rsv2_fails_1002_even_with_deflate() -> None:
    assert failure(frame(0xE2, b"x"), deflate=Deflate(server=True)).code == 1002


def test_rsv1_without_deflate_fails_1002() -> None:
    assert failure(frame(0xC2, b"x")).code == 1002


def test_rsv1_on_a_control_frame_fails_1002() -> None:
    assert failure(frame(0xC9, b""), deflate=Deflate(server=True)).code == 1002


def test_rsv1_on_a_continuation_frame_fails_1002() -> None:
    body = Deflate(server=False).compress(b"abc")
    data = frame(0x42, body[:2]) + frame(0xC0, body[2:])
    assert failure(data, deflate=Deflate(server=True)).code == 1002


def test_rsv1_on_the_first_frame_with_deflate_is_a_compressed_message() -> None:
    body = Deflate(server=False).compress(b"abc" * 100)
    assert feed_all(frame(0xC2, body), deflate=Deflate(server=True)) == [b"abc" * 100]


# -- opcodes (§5.2) --------------------------------------------------------------------


@pytest.mark.parametrize("op", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes_fail_1002(op: int) -> None:
    assert failure(frame(0x80 | op)).code == 1002


# -- control frames (§5.5) ---------------------------------------------------------------


@pytest.mark.parametrize("op", [OP_CLOSE, OP_PING, OP_PONG])
def test_fragmented_control_frame_fails_1002(op: int) -> None:
    assert failure(frame(op, b"")).code == 1002


@pytest.mark.parametrize("op", [OP_CLOSE, OP_PING, OP_PONG])
def test_control_frame_over_125_bytes_fails_1002(op: int) -> None:
    r = reader()
    head = frame(0x80 | op, b"\x03\xe8" + b"x" * 124)[:8]  # header of a 126-byte frame
    assert r.feed(head)[-1].code == 1002  # type: ignore[union-attr]
    assert r.done


def test_control_frame_of_125_bytes_is_accepted() -> None:
    assert feed_all(frame(0x89, b"p" * 125)) == [Ping(b"p" * 125)]


def test_control_frame_between_fragments() -> None:
    data = (frame(0x02, b"ab") + frame(0x89, b"1") + frame(0x00, b"cd") + frame(0x8A, b"2")
            + frame(0x80, b"ef") + frame(0x82, b"g"))
    assert feed_all(data) == [Ping(b"1"), Pong(b"2"), b"abcdef", b"g"]


def test_close_between_fragments_is_the_peers_close() -> None:
    r = reader()
    assert r.feed(frame(0x02, b"ab") + close_frame(1000) + frame(0x80, b"c")) == [
        Close(1000, "")]
    assert r.done and r.buffered == 0


# -- lengths (§5.2) --------------------------------------------------------------------


def test_64_bit_length_with_the_top_bit_set_fails_1002() -> None:
    assert failure(b"\x82\xff\x80" + b"\x00" * 7 + KEY).code == 1002


def test_64_bit_length_over_the_limit_fails_1009_from_the_header() -> None:
    r = reader()
    events = r.feed(b"\x82\xff" + (1 << 40).to_bytes(8, "big"))
    assert events == [Failure(1009, "message too big")] and r.buffered == 0


def test_non_minimal_length_encoding_is_accepted() -> None:
    # RFC 6455 §5.2 asks senders for the shortest form; like websockets, the reader
    # takes a longer one (the size limit still applies to the length it says).
    assert feed_all(b"\x82\xfe\x00\x03" + KEY + apply_mask(b"abc", KEY)) == [b"abc"]


# -- fragmentation (§5.4) -----------------------------------------------------------------


def test_fragmented_binary_message_is_assembled() -> None:
    data = frame(0x02, b"a") + frame(0x00, b"") + frame(0x00, b"bc") + frame(0x80, b"d")
    assert feed_all(data) == [b"abcd"]


def test_new_data_frame_during_a_fragmented_message_fails_1002() -> None:
    assert failure(frame(0x02, b"a") + frame(0x82, b"b")).code == 1002
    assert failure(frame(0x01, b"a") + frame(0x01, b"b")).code == 1002


def test_continuation_without_a_message_fails_1002() -> None:
    assert failure(frame(0x80, b"a")).code == 1002
    assert failure(frame(0x82, b"a") + frame(0x00, b"b")).code == 1002


# -- size (docs/protocol.md §1 "Sizes") ----------------------------------------------------


def test_exactly_the_limit_is_accepted() -> None:
    payload = b"x" * LIMIT
    assert feed_all(frame(0x82, payload)) == [payload]
    assert feed_all(frame(0x02, payload[:400]) + frame(0x80, payload[400:])) == [payload]
    assert feed_all(frame(0x82, b"x" * 100), max_message_bytes=100) == [b"x" * 100]


def test_zero_limit_takes_empty_messages_only() -> None:
    assert feed_all(frame(0x82) + frame(0x89, b"p"), max_message_bytes=0) == [b"", Ping(b"p")]
    assert failure(frame(0x82, b"x"), max_message_bytes=0).code == 1009


def test_message_just_over_limit_fails_1009_before_payload_arrives() -> None:
    r = reader()
    head = frame(0x82, b"x" * (LIMIT + 1))[:8]  # 2 + 2-byte length + key: no payload
    assert r.feed(head[:3]) == [] and r.buffered == 3
    assert r.feed(head[3:4]) == [Failure(1009, "message too big")]
    assert r.done and r.buffered == 0 and r.feed(b"x" * 100) == []


def test_small_message_just_over_a_small_limit_fails_1009_from_its_header() -> None:
    assert reader(max_message_bytes=10).feed(b"\x82\x8b") == [Failure(1009, "message too big")]


def test_fragments_over_the_limit_fail_1009_at_the_crossing_header() -> None:
    r = reader()
    assert r.feed(frame(0x02, b"x" * 600)) == [] and r.buffered == 600
    head = frame(0x80, b"x" * (LIMIT - 600 + 1))[:4]
    assert r.feed(head) == [Failure(1009, "message too big")]
    assert r.buffered == 0


def test_buffered_never_exceeds_limit_plus_a_header() -> None:
    r = reader()
    data = frame(0x02, b"x" * 500) + frame(0x89, b"p" * 100) + frame(0x80, b"y" * 500)
    most = 0
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        most = max(most, r.buffered)
    assert most <= LIMIT + 14


# -- fragment count --------------------------------------------------------------------------


def test_three_million_empty_fragments_do_not_grow_memory() -> None:
    # The red-team case at a thirtieth of the size: 100 000 empty continuations hold
    # nothing (one bytearray for all fragments, not a list entry each).
    count = 100_000
    r = reader(max_fragments=count + 2)
    chunk = frame(0x00, b"") * 1000
    assert r.feed(frame(0x02, b"a")) == []
    tracemalloc.start()
    try:
        for _ in range(count // 1000):
            assert r.feed(chunk) == []
            assert r.buffered == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert r.feed(frame(0x80, b"b")) == [b"ab"]
    assert r.buffered == 0


def test_default_fragment_bound_is_hit_with_1008() -> None:
    first = frame(0x02, b"")
    ok = first + frame(0x00) * (DEFAULT_MAX_FRAGMENTS - 2) + frame(0x80, b"z")
    assert feed_all(ok) == [b"z"]  # exactly DEFAULT_MAX_FRAGMENTS frames
    over = first + frame(0x00) * (DEFAULT_MAX_FRAGMENTS - 1) + frame(0x80, b"z")
    assert failure(over).code == 1008


def test_low_fragment_bound() -> None:
    assert feed_all(frame(0x02, b"a") + frame(0x80, b"b"), max_fragments=2) == [b"ab"]
    assert failure(frame(0x02) + frame(0x00) + frame(0x80), max_fragments=2).code == 1008


def test_fragment_count_restarts_per_message() -> None:
    one = frame(0x02, b"a") + frame(0x80, b"b")
    assert feed_all(one * 5, max_fragments=2) == [b"ab"] * 5


# -- close frames (§5.5.1, §7.4, §8.1) ---------------------------------------------------------


def test_empty_close_body_is_1005() -> None:
    r = reader()
    assert r.feed(frame(0x88)) == [Close(1005, "")]
    assert r.done


def test_close_with_code_and_reason() -> None:
    assert feed_all(close_frame(4000, "bye ✓".encode())) == [Close(4000, "bye ✓")]


def test_one_byte_close_body_fails_1002() -> None:
    assert failure(frame(0x88, b"\x03")).code == 1002


def test_close_code_1005_on_wire_fails_1002() -> None:
    assert failure(close_frame(1005)).code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000,
                                  65535])
def test_close_codes_never_sent_fail_1002(code: int) -> None:
    assert failure(close_frame(code)).code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1010, 1014, 3000, 4999])
def test_close_codes_that_may_be_sent(code: int) -> None:
    assert feed_all(close_frame(code, b"r")) == [Close(code, "r")]


def test_valid_close_code_is_rfc_6455_section_7_4() -> None:
    valid = {*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)}
    assert {c for c in range(70000) if valid_close_code(c)} == valid


def test_close_reason_not_utf8_fails_1007() -> None:
    assert failure(close_frame(1000, b"\xff")).code == 1007


def test_invalid_code_wins_over_bad_reason() -> None:
    assert failure(close_frame(1005, b"\xff")).code == 1002


# -- done -----------------------------------------------------------------------------------


def test_after_close_feed_returns_nothing_and_holds_nothing() -> None:
    r = reader()
    assert r.feed(frame(0x82, b"a") + close_frame(1000) + frame(0x82, b"b")) == [
        b"a", Close(1000, "")]
    assert r.done and r.buffered == 0
    assert r.feed(frame(0x82, b"c")) == [] and r.buffered == 0


def test_after_failure_feed_returns_nothing_and_holds_nothing() -> None:
    r = reader()
    assert r.feed(frame(0x02, b"abc") + frame(0x83)) == [Failure(1002, "reserved opcode")]
    assert r.done and r.buffered == 0
    assert r.feed(frame(0x82, b"c")) == [] and r.buffered == 0


def test_failure_keeps_the_events_before_it() -> None:
    assert feed_all(frame(0x82, b"a") + frame(0x89) + frame(0x82, b"b", masked=False)) == [
        b"a", Ping(b""), Failure(1002, "unmasked client frame")]


def test_constructor_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        FrameReader(max_message_bytes=-1)
    with pytest.raises(ValueError):
        FrameReader(max_message_bytes=1, max_fragments=0)
    with pytest.raises(ValueError):
        FrameReader(max_message_bytes=1, deflate=Deflate(server=False))
    with pytest.raises(ValueError):
        FrameWriter(server=True, deflate=Deflate(server=False))
    with pytest.raises(ValueError):
        FrameWriter(server=True, mask_key=ZERO_MASK_KEY)
    with pytest.raises(ValueError):
        FrameWriter(server=False, mask_key=b"abc")
    with pytest.raises(ValueError):
        Deflate(server=True, local_max_window_bits=8)
    with pytest.raises(ValueError):
        Deflate(server=True, remote_max_window_bits=16)


# -- splits ------------------------------------------------------------------------------------

MIXED = (frame(0x82, b"one") + frame(0x89, b"ping") + frame(0x82, b"\x00" * 126)
         + frame(0x01, "hé".encode()) + frame(0x8A) + frame(0x80, b"llo")
         + frame(0x02, b"") + frame(0x00, b"") + frame(0x80, b"frag")
         + frame(0x82, bytes(range(256)) * 3) + frame(0x82) + close_frame(1001, b"gone"))
MIXED_EVENTS: list[Event] = [
    b"one", Ping(b"ping"), b"\x00" * 126, Pong(b""), Text("héllo".encode()), b"frag",
    bytes(range(256)) * 3, b"", Close(1001, "gone")]


def test_mixed_stream_fed_whole() -> None:
    assert feed_all(MIXED) == MIXED_EVENTS


def test_mixed_stream_fed_one_byte_at_a_time() -> None:
    r = reader()
    events: list[Event] = []
    for i in range(len(MIXED)):
        events += r.feed(MIXED[i:i + 1])
        assert r.buffered <= LIMIT + 14
    assert events == MIXED_EVENTS


def test_mixed_stream_split_at_every_position() -> None:
    for i in range(len(MIXED) + 1):
        r = reader()
        assert r.feed(MIXED[:i]) + r.feed(MIXED[i:]) == MIXED_EVENTS, i


def test_mixed_stream_split_at_every_position_as_bytearrays() -> None:
    for i in range(0, len(MIXED) + 1, 7):
        r = reader()
        assert r.feed(bytearray(MIXED[:i])) + r.feed(bytearray(MIXED[i:])) == MIXED_EVENTS


def test_client_side_stream_split_at_every_position() -> None:
    w = FrameWriter(server=True)
    data = (w.message(b"a") + w.ping(b"x") + w.message(b"b" * 300) + w.frame(OP_TEXT, b"t")
            + w.close(1000, "ok"))
    want: list[Event] = [b"a", Ping(b"x"), b"b" * 300, Text(b"t"), Close(1000, "ok")]
    for i in range(len(data) + 1):
        r = reader(server=False)
        assert r.feed(data[:i]) + r.feed(bytearray(data[i:])) == want, i


# -- writer -----------------------------------------------------------------------------------


def test_binary_header_lengths() -> None:
    for n in (0, 1, 125, 126, 127, 65535, 65536):
        payload = b"\x01" * n
        assert feed_all(binary_header(n) + payload, server=False,
                        max_message_bytes=70000) == [payload]
    assert binary_header(5) == b"\x82\x05"
    assert binary_header(126) == b"\x82\x7e\x00\x7e"
    assert binary_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_client_message_with_a_zero_key_leaves_the_payload() -> None:
    assert client_message(b"abc") == b"\x82\x83\x00\x00\x00\x00abc"
    big = b"y" * 200
    assert client_message(big).endswith(ZERO_MASK_KEY + big)
    for n in (0, 125, 126, 65536):
        p = b"z" * n
        assert feed_all(client_message(p), max_message_bytes=70000) == [p]


def test_client_message_with_a_key_masks() -> None:
    data = client_message(b"Hello", KEY)
    assert data == b"\x82\x85" + KEY + b"\x7f\x9f\x4d\x51\x58"  # RFC 6455 §5.7
    assert feed_all(data) == [b"Hello"]


def test_server_writer_messages_joined() -> None:
    w = FrameWriter()
    payloads = [b"a", b"b" * 126, b"", b"c" * 70000]
    data = w.messages(payloads)
    assert data == b"".join(w.message(p) for p in payloads)
    assert feed_all(data, server=False, max_message_bytes=70000) == payloads


def test_client_writer_random_key_per_frame() -> None:
    w = FrameWriter(server=False)
    a, b = w.message(b"x" * 32), w.message(b"x" * 32)
    assert a != b  # two random keys: equal with chance 2^-32
    assert feed_all(a + b + w.ping(b"p") + w.pong(b"q")) == [b"x" * 32] * 2 + [
        Ping(b"p"), Pong(b"q")]


def test_client_writer_fixed_key() -> None:
    w = FrameWriter(server=False, mask_key=ZERO_MASK_KEY)
    assert w.message(b"abc") == client_message(b"abc")
    assert w.messages([b"a", b"b"]) == client_message(b"a") + client_message(b"b")
    assert w.pong(b"p") == b"\x8a\x81\x00\x00\x00\x00p"


def test_writer_writes_nothing_after_its_close() -> None:
    # RFC 6455 §5.5.1: no data frame, and no pong, after our close frame.
    w = FrameWriter()
    assert w.close(1000) == b"\x88\x02\x03\xe8"
    assert w.closed
    assert (w.message(b"x"), w.messages([b"x"]), w.ping(), w.pong(b"x"), w.close(1000),
            w.frame(OP_TEXT, b"t")) == (b"",) * 6


def test_close_reason_cut_on_a_utf8_boundary() -> None:
    reason = "€" * 60  # 180 bytes
    body = close_body(1000, reason)
    assert len(body) == 2 + 123 and body[2:].decode() == "€" * 41
    data = FrameWriter(server=False).close(4000, "a" + reason)
    assert len(data) == 2 + 4 + 2 + 121
    assert feed_all(data) == [Close(4000, "a" + "€" * 40)]
    assert close_body(1000, "x" * 200)[2:] == b"x" * 123


@pytest.mark.parametrize("code", [0, 1005, 1006, 1015, 2000, 5000])
def test_close_refuses_a_code_never_sent(code: int) -> None:
    w = FrameWriter()
    with pytest.raises(ValueError):
        w.close(code)
    assert not w.closed


def test_control_frames_over_125_bytes_are_refused() -> None:
    w = FrameWriter()
    with pytest.raises(ValueError):
        w.ping(b"x" * 126)
    with pytest.raises(ValueError):
        w.pong(b"x" * 126)


def test_raw_frames_for_fragmenting() -> None:
    w = FrameWriter(server=False, mask_key=KEY)
    data = (w.frame(OP_TEXT, b"a", fin=False) + w.frame(OP_CONT, b"b", fin=False)
            + w.frame(OP_CONT, b"c") + w.frame(OP_BINARY, b"d"))
    assert feed_all(data) == [Text(b"abc"), b"d"]


# -- permessage-deflate (RFC 7692) ------------------------------------------------------------


@pytest.mark.parametrize("no_context_takeover", [False, True])
def test_deflate_round_trip(no_context_takeover: bool) -> None:
    client = Deflate(server=False, local_no_context_takeover=no_context_takeover)
    server = Deflate(server=True, remote_no_context_takeover=no_context_takeover)
    w = FrameWriter(server=False, deflate=client)
    r = reader(deflate=server)
    payloads = [b"hello hello hello", b"", b"hello hello hello", bytes(range(200))]
    data = w.messages(payloads)
    assert data[0] == 0xC2  # RSV1: compressed (§6)
    assert r.feed(data) == payloads
    assert r.feed(w.ping(b"p")) == [Ping(b"p")]  # control frames are never compressed


def test_deflate_context_takeover_shrinks_repeats() -> None:
    w = FrameWriter(deflate=Deflate(server=True))
    first, second = w.message(b"abcdefgh" * 20), w.message(b"abcdefgh" * 20)
    assert len(second) < len(first)
    w2 = FrameWriter(deflate=Deflate(server=True, local_no_context_takeover=True))
    assert w2.message(b"abcdefgh" * 20) == w2.message(b"abcdefgh" * 20)


def test_uncompressed_message_on_a_deflate_connection() -> None:
    assert feed_all(frame(0x82, b"plain"), deflate=Deflate(server=True)) == [b"plain"]


def test_fragmented_compressed_message() -> None:
    body = Deflate(server=False).compress(b"fragmented " * 30)
    data = frame(0x42, body[:5]) + frame(0x89) + frame(0x00, body[5:9]) + frame(0x80, body[9:])
    assert feed_all(data, deflate=Deflate(server=True)) == [Ping(b""), b"fragmented " * 30]


def test_compressed_text_is_checked_after_inflating() -> None:
    good = Deflate(server=False).compress("é".encode())
    assert feed_all(frame(0xC1, good), deflate=Deflate(server=True)) == [Text("é".encode())]
    bad = Deflate(server=False).compress(b"\xff")
    assert failure(frame(0xC1, bad), deflate=Deflate(server=True)).code == 1007


def test_bad_compressed_data_fails_1002() -> None:
    assert failure(frame(0xC2, b"\xff\xff\xff\xff"), deflate=Deflate(server=True)).code == 1002


def test_compressed_message_over_the_limit_fails_1009() -> None:
    body = Deflate(server=False).compress(bytes(range(256)) * 4)  # incompressible-ish
    assert feed_all(frame(0xC2, body), deflate=Deflate(server=True),
                    max_message_bytes=1024) == [bytes(range(256)) * 4]
    assert failure(frame(0xC2, body), deflate=Deflate(server=True),
                   max_message_bytes=1023).code == 1009


def test_compressed_wire_size_is_bounded_before_inflating() -> None:
    assert failure(frame(0xC2, b"\x00" * (LIMIT + 1))[:8], deflate=Deflate(server=True)).code \
        == 1009


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    enc = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    out = b"".join(enc.compress(zeros) for _ in range(64))  # 64 MiB of zeros
    return out + enc.flush(zlib.Z_SYNC_FLUSH)[:-4]


def test_zip_bomb_is_bounded(zip_bomb: bytes) -> None:
    assert len(zip_bomb) < 128 * 1024
    r = reader(deflate=Deflate(server=True), max_message_bytes=128 * 1024)
    tracemalloc.start()
    try:
        events = r.feed(frame(0xC2, zip_bomb, key=ZERO_MASK_KEY))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert events == [Failure(1009, "message too big")]
    # The frame itself (< 128 KiB, unmasked once) and at most the limit inflated.
    assert peak < 4 * 128 * 1024 + len(zip_bomb)


def test_deflate_after_a_final_block_starts_a_fresh_context() -> None:
    # RFC 7692 §7.2.3.4: a sender may end a message with a BFINAL block.
    enc = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = enc.compress(b"first") + enc.flush(zlib.Z_FINISH)
    second = Deflate(server=False).compress(b"second")
    assert feed_all(frame(0xC2, first) + frame(0xC2, second),
                    deflate=Deflate(server=True)) == [b"first", b"second"]


def test_deflate_from_websockets_extension() -> None:
    ext = PerMessageDeflate(True, False, 12, 10, {"memLevel": 5, "level": 3})
    d = Deflate.from_extension(ext, server=True)
    assert (d.remote_no_context_takeover, d.local_no_context_takeover,
            d.remote_max_window_bits, d.local_max_window_bits, d.compress_level,
            d.mem_level, d.server) == (True, False, 12, 10, 3, 5, True)
    assert "remote_max_window_bits=12" in repr(d)
    plain = Deflate.from_extension(PerMessageDeflate(False, False, 15, 15), server=False)
    assert (plain.compress_level, plain.mem_level) == (6, 8)


# -- differential: websockets' parser is the reference ---------------------------------------

MAX = 70_000
LENGTHS = st.one_of(st.sampled_from([0, 1, 124, 125, 126, 127, 65535, 65536]),
                    st.integers(0, 300))
VALID_CODES = st.one_of(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1011, 1014]),
                        st.integers(3000, 4999))


@st.composite
def payloads(draw: Any, n: int) -> bytes:
    return random.Random(draw(st.integers(0, 2**32))).randbytes(n)


@st.composite
def texts(draw: Any, n: int) -> bytes:
    seed: bytes = draw(st.text(min_size=1, max_size=8)).encode()
    return (seed * (n // len(seed) + 1))[:n].decode("utf-8", "ignore").encode()


@st.composite
def messages(draw: Any) -> list[tuple[Opcode, bytes, bool]]:
    """One message as websockets frames (opcode, data, fin): a control frame, or a data
    message cut into fragments with control frames between them."""
    kind = draw(st.sampled_from(["binary", "binary", "text", "ping", "pong"]))
    if kind in ("ping", "pong"):
        n = draw(st.sampled_from([0, 1, 125]) | st.integers(0, 125))
        op = Opcode.PING if kind == "ping" else Opcode.PONG
        return [(op, draw(payloads(n)), True)]
    n = draw(LENGTHS)
    data = draw(payloads(n) if kind == "binary" else texts(n))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out: list[tuple[Opcode, bytes, bool]] = []
    for i, piece in enumerate(pieces):
        op = (Opcode.BINARY if kind == "binary" else Opcode.TEXT) if i == 0 else Opcode.CONT
        out.append((op, piece, i == len(pieces) - 1))
        if i < len(pieces) - 1 and draw(st.booleans()):
            out.append((Opcode.PING, draw(payloads(draw(st.integers(0, 125)))), True))
    return out


@st.composite
def streams(draw: Any) -> list[tuple[Opcode, bytes, bool]]:
    frames = [f for m in draw(st.lists(messages(), max_size=6)) for f in m]
    if draw(st.booleans()):
        reason = draw(st.text(max_size=40)).encode()[:123].decode("utf-8", "ignore")
        frames.append((Opcode.CLOSE, ws_frames.Close(draw(VALID_CODES), reason).serialize(),
                       True))
    elif draw(st.booleans()):
        frames.append((Opcode.CLOSE, b"", True))
    return frames


def cuts_of(draw: Any, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        yield data[a:b]


def serialize(frames: list[tuple[Opcode, bytes, bool]], keys: list[bytes], *, mask: bool,
              extensions: list[Any] | None = None) -> bytes:
    """websockets' own serializer, with the masking keys hypothesis drew."""
    it = iter(keys)
    fake = SimpleNamespace(token_bytes=lambda n: next(it))
    with patch.object(ws_frames, "secrets", fake):
        return b"".join(Frame(op, data, fin).serialize(mask=mask, extensions=extensions)
                        for op, data, fin in frames)


def websockets_events(side: Side, chunks: list[bytes], max_size: int,
                      extensions: list[Any] | None = None) -> list[Any]:
    """What websockets' Protocol makes of the chunks, as our events: fragments assembled
    into messages, control frames as they come, its failure as Failure(code)."""
    proto = Protocol(side, max_size=max_size)
    proto.extensions = extensions or []
    out: list[Any] = []
    current: tuple[Opcode, list[bytes]] | None = None
    for chunk in chunks:
        proto.receive_data(chunk)
        for f in proto.events_received():
            assert isinstance(f, Frame)
            if f.opcode in (Opcode.TEXT, Opcode.BINARY):
                current = (f.opcode, [bytes(f.data)])
            elif f.opcode is Opcode.CONT:
                assert current is not None
                current[1].append(bytes(f.data))
            elif f.opcode is Opcode.PING:
                out.append(Ping(bytes(f.data)))
            elif f.opcode is Opcode.PONG:
                out.append(Pong(bytes(f.data)))
            else:
                c = ws_frames.Close.parse(bytes(f.data))
                out.append(Close(int(c.code), c.reason))
            if f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT) and f.fin:
                assert current is not None
                data = b"".join(current[1])
                out.append(data if current[0] is Opcode.BINARY else Text(data))
                current = None
        if proto.parser_exc is not None:
            assert proto.close_sent is not None
            out.append(("failure", int(proto.close_sent.code)))
            break
    return out


def ours(events: list[Event]) -> list[Any]:
    return [("failure", e.code) if type(e) is Failure else e for e in events]


def feed_chunks(r: FrameReader, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += r.feed(chunk)
    return events


def without_controls_inside_messages(
        frames: list[tuple[Opcode, bytes, bool]]) -> list[tuple[Opcode, bytes, bool]]:
    out = []
    open_message = False
    for op, data, fin in frames:
        if op in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            open_message = not fin
        elif open_message:
            continue
        out.append((op, data, fin))
    return out


@PROPS
@given(st.data())
def test_same_events_as_websockets_on_client_frames(data: st.DataObject) -> None:
    frames = data.draw(streams())
    keys = data.draw(st.lists(st.binary(min_size=4, max_size=4), min_size=len(frames),
                              max_size=len(frames)))
    limit = data.draw(st.sampled_from([MAX, 65536, 200]))
    if limit != MAX:
        # websockets counts a control frame that comes between fragments against the
        # message's size limit; RFC 6455 §5.4 does not, and neither do we. Compare sizes
        # on streams where that cannot matter.
        frames = without_controls_inside_messages(frames)
    wire = serialize(frames, keys, mask=True)
    chunks = list(split(wire, cuts_of(data.draw, len(wire))))
    want = websockets_events(Side.SERVER, chunks, limit)
    got = ours(feed_chunks(FrameReader(max_message_bytes=limit), chunks))
    assert got == want


@PROPS
@given(st.data())
def test_same_events_as_websockets_on_server_frames(data: st.DataObject) -> None:
    frames = data.draw(streams())
    wire = serialize(frames, [], mask=False)
    chunks = list(split(wire, cuts_of(data.draw, len(wire))))
    want = websockets_events(Side.CLIENT, chunks, MAX)
    got = ours(feed_chunks(FrameReader(server=False, max_message_bytes=MAX), chunks))
    assert got == want


def write_ours(w: FrameWriter, frames: list[tuple[Opcode, bytes, bool]],
               whole: bool) -> bytes:
    """The frames as our writer makes them: whole binary messages through message(), the
    rest (and every binary message when not `whole`) as raw frames."""
    out = []
    for op, data, fin in frames:
        if op is Opcode.BINARY and fin and whole:
            out.append(w.message(data))
        elif op is Opcode.PING:
            out.append(w.ping(data))
        elif op is Opcode.PONG:
            out.append(w.pong(data))
        elif op is Opcode.CLOSE:
            if data:
                c = ws_frames.Close.parse(data)
                out.append(w.close(c.code, c.reason))
            else:
                out.append(w.frame(OP_CLOSE, b""))
        else:
            out.append(w.frame(int(op), data, fin=fin))
    return b"".join(out)


@PROPS
@given(st.data())
def test_websockets_reads_what_our_client_writer_writes(data: st.DataObject) -> None:
    frames = data.draw(streams())
    key = data.draw(st.sampled_from([None, ZERO_MASK_KEY, KEY]))
    wire = write_ours(FrameWriter(server=False, mask_key=key), frames, data.draw(st.booleans()))
    want = websockets_events(Side.SERVER, [wire], MAX)
    assert ours(FrameReader(max_message_bytes=MAX).feed(wire)) == want
    assert want == websockets_events(Side.SERVER, [serialize(frames, [KEY] * len(frames),
                                                             mask=True)], MAX)


@PROPS
@given(st.data())
def test_websockets_reads_what_our_server_writer_writes(data: st.DataObject) -> None:
    frames = data.draw(streams())
    wire = write_ours(FrameWriter(), frames, data.draw(st.booleans()))
    want = websockets_events(Side.CLIENT, [wire], MAX)
    assert want == websockets_events(Side.CLIENT, [serialize(frames, [], mask=False)], MAX)
    assert ours(FrameReader(server=False, max_message_bytes=MAX).feed(wire)) == want


DEFLATE_PARAMS = st.tuples(st.booleans(), st.booleans(), st.integers(9, 15), st.integers(9, 15))


def binary_messages(frames: list[tuple[Opcode, bytes, bool]]) -> list[bytes]:
    return [d for op, d, fin in frames if op is Opcode.BINARY and fin]


@PROPS
@given(st.data())
def test_websockets_inflates_what_our_deflate_writes(data: st.DataObject) -> None:
    client_nct, server_nct, client_bits, server_bits = data.draw(DEFLATE_PARAMS)
    msgs = binary_messages(data.draw(streams()))
    ours_client = Deflate(server=False, local_no_context_takeover=client_nct,
                          local_max_window_bits=client_bits,
                          remote_no_context_takeover=server_nct,
                          remote_max_window_bits=server_bits)
    theirs_server = PerMessageDeflate(client_nct, server_nct, client_bits, server_bits)
    wire = FrameWriter(server=False, deflate=ours_client).messages(msgs)
    assert websockets_events(Side.SERVER, [wire], MAX, [theirs_server]) == msgs
    # and the other way: our server writer, their client
    ours_server = Deflate(server=True, local_no_context_takeover=server_nct,
                          local_max_window_bits=server_bits,
                          remote_no_context_takeover=client_nct,
                          remote_max_window_bits=client_bits)
    theirs_client = PerMessageDeflate(server_nct, client_nct, server_bits, client_bits)
    wire = FrameWriter(deflate=ours_server).messages(msgs)
    assert websockets_events(Side.CLIENT, [wire], MAX, [theirs_client]) == msgs


@PROPS
@given(st.data())
def test_we_inflate_what_websockets_deflate_writes(data: st.DataObject) -> None:
    client_nct, server_nct, client_bits, server_bits = data.draw(DEFLATE_PARAMS)
    frames = [f for f in data.draw(streams()) if f[0] is not Opcode.CLOSE]
    theirs_client = PerMessageDeflate(server_nct, client_nct, server_bits, client_bits)
    wire = serialize(frames, [KEY] * len(frames), mask=True, extensions=[theirs_client])
    chunks = list(split(wire, cuts_of(data.draw, len(wire))))
    theirs_server = PerMessageDeflate(client_nct, server_nct, client_bits, server_bits)
    want = websockets_events(Side.SERVER, [wire], MAX, [theirs_server])
    deflate = Deflate.from_extension(
        PerMessageDeflate(client_nct, server_nct, client_bits, server_bits), server=True)
    got = ours(feed_chunks(FrameReader(max_message_bytes=MAX, deflate=deflate), chunks))
    assert got == want


# -- fuzz: whatever arrives, feed never raises and holds at most the limit -----------------

FUZZ_LIMIT = 300


def check_events(events: list[Event], r: FrameReader, limit: int) -> None:
    for i, ev in enumerate(events):
        t = type(ev)
        assert t in (bytes, Text, Ping, Pong, Close, Failure), ev
        if t is bytes:
            assert len(ev) <= limit  # type: ignore[arg-type]
        elif t is Text:
            assert len(ev.data) <= limit  # type: ignore[union-attr]
            ev.data.decode()  # type: ignore[union-attr]
        elif t is Ping or t is Pong:
            assert len(ev.data) <= 125  # type: ignore[union-attr]
        elif t is Close:
            assert ev.code == 1005 or valid_close_code(ev.code)  # type: ignore[union-attr]
            assert (ev.code == 1005) <= (ev.reason == "")  # type: ignore[union-attr]
        else:
            assert ev.code in (1002, 1007, 1008, 1009)  # type: ignore[union-attr]
        if t is Close or t is Failure:
            assert i == len(events) - 1 and r.done and r.buffered == 0


def fuzz_feed(chunks: list[bytes], **kw: Any) -> None:
    r = FrameReader(max_message_bytes=FUZZ_LIMIT, max_fragments=8, **kw)
    events: list[Event] = []
    for chunk in chunks:
        was_done = r.done
        out = r.feed(chunk)
        if was_done:
            assert out == []
        events += out
        # The fragments of an open message (at most the limit) plus one partial frame: a
        # data frame's is refused from its header past what the limit leaves (+14 bytes
        # of header), but a control frame may come between fragments, and its partial
        # frame is up to 125 + 6 bytes whatever the fragments hold.
        assert r.buffered <= FUZZ_LIMIT + 131
    check_events(events, r, FUZZ_LIMIT)


HEADS = st.sampled_from([0x82, 0x02, 0x00, 0x80, 0x81, 0x01, 0x88, 0x89, 0x8A, 0xC2, 0xC0,
                         0x42, 0xA2, 0x83, 0x09])


@st.composite
def rough_frames(draw: Any) -> bytes:
    """A frame that is nearly valid: any first byte from a list, masked or not, lengths
    around the limits."""
    b0 = draw(HEADS | st.integers(0, 255))
    n = draw(st.sampled_from([0, 1, 2, 125, 126, FUZZ_LIMIT, FUZZ_LIMIT + 1]) | st.integers(0, 40))
    payload = draw(st.binary(min_size=min(n, 40), max_size=min(n, 40)))
    payload = (payload * (n // max(1, len(payload)) + 1))[:n] if payload else bytes(n)
    return frame(b0, payload, masked=draw(st.booleans()))


@FUZZ
@given(st.binary(max_size=400), st.data())
def test_fuzz_arbitrary_bytes(raw: bytes, data: st.DataObject) -> None:
    chunks = list(split(raw, cuts_of(data.draw, len(raw))))
    fuzz_feed(chunks)
    fuzz_feed(chunks, server=False)
    fuzz_feed(chunks, deflate=Deflate(server=True))


@FUZZ
@given(st.lists(rough_frames(), max_size=12), st.data())
def test_fuzz_nearly_valid_frames(frames: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(frames)
    chunks = list(split(raw, cuts_of(data.draw, len(raw))))
    fuzz_feed(chunks)
    fuzz_feed(chunks, deflate=Deflate(server=True))


@FUZZ
@given(streams(), st.data())
def test_fuzz_mutated_valid_streams(frames: list[tuple[Opcode, bytes, bool]],
                                    data: st.DataObject) -> None:
    raw = bytearray(serialize(frames, [KEY] * len(frames), mask=True))
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if how == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del raw[i]
    chunks = list(split(bytes(raw), cuts_of(data.draw, len(raw))))
    fuzz_feed(chunks)
    fuzz_feed(chunks, deflate=Deflate(server=True))
