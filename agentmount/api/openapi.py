"""The OpenAPI 3.1 document of the HTTP API (served at `GET /v1/openapi.json`).

Owns the description of every route in `routes.ROUTES` (the operationIds are the route
table's names; a test checks the two agree) and the schemas of what goes in and out.
"""
from __future__ import annotations

import copy
from typing import Any

from agentmount.events.derive import EVENT_TYPES

_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return {"$ref": "#/components/responses/" + description}


_WS = {"name": "ws", "in": "path", "required": True, "description": "workspace name",
       "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}
_ID = {"name": "id", "in": "path", "required": True, "description": "webhook id (from the list or the POST)",
       "schema": {"type": "string", "pattern": "^wh_[0-9a-f]{16}$"}}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string", "description": "what is wrong, in words"}},
    },
    "EventType": {"type": "string", "enum": list(EVENT_TYPES)},
    "WebhookCreate": {
        "type": "object", "required": ["url"], "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "format": "uri",
                    "description": "http:// or https:// endpoint; loopback and private addresses are refused "
                                   "unless allow_private (or the peer's [events] allow_private)"},
            "events": {"type": ["array", "null"], "items": _ref("EventType"), "minItems": 1,
                       "description": "event types to send (omitted or null: all)"},
            "path": {"type": ["string", "null"], "pattern": "^/",
                     "description": "fnmatch glob on the event's path (or old path), relative to the workspace, "
                                    "e.g. /reports/*"},
            "secret": {"type": ["string", "null"], "pattern": "^whsec_",
                       "description": "Standard Webhooks secret, whsec_ + base64 of 24..64 bytes "
                                      "(omitted: generated and returned once)"},
            "allow_private": {"type": "boolean", "default": False},
        },
    },
    "Webhook": {
        "type": "object", "required": ["id", "workspace", "url", "secret", "events", "path", "allow_private"],
        "properties": {
            "id": {"type": "string", "pattern": "^wh_[0-9a-f]{16}$"},
            "workspace": {"type": "string"},
            "url": {"type": "string"},
            "secret": {"type": "string", "description": "the first characters of the secret and ..."},
            "events": {"type": ["array", "null"], "items": _ref("EventType")},
            "path": {"type": ["string", "null"]},
            "allow_private": {"type": "boolean"},
            "source": {"type": "string", "enum": ["api", "config"],
                       "description": "config: a [[webhook]] of mount.conf; api: added at run time"},
            "created": {"type": "number", "description": "Unix time"},
            "start_seq": {"type": "integer", "description": "events of journal records after this seq are sent"},
            "disabled": {"type": ["string", "null"], "description": "why delivery stopped (e.g. a 410 answer)"},
            "cursor": {"type": ["integer", "null"],
                       "description": "every event up to this seq is delivered or dead-lettered"},
            "dead_letters": {"type": "integer"},
            "delivery": {"type": "object", "description": "live figures, when this peer leads the workspace",
                         "properties": {"cursor": {"type": "integer"}, "delivered": {"type": "integer"},
                                        "failed_attempts": {"type": "integer"}, "dead_lettered": {"type": "integer"},
                                        "in_flight": {"type": "integer"},
                                        "last_error": {"type": ["string", "null"]}}},
        },
    },
    "WebhookCreated": {
        "allOf": [_ref("Webhook"), {
            "type": "object", "required": ["secret"],
            "properties": {"secret": {"type": "string", "description": "the whole secret (shown only here)"}}}],
    },
    "WebhookList": {
        "type": "object", "required": ["webhooks"],
        "properties": {"webhooks": {"type": "array", "items": _ref("Webhook")}},
    },
    "TestResult": {
        "type": "object", "required": ["ok", "status", "ms"],
        "properties": {"ok": {"type": "boolean", "description": "answered 2xx"},
                       "status": {"type": ["integer", "null"], "description": "the receiver's HTTP status"},
                       "error": {"type": ["string", "null"]}, "ms": {"type": "number"}},
    },
    "ReplayResult": {
        "type": "object", "required": ["delivered", "failed", "errors"],
        "properties": {"delivered": {"type": "integer"}, "failed": {"type": "integer"},
                       "errors": {"type": "array", "items": {"type": "string"},
                                  "description": "the first ten failures"}},
    },
    "Event": {
        "type": "object", "required": ["id", "type", "timestamp", "data"],
        "description": "an event as delivered to webhooks (the body plus its webhook-id as id)",
        "properties": {
            "id": {"type": "string", "description": "evt_<workspace>_<epoch>_<seq>[_<n>]: deduplicate on it"},
            "type": _ref("EventType"),
            "timestamp": {"type": "string", "format": "date-time"},
            "data": {
                "type": "object", "required": ["workspace", "path", "epoch", "seq"],
                "properties": {
                    "workspace": {"type": "string"}, "path": {"type": "string"}, "old_path": {"type": "string"},
                    "inode": {"type": "integer"}, "is_dir": {"type": "boolean"}, "size": {"type": "integer"},
                    "mode": {"type": "integer"}, "mtime": {"type": "number"}, "version": {"type": "integer"},
                    "actor": {"type": "object", "properties": {"peer": {"type": ["string", "null"]},
                                                               "uid": {"type": ["integer", "null"]},
                                                               "pid": {"type": ["integer", "null"]}}},
                    "epoch": {"type": "integer"}, "seq": {"type": "integer"},
                    "cookie": {"type": "integer", "description": "fs.entry.moved: the same for both halves"},
                    "lock": {"type": "object", "description": "fs.lock.*: {kind, type}"},
                    "token": {"type": "string", "description": "fs.lock.acquired: the fencing token"},
                },
            },
        },
    },
    "EventPage": {
        "type": "object", "required": ["events", "next_after_seq", "gap"],
        "properties": {
            "events": {"type": "array", "items": _ref("Event"),
                       "description": "oldest first; whole journal records (a page never splits one)"},
            "next_after_seq": {"type": "integer", "description": "pass as after_seq to get the next page"},
            "gap": {"type": ["object", "null"],
                    "description": "records no longer in the journal: their events are lost to this pull",
                    "properties": {"first_seq": {"type": "integer"}, "last_seq": {"type": "integer"}}},
        },
    },
}

_RESPONSES = {
    "BadRequest": _json(_ref("Error"), "invalid parameters or body (the message says which)"),
    "Unauthorized": {**_json(_ref("Error"), "missing or wrong bearer token"),
                     "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    "NotFound": _json(_ref("Error"), "no such workspace, webhook or route"),
    "MethodNotAllowed": {**_json(_ref("Error"), "method not allowed on this path"),
                         "headers": {"Allow": {"schema": {"type": "string"}}}},
    "TooLarge": _json(_ref("Error"), "request body over 1 MiB"),
    "Unavailable": _json(_ref("Error"), "the stores did not answer"),
}


def _op(op_id: str, summary: str, ok: dict, *, params: tuple = (), body: dict | None = None) -> dict:
    responses = {**ok, "400": _error("BadRequest"), "401": _error("Unauthorized"), "404": _error("NotFound"),
                 "405": _error("MethodNotAllowed"), "503": _error("Unavailable")}
    if body is not None:
        responses["413"] = _error("TooLarge")
    out: dict[str, Any] = {"operationId": op_id, "summary": summary, "parameters": list(params),
                           "responses": dict(sorted(responses.items()))}
    if body is not None:
        out["requestBody"] = body
    return out


def document() -> dict:
    """The OpenAPI 3.1 document (a fresh dict)."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "agentmount peer API", "version": "1",
            "description": "Webhook subscriptions and change events of the workspaces of an agentmount peer. "
                           "Subscriptions are kept with the workspace in the stores: every peer serves and "
                           "sees the same ones, and the workspace's leader delivers. Every route but this "
                           "document needs `Authorization: Bearer <[api] token>`.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
            "responses": _RESPONSES,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/openapi.json": {"get": {
                "operationId": "openapi", "summary": "this document", "security": [],
                "responses": {"200": {"description": "the OpenAPI document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/v1/workspaces/{ws}/webhooks": {
                "get": _op("list_webhooks", "the workspace's webhook subscriptions (secrets masked)",
                           {"200": _json(_ref("WebhookList"), "the subscriptions")}, params=(_WS,)),
                "post": _op("add_webhook", "subscribe an endpoint to the workspace's events from now on",
                            {"201": {**_json(_ref("WebhookCreated"), "the subscription, with its whole secret"),
                                     "headers": {"Location": {"schema": {"type": "string"}}}}},
                            params=(_WS,), body={"required": True, "content": {
                                "application/json": {"schema": _ref("WebhookCreate")}}}),
            },
            "/v1/workspaces/{ws}/webhooks/{id}": {
                "get": _op("get_webhook", "one subscription (secret masked)",
                           {"200": _json(_ref("Webhook"), "the subscription")}, params=(_WS, _ID)),
                "delete": _op("remove_webhook", "delete a subscription with its cursor and dead letters",
                              {"204": {"description": "deleted"}}, params=(_WS, _ID)),
            },
            "/v1/workspaces/{ws}/webhooks/{id}/test": {
                "post": _op("test_webhook", "send one signed webhook.test event now (no retries)",
                            {"200": _json(_ref("TestResult"), "how the receiver answered")}, params=(_WS, _ID)),
            },
            "/v1/workspaces/{ws}/webhooks/{id}/replay": {
                "post": _op("replay_webhook", "re-send the subscription's dead-lettered events, oldest first",
                            {"200": _json(_ref("ReplayResult"), "what was delivered")}, params=(_WS, _ID)),
            },
            "/v1/workspaces/{ws}/events": {
                "get": _op("events", "pull the workspace's change events after a journal seq (resync)",
                           {"200": _json(_ref("EventPage"), "a page of events")}, params=(
                               _WS,
                               {"name": "after_seq", "in": "query", "required": False,
                                "description": "events of journal records after this seq (0: the oldest kept)",
                                "schema": {"type": "integer", "minimum": 0, "default": 0}},
                               {"name": "limit", "in": "query", "required": False,
                                "description": "at most this many events (a record's events are never split; "
                                               "one record bigger than the limit comes whole)",
                                "schema": {"type": "integer", "minimum": 1, "maximum": 10000,
                                           "default": 1000}})),
            },
        },
    })
