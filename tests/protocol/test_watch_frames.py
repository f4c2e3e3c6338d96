"""`watch` / `unwatch` and the `presence` event (docs/protocol.md §6.1, §10), fed as
bytes: no sockets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from openred.protocol.errors import BAD_FRAME, UNKNOWN_TYPE, FrameError
from openred.protocol.frames import Unwatch, Watch, decode_client, encode_presence

NODE = "node-1"
HEX_NODE = bytes(range(32)).hex()


def one(value: Any) -> Any:
    (frame,) = decode_client(msgpack.packb(value, use_bin_type=True))
    return frame


@pytest.mark.parametrize(("t", "cls"), [("watch", Watch), ("unwatch", Unwatch)])
class TestWatchAndUnwatch:
    def test_nodes_and_topic(self, t: str, cls: type) -> None:
        res = one({"t": t, "id": 1, "nodes": [NODE, HEX_NODE], "topic": "a/b"})
        assert res == cls(1, [NODE, HEX_NODE], "a/b")

    def test_nodes_only_and_topic_only(self, t: str, cls: type) -> None:
        assert one({"t": t, "id": "w", "nodes": [NODE]}) == cls("w", [NODE], None)
        assert one({"t": t, "topic": "x"}) == cls(None, None, "x")

    def test_repeated_nodes_count_once(self, t: str, cls: type) -> None:
        assert one({"t": t, "nodes": [NODE, HEX_NODE, NODE]}).nodes == [NODE, HEX_NODE]

    def test_empty_nodes_list_is_given(self, t: str, cls: type) -> None:
        assert one({"t": t, "id": 2, "nodes": []}) == cls(2, [], None)

    @pytest.mark.parametrize("fields", [
        {}, {"nodes": None}, {"topic": None}, {"nodes": None, "topic": None},
        {"nodes": NODE}, {"nodes": {NODE: True}}, {"nodes": [NODE, 1]},
        {"nodes": ["bad id"]}, {"nodes": [""]}, {"nodes": ["x" * 129]}, {"nodes": [b"n"]},
        {"nodes": ["$admin"]}, {"topic": "bad topic"}, {"topic": ""}, {"topic": 7},
        {"topic": "t" * 201}, {"nodes": [NODE], "topic": "no spaces"},
    ])
    def test_bad_fields(self, t: str, cls: type, fields: dict[str, Any]) -> None:
        res = one({"t": t, "id": 9, **fields})
        assert type(res) is FrameError and (res.id, res.code) == (9, BAD_FRAME), res

    def test_bad_id(self, t: str, cls: type) -> None:
        res = one({"t": t, "id": -1, "nodes": [NODE]})
        assert (res.id, res.code) == (None, BAD_FRAME)


def test_presence_event_is_not_a_client_frame() -> None:
    res = one({"t": "presence_event", "id": 3})
    assert (res.id, res.code) == (3, UNKNOWN_TYPE)


def test_encode_presence() -> None:
    assert msgpack.unpackb(encode_presence(NODE, True, 1700000000000)) == {
        "t": "presence", "node": NODE, "online": True, "ts": 1700000000000}
    assert msgpack.unpackb(encode_presence(NODE, False, 5, "room")) == {
        "t": "presence", "node": NODE, "online": False, "ts": 5, "topic": "room"}
