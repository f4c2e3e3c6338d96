"""The OpenAPI document: generated from the route table, so it matches the router both
ways; valid OpenAPI 3.1; and a schemathesis run against the live server finds no 5xx
and no response that breaks the schema (positive and negative data)."""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any

import pytest
import schemathesis  # the test extra installs it: missing, the suite fails
from openred.admin_http.routes import openapi_document

from tests.admin.conftest import TOKEN, Api
from tests.conftest import timeout

METHODS = {"GET", "PUT", "POST", "DELETE", "PATCH"}


def router_routes(hub: Any) -> set[tuple[str, str]]:
    app = hub._admin.app
    out = set()
    for r in app.router.routes():
        if r.method == "HEAD":  # aiohttp's implicit HEAD beside GET (/healthz...)
            continue
        out.add((r.method, r.resource.canonical))
    return out


def document_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops
            if m.upper() in METHODS}


async def test_document_and_router_match(api: Api) -> None:
    r = await api.get("/v1/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    doc = r.json()
    assert doc == openapi_document(api.hub.cfg)
    assert doc["openapi"].startswith("3.1")
    assert router_routes(api.hub) == document_routes(doc)
    for path, ops in doc["paths"].items():
        for m, op in ops.items():
            open_route = path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json")
            assert (op.get("security") == []) == open_route, (m, path)
            if not open_route:
                assert "401" in op["responses"], (m, path)
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema


async def test_document_gives_each_route_its_scope_and_cost(api: Api) -> None:
    """The scope the router enforces is the one the document states, both ways, and
    every route the limits can refuse documents 429."""
    from openred.admin_http.routes import ROUTES
    from openred.admin_http.tokens import SCOPES

    doc = (await api.get("/v1/openapi.json", token=None)).json()
    table = {(r.method, r.path): r for r in ROUTES}
    for path, ops in doc["paths"].items():
        for m, op in ops.items():
            route = table[(m.upper(), path)]
            if path.startswith("/v1/"):
                assert op["x-openred-cost"] == route.cost >= 1, (m, path)
                assert "429" in op["responses"], (m, path)
            if not route.auth:
                assert "x-openred-scope" not in op
                continue
            assert route.scope in SCOPES
            assert op["x-openred-scope"] == route.scope, (m, path)
            assert op["security"] == [{"bearer": [route.scope]}], (m, path)
            assert {"401", "403"} <= set(op["responses"]), (m, path)
            # Reads need read; what changes state needs more, and costs more.
            if m == "get" and path != "/v1/audit":
                assert (route.scope, route.cost) == ("read", 1), (m, path)
            elif m != "get":
                assert route.scope in ("write", "admin") and route.cost > 1, (m, path)


def _meta_packs(case: Any) -> bool:
    """PUT /v1/nodes/{id}: a `meta` must also be a hello's meta, msgpack (docs/protocol.md
    §3), which JSON Schema cannot say (integers of at most 64 bits, no lone surrogates):
    the server refuses the rest with 422 by design (test_errors), so positive data
    leaves them out."""
    import msgpack

    meta = case.body.get("meta") if isinstance(case.body, dict) else None
    try:
        msgpack.packb(meta)
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def _without_cursor(case: Any) -> Any:
    if case.query and "cursor" in case.query:
        case.query = {k: v for k, v in case.query.items() if k != "cursor"}
    return case


def run_schemathesis(doc: dict[str, Any], base_url: str, max_examples: int,
                     budget_s: float, known: dict[str, str] | None = None) -> list[str]:
    """Every operation, positive then negative data, every default check; then, for
    operations on one resource, positive data about a resource that exists (`known`:
    path parameter -> value), which random ids almost never hit."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    deadline = time.monotonic() + budget_s
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for result in schema.get_all_operations():
        op = result.ok()
        fixed = {name: value for name, value in (known or {}).items()
                 if "{" + name + "}" in op.path}
        passes: list[tuple[Any, dict[str, str] | None]] = [
            (GenerationMode.POSITIVE, None), (GenerationMode.NEGATIVE, None)]
        if fixed:
            passes.append((GenerationMode.POSITIVE, fixed))
        for mode, path_parameters in passes:
            if time.monotonic() > deadline:  # a slow machine: bounded, said, not failed
                warnings.warn(f"schemathesis: time budget spent before {op.label} {mode}",
                              stacklevel=1)
                return failures

            strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)
            if mode == GenerationMode.POSITIVE:
                # A cursor is opaque: valid ones only come from next_cursor, and a made-up
                # one is a 400 by design (test_errors), not a schema-valid request.
                strategy = strategy.map(_without_cursor)
                if op.method.upper() == "PUT":
                    strategy = strategy.filter(_meta_packs)

            @given(case=strategy)
            @settings(max_examples=max_examples, deadline=None, database=None,
                      derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=10)
                case.validate_response(response, headers=headers)

            try:
                check()
            except Unsatisfiable:
                pass  # negative mode of an operation with no input to break (/healthz)
            except (Exception, BaseExceptionGroup) as exc:  # check failures: report all
                failures.append(f"{op.label} [{mode}]: {exc}")
    return failures


@pytest.mark.slow
async def test_schemathesis(api: Api) -> None:
    doc = (await api.get("/v1/openapi.json")).json()
    assert (await api.put("/v1/nodes/known-1", json={"meta": {"k": 1}})).status == 201
    sent = await api.post("/v1/messages", json={"to": "known-1", "body_b64": "", "qos": 1})
    known = {"id": "known-1", "mid": sent.json()["mid"]}
    # About 25 s here; the budget bounds a slow machine.
    failures = await asyncio.to_thread(run_schemathesis, doc, api.base, 25, timeout(60.0),
                                      known)
    assert not failures, "\n\n".join(failures)
