"""The web view in a real browser: ``brokerexec web`` started as users start it, against the
real broker and real worker processes, driven by Playwright in Debian's Chromium (never a
downloaded browser: ``apt-get install -y chromium``; ``.ci/run`` installs it, and under
``CI=true`` these tests fail without it rather than skip).

With ``BROKEREXEC_SCREENSHOTS=1`` they also write the screenshots of ``docs/web.md``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brokerctl
import pytest

from brokerexec import Client, HistoryUnavailable

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "browser-test-token"
WAIT = 30_000  # ms, Playwright's unit
#: As the machine's probe starts it: no sandbox (root), no background networking (the
#: closed network refuses it), no first-run work.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
Workers = Callable[..., Any]
Web = Callable[..., "WebProcess"]


class WebProcess:
    """``brokerexec web`` in its own process; ``url`` once it has said where it listens."""

    def __init__(self, broker: str, store: Path, *args: str) -> None:
        env = {**os.environ, "BROKEREXEC_WEB_TOKEN": TOKEN}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "brokerexec", "web", "--broker", broker, "--store", str(store),
             "--port", "0", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line)
                found = re.search(r"brokerexec web at (http://\S+?)/\?token=", line)
                if found:
                    self.url = found.group(1)
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            raise AssertionError("brokerexec web did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def web(own_vhost: str, tmp_path: Path) -> Iterator[Callable[..., WebProcess]]:
    started: list[WebProcess] = []

    def start(*args: str) -> WebProcess:
        server = WebProcess(own_vhost, tmp_path / "history.db", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        message = f"the browser tests need Debian's Chromium at {CHROMIUM}: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()


def signed_in(page: Any, server: WebProcess, path: str) -> Any:
    """Open ``path`` signed in (the token becomes the session cookie); wait for it to exist
    (a job is on its page once the store has it)."""
    from playwright.sync_api import expect

    page.goto(f"{server.url}/jobs?token={TOKEN}")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    brokerctl.wait_until(lambda: page.context.request.get(server.url + path).status == 200, WAIT / 1000,
                         f"{path} in the store")  # the context's cookie: signed in
    page.goto(server.url + path)
    return page


def stored(client: Client, **query: Any) -> list[dict[str, Any]]:
    """The store's rows, asked through the broker; none while the web process's indexer is
    not answering yet (it starts answering a moment after the view)."""
    try:
        return client.history(**query).rows
    except HistoryUnavailable:
        return []


def screenshot(page: Any, name: str) -> None:
    if os.environ.get("BROKEREXEC_SCREENSHOTS"):
        page.screenshot(path=str(ROOT / "docs" / "img" / f"{name}.png"), full_page=True)


def test_a_running_job_is_watched_and_steered_from_its_page(
        own_vhost: str, worker_process: Workers, web: Web, page: Any) -> None:
    from playwright.sync_api import expect

    worker_process("--concurrency", "4", url=own_vhost)
    server = web()
    with Client(own_vhost, timeout=10) as client:
        steps = client.launch("steps", {"steps": 3000, "delay": 0.01}, progress_delta=0.1)
        forever = client.launch("forever", {"tick": 0.01}, progress_delta=0.1)
        signed_in(page, server, f"/jobs/{steps.id}")
        bar = page.locator(f'progress[data-bar-of="{steps.id}"]')
        page.wait_for_function("(bar) => bar.value > 0", arg=bar.element_handle(), timeout=WAIT)
        first = bar.evaluate("bar => bar.value")
        page.wait_for_function("([bar, first]) => bar.value > first", arg=[bar.element_handle(), first],
                               timeout=WAIT)  # the bar advances, live
        state = page.locator('article [data-field="state"]')
        page.get_by_role("button", name="Pause").click()
        expect(state).to_have_text("paused", timeout=1000)
        page.get_by_role("button", name="Resume").click()
        expect(state).to_have_text("running", timeout=1000)
        screenshot(page, "web-job")
        # a settable value set from its typed form, seen in the job's next progress
        signed_in(page, server, f"/jobs/{forever.id}")
        field = page.get_by_role("spinbutton", name="value (int)")  # its declared type's input
        field.fill("42")
        page.get_by_role("button", name="Set value").click()
        said = page.locator('form[data-field-name="value"] output')
        expect(said).to_have_text("set value = 42", timeout=WAIT)
        expect(page.locator("[data-events]")).to_contain_text('"value":42', timeout=WAIT)
        field.press_sequentially("x")  # a number input takes no letter: the browser's own check
        assert field.input_value() in ("", "42")
        page.get_by_role("button", name="Abort").click()
        expect(page.locator('article [data-field="state"]')).to_have_text("aborted", timeout=WAIT)
        assert client.job(forever.id).record(30)["state"] == "aborted"
        steps.abort()


def test_an_operations_counts_move_and_rerun_failed_reruns_only_the_failures(
        own_vhost: str, worker_process: Workers, web: Web, page: Any) -> None:
    from playwright.sync_api import expect

    worker_process("--concurrency", "4", url=own_vhost)
    server = web()
    with Client(own_vhost, timeout=10) as client:
        requests = [{"steps": 20 + n, "delay": 0.02, "fail_at": 3 if n in (2, 5) else -1} for n in range(8)]
        op = client.operation("counter", requests, name="browser sweep")
        signed_in(page, server, f"/operations/{op.id}")
        counts = page.locator("[data-counts]")
        expect(counts).to_contain_text("6 finished", timeout=WAIT)  # moved live, without a reload
        expect(counts).to_contain_text("2 failed", timeout=WAIT)
        screenshot(page, "web-operation")
        failed = {item.key for item in op.items("failed")}
        page.get_by_role("button", name="Re-run failed").click()
        expect(page.locator('form[action$="/rerun"] output')).to_have_text(
            "2 failed or aborted item(s) launched again", timeout=WAIT)
        op.close()

        def jobs_by_key() -> Counter[str]:
            return Counter(row["item_key"] for row in stored(client, operation=op.id, limit=100))

        brokerctl.wait_until(lambda: sum(jobs_by_key().values()) == 10, 30, "the re-run's jobs in the store")
        assert {key for key, n in jobs_by_key().items() if n == 2} == failed  # only the failures ran again


def test_ended_jobs_stay_listed_after_the_web_process_and_the_workers_restart(
        own_vhost: str, worker_process: Workers, web: Web, page: Any) -> None:
    from playwright.sync_api import expect

    worker = worker_process("--concurrency", "2", url=own_vhost)
    server = web()
    with Client(own_vhost, timeout=10) as client:
        job = client.launch("counter", {"steps": 3})
        job.record(30)
        signed_in(page, server, f"/jobs/{job.id}")
    server.stop()
    worker.terminate()
    worker_process("--concurrency", "2", url=own_vhost)
    again = web()
    signed_in(page, again, "/jobs")
    expect(page.locator(f'tr[data-job-id="{job.id}"] [data-field="state"]')).to_have_text("finished")
    screenshot(page, "web-jobs")


def test_a_stream_reconnected_goes_on_with_no_event_missed(
        own_vhost: str, worker_process: Workers, web: Web, page: Any) -> None:
    from playwright.sync_api import expect

    worker = worker_process("--concurrency", "4", url=own_vhost)
    worker.terminate()  # the service's queue exists; nobody takes from it now
    server = web()
    with Client(own_vhost, timeout=10) as client:
        jobs = [client.launch("counter", {"steps": 2 + n}) for n in range(5)]
        brokerctl.wait_until(lambda: len(stored(client, state="queued", limit=10)) == 5, 30,
                             "the queued jobs in the store")
        signed_in(page, server, "/jobs")
        page.evaluate("() => window.brokerexec.disconnect()")
        worker_process("--concurrency", "4", url=own_vhost)
        for job in jobs:
            job.record(30)  # they ran and ended while the page heard nothing
        states = page.locator('tbody [data-field="state"]')
        assert "finished" not in states.all_text_contents()
        page.evaluate("() => window.brokerexec.reconnect()")
        for job in jobs:  # every end arrives: the stream went on after the last event seen
            expect(page.locator(f'tr[data-job-id="{job.id}"] [data-field="state"]')).to_have_text(
                "finished", timeout=WAIT)


def test_hostile_content_is_inert_and_no_control_is_reachable_without_the_token_or_read_only(
        own_vhost: str, worker_process: Workers, web: Web, page: Any) -> None:
    from playwright.sync_api import expect

    worker_process("--concurrency", "2", url=own_vhost)
    server = web()
    hostile = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
    with Client(own_vhost, timeout=10) as client:
        job = client.launch("echo", {"value": {"text": hostile, "link": "javascript:window.pwned=3"}})
        job.record(30)
        forever = client.launch("forever", {"tick": 0.01})
        signed_in(page, server, f"/jobs/{job.id}")
        expect(page.locator("pre.value").first).to_contain_text("<script>window.pwned=2</script>")
        assert page.evaluate("() => window.pwned") is None
        assert page.locator('a[href^="javascript:"]').count() == 0
        # no token: the sign-in page, no control
        anonymous = page.context.browser.new_context()
        stranger = anonymous.new_page()
        stranger.goto(f"{server.url}/jobs/{forever.id}")
        expect(stranger.get_by_role("button", name="Sign in")).to_be_visible()
        assert stranger.get_by_role("button", name="Abort").count() == 0
        refused = stranger.request.post(f"{server.url}/jobs/{forever.id}/abort")
        assert refused.status == 401
        anonymous.close()
        # read-only: the page, without its controls
        viewer = web("--read-only")
        signed_in(page, viewer, f"/jobs/{forever.id}")
        expect(page.get_by_text("read-only").first).to_be_visible()
        assert page.get_by_role("button", name="Abort").count() == 0
        assert client.job(forever.id).status()["state"] == "running"
        forever.abort()


def test_pages_work_at_360_pixels_wide(
        own_vhost: str, worker_process: Workers, web: Web, browser: Any) -> None:
    worker_process("--concurrency", "2", url=own_vhost)
    server = web()
    context = browser.new_context(viewport={"width": 360, "height": 740})
    narrow = context.new_page()
    with Client(own_vhost, timeout=10) as client:
        job = client.launch("forever", {"tick": 0.01})
        signed_in(narrow, server, f"/jobs/{job.id}")
        wide = narrow.evaluate("() => document.documentElement.scrollWidth")
        assert wide <= 360, f"the page is {wide} px wide"
        assert narrow.get_by_role("button", name="Pause").is_visible()
        screenshot(narrow, "web-narrow")
        job.abort()
    context.close()
