"""The dashboard's web front end: an ASGI app (Starlette) serving the page and its static files,
a JSON API over the fleet view, server-sent events for live updates, and the operator actions
(revoke, reinstate, request re-attestation) behind a bearer token.

Reading needs no token (bind to loopback, the default, or put an authenticating proxy in front);
acting does: `Authorization: Bearer <token>`, compared in constant time, never logged and never
accepted from a URL. Requests whose Host is not one of ours are refused (DNS rebinding), and
every response carries a strict Content-Security-Policy: the page runs only its own script.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from provisioning.home import FleetHome
from provisioning.registry import Registry
from strongroom.errors import InputError, StrongroomError
from strongroom.fields import DEVICE_ID_RE
from verifier.dashboard import queries as fq
from verifier.dashboard.live import LiveView
from verifier.dashboard.view import FleetView
from verifier.operator import ACTIVE, REVOKED, Outcome, request_reattestation, set_status

log = structlog.get_logger()

ACTIONS = ("revoke", "reinstate", "reattest")
MAX_ACTION_BODY = 4096
MAX_REASON = 500
MAX_CHANGED = 200  # beyond this many changed devices an update says "everything"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"cache-control", b"no-store"),
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class WebConfig:
    home: FleetHome
    token: bytes  # the operator token (held only here, for the comparison)
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    update_interval_s: float = 0.5
    keepalive_s: float = 15.0


def bearer_matches(header: str | None, token: bytes) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (constant-time comparison)."""
    if not header or not token:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (a plain ASGI middleware: streaming-safe)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def create_app(live: LiveView, config: WebConfig) -> Starlette:
    """The ASGI application over `live`; operator actions act on `config.home`."""

    page = (resources.files("verifier.dashboard") / "static" / "index.html").read_bytes()

    async def index(_request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def get_summary(_request: Request) -> Response:
        now = live.clock()
        doc = live.use(lambda v: fq.summary(v, now))
        doc["connected"] = live.connected
        return JSONResponse(doc)

    async def get_devices(request: Request) -> Response:
        try:
            q = fq.Query.from_params(request.query_params)
        except InputError as e:
            return _error(400, str(e), e.hint)
        now = live.clock()
        # sorting thousands of devices takes milliseconds: not on the event loop
        doc = await run_in_threadpool(live.use, lambda v: fq.query(v, q).to_json_dict(now))
        return JSONResponse(doc)

    async def get_device(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        now = live.clock()
        doc = live.use(lambda v: fq.detail(v, device_id, now))
        if doc is None:
            return _error(404, "no such device in the fleet view")
        return JSONResponse(doc)

    async def get_alerts(_request: Request) -> Response:
        return JSONResponse({"alerts": live.use(fq.recent_alerts)})

    async def get_history(_request: Request) -> Response:
        doc = live.use(fq.history)
        doc["now"] = live.clock()
        return JSONResponse(doc)

    async def get_operator(request: Request) -> Response:
        """Lets the page check a token before the operator needs it."""
        if not bearer_matches(request.headers.get("authorization"), config.token):
            return _unauthorized(request, "check")
        return Response(status_code=204)

    async def post_action(request: Request) -> Response:
        device_id, action = request.path_params["device_id"], request.path_params["action"]
        if action not in ACTIONS:
            return _error(404, "unknown action", f"use one of {', '.join(ACTIONS)}")
        if not bearer_matches(request.headers.get("authorization"), config.token):
            return _unauthorized(request, action)
        if not DEVICE_ID_RE.fullmatch(device_id) or not Registry(config.home.registry_dir).exists(
            device_id
        ):
            return _error(404, "no such enrolled device")
        try:
            reason = await _reason(request)
            outcome = await run_in_threadpool(_act, config.home, action, device_id, reason)
        except InputError as e:
            return _error(400, str(e), e.hint)
        except StrongroomError as e:
            log.error("operator_action_failed", action=action, device=device_id, reason=str(e))
            return _error(500, str(e), e.hint)
        log.info("operator_action", action=action, device=device_id, changed=outcome.changed)
        return JSONResponse(outcome.to_json_dict())

    async def events(_request: Request) -> Response:
        return StreamingResponse(
            _updates(live, config),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    statics = StaticFiles(packages=[("verifier.dashboard", "static")])
    routes = [
        Route("/", index),
        Route("/api/summary", get_summary),
        Route("/api/devices", get_devices),
        Route("/api/devices/{device_id}", get_device),
        Route("/api/devices/{device_id}/{action}", post_action, methods=["POST"]),
        Route("/api/alerts", get_alerts),
        Route("/api/history", get_history),
        Route("/api/operator", get_operator),
        Route("/api/events", events),
        Mount("/static", app=statics, name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts)),
    ]
    return Starlette(routes=routes, middleware=middleware)


def _unauthorized(request: Request, action: str) -> Response:
    client = request.client.host if request.client else "?"
    log.warning("operator_auth_failed", action=action, client=client)
    return JSONResponse(
        {"error": "operator token missing or wrong", "hint": "sign in with the operator token"},
        status_code=401,
        headers={"www-authenticate": 'Bearer realm="strongroom"'},
    )


async def _reason(request: Request) -> str:
    body = await request.body()
    if len(body) > MAX_ACTION_BODY:
        raise InputError("request body too large")
    if not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise InputError("request body is not JSON") from e
    reason = doc.get("reason", "") if isinstance(doc, dict) else None
    if not isinstance(reason, str):
        raise InputError("reason must be text")
    return " ".join(reason.split())[:MAX_REASON]


def _act(home: FleetHome, action: str, device_id: str, reason: str) -> Outcome:
    if action == "revoke":
        why = reason or "revoked from the dashboard"
        return set_status(home, device_id, REVOKED, reason=why, by="dashboard")
    if action == "reinstate":
        return set_status(home, device_id, ACTIVE, reason=reason, by="dashboard")
    return request_reattestation(home, device_id, by="dashboard")


def _update(view: FleetView, since: int, now: float) -> dict[str, Any]:
    changed = view.changed_since(since) if since >= 0 else None
    if changed is not None and len(changed) > MAX_CHANGED:
        changed = None
    return {"summary": fq.summary(view, now), "changed": changed}


async def _updates(live: LiveView, config: WebConfig) -> AsyncIterator[str]:
    """Server-sent events: `update` with the summary and the devices changed since the last one
    (null: reload everything), sent at most every `update_interval_s`; comments keep it alive."""
    yield "retry: 2000\n\n"
    seen, was_connected = -1, None
    quiet = 0.0
    while True:
        version, connected = live.version, live.connected
        if version != seen or connected != was_connected:
            doc = live.use(partial(_update, since=seen, now=live.clock()))
            doc["summary"]["connected"] = connected
            seen, was_connected, quiet = doc["summary"]["version"], connected, 0.0
            yield f"event: update\ndata: {json.dumps(doc)}\n\n"
        elif quiet >= config.keepalive_s:
            quiet = 0.0
            yield ": keepalive\n\n"
        await asyncio.sleep(config.update_interval_s)
        quiet += config.update_interval_s
