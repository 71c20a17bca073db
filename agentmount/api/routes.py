"""What each HTTP API request does: routes, the bearer-token check, JSON in and out.

Owns the mapping of `/v1/...` requests onto `agentmount.events.service` (the same calls the
control socket makes: one implementation), checking a request's token, parameters and
body, and turning errors into statuses (400 invalid, 401 token, 404 unknown, 405 method).
The wire (framing, limits) is `http.py`'s; the OpenAPI document is `openapi.py`'s.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

from agentmount.api import openapi
from agentmount.api.http import Request, Response
from agentmount.errors import FsError, NotFound
from agentmount.events import service
from backend.store import StoreError

log = logging.getLogger("agentmount.api")

# Path templates and, per method, the Api method that answers (also the OpenAPI operationId).
ROUTES: list[tuple[str, dict[str, str]]] = [
    ("/v1/openapi.json", {"GET": "openapi"}),
    ("/v1/workspaces/{ws}/webhooks", {"GET": "list_webhooks", "POST": "add_webhook"}),
    ("/v1/workspaces/{ws}/webhooks/{id}", {"GET": "get_webhook", "DELETE": "remove_webhook"}),
    ("/v1/workspaces/{ws}/webhooks/{id}/test", {"POST": "test_webhook"}),
    ("/v1/workspaces/{ws}/webhooks/{id}/replay", {"POST": "replay_webhook"}),
    ("/v1/workspaces/{ws}/events", {"GET": "events"}),
]
PUBLIC = {"/v1/openapi.json"}          # answered without a token

EVENTS_LIMIT_DEFAULT = 1000
EVENTS_LIMIT_MAX = 10000
_WEBHOOK_FIELDS = {"url", "events", "path", "secret", "allow_private"}


class BadRequest(ValueError):
    """The request's parameters or body are invalid; the message says how."""


def match(path: str) -> tuple[str, dict[str, str], dict[str, str]] | None:
    """(template, its methods, path parameters) of the route `path` (as sent) is on, or None."""
    parts = path.split("/")
    for template, methods in ROUTES:
        tparts = template.split("/")
        if len(tparts) != len(parts):
            continue
        params: dict[str, str] = {}
        for t, p in zip(tparts, parts):
            if t.startswith("{"):
                value = unquote(p)
                if not value or "/" in value:
                    break
                params[t[1:-1]] = value
            elif t != p:
                break
        else:
            return template, methods, params
    return None


class Api:
    """The HTTP API of one peer: `early` decides from the request head (token, route, method),
    `handle` answers a complete request."""

    def __init__(self, vfs: Any, token: str) -> None:
        self.vfs = vfs
        self._token = token.encode()
        self._doc = json.dumps(openapi.document(), indent=1).encode() + b"\n"

    def authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def early(self, method: str, path: str, headers: dict[str, str]) -> Response | None:
        found = match(path)
        if found is None or found[0] not in PUBLIC:
            if not self.authorized(headers):
                wrong = "authorization" in headers
                return Response.error(
                    401, "wrong bearer token" if wrong else "missing bearer token (Authorization: Bearer <[api] token>)",
                    [("www-authenticate", 'Bearer realm="agentmount"' + (', error="invalid_token"' if wrong else ""))])
        if found is None:
            return Response.error(404, f"no such route: {path.split('?')[0]} (see /v1/openapi.json)")
        template, methods, _ = found
        if method not in methods:
            return Response.error(405, f"{method} not allowed on {template} (allowed: {', '.join(methods)})",
                                  [("allow", ", ".join(methods))])
        return None

    async def handle(self, req: Request) -> Response:
        early = self.early(req.method, req.path, req.headers)
        if early is not None:
            return early
        found = match(req.path)
        assert found is not None
        template, methods, params = found
        op: Callable[..., Awaitable[Response]] = getattr(self, "_" + methods[req.method])
        try:
            return await op(req, **params)
        except BadRequest as e:
            return Response.error(400, str(e))
        except NotFound as e:
            return Response.error(404, str(e))
        except ValueError as e:         # an invalid subscription: the same message as the CLI gives
            return Response.error(400, str(e))
        except FsError as e:
            status = {2: 404, 22: 400}.get(e.errno, 500)
            return Response.error(status, e.args[1] if len(e.args) > 1 else os.strerror(e.errno))
        except StoreError as e:
            log.warning("event=api_store_error path=%s error=%r", req.path, str(e))
            return Response.error(503, f"store unavailable: {e}", [("retry-after", "5")])

    # -- operations ---------------------------------------------------------------------
    async def _openapi(self, req: Request) -> Response:
        return Response(200, self._doc, [("content-type", "application/json")])

    async def _list_webhooks(self, req: Request, ws: str) -> Response:
        _no_query(req)
        return Response.json(200, {"webhooks": await service.list_webhooks(self.vfs, ws)})

    async def _add_webhook(self, req: Request, ws: str) -> Response:
        _no_query(req)
        body = _json_object(req)
        unknown = sorted(set(body) - _WEBHOOK_FIELDS)
        if unknown:
            raise BadRequest(f"webhook.{unknown[0]}: unknown field (known: {', '.join(sorted(_WEBHOOK_FIELDS))})")
        if not isinstance(body.get("url"), str) or not body["url"]:
            raise BadRequest("webhook.url: required, a string (the http:// or https:// endpoint)")
        for k in ("secret", "path"):
            if body.get(k) is not None and not isinstance(body[k], str):
                raise BadRequest(f"webhook.{k}: a string")
        events = body.get("events")
        if events is not None and not (isinstance(events, list) and all(isinstance(t, str) for t in events)):
            raise BadRequest("webhook.events: a non-empty list of event types (omit it for all)")
        if not isinstance(body.get("allow_private", False), bool):
            raise BadRequest("webhook.allow_private: true or false")
        sub = await service.add_webhook(self.vfs, ws, body["url"], body.get("secret") or None, events,
                                        body.get("path"), body.get("allow_private", False))
        return Response.json(201, sub, [("location", f"/v1/workspaces/{ws}/webhooks/{sub['id']}")])

    async def _get_webhook(self, req: Request, ws: str, id: str) -> Response:
        _no_query(req)
        return Response.json(200, await service.get_webhook(self.vfs, ws, id))

    async def _remove_webhook(self, req: Request, ws: str, id: str) -> Response:
        _no_query(req)
        await service.remove_webhook(self.vfs, ws, id)
        return Response(204)

    async def _test_webhook(self, req: Request, ws: str, id: str) -> Response:
        _no_query(req)
        return Response.json(200, await service.test_webhook(self.vfs, ws, id))

    async def _replay_webhook(self, req: Request, ws: str, id: str) -> Response:
        _no_query(req)
        return Response.json(200, await service.replay_webhook(self.vfs, ws, id))

    async def _events(self, req: Request, ws: str) -> Response:
        unknown = sorted(set(req.query) - {"after_seq", "limit"})
        if unknown:
            raise BadRequest(f"unknown query parameter {unknown[0]!r} (known: after_seq, limit)")
        after = _int_param(req, "after_seq", 0, 0, None, "a journal seq, 0 or more")
        limit = _int_param(req, "limit", EVENTS_LIMIT_DEFAULT, 1, EVENTS_LIMIT_MAX,
                           f"an integer from 1 to {EVENTS_LIMIT_MAX}")
        r = await service.tail_events(self.vfs, ws, after, limit)
        return Response.json(200, {"events": r["events"], "next_after_seq": r["next"], "gap": r["gap"]})


def _no_query(req: Request) -> None:
    if req.query:
        raise BadRequest(f"unknown query parameter {sorted(req.query)[0]!r}")


def _json_object(req: Request) -> dict:
    if not req.body.strip():
        raise BadRequest("the request body must be a JSON object")
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _int_param(req: Request, name: str, default: int, low: int, high: int | None, what: str) -> int:
    values = req.query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"{name}: given more than once")
    v = values[0]
    if not (v.isascii() and v.isdigit()) or int(v) < low or (high is not None and int(v) > high):
        raise BadRequest(f"{name}: {what} (got {v!r})")
    return int(v)
