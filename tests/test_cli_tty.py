"""What people see on a terminal: the live bar, the status panel, the jobs table and the
``--all`` confirmation, under a pseudo-terminal (stdin, stdout and stderr a pty of 120
columns), through the real entry point."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator

import pytest
from test_cli import FIT, LONG_FIT, ROOT, Worker, brokerexec, wait_until

from brokerexec.cli.display import label
from brokerexec.client.pace import Pace

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WAIT = 30.0


class Terminal:
    """``python -m brokerexec ARGS`` on a pseudo-terminal; what it draws, as text."""

    def __init__(self, *args: str, columns: int = 120) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        self.process = subprocess.Popen([sys.executable, "-m", "brokerexec", *args], cwd=ROOT,
                                        stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True)
        os.close(slave)
        self._master = master
        self._raw = b""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the other side closed
                data = b""
            with self._changed:
                self._raw += data
                self._changed.notify_all()
            if not data:
                return

    def text(self) -> str:
        """Everything drawn so far, escapes removed, each redraw on a line of its own."""
        with self._changed:
            raw = self._raw.decode(errors="replace")
        return ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.text())
            if match:
                found.append(match)
            return bool(match)

        with self._changed:
            self._changed.wait_for(seen, timeout)
        assert found, f"nothing matching {pattern!r} within {timeout} s:\n{self.text()}"
        return found[0]

    def type(self, text: str) -> None:
        os.write(self._master, text.encode())

    def wait(self, timeout: float = WAIT) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        os.close(self._master)
        return code


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        if terminal.process.poll() is None:
            terminal.process.kill()
            terminal.wait()


def test_pace_moves_between_reports_and_never_reaches_the_end_early() -> None:
    pace = Pace()
    pace.started(100.0)
    pace.report(110.0, 0.5)  # half-way after 10 s: 5% a second
    assert pace.fraction(112.0) == pytest.approx(0.6)  # moved on, not stalled at 50%
    assert pace.eta(112.0) == pytest.approx(8.0)
    assert pace.fraction(200.0) == 0.99  # never 100% before the job says it ended
    pace.report(120.0, 0.9)
    assert pace.eta(120.0) == pytest.approx(2.5)  # the rate since the first report: 4%/s
    assert pace.elapsed(130.0) == 30.0
    assert Pace().eta(1.0) is None and Pace().fraction(1.0) is None


def test_labels_tell_jobs_launched_together_apart() -> None:
    same_millisecond = ["0193a2b3c4d5" + tail for tail in ("1" * 20, "2" * 20)]
    assert len({label(job_id) for job_id in same_millisecond}) == 2
    assert label(same_millisecond[0]) == "job …11111111"


@pytest.mark.timeout(120)
def test_run_draws_a_bar_with_eta_and_improved_values_above_it(terminals: list[Terminal]) -> None:
    terminal = Terminal("run", FIT, "--progress-delta", "0.2", "--request",
                        json.dumps({"max_iterations": 4000, "tolerance": 0}))
    terminals.append(terminal)
    assert terminal.wait(110) == 0, terminal.text()
    text = terminal.text()
    lines = text.splitlines()
    # the improved values are lines of their own above the bar, in the job's time
    assert any(re.match(r"improved: params=\[[\d., ]+\], cost=[\d.]+, iteration=\d+ \(at 0:0\d\)$", line)
               for line in lines), text
    # the bar: the id's random tail, a percentage, elapsed time and an ETA while it runs
    drawn = [line for line in lines if "ETA" in line]
    assert drawn, text
    assert all(re.search(r"job …[0-9a-f]{8} .* +\d+% elapsed 0:\d\d, ETA 0:\d\d", line)
               for line in drawn), drawn
    # it ends at 100% with the state, then the result
    assert re.search(r"100% elapsed 0:\d\d +finished", text), text
    assert '"iterations": 4000' in text


@pytest.mark.timeout(120)  # a few seconds of fitting, on a machine that may be busy
def test_the_bar_moves_on_between_progress_reports(terminals: list[Terminal]) -> None:
    # Given reports 1 s apart, the bar is redrawn twice a second in between:
    terminal = Terminal("run", FIT, "--progress-delta", "1", "--request",
                        json.dumps({"max_iterations": 6000, "tolerance": 0}))
    terminals.append(terminal)
    assert terminal.wait(110) == 0, terminal.text()
    drawn = re.findall(r" (\d+)% elapsed [\d:]+, ETA [\d:-]+ +iteration=(\d+)", terminal.text())
    by_report: dict[str, set[int]] = {}
    for percent, iteration in drawn:
        by_report.setdefault(iteration, set()).add(int(percent))
    # then one report is shown at several, growing percentages (no stall until the next),
    assert any(len(percents) > 1 for percents in by_report.values()), drawn
    # never 100% before the end (unless the service itself reports all 6000 iterations done).
    assert all(int(percent) < 100 or iteration == "6000" for percent, iteration in drawn), drawn


@pytest.mark.rabbitmq
def test_watch_counts_elapsed_time_from_the_jobs_start(amqp_url: str, terminals: list[Terminal]) -> None:
    worker = Worker(amqp_url, "--shutdown-grace", "5")
    try:
        job_id = brokerexec("launch", "fit", "--request", LONG_FIT, "--broker", amqp_url).stdout.strip()

        def elapsed() -> float:
            done = brokerexec("status", job_id, "--broker", amqp_url, "--json")
            progress = json.loads(done.stdout).get("progress") or {} if done.returncode == 0 else {}
            return float(progress.get("elapsed", 0.0))

        wait_until(lambda: elapsed() >= 3.0, "the job to have run 3 s")
        terminal = Terminal("watch", job_id, "--broker", amqp_url)
        terminals.append(terminal)
        first = terminal.wait_for(r"elapsed (\d+):(\d\d)")
        assert int(first.group(1)) * 60 + int(first.group(2)) >= 3, terminal.text()
        terminal.process.send_signal(signal.SIGINT)
        assert terminal.wait(15) == 130
        assert f"job {job_id} keeps running" in terminal.text()
        # status, on a terminal: a short panel, and the jobs table with its footer
        panel = Terminal("status", job_id, "--broker", amqp_url)
        terminals.append(panel)
        assert panel.wait() == 0
        text = panel.text()
        assert re.search(r"│ state +running", text), text
        assert re.search(r"│ since +\d\d:\d\d:\d\d \(\d+ s ago\)", text), text
        assert re.search(r"│ progress +\[\.+\] +0%", text) and re.search(r"│ attempt +1", text), text
        table = Terminal("jobs", "--broker", amqp_url)
        terminals.append(table)
        assert table.wait() == 0
        assert job_id in table.text() and "1 worker answered, 1 running, 0 queued" in table.text()
    finally:
        brokerexec("abort", "--all", "--yes", "--broker", amqp_url)
        worker.stop()


def test_all_without_a_service_asks_first_on_a_terminal(terminals: list[Terminal]) -> None:
    # No broker is needed: a refusal sends nothing (the URL would fail with exit 5).
    terminal = Terminal("abort", "--all", "--broker", "amqp://guest:guest@127.0.0.1:1/")
    terminals.append(terminal)
    terminal.wait_for(r"abort every job on this broker, of every service\? \[y/N\]")
    terminal.type("n\n")
    assert terminal.wait() == 130
    assert "abort --all not confirmed; nothing sent" in terminal.text()
    # and with a pipe for stdin (a script) it is not asked: it goes on, here to exit 5
    done = brokerexec("abort", "--all", "--broker", "amqp://guest:guest@127.0.0.1:1/")
    assert done.returncode == 5 and "[y/N]" not in done.stderr
