"""The `/v1/` operator routes (README.md "Operator surface"): nodes, bans, kicks,
server-side send and publish, message state, audit, token issuing, stats, and the
OpenAPI document; plus the middleware every admin request passes through.

Owned here: `ROUTES` (the one route table: the router and `/v1/openapi.json` are both
built from it), the request schemas (`components(cfg)`), bearer auth, request ids, the
`admin_call` audit trail and the translation of every error into problem+json.

Choices an operator can rely on (also stated in the OpenAPI document):

- Auth: `Authorization: Bearer <token>`, matched in constant time against every one of
  `admin.tokens` (admin_http/tokens.py); with none configured every `/v1/` route but
  `/v1/openapi.json` (open, as documentation is) answers 401. Auth is checked before
  routing, so without a token an unknown `/v1/` path is a 401 too. Each route needs a
  scope (`Route.scope`: read, write or admin; in the document as the security
  requirement and `x-openred-scope`); a token below it gets 403, audited as
  `admin_forbidden`. A token is never logged nor audited: calls are attributed to its
  name (an old-style token's is the first 8 hex digits of its SHA-256).
- Abuse limits (admin_http/guard.py), decided before the handler: per client IP and
  per token, at the route's cost (`x-openred-cost`), and the lockout of an IP after
  `admin.max_auth_failures` bad tokens: 429 with `Retry-After`. With the Redis broker
  every instance counts together.
- Errors are problem+json: 400 bad parameter, cursor or JSON; 401; 403 out of scope;
  404 unknown route, node or mid; 405; 409 a state conflict (queue full, no signing
  key); 413 body too large; 415 not JSON; 422 a body that breaks its schema (unknown
  members included, named in `field`); 429 too many requests or locked out; 503 store
  or broker unavailable; 500 anything else.
- Lists are pages `{"items", "next_cursor"}`; the cursor is opaque. A filtered page
  (`?online=`) may hold fewer than `limit` items (even none) with a `next_cursor`: the
  list ends only when `next_cursor` is null.
- `POST /v1/messages` answers 202 with `status` `sent` (QoS 0, delivered to a session),
  `stored` (QoS 1, durable) or `no_route` (QoS 0 to a node with no session anywhere:
  dropped, as a node's own `send` gets `error no_route`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from aiohttp import web
from openred.admin_http.guard import AdminGuard, client_ip
from openred.admin_http.openapi import Param, Resp, Route, build_document, check, parse_param
from openred.admin_http.problems import PROBLEM_CONTENT_TYPE, Problem, problem_response
from openred.admin_http.tokens import AdminToken, TokenTable, parse_token, scope_allows
from openred.hub.broker import BrokerUnavailable
from openred.hub.node import ADMIN_SENDER
from openred.hub.ratelimit import TokenBucket
from openred.hub.revocations import NEVER
from openred.hub.session import CLOSED
from openred.hub.tokens import MAX_TOKEN_CHARS, TokenIssuer
from openred.persistence.store import NodeRecord, QueueFull, StoreUnavailable
from openred.protocol import errors as E
from openred.protocol.frames import MAX_META_BYTES
from openred.protocol.identity import is_node_id

if TYPE_CHECKING:
    from openred.hub.config import Config
    from openred.hub.node import HubNode
    from prometheus_client.registry import CollectorRegistry

__all__ = ["ROUTES", "add_routes", "components", "openapi_document"]

log = logging.getLogger("openred.admin")

REALM = 'Bearer realm="openred-hub"'
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
NODE_SCAN_PAGE = 500  # store page size while filtering nodes by ?online=
NODE_SCAN_MAX = 10_000  # nodes looked at per filtered request before a short page
MAX_TOKEN_TTL_S = 366 * 86400
MAX_TOKEN_TOPICS = 20  # keeps every token under MAX_TOKEN_CHARS, whatever the key
MAX_SAFE_INT = 2**53 - 1
FAILED_AUTH_AUDIT_PER_S = 5.0  # bounded, so a token-less client cannot flood the log
FAILED_AUTH_AUDIT_BURST = 20.0

NODE_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
TOPIC_PATTERN = r"^[A-Za-z0-9._:/\-]{1,200}$"
TOPIC_CLAIM_PATTERN = r"^(?:[A-Za-z0-9._:/\-]{1,200}|[A-Za-z0-9._:/\-]{0,200}\*)$"
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
KEY_HEX_PATTERN = r"^[0-9A-Fa-f]{64}$"
MID_PATTERN = r"^[0-9A-Za-z]{1,64}$"
KIND_PATTERN = r"^[a-z_]{1,32}$"

# Request storage keys (web.RequestKey from aiohttp 3.13; plain strings before it).
_RequestKey: Any = getattr(web, "RequestKey", None)
_RID_KEY: Any = _RequestKey("openred.request_id", str) if _RequestKey else "openred.request_id"
_TID_KEY: Any = _RequestKey("openred.token_id", str) if _RequestKey else "openred.token_id"
_IP_KEY: Any = _RequestKey("openred.client_ip", str) if _RequestKey else "openred.client_ip"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- schemas -------------------------------------------------------------------------------


def _obj(required: list[str], props: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props, **kw}


_INT = {"type": "integer"}
_OPT_INT = {"type": ["integer", "null"]}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}


def body_b64_max_chars(max_body_bytes: int) -> int:
    return 4 * -(-max_body_bytes // 3)


def components(cfg: Config) -> dict[str, Any]:
    """Every schema of the document; the request schemas are also what bodies are
    checked against (with the limits of this configuration)."""
    b64 = {"type": "string", "pattern": BASE64_PATTERN,
           "maxLength": body_b64_max_chars(cfg.limits.max_body_bytes),
           "description": "the body, standard base64 (RFC 4648 §4, padded); at most "
                          f"limits.max_body_bytes ({cfg.limits.max_body_bytes}) once decoded"}
    node_id = {"type": "string", "pattern": NODE_ID_PATTERN}
    return {
        "Problem": _obj(["type", "title", "status", "detail"], {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "field": {"type": "string", "description": "the member or parameter at fault"},
        }, description="RFC 9457 problem details"),
        "Health": _obj(["status"], {"status": {"type": "string", "enum": ["ok"]}}),
        "Readiness": _obj(["status"], {
            "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
            "failed": {"type": "array", "items": {"type": "string"}}}),
        "Node": _obj(
            ["id", "key", "online", "instance", "meta", "banned", "first_seen", "last_seen"],
            {"id": {"type": "string"},
             "key": {"type": ["string", "null"], "description": "Ed25519 public key, hex"},
             "online": {"type": "boolean"},
             "instance": {"type": ["string", "null"],
                          "description": "instance holding the session when known"},
             "meta": {"type": "object"},
             "banned": {"type": "boolean"},
             "first_seen": {**_INT, "description": "ms since the epoch"},
             "last_seen": {**_INT, "description": "ms since the epoch"}}),
        "NodeList": _obj(["items", "next_cursor"], {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
            "next_cursor": {"type": ["string", "null"]}}),
        "PutNode": _obj(["meta"], {
            "meta": {"type": "object", "maxProperties": 64,
                     "description": f"at most {MAX_META_BYTES} bytes as JSON"},
            "key": {"type": ["string", "null"], "pattern": KEY_HEX_PATTERN,
                    "description": "Ed25519 public key (hex); omitted or null keeps the "
                                   "known one"}},
            additionalProperties=False),
        "AuditEvent": _obj(["id", "ts", "kind", "node", "ip", "detail"], {
            "id": _INT, "ts": {**_INT, "description": "ms since the epoch"},
            "kind": {"type": "string"}, "node": {"type": ["string", "null"]},
            "ip": {"type": ["string", "null"]}, "detail": {"type": "object"}}),
        "AuditList": _obj(["items", "next_cursor"], {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
            "next_cursor": {"type": ["string", "null"]}}),
        "MessageToNode": _obj(["to", "body_b64"], {
            "to": node_id, "body_b64": b64,
            "qos": {"type": "integer", "enum": [0, 1], "default": 0},
            "ttl": {"type": "integer", "minimum": 1, "maximum": cfg.store.message_ttl_s,
                    "description": "seconds a QoS 1 message is kept (default "
                                   "store.message_ttl_s); ignored for QoS 0"}},
            additionalProperties=False),
        "MessageToTopic": _obj(["topic", "body_b64"], {
            "topic": {"type": "string", "pattern": TOPIC_PATTERN}, "body_b64": b64,
            "qos": {"type": "integer", "enum": [0], "default": 0,
                    "description": "topics are QoS 0"}},
            additionalProperties=False),
        "SendMessage": {"oneOf": [{"$ref": "#/components/schemas/MessageToNode"},
                                  {"$ref": "#/components/schemas/MessageToTopic"}]},
        "MessageAccepted": _obj(["mid", "status"], {
            "mid": {"type": "string"},
            "status": {"type": "string", "enum": ["sent", "stored", "no_route"],
                       "description": "sent: QoS 0 written to a session (or topic "
                                      "published); stored: QoS 1 kept durably; no_route: "
                                      "QoS 0 to a node with no session, dropped"},
            "seq": {**_INT, "description": "the topic sequence (topic publish only)"}}),
        "MessageState": _obj(
            ["mid", "from", "to", "qos", "state", "created", "delivered", "acked"],
            {"mid": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
             "qos": _INT,
             "state": {"type": "string", "enum": ["stored", "delivered", "acked", "expired"]},
             "created": _INT, "delivered": _OPT_INT, "acked": _OPT_INT}),
        "IssueToken": _obj(["sub"], {
            "sub": node_id,
            "ttl_s": {"type": "integer", "minimum": 1, "maximum": MAX_TOKEN_TTL_S,
                      "default": 3600},
            "topics": {"type": "array", "maxItems": MAX_TOKEN_TOPICS,
                       "items": {"type": "string", "pattern": TOPIC_CLAIM_PATTERN},
                       "description": "allowed topics ('a/*' for a prefix); omitted: all"}},
            additionalProperties=False),
        "RevokeJti": _obj(["jti"], {
            "jti": {"type": "string", "minLength": 1, "maxLength": 256,
                    "description": "the token's jti claim"},
            "expires": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT,
                        "description": "ms since the epoch after which the revocation "
                                       "may be forgotten (the token's exp); default a "
                                       "year from now"}},
            additionalProperties=False),
        "RevokeNode": _obj(["node"], {
            "node": node_id,
            "before": {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT,
                       "description": "ms since the epoch: tokens of the node whose iat "
                                      "is earlier are revoked (default and at most: now)"},
            "kick": {"type": "boolean", "default": False,
                     "description": "also close the node's session, wherever it is "
                                    "(4012)"}},
            additionalProperties=False),
        "RevokeTokens": {"oneOf": [{"$ref": "#/components/schemas/RevokeJti"},
                                   {"$ref": "#/components/schemas/RevokeNode"}]},
        "Revocation": _obj(["kind", "subject", "issued_before", "created", "expires"], {
            "kind": {"type": "string", "enum": ["jti", "node"]},
            "subject": {"type": "string", "description": "the jti, or the node id"},
            "issued_before": {**_OPT_INT, "description": "node: tokens with an earlier "
                                                        "iat (ms) are refused"},
            "created": {**_INT, "description": "ms since the epoch"},
            "expires": {**_INT, "description": "ms since the epoch (2^63-1: never)"}}),
        "TokenIssued": _obj(["token", "expires"], {
            "token": {"type": "string"},
            "expires": {**_INT, "description": "ms since the epoch (the exp claim)"},
            "algorithm": {"type": "string"}}),
        "Stats": _obj(["instances"], {"instances": {
            "type": "array", "description": "this instance (the one answering)",
            "items": _obj(["instance", "connections"], {
                "instance": {"type": "string"}, "hub_id": {"type": "string"},
                "clustered": {"type": "boolean"}, "connections": _INT, "topics": _INT,
                "frames_in": _COUNTS, "frames_out": _COUNTS, "routed": _COUNTS,
                "handshakes": _COUNTS, "auth_failures": _COUNTS, "rate_limited": _INT,
                "slow_consumer_disconnects": _INT})}}),
    }


# -- one admin call ------------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """What a handler gets: the request, the hub, and its checked inputs."""

    request: web.Request
    hub: HubNode
    path: dict[str, Any]
    query: dict[str, Any]
    body: Any

    @property
    def token_id(self) -> str:
        return str(self.request.get(_TID_KEY, ""))

    @property
    def request_id(self) -> str:
        return str(self.request.get(_RID_KEY, ""))

    def audit(self, kind: str, node: str | None, **detail: Any) -> None:
        self.hub.store.audit_nowait(kind, node, self.request.get(_IP_KEY),
                                    {"token": self.token_id, "request_id": self.request_id,
                                     **detail}, _now_ms())


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, separators=(",", ":")),
                        content_type="application/json", headers=headers)


# -- cursors (opaque: base64url of a versioned position) ---------------------------------


def _encode_cursor(kind: str, position: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}1:{position}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None, kind: str) -> str | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise Problem(400, "cursor: not a cursor of this list", field="cursor") from None
    prefix = f"{kind}1:"
    if not raw.startswith(prefix):
        raise Problem(400, "cursor: not a cursor of this list", field="cursor")
    return raw[len(prefix):]


def _node_cursor(cursor: str | None) -> str | None:
    after = _decode_cursor(cursor, "n")
    if after is not None and not is_node_id(after):
        raise Problem(400, "cursor: not a cursor of this list", field="cursor")
    return after


def _audit_cursor(cursor: str | None) -> int | None:
    before = _decode_cursor(cursor, "a")
    if before is None:
        return None
    if not re.fullmatch(r"[1-9][0-9]{0,15}", before):
        raise Problem(400, "cursor: not a cursor of this list", field="cursor")
    return int(before)


# -- nodes ---------------------------------------------------------------------------------


async def _node_views(hub: HubNode, recs: list[NodeRecord]) -> list[dict[str, Any]]:
    """Node shapes; online/instance from the local registry, then cluster presence."""
    where: dict[str, str | None] = {}
    elsewhere = []
    for r in recs:
        s = hub.local.get(r.id)
        if s is not None and s.state is not CLOSED:
            where[r.id] = hub.instance_id
        else:
            elsewhere.append(r.id)
    if hub.clustered and elsewhere:
        # Presence says whether, not where: the holding instance is not known here.
        online = await hub.broker.presence(elsewhere)
    else:
        online = {}
    return [{"id": r.id, "key": r.key.hex() if r.key is not None else None,
             "online": r.id in where or bool(online.get(r.id)),
             "instance": where.get(r.id), "meta": r.meta, "banned": r.banned,
             "first_seen": r.first_seen, "last_seen": r.last_seen} for r in recs]


async def _node_view(hub: HubNode, rec: NodeRecord) -> dict[str, Any]:
    return (await _node_views(hub, [rec]))[0]


async def _known_node(call: Call) -> NodeRecord:
    node_id = call.path["id"]
    rec = await call.hub.store.get_node(node_id)
    if rec is None:
        raise Problem(404, "unknown node", field="id")
    return rec


async def list_nodes(call: Call) -> web.Response:
    hub, q = call.hub, call.query
    limit: int = q.get("limit", DEFAULT_LIMIT)
    after = _node_cursor(q.get("cursor"))
    want: bool | None = q.get("online")
    if want is None:
        recs = await hub.store.list_nodes(limit + 1, after)
        page = recs[:limit]
        items = await _node_views(hub, page)
        nxt = page[-1].id if len(recs) > limit else None
        return _page(items, nxt, "n")
    items = []
    scanned = 0
    position = after
    while True:
        recs = await hub.store.list_nodes(NODE_SCAN_PAGE, position)
        for view in await _node_views(hub, recs):
            if view["online"] is want:
                if len(items) == limit:
                    return _page(items, items[-1]["id"], "n")
                items.append(view)
        if len(recs) < NODE_SCAN_PAGE:
            return _page(items, None, "n")
        position = recs[-1].id
        scanned += len(recs)
        if scanned >= NODE_SCAN_MAX:
            return _page(items, position, "n")


def _page(items: list[dict[str, Any]], position: str | None, kind: str) -> web.Response:
    return _json({"items": items,
                  "next_cursor": None if position is None else _encode_cursor(kind, position)})


async def get_node(call: Call) -> web.Response:
    return _json(await _node_view(call.hub, await _known_node(call)))


async def put_node(call: Call) -> web.Response:
    node_id, body = call.path["id"], call.body
    meta = body["meta"]
    if len(json.dumps(meta, separators=(",", ":")).encode()) > MAX_META_BYTES:
        raise Problem(422, f"meta: larger than {MAX_META_BYTES} bytes as JSON", field="meta")
    try:  # the limits of a hello's meta (§2), which is msgpack
        packed = msgpack.packb(meta)
    except (OverflowError, ValueError, TypeError):
        raise Problem(422, "meta: not representable in msgpack (integers must fit in "
                           "64 bits)", field="meta") from None
    if len(packed) > MAX_META_BYTES:
        raise Problem(422, f"meta: larger than {MAX_META_BYTES} bytes", field="meta")
    key = bytes.fromhex(body["key"]) if body.get("key") is not None else None
    rec, created = await call.hub.store.put_node(node_id, meta, key, _now_ms())
    view = await _node_view(call.hub, rec)
    if created:
        return _json(view, 201, headers={"Location": f"/v1/nodes/{node_id}"})
    return _json(view)


async def _close_everywhere(call: Call, node_id: str, code: int, command: str,
                            reason: str) -> bool:
    """Close the node's session wherever it is: here, or through the broker."""
    hub = call.hub
    closed = hub.close_node(node_id, code, reason)
    if hub.clustered and not closed:
        try:
            closed = await hub.broker.control(node_id, command)
        except BrokerUnavailable:
            raise Problem(503, f"{command} recorded, but the broker is unavailable: a "
                               "session on another instance may stay open; retry") from None
    return closed


async def ban_node(call: Call) -> web.Response:
    node_id = call.path["id"]
    # Stored first: the hub refuses a banned node at auth (§2), so a reconnect after the
    # close below is refused too. A ban may precede the node's first connection.
    rec = await call.hub.store.set_banned(node_id, True, _now_ms())
    try:
        closed = await _close_everywhere(call, node_id, E.CLOSE_FORBIDDEN, "ban", "banned")
    finally:
        call.audit("ban", node_id)
    view = await _node_view(call.hub, rec)
    if closed:
        view |= {"online": False, "instance": None}
    return _json(view)


async def unban_node(call: Call) -> web.Response:
    await _known_node(call)
    rec = await call.hub.store.set_banned(call.path["id"], False, _now_ms())
    call.audit("unban", rec.id)
    return _json(await _node_view(call.hub, rec))


async def kick_node(call: Call) -> web.Response:
    rec = await _known_node(call)
    try:
        closed = await _close_everywhere(call, rec.id, E.CLOSE_KICKED, "kick", "kicked")
    finally:
        call.audit("kick", rec.id)
    view = await _node_view(call.hub, rec)
    if closed:
        view |= {"online": False, "instance": None}
    return _json(view)


async def delete_node(call: Call) -> web.Response:
    """Forget the node (registration, meta, key; a ban stays), expire its queued QoS 1
    messages, then close its session wherever it is (4012)."""
    node_id = call.path["id"]
    if not await call.hub.store.forget_node(node_id, _now_ms()):
        raise Problem(404, "unknown node", field="id")
    try:
        await _close_everywhere(call, node_id, E.CLOSE_KICKED, "kick", "kicked")
    finally:
        call.audit("node_deleted", node_id)
    return web.Response(status=204)


# -- messages ------------------------------------------------------------------------------


async def send_message(call: Call) -> web.Response:
    hub, body = call.hub, call.body
    if ("to" in body) == ("topic" in body):
        raise Problem(422, "give exactly one of 'to' and 'topic'",
                      field="topic" if "to" in body else "to")
    schemas = call.request.app[_COMPONENTS_KEY]
    check(body, schemas["MessageToNode" if "to" in body else "MessageToTopic"])
    data = base64.b64decode(body["body_b64"], validate=True)
    if len(data) > hub.cfg.limits.max_body_bytes:
        raise Problem(422, f"body_b64: more than {hub.cfg.limits.max_body_bytes} bytes once "
                           "decoded", field="body_b64")
    qos = int(body.get("qos", 0))
    if "topic" in body:
        published = await hub.publish(None, None, body["topic"], data, sender=ADMIN_SENDER)
        if published is None:
            raise Problem(503, "topic publish failed: broker or history store unavailable")
        mid, seq = published
        return _json({"mid": mid, "status": "sent", "seq": seq}, 202)
    to = body["to"]
    if qos == 1 and hub.allowlist:
        rec = await hub.store.get_node(to)
        if rec is None or not rec.registered:
            # §4: in allowlist mode a node not registered gets no_route.
            raise Problem(404, "unknown node: not registered (auth.mode = allowlist)",
                          field="to")
    ttl = body.get("ttl")
    try:
        mid, status = await hub.send_from_admin(to, data, qos,
                                                int(ttl) if ttl is not None else None)
    except QueueFull:
        raise Problem(409, "queue full: the node holds limits.max_pending_per_node "
                           "unacked messages", field="to") from None
    return _json({"mid": mid, "status": status}, 202)


async def get_message(call: Call) -> web.Response:
    st = await call.hub.store.message_state(call.path["mid"], _now_ms())
    if st is None:
        raise Problem(404, "unknown message (only QoS 1 messages are kept)", field="mid")
    return _json({"mid": st.mid, "from": st.sender, "to": st.recipient, "qos": st.qos,
                  "state": st.state, "created": st.created, "delivered": st.delivered,
                  "acked": st.acked})


# -- audit, tokens, stats, document -------------------------------------------------------


async def list_audit(call: Call) -> web.Response:
    q = call.query
    limit: int = q.get("limit", DEFAULT_LIMIT)
    before = _audit_cursor(q.get("cursor"))
    events = await call.hub.store.audit_query(q.get("node"), q.get("kind"), q.get("since"),
                                              limit + 1, before)
    page = events[:limit]
    items = [{"id": e.id, "ts": e.ts, "kind": e.kind, "node": e.node, "ip": e.ip,
              "detail": e.detail} for e in page]
    return _page(items, str(page[-1].id) if len(events) > limit else None, "a")


def _issuer(cfg: Config) -> TokenIssuer | str:
    """The hub's token signer, or why there is none (said in the 409)."""
    a = cfg.auth
    try:
        if a.jwt_private_key_file:
            return TokenIssuer(private_key_pem=Path(a.jwt_private_key_file).read_bytes())
        if a.jwt_secret:
            return TokenIssuer(secret=a.jwt_secret, algorithm="HS256")
    except OSError as exc:
        return f"cannot read auth.jwt_private_key_file: {(exc.strerror or 'error').lower()}"
    except (ValueError, TypeError) as exc:
        return f"cannot sign tokens: {exc}"
    return "no signing key configured: set auth.jwt_secret or auth.jwt_private_key_file"


async def issue_token(call: Call) -> web.Response:
    issuer = call.request.app[_ISSUER_KEY]
    if not isinstance(issuer, TokenIssuer):
        raise Problem(409, str(issuer))
    body = call.body
    topics = body.get("topics")
    ttl_s = int(body.get("ttl_s", 3600))
    token, exp = issuer.issue(body["sub"], ttl_s, tuple(topics) if topics is not None else None,
                              audience=call.hub.cfg.auth.jwt_audience)
    if len(token) > MAX_TOKEN_CHARS:  # cannot happen within the schema's bounds
        raise Problem(422, "token too long: give fewer or shorter topics", field="topics")
    call.audit("token_issued", body["sub"], ttl_s=ttl_s,
               topics=len(topics) if topics is not None else None)
    return _json({"token": token, "expires": exp * 1000, "algorithm": issuer.algorithm}, 201)


async def revoke_tokens(call: Call) -> web.Response:
    """docs/protocol.md §2.4: one token by `jti`, or every token of a node issued before
    `before` (default now). Stored durably; every instance refuses them within a second."""
    hub, body = call.hub, call.body
    if ("jti" in body) == ("node" in body):
        raise Problem(422, "give exactly one of 'jti' and 'node'",
                      field="node" if "jti" in body else "jti")
    schemas = call.request.app[_COMPONENTS_KEY]
    check(body, schemas["RevokeJti" if "jti" in body else "RevokeNode"])
    now = _now_ms()
    revocations = hub.admission.revocations
    if "jti" in body:
        expires = int(body.get("expires", now + MAX_TOKEN_TTL_S * 1000))
        row = await revocations.revoke_jti(body["jti"], expires, now)
        call.audit("token_revoked", None, jti=body["jti"])
    else:
        node_id = body["node"]
        before = int(body.get("before", now))
        if before > now:
            raise Problem(422, "before: must not be in the future", field="before")
        row = await revocations.revoke_node(node_id, before, now)
        call.audit("token_revoked", node_id, before=before)
        if body.get("kick"):
            await _close_everywhere(call, node_id, E.CLOSE_KICKED, "kick", "kicked")
    return _json({"kind": row.kind, "subject": row.subject,
                  "issued_before": row.issued_before, "created": row.created,
                  "expires": min(row.expires, NEVER)})


async def stats(call: Call) -> web.Response:
    hub = call.hub
    snap = hub.metrics.snapshot()
    snap.update({"instance": hub.instance_id, "hub_id": hub.cfg.server.hub_id,
                 "clustered": hub.clustered, "topics": len(hub.topics),
                 "auth_failures": dict(hub.metrics.auth_failures)})
    return _json({"instances": [snap]})


async def openapi(call: Call) -> web.Response:
    return _json(call.request.app[_DOCUMENT_KEY])


# -- the route table -----------------------------------------------------------------------

P = PROBLEM_CONTENT_TYPE
_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                  "default": DEFAULT_LIMIT}, "page size")
_CURSOR = Param("cursor", "query", {"type": "string", "minLength": 1, "maxLength": 512},
                "next_cursor of the previous page (opaque)")
_NODE = Param("id", "path", {"type": "string", "pattern": NODE_ID_PATTERN}, "node id", True)
_UNAUTH = Resp("missing or wrong bearer token", content_type=P,
               headers={"WWW-Authenticate": f"{REALM}"})
_FORBIDDEN = Resp("the token's scope is below the one this operation needs", content_type=P)
_TOO_MANY = Resp("too many requests from this address or with this token, or the address "
                 "is locked out after too many bad tokens", content_type=P,
                 headers={"Retry-After": "seconds to wait"})
_UNAVAILABLE = Resp("store or broker unavailable", content_type=P)
_BAD = Resp("bad parameter or cursor", content_type=P)
_NO_NODE = Resp("unknown node", content_type=P)


def _admin(*ok: tuple[int, Resp], bad: bool = False, body: bool = False,
           node: bool = False, **extra: Resp) -> dict[int, Resp]:
    out: dict[int, Resp] = dict(ok)
    out[401] = _UNAUTH
    out[403] = _FORBIDDEN
    out[429] = _TOO_MANY
    out[503] = _UNAVAILABLE
    if bad or body or node:
        out[400] = _BAD if not body else Resp("bad parameter or malformed JSON",
                                                content_type=P)
    if node:
        out[404] = _NO_NODE
    if body:
        out[413] = Resp("body too large", content_type=P)
        out[415] = Resp("body not application/json", content_type=P)
        out[422] = Resp("body breaks the schema (the member is named in 'field')",
                        content_type=P)
    out.update({int(k.removeprefix("s")): v for k, v in extra.items()})
    return out


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", None, "healthz", "liveness", auth=False, tag="probes",
          responses={200: Resp("the process serves", "Health")}),
    Route("GET", "/readyz", None, "readyz", "readiness: store and broker answer",
          auth=False, tag="probes",
          responses={200: Resp("ready (`ok`), or `degraded` with `failed: [\"broker\"]`"
                               " while only the broker is down (or this instance's own connections"
                               " to it are not back yet)", "Readiness"),
                     503: Resp("not ready; `failed` names what", "Readiness")}),
    Route("GET", "/metrics", None, "metrics", "Prometheus metrics", auth=False,
          tag="probes",
          responses={200: Resp("text exposition format", content_type="text/plain")}),
    Route("GET", "/v1/openapi.json", openapi, "getOpenapi", "this document",
          auth=False, tag="docs",
          responses={200: Resp("OpenAPI 3.1 document", None), 429: _TOO_MANY}),
    Route("GET", "/v1/stats", stats, "getStats",
          "connections, frames, routed/queued/dropped counts of this instance",
          responses=_admin((200, Resp("counters", "Stats")))),
    Route("GET", "/v1/nodes", list_nodes, "listNodes", "known nodes, by id",
          description="A page filtered by `online` may be short (even empty) while "
                      "`next_cursor` is not null; the list ends when it is null.",
          params=(Param("online", "query", {"type": "boolean"},
                        "only nodes with (true) or without (false) a session"),
                  _LIMIT, _CURSOR),
          responses=_admin((200, Resp("a page of nodes", "NodeList")), bad=True)),
    Route("GET", "/v1/nodes/{id}", get_node, "getNode", "one node", params=(_NODE,),
          responses=_admin((200, Resp("the node", "Node")), node=True)),
    Route("PUT", "/v1/nodes/{id}", put_node, "putNode",
          "register a node (allowlist mode) or update its meta and key",
          description="Replacing `key` is how a key is rotated: the operator's PUT, not "
                      "a proof by the node (a node authenticated by its key has the key's "
                      "hex as its id, so a new key is a new node: register it, then "
                      "DELETE the old one). The new key applies from the node's next "
                      "session.",
          params=(_NODE,), body="PutNode", scope="write", cost=5,
          responses=_admin((200, Resp("updated", "Node")),
                           (201, Resp("registered", "Node",
                                      headers={"Location": "the node's URL"})),
                           body=True)),
    Route("DELETE", "/v1/nodes/{id}", delete_node, "deleteNode",
          "forget a node: its registration, meta and key (a ban stays); its queued QoS 1 "
          "messages expire; its session, wherever it is, is closed with 4012",
          description="In allowlist mode the node can no longer authenticate; in open "
                      "mode it may come back as a new node. Tokens it holds stay valid "
                      "unless revoked (POST /v1/tokens/revoke).",
          params=(_NODE,), scope="write", cost=5,
          responses=_admin((204, Resp("forgotten", None)), node=True)),
    Route("POST", "/v1/nodes/{id}/ban", ban_node, "banNode",
          "ban a node: its session, wherever it is, is closed with 4003 and it cannot "
          "authenticate until unbanned (a node never seen is recorded as banned)",
          params=(_NODE,), scope="write", cost=5,
          responses=_admin((200, Resp("the node", "Node")), bad=True)),
    Route("DELETE", "/v1/nodes/{id}/ban", unban_node, "unbanNode", "lift a ban",
          params=(_NODE,), scope="write", cost=5,
          responses=_admin((200, Resp("the node", "Node")), node=True)),
    Route("POST", "/v1/nodes/{id}/kick", kick_node, "kickNode",
          "close the node's session, wherever it is, with 4012 (a known node without a "
          "session: 200, nothing to close)",
          params=(_NODE,), scope="write", cost=5,
          responses=_admin((200, Resp("the node", "Node")), node=True)),
    Route("POST", "/v1/messages", send_message, "sendMessage",
          "server-side send to a node (QoS 0/1) or publish to a topic, from $admin",
          description="202 with status `sent`, `stored` or `no_route` (QoS 0 to a node "
                      "with no session: dropped, not an error). QoS 1 to a node not "
                      "registered in allowlist mode: 404. A full queue: 409.",
          body="SendMessage", scope="write", cost=5,
          responses=_admin((202, Resp("accepted", "MessageAccepted")), body=True,
                           s404=Resp("node not registered (allowlist mode)", content_type=P),
                           s409=Resp("the node's queue is full", content_type=P))),
    Route("GET", "/v1/messages/{mid}", get_message, "getMessage",
          "a QoS 1 message's state (asked of another instance than the one that "
          "delivered it, `delivered` may lag by up to 1 s until the ack)",
          params=(Param("mid", "path", {"type": "string", "pattern": MID_PATTERN},
                        "message id", True),),
          responses=_admin((200, Resp("its state", "MessageState")), bad=True,
                           s404=Resp("unknown mid", content_type=P))),
    Route("GET", "/v1/audit", list_audit, "listAudit", "audit events, newest first",
          params=(Param("node", "query", {"type": "string", "pattern": NODE_ID_PATTERN},
                        "only events about this node"),
                  Param("kind", "query", {"type": "string", "pattern": KIND_PATTERN},
                        "only this kind: auth_ok, auth_failed, auth_refused, ban, unban, "
                        "kick, admin_call, admin_auth_failed, token_issued, ..."),
                  Param("since", "query",
                        {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INT},
                        "only events at or after this time (ms)"),
                  _LIMIT, _CURSOR),
          scope="admin",
          responses=_admin((200, Resp("a page of events", "AuditList")), bad=True)),
    Route("POST", "/v1/tokens", issue_token, "issueToken",
          "issue a node JWT signed with the hub's key", body="IssueToken",
          scope="admin", cost=10,
          responses=_admin((201, Resp("the token", "TokenIssued")), body=True,
                           s409=Resp("no signing key configured", content_type=P))),
    Route("POST", "/v1/tokens/revoke", revoke_tokens, "revokeTokens",
          "revoke one node token (by jti) or every token of a node issued before a time",
          description="Stored durably and checked at every token handshake: a revoked "
                      "token gets auth_failed and close 4001 (docs/protocol.md §2.4), on "
                      "every instance within one second. A session already open stays "
                      "unless `kick` is true.",
          body="RevokeTokens", scope="admin", cost=10,
          responses=_admin((200, Resp("the revocation as stored", "Revocation")),
                           body=True)),
)

_COMPONENTS_KEY = web.AppKey("openred.components", dict)
_DOCUMENT_KEY = web.AppKey("openred.openapi", dict)
_ISSUER_KEY = web.AppKey("openred.token_issuer", object)


def openapi_document(cfg: Config) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("openred-hub")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout
        v = "0"
    return build_document(
        ROUTES, components(cfg), title="OpenRed hub admin API", version=v,
        description="The operator surface of an OpenRed hub instance (README.md). "
                    "Errors are application/problem+json (RFC 9457). Every /v1/ route but "
                    "this document needs `Authorization: Bearer <admin token>` whose "
                    "scope is at least the operation's `x-openred-scope` (read < write < "
                    "admin); each call costs `x-openred-cost` against admin.requests_per_s "
                    "per client IP and per token, and an address that presents "
                    "admin.max_auth_failures bad tokens is locked out (429, Retry-After). "
                    "Any instance acts on the whole cluster.")


# -- parsing a request into a Call ---------------------------------------------------------

_EMPTY_BODY = {"type": "object", "additionalProperties": False}


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python reads it as inf, JSON has no inf
        raise ValueError("number out of range")
    return value


async def _read_json(request: web.Request) -> Any:
    ct = request.content_type
    if ct != "application/json" and not (ct.startswith("application/") and ct.endswith("+json")):
        raise Problem(415, "content type must be application/json",
                      headers={"Accept": "application/json"})
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes,
                          parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise Problem(400, "body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise Problem(400, f"body is not JSON: {exc.msg.lower()} at line {exc.lineno} "
                           f"column {exc.colno}") from None
    except ValueError as exc:
        raise Problem(400, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise Problem(400, "body is not JSON: nested too deeply") from None


def _handler(route: Route, schema: dict[str, Any] | None,
             hub: HubNode) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    assert route.handler is not None
    target = route.handler
    path_params = [p for p in route.params if p.where == "path"]
    query_params = {p.name: p for p in route.params if p.where == "query"}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = {}
        for p in path_params:
            path[p.name] = parse_param(p, request.match_info[p.name])
        query: dict[str, Any] = {}
        for name in request.query:
            qp = query_params.get(name)
            if qp is None:
                raise Problem(400, f"unknown parameter {name!r}", field=name)
            values = request.query.getall(name)
            if len(values) > 1:
                raise Problem(400, f"{name}: given more than once", field=name)
            query[name] = parse_param(qp, values[0])
        if schema is not None:
            body = await _read_json(request)
            if "oneOf" in schema:  # the handler picks the branch, to say what is wrong
                check(body, {"type": "object"})
            else:
                check(body, schema)
        else:
            body = None
            if request.body_exists and await request.read():
                check(await _read_json(request), _EMPTY_BODY)
        response: web.StreamResponse = await target(Call(request, hub, path, query, body))
        return response

    return handle


# -- middleware: request id, auth, problems, log and audit ---------------------------------


def _authenticate(request: web.Request,
                  tokens: TokenTable) -> tuple[AdminToken | None, str]:
    """(the token, "ok"), or (None, reason) with reason missing|malformed|invalid|no_tokens."""
    header = request.headers.get("Authorization")
    if not tokens:
        return None, "no_tokens"
    if header is None:
        return None, "missing"
    scheme, _, cred = header.strip().partition(" ")
    given = cred.strip().encode("utf-8", "replace")
    if scheme.lower() != "bearer" or not given:
        return None, "malformed"
    token = tokens.match(given)
    return (token, "ok") if token is not None else (None, "invalid")


_AUTH_DETAIL = {
    "no_tokens": "the admin API is disabled: no admin tokens are configured (admin.tokens)",
    "missing": "bearer token required",
    "malformed": "authorization must be 'Bearer <token>'",
    "invalid": "invalid bearer token",
}


def _unauthorized(reason: str) -> Problem:
    # RFC 6750 §3: no error code when the request carried no credentials.
    challenge = REALM if reason in ("missing", "no_tokens") else f'{REALM}, error="invalid_token"'
    return Problem(401, _AUTH_DETAIL[reason], headers={"WWW-Authenticate": challenge})


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _REQUEST_ID_RE.fullmatch(given):
        return given
    return secrets.token_hex(8)


def _http_problem(exc: web.HTTPException, request: web.Request) -> web.Response:
    headers = {}
    if exc.status == 405:
        headers["Allow"] = exc.headers.get("Allow", "")
        detail = f"method {request.method} not allowed; allowed: {headers['Allow']}"
    elif exc.status == 404:
        detail = "no such route"
    elif exc.status == 413:
        detail = "request body too large: " + (exc.text or "").lower()
    else:
        detail = (exc.text or exc.reason or "error").lower()
    return problem_response(exc.status, detail, headers=headers)


_LIMIT_DETAIL = {
    "lockout": "too many bad tokens from this address: locked out",
    "ip": "too many requests from this address",
    "token": "too many requests with this token",
}


def _middleware(hub: HubNode, tokens: TokenTable, guard: AdminGuard) -> Any:
    routes = {r.operation_id: r for r in ROUTES}
    # Audit and log rows of refused requests are bounded (a client with many addresses
    # could flood them); the Prometheus counters of AdminGuard count every one.
    noisy_bucket = TokenBucket(FAILED_AUTH_AUDIT_PER_S, FAILED_AUTH_AUDIT_BURST,
                               time.monotonic())

    def audit_refusal(kind: str, ip: str, request: web.Request, **detail: Any) -> None:
        if noisy_bucket.take(time.monotonic()):
            detail |= {"method": request.method, "route": _route_name(request),
                       "request_id": request[_RID_KEY]}
            hub.store.audit_nowait(kind, None, ip, detail, _now_ms())
            log.warning("admin request refused", extra={"event": kind, "ip": ip, **detail})

    async def guard_v1(request: web.Request, ip: str) -> str | None:
        """Auth, limits and scope of one /v1/ request; the token's name, or None for an
        open route. Raises the Problem that refuses it."""
        route = routes.get(request.match_info.route.name or "")
        if route is not None and not route.auth:
            verdict = await guard.check(ip, None, route.cost, None)
            token, reason = None, "ok"
        else:
            token, reason = _authenticate(request, tokens)
            verdict = await guard.check(ip, token.name if token else None,
                                        route.cost if route else 1, reason)
        if verdict.limit is not None:
            if verdict.limit == "lockout":
                audit_refusal("admin_lockout", ip, request, retry_after_s=verdict.retry_after_s)
            raise Problem(429, _LIMIT_DETAIL[verdict.limit],
                          headers={"Retry-After": str(verdict.retry_after_s)})
        if route is not None and not route.auth:
            return None
        if token is None:
            guard.auth_failures.labels(reason).inc()
            audit_refusal("admin_auth_failed", ip, request, reason=reason)
            raise _unauthorized(reason)
        need = route.scope if route is not None else "read"
        if not scope_allows(token.scope, need):
            guard.refused.labels("scope").inc()
            node = request.match_info.get("id")
            hub.store.audit_nowait("admin_forbidden", node if is_node_id(node) else None, ip,
                                   {"method": request.method, "route": _route_name(request),
                                    "token": token.name, "scope": token.scope, "needs": need,
                                    "request_id": request[_RID_KEY]}, _now_ms())
            raise Problem(403, f"this token's scope ({token.scope}) does not allow this "
                               f"operation (it needs {need})")
        return token.name

    @web.middleware
    async def admin(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = _request_id(request)
        request[_RID_KEY] = rid
        ip = client_ip(hub, request.remote, request.headers.getall("X-Forwarded-For", []))
        request[_IP_KEY] = ip
        v1 = request.path.startswith("/v1/")
        t0 = time.perf_counter()
        token_id = None
        try:
            if v1:
                token_id = await guard_v1(request, ip)
                if token_id is not None:
                    request[_TID_KEY] = token_id
            resp: web.StreamResponse = await handler(request)
        except Problem as exc:
            resp = problem_response(exc.status, exc.detail, field=exc.field,
                                    headers=exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _http_problem(exc, request)
        except StoreUnavailable:
            resp = problem_response(503, "store unavailable")
        except BrokerUnavailable:
            resp = problem_response(503, "broker unavailable")
        except Exception:
            log.exception("admin request failed", extra={
                "event": "admin_error", "request_id": rid, "method": request.method,
                "route": _route_name(request)})
            resp = problem_response(500, f"internal error (request id {rid})")
        resp.headers[REQUEST_ID_HEADER] = rid
        if token_id is not None:
            route = _route_name(request)
            node = request.match_info.get("id")
            hub.store.audit_nowait("admin_call", node if is_node_id(node) else None, ip,
                                   {"method": request.method, "route": route,
                                    "status": resp.status, "token": token_id,
                                    "request_id": rid}, _now_ms())
            log.info("admin call", extra={
                "event": "admin_call", "method": request.method, "route": route,
                "status": resp.status, "token": token_id, "request_id": rid, "ip": ip,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 3)})
        return resp

    return admin


def add_routes(app: web.Application, hub: HubNode,
               registry: CollectorRegistry | None = None) -> None:
    """Add every /v1/ route of ROUTES, serving `hub`, and the admin middleware to `app`
    (its counters in `registry`)."""
    schemas = components(hub.cfg)
    app[_COMPONENTS_KEY] = schemas
    app[_DOCUMENT_KEY] = openapi_document(hub.cfg)
    app[_ISSUER_KEY] = _issuer(hub.cfg)
    tokens = TokenTable(parse_token(t) for t in hub.cfg.admin.tokens)
    guard = AdminGuard(hub.cfg.admin, hub, registry)
    # Appended: inside app.py's security_headers, so problems get those headers too.
    app.middlewares.append(_middleware(hub, tokens, guard))
    for r in ROUTES:
        if r.handler is None:
            continue
        schema = schemas[r.body] if r.body is not None else None
        app.router.add_route(r.method, r.path, _handler(r, schema, hub), name=r.operation_id)
