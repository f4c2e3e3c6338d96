"""The route table's types, request validation against its schemas, and the OpenAPI 3.1
document built from it (README.md "Operator surface").

`admin_http.routes.ROUTES` is the one list of what the admin surface serves: each `Route`
carries its method, path, handler, parameters, request schema and responses. The aiohttp
router is filled from it and `/v1/openapi.json` is generated from it, so the two cannot
drift (tests/admin checks both ways). Request bodies and parameters are validated against
the same schemas the document publishes, by the small JSON Schema subset below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openred.admin_http.problems import PROBLEM_CONTENT_TYPE, Problem

__all__ = ["Param", "Resp", "Route", "build_document", "check", "parse_param"]

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter. `schema` is a JSON Schema of type string, integer or
    boolean; values arrive as text and are converted before they are checked."""

    name: str
    where: str  # "query" | "path"
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Resp:
    description: str
    schema: str | None = None  # a component name
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    # None: registered by admin_http.app itself (/healthz, /readyz, /metrics); the table
    # still describes it so that the document covers every route.
    handler: Callable[..., Awaitable[Any]] | None
    operation_id: str
    summary: str
    description: str = ""
    params: tuple[Param, ...] = ()
    body: str | None = None  # component name of the request schema
    responses: Mapping[int, Resp] = field(default_factory=dict)
    auth: bool = True
    tag: str = "admin"
    # The admin token scope the route needs (admin_http/tokens.py: read < write <
    # admin), and what a call costs against admin.requests_per_s (admin_http/guard.py).
    scope: str = "read"
    cost: int = 1


# -- validation: the JSON Schema subset the request schemas use ------------------------


def _type_ok(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if t == "integer":  # JSON Schema: a number with no fractional part (1.0 is one)
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)
                                          and value.is_integer())
    if t == "number":
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    raise AssertionError(f"schema type {t!r} not supported")


_TYPE_WORDS = {"object": "an object", "array": "an array", "string": "a string",
               "boolean": "true or false", "null": "null", "integer": "an integer",
               "number": "a number"}


def check(value: Any, schema: Mapping[str, Any], where: str = "body") -> None:
    """Raise Problem(422) naming the first member of `value` that `schema` refuses.

    Supports type, enum, properties, required, additionalProperties (false), minLength,
    maxLength, pattern, minimum, maximum, items, minItems, maxItems, maxProperties.
    """
    types = schema.get("type")
    if types is not None:
        tl = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in tl):
            raise Problem(422, f"{where}: must be {' or '.join(_TYPE_WORDS[t] for t in tl)}",
                          field=where)
    if "enum" in schema and not any(value == e and isinstance(value, bool) == isinstance(e, bool)
                                    for e in schema["enum"]):
        allowed = ", ".join(repr(e) for e in schema["enum"])
        raise Problem(422, f"{where}: must be one of {allowed}", field=where)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in value:
            if name not in props and schema.get("additionalProperties", True) is False:
                member = name if where == "body" else f"{where}.{name}"
                raise Problem(422, f"unknown field {member!r}", field=member)
        for name in schema.get("required", ()):
            if name not in value:
                member = name if where == "body" else f"{where}.{name}"
                raise Problem(422, f"{member}: required", field=member)
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            raise Problem(422, f"{where}: at most {schema['maxProperties']} members",
                          field=where)
        for name, sub in props.items():
            if name in value:
                check(value[name], sub, name if where == "body" else f"{where}.{name}")
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Problem(422, f"{where}: at least {schema['minLength']} characters",
                          field=where)
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise Problem(422, f"{where}: at most {schema['maxLength']} characters",
                          field=where)
        if "pattern" in schema and _regex(schema["pattern"]).search(value) is None:
            raise Problem(422, f"{where}: not of the allowed form", field=where)
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise Problem(422, f"{where}: at least {schema['minItems']} items", field=where)
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise Problem(422, f"{where}: at most {schema['maxItems']} items", field=where)
        if "items" in schema:
            for i, item in enumerate(value):
                check(item, schema["items"], f"{where}[{i}]")
    elif _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise Problem(422, f"{where}: must be >= {schema['minimum']}", field=where)
        if "maximum" in schema and value > schema["maximum"]:
            raise Problem(422, f"{where}: must be <= {schema['maximum']}", field=where)


_regexes: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    rx = _regexes.get(pattern)
    if rx is None:
        # Our patterns are anchored with ^...$; \Z so that a trailing newline never
        # passes (Python's $ matches before one, ECMA-262's does not).
        rx = _regexes[pattern] = re.compile(pattern.removesuffix("$") + r"\Z"
                                            if pattern.endswith("$") else pattern)
    return rx


def parse_param(p: Param, raw: str) -> Any:
    """Convert and check one parameter's text; Problem(400) naming it when bad."""
    t = p.schema.get("type", "string")
    value: Any = raw
    if t == "integer":
        if not re.fullmatch(r"-?[0-9]{1,19}", raw):
            raise Problem(400, f"{p.name}: must be an integer", field=p.name)
        value = int(raw)
    elif t == "boolean":
        if raw not in ("true", "false"):
            raise Problem(400, f"{p.name}: must be true or false", field=p.name)
        value = raw == "true"
    try:
        check(value, p.schema, p.name)
    except Problem as exc:
        raise Problem(400, exc.detail, field=p.name) from None
    return value


# -- the document ------------------------------------------------------------------------


def _problem_ref() -> dict[str, Any]:
    return {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _operation(r: Route, components: Mapping[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary,
                          "tags": [r.tag]}
    if r.description:
        op["description"] = r.description
    if r.params:
        op["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.required or p.where == "path",
             "description": p.description, "schema": p.schema}
            for p in r.params]
    if r.body is not None:
        assert r.body in components, r.body
        op["requestBody"] = {"required": True, "content": {
            JSON: {"schema": {"$ref": f"#/components/schemas/{r.body}"}}}}
    if not r.auth:
        op["security"] = []
    else:
        # OpenAPI 3.1 §4.8.30: for a scheme that is not OAuth2 the array lists the roles
        # the operation needs; x-openred-scope says the same for tools that ignore it.
        op["security"] = [{"bearer": [r.scope]}]
        op["x-openred-scope"] = r.scope
    if r.path.startswith("/v1/"):
        op["x-openred-cost"] = r.cost
    responses: dict[str, Any] = {}
    for status, resp in sorted(r.responses.items()):
        out: dict[str, Any] = {"description": resp.description}
        if status == 204:
            pass  # no content
        elif resp.content_type == PROBLEM_CONTENT_TYPE:
            out["content"] = _problem_ref()
        elif resp.schema is not None:
            assert resp.schema in components, resp.schema
            out["content"] = {resp.content_type: {
                "schema": {"$ref": f"#/components/schemas/{resp.schema}"}}}
        elif resp.content_type != JSON:
            out["content"] = {resp.content_type: {"schema": {"type": "string"}}}
        else:
            out["content"] = {JSON: {"schema": {"type": "object"}}}
        if resp.headers:
            out["headers"] = {name: {"description": d, "schema": {"type": "string"}}
                              for name, d in resp.headers.items()}
        responses[str(status)] = out
    op["responses"] = responses
    return op


def build_document(routes: tuple[Route, ...], components: Mapping[str, Any], *,
                   title: str, version: str, description: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, components)
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": dict(components),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "one of admin.tokens. Its scope (read < write < admin; each "
                               "includes those before it) must be at least the one an "
                               "operation's security requirement and x-openred-scope "
                               "name, else 403."}},
        },
        "security": [{"bearer": []}],
        "tags": [{"name": "admin", "description": "operator routes (bearer token)"},
                 {"name": "probes", "description": "health, readiness, metrics (no token)"},
                 {"name": "docs", "description": "this document (no token)"}],
    }
