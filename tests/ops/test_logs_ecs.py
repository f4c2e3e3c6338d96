"""`log.format = "ecs"` (hub/log.py): one line of each kind an operator searches for,
written by a real hub (node connect, node disconnect, a failed authentication, an
error with its exception), checked against the Elastic Common Schema: every field is an
ECS field of the right type, or under the hub's own `openred.` namespace.

ECS_FIELDS is the part of the ECS 8.11 field reference (elastic/ecs,
generated/csv/fields.csv) that the hub writes, with each field's type, and the allowed
values of the categorization fields.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from typing import Any

import pytest
from openred.hub.log import ECS_VERSION, EcsFormatter
from openred.protocol.identity import Identity

from tests.hub.nodes import RawNode, eventually

ECS_FIELDS: dict[str, str] = {
    "@timestamp": "date",
    "message": "match_only_text",
    "ecs.version": "keyword",
    "log.level": "keyword",
    "log.logger": "keyword",
    "service.name": "keyword",
    "service.node.name": "keyword",
    "event.action": "keyword",
    "event.category": "keyword",
    "event.dataset": "keyword",
    "event.duration": "long",
    "event.kind": "keyword",
    "event.outcome": "keyword",
    "event.reason": "keyword",
    "event.type": "keyword",
    "client.ip": "ip",
    "error.message": "match_only_text",
    "error.stack_trace": "wildcard",
    "error.type": "keyword",
    "http.request.id": "keyword",
    "http.request.method": "keyword",
    "http.response.status_code": "long",
}
ALLOWED = {
    "event.kind": {"alert", "asset", "enrichment", "event", "metric", "state",
                   "pipeline_error", "signal"},
    "event.category": {"api", "authentication", "configuration", "database", "driver",
                       "email", "file", "host", "iam", "intrusion_detection", "library",
                       "malware", "network", "package", "process", "registry", "session",
                       "threat", "vulnerability", "web"},
    "event.type": {"access", "admin", "allowed", "change", "connection", "creation",
                   "deletion", "denied", "end", "error", "group", "indicator", "info",
                   "installation", "protocol", "start", "user"},
    "event.outcome": {"failure", "success", "unknown"},
}


def leaves(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def check_ecs(line: str) -> dict[str, Any]:
    """The line's fields (dotted), after checking each against ECS_FIELDS."""
    fields = leaves(json.loads(line))
    for name, value in fields.items():
        if name.startswith("openred."):
            continue
        assert name in ECS_FIELDS, f"{name} is neither an ECS field nor under openred."
        kind = ECS_FIELDS[name]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if kind == "long":
                assert type(v) is int, (name, v)
            elif kind == "ip":
                ipaddress.ip_address(v)
            elif kind == "date":
                datetime.datetime.strptime(v, "%Y-%m-%dT%H:%M:%S.%fZ")
            else:
                assert isinstance(v, str), (name, v)
            if name in ALLOWED:
                assert v in ALLOWED[name], (name, v)
    for required in ("@timestamp", "log.level", "message", "ecs.version", "event.action"):
        assert required in fields, (required, fields)
    assert fields["ecs.version"] == ECS_VERSION
    return fields


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(EcsFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def of(self, action: str) -> list[dict[str, Any]]:
        found = [check_ecs(line) for line in self.lines if f'"{action}"' in line]
        return [f for f in found if f["event.action"] == action]


@pytest.fixture
def lines() -> Any:
    handler = Lines()
    logger = logging.getLogger("openred")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_one_line_of_each_kind_in_ecs_fields(make_hub: Any, lines: Lines,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hub = await make_hub()
    node = await RawNode.connect(hub)
    await node.close()
    await eventually(lambda: lines.of("node_disconnected"))

    (connected,) = lines.of("node_connected")
    assert connected["openred.node"] == node.node_id
    assert connected["client.ip"] == "127.0.0.1"
    assert connected["openred.session"] == node.welcome["session"]
    assert (connected["event.category"], connected["event.type"],
            connected["event.outcome"]) == (["session"], ["start"], "success")
    assert connected["log.level"] == "info" and connected["service.name"] == "openred-hub"

    (gone,) = lines.of("node_disconnected")
    assert gone["openred.node"] == node.node_id
    assert gone["openred.session"] == node.welcome["session"]
    assert gone["openred.close_code"] == 1000  # the client's close, echoed
    assert gone["event.type"] == ["end"] and gone["event.duration"] >= 0

    # A hello signed for another challenge: refused, the claimed node id in the line
    # (and in the audit event, README.md).
    ident = Identity.generate()
    bad = await RawNode.open(hub, ident)
    await bad.send({"t": "hello", "v": 1, "key": ident.public_key,
                    "sig": ident.sign_auth(bad.challenge["hub"], b"x" * 32)})
    code, _ = await bad.closed()
    assert code == 4001
    (failed,) = lines.of("auth_failed")
    assert failed["openred.node"] == ident.public_key.hex()
    assert failed["event.outcome"] == "failure" and failed["event.category"] == [
        "authentication"]
    assert failed["event.reason"] and failed["client.ip"] == "127.0.0.1"
    events = await hub.store.audit_query(None, "auth_failed", None, 10, None)
    assert [e.node for e in events] == [ident.public_key.hex()]

    # An error with its exception: the store failing in a way it should not.
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(hub.node.store, "session_start", broken)
    victim = await RawNode.open(hub, Identity.generate())
    assert victim.identity is not None
    await victim.send({"t": "hello", "v": 1, "key": victim.identity.public_key,
                       "sig": victim.identity.sign_auth(victim.challenge["hub"],
                                                        victim.challenge["nonce"])})
    code, _ = await victim.closed()
    assert code == 1011
    (error,) = lines.of("handshake_failed")
    assert error["log.level"] == "error"
    assert (error["error.type"], error["error.message"]) == ("RuntimeError", "boom")
    assert "Traceback" in error["error.stack_trace"]
