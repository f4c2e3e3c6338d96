"""Errors of the admin HTTP surface as `application/problem+json` (RFC 9457).

Owned here: `Problem`, the one exception a handler raises to answer with an error, and
`problem_response()`, which renders it. Every error body has `type`, `title`, `status`
and `detail`; `type` is `about:blank` (RFC 9457 §4.2.1: the title is then the HTTP
reason phrase), and an error about one input names it in the `field` extension member.
A `detail` is short and lowercase, and never echoes a secret or a payload.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

__all__ = ["PROBLEM_CONTENT_TYPE", "Problem", "problem_response"]

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An error answer: `status`, a `detail` for the operator, optionally the `field`
    (body member, query or path parameter) it is about, and extra response headers."""

    def __init__(self, status: int, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def problem_response(status: int, detail: str, *, field: str | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if field is not None:
        body["field"] = field
    return web.Response(status=status, text=json.dumps(body, separators=(",", ":")),
                        content_type=PROBLEM_CONTENT_TYPE, headers=headers)
