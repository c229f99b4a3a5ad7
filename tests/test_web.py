"""The web view's endpoints without a browser (Starlette's TestClient), on a ``memory://``
broker whose history store the view reads: the door (token, basic auth, a trusted header),
CSRF and Origin checks, read-only, every page and control, hostile content, the live
stream and its resumption. ``test_web_browser.py`` drives the real thing in Chromium."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sample_services
from starlette.testclient import TestClient

from brokerexec import Client, Service, ServiceHandler
from brokerexec.history.embedded import MemoryHistory, keep_history
from brokerexec.history.store import HistoryStore
from brokerexec.protocol.events import Event
from brokerexec.web.app import WebView, create_app
from brokerexec.web.live import Behind, EventHub
from brokerexec.web.security import COOKIE, Access, Guard

pytestmark = pytest.mark.timeout(60)
WAIT = 20.0
TOKEN = "a-token-for-tests"
ORIGIN = "http://testserver"


HOSTILE = "<script>alert('x')</script><a href=\"javascript:alert(1)\">click</a>"


class Hostile(Service):
    """Puts markup everywhere it can: its improved value, its result (10 MB of it)."""

    name = "hostile"

    def run(self, handler: ServiceHandler, request: dict[str, Any]) -> dict[str, Any]:
        handler.ready()
        handler.improved({"note": HOSTILE, "score": 1.0})
        handler.ready()
        return {"text": HOSTILE, "big": "x" * 10_000_000}


@dataclass
class Site:
    http: TestClient
    client: Client
    view: WebView
    history: MemoryHistory

    def flushed(self) -> None:
        """Once every entry noted so far is in the store."""
        self.history.flushed().result(WAIT)

    def csrf(self) -> str:
        from brokerexec.web.security import Who

        return self.view.guard.csrf(Who("token", "cookie"))

    def post(self, path: str, data: dict[str, Any] | None = None, **headers: str) -> Any:
        return self.http.post(path, data={"csrf": self.csrf(), **(data or {})},
                              headers={"Origin": ORIGIN, "Accept": "application/json", **headers})


def make_site(tmp_path: Path, access: Access, read_only: bool = False) -> Iterator[Site]:
    url = f"memory://web-{uuid.uuid4().hex[:8]}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = HistoryStore(str(tmp_path / "history.db"))
    store.migrate()  # as the server does when it starts
    history = keep_history(url, store)
    hub = EventHub()
    with Client(url, services=[*sample_services.ALL, Hostile], concurrency=4) as client:
        client.subscribe("#", hub.publish)
        view = WebView(client, store, hub, Guard(access), read_only)
        with TestClient(create_app(view), base_url=ORIGIN, follow_redirects=False) as http:
            yield Site(http, client, view, history)
    history.close()
    store.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    for made in make_site(tmp_path, Access(token=TOKEN)):
        made.http.get(f"/jobs?token={TOKEN}")  # signed in: the session cookie
        yield made


def running(site: Site, request: dict[str, Any] | None = None, service: str = "forever") -> str:
    """A job launched and heard to run (its state event), in the store once it is."""
    started = threading.Event()
    job_id: list[str] = []

    def heard(event: Event) -> None:
        if event.data.get("to") == "running" and event.job_id in job_id:
            started.set()

    listening = site.client.subscribe("state.*.*", heard)
    try:
        job = site.client.launch(service, request or {"tick": 0.01})
        job_id.append(job.id)
        if job.status()["state"] != "running":  # it may have started before it was named here
            assert started.wait(WAIT), f"job {job.id} never ran"
    finally:
        listening.close()
    site.flushed()
    return job.id


# ---- the door -----------------------------------------------------------------------------


def test_nothing_is_shown_without_the_token_and_the_token_becomes_a_session(tmp_path: Path) -> None:
    for site in make_site(tmp_path, Access(token=TOKEN)):
        http = site.http
        page = http.get("/jobs", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert http.get("/jobs").status_code == 401
        assert http.get("/events").status_code == 401
        assert http.get("/jobs?token=wrong").status_code == 401
        assert http.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        signed = http.get(f"/jobs?token={TOKEN}")
        assert signed.status_code == 200
        cookie = signed.headers["set-cookie"]
        assert COOKIE in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert http.get("/operations").status_code == 200  # the cookie from now on
        # the sign-in form: a wrong token is refused, the right one lands where asked (never elsewhere)
        http.cookies.clear()
        assert http.post("/login", data={"token": "wrong", "next": "/fleet"}).status_code == 401
        good = http.post("/login", data={"token": TOKEN, "next": "https://elsewhere.example/"})
        assert good.status_code == 303 and good.headers["location"] == "/jobs"
        headers = http.get("/jobs").headers
        assert "default-src 'self'" in headers["content-security-policy"]
        # what needs no session: the health check, the sign-in page, the page's own files
        http.cookies.clear()
        assert http.get("/healthz").text == "ok"
        assert "Sign in" in http.get("/login").text
        script = http.get("/static/app.js")
        assert script.status_code == 200 and "EventSource" in script.text
        assert http.get("/static/app.css").headers["content-type"].startswith("text/css")


def test_basic_auth_and_a_trusted_header(tmp_path: Path) -> None:
    for site in make_site(tmp_path / "basic", Access(basic="ada:s3cret")):
        refused = site.http.get("/jobs")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"ada:nope").decode()
        assert site.http.get("/jobs", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
        right = base64.b64encode(b"ada:s3cret").decode()
        assert site.http.get("/jobs", headers={"Authorization": f"Basic {right}"}).status_code == 200
    for site in make_site(tmp_path / "header", Access(header="X-Forwarded-User")):
        assert site.http.get("/jobs").status_code == 401
        assert site.http.get("/jobs", headers={"X-Forwarded-User": "ada"}).status_code == 200
    with pytest.raises(ValueError, match="exactly one"):
        Access(token="t", basic="a:b")


def test_a_change_needs_the_csrf_token_and_the_servers_own_origin(site: Site) -> None:
    job_id = running(site)
    no_csrf = site.http.post(f"/jobs/{job_id}/pause", headers={"Origin": ORIGIN})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    elsewhere = site.post(f"/jobs/{job_id}/pause", Origin="https://evil.example")
    assert elsewhere.status_code == 403 and "another origin" in elsewhere.text
    assert site.post(f"/jobs/{job_id}/pause", Origin="").status_code == 403  # neither Origin nor Referer
    assert site.client.job(job_id).status()["state"] == "running"  # none of them reached it
    by_referer = site.http.post(f"/jobs/{job_id}/pause", data={"csrf": site.csrf()},
                                headers={"Referer": f"{ORIGIN}/jobs/{job_id}", "Accept": "application/json"})
    assert by_referer.status_code == 200 and by_referer.json()["ok"]
    bearer = site.http.post(f"/jobs/{job_id}/abort", headers={"Authorization": f"Bearer {TOKEN}",
                                                              "Accept": "application/json"})
    assert bearer.status_code == 200 and bearer.json()["ok"]  # a script's token: no CSRF needed


def test_a_read_only_view_shows_no_control_and_takes_none(tmp_path: Path) -> None:
    for site in make_site(tmp_path, Access(token=TOKEN), read_only=True):
        site.http.get(f"/jobs?token={TOKEN}")
        job_id = running(site)
        page = site.http.get(f"/jobs/{job_id}").text
        assert "read-only" in page and ">Pause<" not in page and "<form method=\"post\"" not in page
        refused = site.post(f"/jobs/{job_id}/abort")
        assert refused.status_code == 403 and "read-only" in refused.text
        assert site.client.job(job_id).status()["state"] == "running"
        site.client.job(job_id).abort()


# ---- pages and controls ---------------------------------------------------------------------------


def test_the_jobs_page_lists_filters_and_pages_the_store(site: Site) -> None:
    jobs = [site.client.launch("counter", {"steps": 3 + n}) for n in range(5)]
    failing = site.client.launch("counter", {"steps": 5, "fail_at": 1})
    for job in [*jobs, failing]:
        job.record(WAIT)
    site.flushed()
    page = site.http.get("/jobs").text
    assert all(f'data-job-id="{job.id}"' in page for job in [*jobs, failing])
    failed = site.http.get("/jobs?state=failed").text
    assert f'data-job-id="{failing.id}"' in failed and f'data-job-id="{jobs[0].id}"' not in failed
    first = site.http.get("/jobs?service=counter&limit=2")
    assert first.status_code == 200
    assert site.http.get("/jobs?cursor=not-a-cursor").status_code == 400
    found = site.http.get(f"/jobs?q={failing.id[:20]}").text
    assert f'data-job-id="{failing.id}"' in found and f'data-job-id="{jobs[0].id}"' not in found


def test_a_job_page_steers_it_with_typed_forms_and_says_each_outcome(site: Site) -> None:
    job_id = running(site)
    page = site.http.get(f"/jobs/{job_id}").text
    for label in ("Pause", "Resume", "Abort", "Checkpoint", "Set value", "Invoke loops"):
        assert f">{label}</button>" in page, label
    assert 'name="value" type="number" step="1"' in page  # value is declared an int
    assert site.post(f"/jobs/{job_id}/pause").json() == {"ok": True, "message": "pause applied"}
    wrong = site.post(f"/jobs/{job_id}/set", {"attribute": "value", "value": "seven"})
    assert wrong.status_code == 422 and wrong.json()["field"] == "value"
    assert "expected int" in wrong.json()["message"]
    undeclared = site.post(f"/jobs/{job_id}/set", {"attribute": "nope", "value": "1"})
    assert undeclared.status_code == 422 and "nope" in undeclared.json()["message"]
    assert site.post(f"/jobs/{job_id}/resume").json()["ok"]
    applied = site.post(f"/jobs/{job_id}/set", {"attribute": "value", "value": "7"})
    assert applied.json() == {"ok": True, "message": "set value = 7", "field": "value"}
    invoked = site.post(f"/jobs/{job_id}/invoke/current", {"args": "[]"})
    assert invoked.json()["message"] == "current returned 7"
    assert site.post(f"/jobs/{job_id}/invoke/current", {"args": "{"}).status_code == 422
    assert site.post(f"/jobs/{job_id}/checkpoint").status_code in (200, 409)  # forever keeps none
    # without the page's script: the form posts, and the page says it
    plain = site.http.post(f"/jobs/{job_id}/abort", data={"csrf": site.csrf()}, headers={"Origin": ORIGIN})
    assert plain.status_code == 303 and plain.headers["location"].startswith(f"/jobs/{job_id}?said=")
    assert site.client.job(job_id).record(WAIT)["state"] == "aborted"
    site.flushed()
    ended = site.http.get(plain.headers["location"]).text
    assert "abort applied" in ended and ">Pause</button>" not in ended
    again = site.post(f"/jobs/{job_id}/pause")
    assert again.status_code in (200, 409) and not again.json()["ok"]


def test_unknown_ids_are_a_404_page_and_hostile_content_is_inert_and_clipped(site: Site) -> None:
    missing = site.http.get("/jobs/" + "0" * 32)
    assert missing.status_code == 404 and "No such job" in missing.text and "Traceback" not in missing.text
    assert site.http.get("/operations/" + "0" * 32).status_code == 404
    assert site.http.get("/operations/not-an-id").status_code == 404
    assert site.http.get("/nowhere").status_code == 404
    job = site.client.launch("hostile", {"text": HOSTILE})
    job.record(WAIT)
    site.flushed()
    page = site.http.get(f"/jobs/{job.id}").text
    assert "<script>alert" not in page and 'href="javascript:' not in page
    assert "&lt;script&gt;alert" in page
    assert len(page) < 400_000 and "more characters not shown" in page
    listing = site.http.get("/jobs").text
    assert "<script>alert" not in listing


def test_operations_are_listed_counted_steered_rerun_and_downloaded(site: Site) -> None:
    requests = [{"steps": 3 + n, "fail_at": 1 if n % 3 == 0 else -1} for n in range(6)]
    op = site.client.operation("counter", requests, name="<b>nightly</b>")
    op.wait(WAIT)
    site.flushed()
    listing = site.http.get("/operations").text
    assert f'data-operation-id="{op.id}"' in listing and "&lt;b&gt;nightly" in listing
    page = site.http.get(f"/operations/{op.id}").text
    assert "4 finished" in page and "2 failed" in page and ">Re-run failed</button>" in page
    failed = site.http.get(f"/operations/{op.id}?state=failed").text
    assert failed.count("data-job-id=") == 2
    lines = site.http.get(f"/operations/{op.id}/results.jsonl").text.splitlines()
    outcomes = [json.loads(line) for line in lines]
    assert len(outcomes) == 6 and sorted(o["state"] for o in outcomes) == ["failed"] * 2 + ["finished"] * 4
    assert all(o["value"] == {"count": o["request"]["steps"], "label": ""}
               for o in outcomes if o["state"] == "finished")
    rerun = site.post(f"/operations/{op.id}/rerun")
    assert rerun.json()["ok"] and rerun.json()["launched"] == 2
    paused = site.post(f"/operations/{op.id}/pause")
    assert paused.json() == {"ok": True, "message": "pause sent to every item of the operation"}
    op.close()


def test_an_operations_page_shows_its_best_improved_value_either_way(site: Site) -> None:
    with site.client.operation("improver", [{"n": n} for n in (3, 5, 4)]) as op:
        op.wait(WAIT)
    site.flushed()
    page = site.http.get(f"/operations/{op.id}").text
    assert "i = 4.0 (highest)" in page  # the last improved value of each: 2, 4, 3
    lowest = site.http.get(f"/operations/{op.id}?best=i&lowest=1").text
    assert "i = 2.0 (lowest)" in lowest
    assert site.http.get(f"/operations/{op.id}?best=i%27)--").status_code == 400


def test_the_fleet_page_shows_the_workers_and_their_services(site: Site) -> None:
    page = site.http.get("/fleet").text
    assert "forever" in page and "counter" in page and "No worker answered" not in page
    assert "<td>4</td>" in page  # its capacity (concurrency)


# ---- the live stream --------------------------------------------------------------------------


def read_events(site: Site, path: str, count: int, last_id: str | None = None) -> list[tuple[str, str, Any]]:
    """The first ``count`` events of a stream: (id, event, data)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    found: list[tuple[str, str, Any]] = []
    with site.http.stream("GET", path, headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in stream.iter_lines():
            if line == "":
                if "event" in fields:
                    data = json.loads(fields.get("data", "null"))
                    found.append((fields.get("id", ""), fields["event"], data))
                    if len(found) == count:
                        return found
                fields = {}
            elif not line.startswith(":") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return found


def test_the_stream_carries_a_jobs_events_and_a_reconnect_misses_none(site: Site) -> None:
    start = site.view.hub.newest_id()
    job = site.client.launch("improver", {"n": 6, "delay": 0.01})
    job.record(WAIT)
    first = read_events(site, f"/events?job={job.id}&from={start}", 4)
    assert [kind for _, kind, _ in first] == ["job"] * 4 and first[0][2]["job_id"] == job.id
    # reconnected after the second: the third comes next, and nothing is skipped
    again = read_events(site, f"/events?job={job.id}", 2, last_id=first[1][0])
    assert [e[0] for e in again] == [e[0] for e in first[2:4]]
    only = read_events(site, f"/events?job={job.id}&from={start}&kinds=improved", 6)
    improved = [data["data"]["state"]["i"] for _, _, data in only]
    assert improved == list(range(6))
    stale = read_events(site, "/events", 1, last_id="0-5")  # another server's id: load the page again
    assert stale[0][1] == "reset"


def test_the_hub_coalesces_progress_never_losing_the_newest_and_a_reader_too_far_behind_is_told() -> None:
    import asyncio

    hub = EventHub(kept=50, progress_every=0.2)

    def progress(n: int, job: str = "j") -> Event:
        return Event("progress", job, "s", n, time.time(), {"n": n})

    for n in range(100):
        hub.publish(progress(n))
    taken = [event.data["n"] for event in hub.since(0) or []]
    assert taken == [0]  # the burst: the first now, the newest held back
    done = threading.Event()
    timer = threading.Timer(0.5, done.set)
    timer.start()
    done.wait(WAIT)
    assert [event.data["n"] for event in hub.since(0) or []] == [0, 99]  # the newest, when its time came
    hub.publish(Event("state", "j", "s", 100, time.time(), {"from": "running", "to": "finished"}))
    assert (hub.since(0) or [])[-1].kind == "state"
    for n in range(60):  # other events are never coalesced; the ring keeps 50
        hub.publish(Event("improved", "k", "s", n, time.time(), {"state": {"n": n}}))
    assert hub.since(0) is None and hub.after(f"{hub.epoch}-1") is None and hub.after("other-3") is None

    async def fall_behind() -> None:
        hub.attach(asyncio.get_running_loop())
        async for _ in hub.follow(0, lambda event: True):
            pass

    with pytest.raises(Behind):
        asyncio.run(fall_behind())
