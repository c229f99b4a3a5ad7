"""The web view's ASGI application (Starlette): pages rendered on the server, one live stream.

Every page reads the history store (``history/store.py``) or asks the broker through a
blocking :class:`~brokerexec.Client`, on Starlette's thread pool: the event loop only
renders and streams. Each page reads right without JavaScript; ``static/app.js`` makes it
live through one Server-Sent Events stream per tab (``/events``, fed by ``live.py``), and
sends the controls' forms without leaving the page. What a job put anywhere (its service's
name, request, result, error, improved values) is escaped by the templates (Jinja2's
autoescape) and clipped (:data:`SHOWN_BYTES`).

Routes: ``/jobs``, ``/jobs/{id}`` (and its controls, POST), ``/operations``,
``/operations/{id}`` (its controls, and ``/operations/{id}/results.jsonl``), ``/fleet``,
``/events``, ``/login``, ``/healthz``, ``/static/...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import BrokerExecError, DecodeError, InvalidState, JobNotFound, SignalRefused
from ..operations.registry import first_number_field
from ..protocol.history import decode_cursor
from ..protocol.states import TERMINAL
from .live import Behind, EventHub, LiveEvent
from .security import COOKIE, Guard, Who

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..history.store import HistoryStore

__all__ = ["SHOWN_BYTES", "WebView", "create_app"]

HERE = Path(__file__).parent
#: The most of one value (a request, a result, an error) a page shows.
SHOWN_BYTES = 64 * 1024
#: Rows a page of jobs or items holds.
PAGE = 50
#: How long what a service declares is kept before the workers are asked again (seconds).
DECLARATIONS_KEPT = 60.0
#: How long a control waits for its job's answer (seconds).
CONTROL_TIMEOUT = 10.0
_CONTROLS = ("pause", "resume", "abort", "checkpoint")
_ENDED = {state.value for state in TERMINAL}


@dataclass
class WebView:
    """What the application serves from: the broker (``client``), the store, the live feed,
    the door (``guard``), and whether anything may be changed."""

    client: Client
    store: HistoryStore
    hub: EventHub
    guard: Guard
    read_only: bool = False


def create_app(view: WebView) -> Starlette:
    """The application (see the module docstring)."""
    pages = _Pages(view)
    routes = [
        Route("/", pages.home),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/healthz", pages.healthz),
        Route("/jobs", pages.jobs),
        Route("/jobs/{job_id}", pages.job),
        Route("/jobs/{job_id}/set", pages.job_set, methods=["POST"]),
        Route("/jobs/{job_id}/invoke/{method}", pages.job_invoke, methods=["POST"]),
        Route("/jobs/{job_id}/{action}", pages.job_control, methods=["POST"]),
        Route("/operations", pages.operations),
        Route("/operations/{operation_id}", pages.operation),
        Route("/operations/{operation_id}/results.jsonl", pages.operation_results),
        Route("/operations/{operation_id}/{action}", pages.operation_control, methods=["POST"]),
        Route("/fleet", pages.fleet),
        Route("/events", pages.events),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        view.hub.attach(asyncio.get_running_loop())  # the live feed wakes this loop's streams
        yield

    return Starlette(routes=routes, exception_handlers={404: pages.not_found, 500: pages.failed},
                     lifespan=lifespan)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["shown"] = shown
    env.filters["when"] = when
    env.filters["took"] = took
    env.filters["percent"] = percent
    env.filters["short"] = short
    env.filters["compact"] = compact
    return env


class _Pages:
    def __init__(self, view: WebView) -> None:
        self.view = view
        self.env = _templates()
        self._declared: dict[str, tuple[float, dict[str, Any] | None]] = {}  # service -> (when, declaration)

    # ---- the door ---------------------------------------------------------------------------

    def _who(self, request: Request) -> Who | None:
        return self.view.guard.who(request.headers, request.cookies, request.query_params.get("token"))

    def _render(self, request: Request, who: Who, name: str, status: int = 200,
                **context: Any) -> HTMLResponse:
        template = self.env.get_template(name)
        body = template.render(request=request, csrf=self.view.guard.csrf(who),
                               read_only=self.view.read_only, live_from=self.view.hub.newest_id(),
                               said=request.query_params.get("said"),
                               said_ok=request.query_params.get("ok") == "1", **context)
        response = HTMLResponse(body, status)
        _harden(response)
        if request.query_params.get("token") is not None and who.how == "cookie":
            response.set_cookie(COOKIE, self.view.guard.session(), httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    def _refused(self, request: Request) -> Response:
        if "text/html" in request.headers.get("accept", "") and request.method == "GET":
            return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", 303)
        response = PlainTextResponse("sign in first: open the address the server printed (with its token)",
                                     401)
        if self.view.guard.access.basic is not None:
            response.headers["WWW-Authenticate"] = 'Basic realm="brokerexec"'
        return response

    async def _change(self, request: Request) -> tuple[Who | None, Response | None, dict[str, Any]]:
        """A state-changing request: who, or the response refusing it; and its form."""
        who = self._who(request)
        if who is None:
            return None, self._refused(request), {}
        form = dict(await request.form())
        if self.view.read_only:
            refusal = self._answer(request, False, "this view is read-only: nothing may be changed", 403)
            return who, refusal, form
        given = str(form.get("csrf") or request.headers.get("x-csrf-token") or "")
        own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        why = self.view.guard.may_change(who, given, request.headers, own)
        if why is not None:
            return who, self._answer(request, False, why, 403), form
        return who, None, form

    def _answer(self, request: Request, ok: bool, message: str, status: int = 200,
                back: str | None = None, **more: Any) -> Response:
        """A control's outcome: JSON for the page's script, else back to the page, said there."""
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": ok, "message": message, **more}, status)
        if back is None or status in (401, 403):
            response: Response = PlainTextResponse(message, status)
        else:
            response = RedirectResponse(f"{back}?{urlencode({'said': message, 'ok': int(ok)})}", 303)
        return response

    # ---- pages ------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/jobs" + (f"?{request.url.query}" if request.url.query else ""), 303)

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login(self, request: Request) -> Response:
        guard = self.view.guard
        if request.method == "POST":
            form = await request.form()
            token = str(form.get("token") or "")
            target = _local(str(form.get("next") or "/jobs"))
            if guard.token_matches(token):
                response = RedirectResponse(target, 303)
                response.set_cookie(COOKIE, guard.session(), httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return response
            return HTMLResponse(self.env.get_template("login.html").render(
                next=target, said="That is not this server's token."), 401)
        return HTMLResponse(self.env.get_template("login.html").render(
            next=_local(request.query_params.get("next", "/jobs")), said=None),
            401 if guard.access.token is not None else 200)

    async def jobs(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        q = request.query_params
        filters: dict[str, Any] = {name: q.get(name) or None
                                   for name in ("service", "state", "worker", "operation")}
        text = q.get("q") or None
        since = _hours_ago(q.get("since"))
        cursor = q.get("cursor") or None
        try:
            if cursor is not None:
                decode_cursor(cursor)
            page = await run_in_threadpool(lambda: self.view.store.page(
                **filters, text=text, since=since, limit=PAGE, cursor=cursor))
        except DecodeError as exc:
            return self._render(request, who, "error.html", 400, title="Bad filter", message=str(exc))
        more = dict(q)
        more.pop("token", None)
        next_url = f"/jobs?{urlencode({**more, 'cursor': page.cursor})}" if page.cursor else None
        return self._render(request, who, "jobs.html", rows=page.rows, filters=filters, text=text or "",
                            since=q.get("since") or "", next_url=next_url, ended=_ENDED)

    async def job(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        job_id = request.path_params["job_id"]
        row = await run_in_threadpool(self.view.store.get, job_id)
        if row is None:
            return self._render(request, who, "error.html", 404, title="No such job",
                                message=f"The history store has no job {job_id}.")
        ended = row.state in _ENDED
        record = await run_in_threadpool(self.view.store.record, job_id) if ended else None
        declared = None if ended else await run_in_threadpool(self._declaration, row.service)
        events = self.view.hub.recent(lambda event: event.job_id == job_id)
        improved = [(event.time, event.data.get("state")) for event in events if event.kind == "improved"]
        return self._render(request, who, "job.html", row=row, record=record, declared=declared or {},
                            events=events, improved=improved, chart=chart(improved), ended=ended)

    def _declaration(self, service: str) -> dict[str, Any] | None:
        """What ``service`` declares, as a worker offering it says (the ``jobs`` query, which
        waits its whole time for every worker's answer: kept for :data:`DECLARATIONS_KEPT` s)."""
        known = self._declared.get(service)
        if known is not None and time.monotonic() - known[0] < DECLARATIONS_KEPT:
            return known[1]
        try:
            listing = self.view.client.listing(1.0)
        except BrokerExecError:
            return None
        now = time.monotonic()
        for worker in listing.workers:
            for name, found in (worker.get("descriptions") or {}).items():
                if isinstance(found, dict):
                    self._declared[name] = (now, found)
        return self._declared.get(service, (now, None))[1]

    async def job_control(self, request: Request) -> Response:
        _, refused, _ = await self._change(request)
        if refused is not None:
            return refused
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        back = f"/jobs/{job_id}"
        if action not in _CONTROLS:
            return self._answer(request, False, f"no control {action!r}", 404)
        job = self.view.client.job(job_id)
        try:
            outcome = await run_in_threadpool(getattr(job, action), CONTROL_TIMEOUT)
        except (JobNotFound, InvalidState) as exc:
            return self._answer(request, False, f"{action} not applied: {exc}", 409, back)
        except BrokerExecError as exc:
            return self._answer(request, False, f"{action} failed: {exc}", 502, back)
        if action == "checkpoint":
            return self._answer(request, True, "checkpoint taken", back=back)
        said = f"{action} applied" if outcome else f"{action} not applied (the job is not running)"
        return self._answer(request, bool(outcome), said, back=back)

    async def job_set(self, request: Request) -> Response:
        _, refused, form = await self._change(request)
        if refused is not None:
            return refused
        job_id = request.path_params["job_id"]
        back = f"/jobs/{job_id}"
        attribute = str(form.get("attribute") or "")
        service = await run_in_threadpool(self._service_of, job_id)
        declared = await run_in_threadpool(self._declaration, service or "")
        kind = ((declared or {}).get("settable") or {}).get(attribute)
        try:
            value = typed(str(form.get("value", "")), kind)
        except ValueError as exc:
            return self._answer(request, False, f"{attribute}: {exc}", 422, back, field=attribute)
        job = self.view.client.job(job_id)
        applied, refusal = await self._ask(request, back, attribute, "set",
                                           lambda: job.set({attribute: value}, rpc_timeout=CONTROL_TIMEOUT))
        if refusal is not None:
            return refusal
        return self._answer(request, True, f"set {attribute} = {json.dumps(applied.get(attribute, value))}",
                            back=back, field=attribute)

    async def job_invoke(self, request: Request) -> Response:
        _, refused, form = await self._change(request)
        if refused is not None:
            return refused
        job_id, method = request.path_params["job_id"], request.path_params["method"]
        back = f"/jobs/{job_id}"
        try:
            args = json.loads(str(form.get("args") or "[]"))
            if not isinstance(args, list):
                raise ValueError("the arguments are a JSON list: [1, \"a\"]")
        except ValueError as exc:
            return self._answer(request, False, f"{method}: {exc}", 422, back, field=method)
        job = self.view.client.job(job_id)
        value, refusal = await self._ask(request, back, method, method,
                                         lambda: job.invoke(method, *args, rpc_timeout=CONTROL_TIMEOUT))
        if refusal is not None:
            return refusal
        return self._answer(request, True, f"{method} returned {json.dumps(value, default=str)[:2000]}",
                            back=back, field=method)

    async def _ask(self, request: Request, back: str, field: str, what: str,
                   call: Callable[[], Any]) -> tuple[Any, Response | None]:
        """A set or an invoke's answer, or the response that says why it was not applied:
        refused by the service's declarations (422, next to ``field``), or not reached (409)."""
        try:
            return await run_in_threadpool(call), None
        except SignalRefused as exc:
            return None, self._answer(request, False, f"{field}: {exc}", 422, back, field=field)
        except BrokerExecError as exc:
            return None, self._answer(request, False, f"{what} not applied: {exc}", 409, back, field=field)

    def _service_of(self, job_id: str) -> str | None:
        row = self.view.store.get(job_id)
        return row.service if row is not None else None

    async def operations(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        cursor = request.query_params.get("cursor") or None
        try:
            headers, more = await run_in_threadpool(self.view.store.operations, limit=PAGE, cursor=cursor)
        except DecodeError as exc:
            return self._render(request, who, "error.html", 400, title="Bad page", message=str(exc))
        counts = await run_in_threadpool(
            lambda: {header["operation"]: self.view.store.operation_counts(header["operation"])
                     for header in headers})
        rows = [{**header, "counts": counts[header["operation"]],
                 **_progress(header, counts[header["operation"]])} for header in headers]
        next_url = f"/operations?{urlencode({'cursor': more})}" if more else None
        return self._render(request, who, "operations.html", rows=rows, next_url=next_url)

    async def operation(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        operation_id = request.path_params["operation_id"]
        header = await run_in_threadpool(self._header, operation_id)
        if header is None:
            return self._render(request, who, "error.html", 404, title="No such operation",
                                message=f"The history store has no operation {operation_id}.")
        counts = await run_in_threadpool(self.view.store.operation_counts, operation_id)
        state = request.query_params.get("state") or None
        cursor = request.query_params.get("cursor") or None
        try:
            page = await run_in_threadpool(self.view.store.page, operation=operation_id, state=state,
                                           limit=PAGE, cursor=cursor)
        except DecodeError as exc:
            return self._render(request, who, "error.html", 400, title="Bad page", message=str(exc))
        next_url = f"/operations/{operation_id}?{urlencode({'cursor': page.cursor, 'state': state or ''})}" \
            if page.cursor else None
        rate = await run_in_threadpool(self._throughput, operation_id)
        field = request.query_params.get("best") or first_number_field(row.improved for row in page.rows)
        lowest = request.query_params.get("lowest") == "1"
        try:
            best = None if not field else await run_in_threadpool(self.view.store.best, operation_id, field,
                                                                  lowest)
        except DecodeError as exc:
            return self._render(request, who, "error.html", 400, title="Bad field", message=str(exc))
        return self._render(request, who, "operation.html", header=header, counts=counts, rows=page.rows,
                            state=state or "", next_url=next_url, rate=rate, best=best, best_field=field,
                            lowest=lowest, **_progress(header, counts, rate))

    def _header(self, operation_id: str) -> dict[str, Any] | None:
        from ..protocol.operation_log import time_of_id

        created = time_of_id(operation_id) if len(operation_id) == 32 else None
        if created is None:
            return None
        headers, _ = self.view.store.operations(since=created - 1, until=created + 1, limit=1000)
        return next((header for header in headers if header.get("operation") == operation_id), None)

    def _throughput(self, operation_id: str) -> float | None:
        """Items ended a second over the last minute, from the store."""
        window = 60.0
        ended = self.view.store.page(operation=operation_id, since=time.time() - window, limit=1, count=True)
        return (ended.total or 0) / window if ended.total else None

    async def operation_results(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        operation_id = request.path_params["operation_id"]
        if await run_in_threadpool(self._header, operation_id) is None:
            return PlainTextResponse(f"no operation {operation_id}", 404)
        store = self.view.store

        async def lines() -> AsyncIterator[bytes]:
            cursor = None
            while True:
                page = await run_in_threadpool(store.page, operation=operation_id, limit=1000, cursor=cursor)
                for row in page.rows:
                    if row.state not in _ENDED:
                        continue
                    record = await run_in_threadpool(store.record, row.job_id) or {}
                    outcome = {"key": row.item_key, "request": _json(row.request), "job_id": row.job_id,
                               "state": row.state, "value": record.get("result"),
                               "error": record.get("error")}
                    yield (json.dumps(outcome, default=str) + "\n").encode()
                cursor = page.cursor
                if cursor is None:
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{operation_id}.jsonl"'})

    async def operation_control(self, request: Request) -> Response:
        _, refused, _ = await self._change(request)
        if refused is not None:
            return refused
        operation_id, action = request.path_params["operation_id"], request.path_params["action"]
        back = f"/operations/{operation_id}"
        header = await run_in_threadpool(self._header, operation_id)
        if header is None:
            return self._answer(request, False, f"no operation {operation_id}", 404)
        if action in ("pause", "resume", "abort"):
            from ..protocol.intents import Intent
            from ..protocol.messages import Control

            control = Control(Intent(action), header["service"], time.time(), operation=operation_id)
            try:
                await run_in_threadpool(self.view.client.transport.control, control)
            except BrokerExecError as exc:
                return self._answer(request, False, f"{action} failed: {exc}", 502, back)
            return self._answer(request, True, f"{action} sent to every item of the operation", back=back)
        if action == "rerun":
            def rerun() -> int:
                with self.view.client.operation_of(operation_id) as found:
                    found.wait_launched()
                    launched = found.rerun()
                    found.wait_launched()
                    return launched
            try:
                launched = await run_in_threadpool(rerun)
            except BrokerExecError as exc:
                return self._answer(request, False, f"re-run failed: {exc}", 409, back)
            return self._answer(request, True, f"{launched} failed or aborted item(s) launched again",
                                back=back, launched=launched)
        return self._answer(request, False, f"no control {action!r}", 404)

    async def fleet(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        try:
            listing = await run_in_threadpool(self.view.client.listing, 2.0)
        except BrokerExecError as exc:
            return self._render(request, who, "error.html", 502, title="The broker did not answer",
                                message=str(exc))
        queued: dict[str, int] = {}
        for job in listing.queued:
            queued[str(job.get("service"))] = queued.get(str(job.get("service")), 0) + 1
        return self._render(request, who, "fleet.html", workers=listing.workers, running=listing.running,
                            queued=queued)

    async def events(self, request: Request) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        hub = self.view.hub
        last = request.headers.get("last-event-id") or request.query_params.get("from")
        start = hub.after(last)
        q = request.query_params
        jobs = {job for job in (q.get("jobs") or "").split(",") if job} or None
        wanted = _wanted(q.get("job"), q.get("service"), q.get("kinds"), jobs)

        async def stream() -> AsyncIterator[str]:
            if start is None:
                yield f"id: {hub.newest_id()}\nevent: reset\ndata: {{}}\n\n"
                begin = hub.after(None)
            else:
                begin = start
            yield "retry: 1000\n\n"
            assert begin is not None
            try:
                async for event in hub.follow(begin, wanted):
                    if event is None:
                        yield ": ping\n\n"
                    else:
                        yield f"id: {hub.epoch}-{event.number}\nevent: job\ndata: {event.body()}\n\n"
            except Behind:
                yield f"id: {hub.newest_id()}\nevent: reset\ndata: {{}}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        who = self._who(request)
        if who is None:
            return self._refused(request)
        return self._render(request, who, "error.html", 404, title="Not found",
                            message=f"Nothing here at {request.url.path}.")

    async def failed(self, request: Request, exc: Exception) -> Response:
        return PlainTextResponse("the web view failed to answer this request (its log says why)", 500)


# ---- what the templates use ----------------------------------------------------------------


def shown(value: Any, limit: int = SHOWN_BYTES) -> str:
    """A value as JSON text (a string as it is), clipped to ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str, ensure_ascii=False)
    if len(text) > limit:
        return f"{text[:limit]}\n… ({len(text) - limit:,} more characters not shown)"
    return text


def compact(value: Any, limit: int = SHOWN_BYTES) -> str:
    """A value as JSON on one line (as the page's script shows events), clipped."""
    text = json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[:limit]}…"


def short(identifier: str) -> str:
    """An id as a table shows it: its start (when it was made) and its end (what tells ids
    made in the same moment apart)."""
    return identifier if len(identifier) <= 16 else f"{identifier[:6]}…{identifier[-6:]}"


def when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def took(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def percent(fraction: float | None) -> int:
    if fraction is None or not math.isfinite(fraction):
        return 0
    return max(0, min(100, round(fraction * 100)))


def typed(text: str, kind: str | None) -> Any:
    """A form's text as the declared type's value (``Service.describe()``'s type names).

    Raises:
        ValueError: it is not one, said for the field.
    """
    text = text.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "on", "off", ""):
                raise ValueError(text)
            return text.lower() in ("true", "1", "on")
        if kind == "str":
            return text
    except ValueError:
        raise ValueError(f"expected {kind}, got {text[:80]!r}") from None
    try:  # any other declared type (a list, a dict, a union): JSON
        return json.loads(text)
    except ValueError:
        raise ValueError(f"expected JSON of {kind or 'any type'}, got {text[:80]!r}") from None


def chart(points: list[tuple[float, Any]], width: int = 480, height: int = 120) -> Markup | None:
    """An inline SVG line of the first numeric field of the improved values, or None."""
    field = next((name for _, state in points if isinstance(state, dict)
                  for name, value in state.items() if _number(value)), None)
    values = [(at, float(state[field])) for at, state in points
              if field is not None and isinstance(state, dict) and _number(state.get(field))]
    if len(values) < 1:
        return None
    times = [at for at, _ in values]
    numbers = [number for _, number in values]
    t0, t1 = min(times), max(times) or 1
    lo, hi = min(numbers), max(numbers)
    span_t, span_v = (t1 - t0) or 1.0, (hi - lo) or 1.0
    coords = " ".join(f"{(at - t0) / span_t * (width - 10) + 5:.1f},"
                      f"{height - 5 - (v - lo) / span_v * (height - 10):.1f}" for at, v in values)
    label = escape(field)
    return Markup(f'<svg class="chart" role="img" aria-label="{label} over time" data-field="{label}" '
                  f'viewBox="0 0 {width} {height}" width="100%" height="{height}">'
                  f'<polyline fill="none" stroke="currentColor" stroke-width="2" points="{coords}"/></svg>')


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _progress(header: dict[str, Any], counts: dict[str, int], rate: float | None = None) -> dict[str, Any]:
    """An operation's overall bar: done of total, and an ETA at ``rate`` items a second."""
    done = sum(n for state, n in counts.items() if state in _ENDED)
    total = max(int(header.get("expected") or 0), sum(counts.values()))
    fraction = done / total if total else 1.0
    eta = (total - done) / rate if rate else None
    return {"done": done, "total": total, "fraction": fraction, "eta": eta}


def _wanted(job: str | None, service: str | None, kinds: str | None,
            jobs: set[str] | None = None) -> Callable[[LiveEvent], bool]:
    """The events a stream asked for: of one job, or of ``jobs`` (those a page shows), of a
    service, of some kinds."""
    chosen = set(kinds.split(",")) if kinds else None

    def wanted(event: LiveEvent) -> bool:
        return ((job is None or event.job_id == job) and (jobs is None or event.job_id in jobs)
                and (service is None or event.service == service)
                and (chosen is None or event.kind in chosen))

    return wanted


def _hours_ago(text: str | None) -> float | None:
    try:
        return time.time() - float(text) * 3600 if text else None
    except ValueError:
        return None


def _local(target: str) -> str:
    """``target`` if it is a path of this server (never another site after signing in)."""
    local = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if local else "/jobs"


def _harden(response: Response) -> None:
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
