"""The MCC's HTTP side (Starlette): the login, the read-only page, its event stream, /metrics.

Read-only: no route changes anything on the box. The page (`page.html`, plain HTML, vanilla JS,
inline SVG; no build step) loads `/api/state` and then follows `/events`, server-sent events
carrying the same snapshot every second. Sessions are random tokens held in memory (at most
MAX_SESSIONS, the oldest dropped first) in an HttpOnly, SameSite=Strict cookie; a restart logs
everyone out. Neither passwords nor tokens are ever logged.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from services.mcc import users
from services.mcc.metrics import exposition
from services.mcc.state import BoxState
from shared.runtime.logs import get_logger

COOKIE = "mcc_session"
MAX_SESSIONS = 64
FORM_MAX = 4096
EVENT_INTERVAL_S = 1.0
FAILED_LOGIN_DELAY_S = 1.0
CHECKS_AT_ONCE = 2  # password checks (PBKDF2, ~0.1 s of CPU each) run at once; more wait their turn
_encode = msgspec.json.Encoder().encode

LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MCC login</title>
<meta name="viewport" content="width=device-width">
<style>body{{font-family:system-ui,sans-serif;max-width:22em;margin:4em auto}}input{{display:block;width:100%;
margin:.3em 0 1em;padding:.4em}}.err{{color:#b00}}</style></head><body>
<h1>Maintenance control</h1><p>Station {station}</p>{error}
<form method="post" action="/login"><label>Operator<input name="user" id="user" autocomplete="username"></label>
<label>Password<input name="password" id="password" type="password" autocomplete="current-password"></label>
<button type="submit" id="login">Log in</button></form></body></html>"""


class Sessions:
    def __init__(self, hours: float) -> None:
        self.ttl = hours * 3600
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (user, time.monotonic() + self.ttl)
            while len(self._tokens) > MAX_SESSIONS:
                self._tokens.popitem(last=False)
        return token

    def user(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._lock:
            held = self._tokens.get(token)
            if held is None or held[1] < time.monotonic():
                self._tokens.pop(token, None)
                return None
            return held[0]

    def close(self, token: str | None) -> None:
        with self._lock:
            self._tokens.pop(token or "", None)


def page_html() -> str:
    return resources.files("services.mcc").joinpath("page.html").read_text()


class McWeb:
    """The routes; every one but /login and (when public) /metrics needs a session."""

    def __init__(self, state: BoxState, lock: threading.Lock, users_file: Path, *, metrics_public: bool,
                 session_hours: float, secure_cookie: bool) -> None:
        self.state = state
        self.lock = lock
        self.users_file = users_file
        self.metrics_public = metrics_public
        self.secure_cookie = secure_cookie
        self.sessions = Sessions(session_hours)
        self.page = page_html()
        self.log = get_logger(component="mcc-web")
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)  # a login flood cannot take the box's CPU

    def snapshot(self) -> bytes:
        with self.lock:
            return _encode(self.state.snapshot(time.time()))

    def signed_in(self, request: Request) -> str | None:
        return self.sessions.user(request.cookies.get(COOKIE))

    def login_page(self, error: str = "", status_code: int = 200) -> Response:
        return HTMLResponse(LOGIN_PAGE.format(station=self.state.station, error=error), status_code=status_code,
                            headers={"Cache-Control": "no-store"})

    async def index(self, request: Request) -> Response:
        if self.signed_in(request) is None:
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(self.page, headers={"Cache-Control": "no-store"})

    async def login_form(self, request: Request) -> Response:
        return self.login_page()

    async def login(self, request: Request) -> Response:
        body = await request.body()
        form = parse_qs(body[:FORM_MAX].decode("utf-8", "replace"))
        name = (form.get("user") or [""])[0]
        password = (form.get("password") or [""])[0]
        ok = False
        if len(body) <= FORM_MAX:
            async with self._checks:
                ok = await asyncio.to_thread(users.check, self.users_file, name, password)
        if not ok:
            self.log.warning("mcc login refused", state_transition="LOGIN_REFUSED")
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            return self.login_page('<p class="err" id="error">Wrong operator or password.</p>', 401)
        self.log.info("mcc login", operator=name, state_transition="LOGIN")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, self.sessions.open(name), max_age=int(self.sessions.ttl), httponly=True,
                            samesite="strict", secure=self.secure_cookie, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        self.sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def api_state(self, request: Request) -> Response:
        if self.signed_in(request) is None:
            return Response(status_code=401)
        return Response(self.snapshot(), media_type="application/json", headers={"Cache-Control": "no-store"})

    async def events(self, request: Request) -> Response:
        if self.signed_in(request) is None:
            return Response(status_code=401)
        token = request.cookies.get(COOKIE)

        async def stream() -> AsyncIterator[bytes]:
            while self.sessions.user(token) is not None and not await request.is_disconnected():
                yield b"data: " + self.snapshot() + b"\n\n"
                await asyncio.sleep(EVENT_INTERVAL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def metrics(self, request: Request) -> Response:
        if not self.metrics_public and self.signed_in(request) is None:
            return Response(status_code=404)
        return Response(exposition(self.state, self.lock), media_type="text/plain; version=0.0.4; charset=utf-8")


def make_app(state: BoxState, lock: threading.Lock, users_file: Path, *, metrics_public: bool = True,
             session_hours: float = 12.0, secure_cookie: bool = False) -> Starlette:
    web = McWeb(state, lock, users_file, metrics_public=metrics_public, session_hours=session_hours,
                secure_cookie=secure_cookie)
    return Starlette(routes=[
        Route("/", web.index), Route("/login", web.login_form, methods=["GET"]),
        Route("/login", web.login, methods=["POST"]), Route("/logout", web.logout, methods=["POST"]),
        Route("/api/state", web.api_state), Route("/events", web.events), Route("/metrics", web.metrics),
    ])
