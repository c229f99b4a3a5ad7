"""Reading a job's journal from its end backwards (protocol/journal.py's BackSearch and
JournalWindow), sans-I/O: a stream of the test's own, fed as RabbitMQ feeds a consumer
(from the start of the chunk that holds the offset asked for, then on to a probe)."""

from __future__ import annotations

from typing import Any

from brokerexec import codec
from brokerexec.protocol.commands import Incoming
from brokerexec.protocol.journal import BackSearch, JournalWindow
from brokerexec.protocol.names import (
    CHECKPOINT_TYPE,
    LAUNCH_TYPE,
    PROBES_EXCHANGE,
    RECORD_TYPE,
    STARTED_TYPE,
    new_job_id,
)

CHUNK = 100


class Stream:
    """Messages with offsets; the broker's chunks are CHUNK messages long."""

    def __init__(self) -> None:
        self.messages: list[Incoming] = []
        self.delivered = 0

    def write(self, job_id: str, kind: str, body: dict[str, Any]) -> int:
        at = len(self.messages)
        self.messages.append(Incoming(codec.encode({"job_id": job_id, **body}), codec.JSON, job_id, kind,
                                      None, "", at))
        return at

    def noise(self, n: int) -> None:
        for _ in range(n):
            self.write(new_job_id(), STARTED_TYPE, {"attempt": 1, "time": 0.0})

    def read(self, window: JournalWindow) -> JournalWindow:
        """What a consumer at ``window.offset`` gets, until the window is done."""
        messages = list(self.messages)
        for probe_id in window.probes.values():
            messages.append(Incoming(b"{}", None, probe_id, "brokerexec.probe", None, PROBES_EXCHANGE,
                                     len(messages)))
        start = window.offset
        first = (len(self.messages) - 1) // CHUNK * CHUNK if start == "last" else int(start) // CHUNK * CHUNK
        for message in messages[max(first, 0):]:
            self.delivered += 1
            if window.feed(window.stream, message):
                break
        return window

    def search(self, search: BackSearch) -> BackSearch:
        while (window := search.next_window()) is not None:
            search.took(self.read(window))
        return search


def test_an_ended_job_is_found_reading_only_what_came_after_its_record() -> None:
    stream, job = Stream(), new_job_id()
    stream.write(job, LAUNCH_TYPE, {"service": "s", "sent": 1.0})
    stream.noise(100_000)  # its life, in a busy fleet
    stream.write(job, RECORD_TYPE, {"state": "finished", "result": 42, "attempt": 1})
    stream.noise(2_500)  # since its end
    search = stream.search(BackSearch(job))
    assert search.complete and search.history.record is not None
    assert search.history.record["result"] == 42
    assert stream.delivered < 10_000  # not the 100,000 of its life


def test_the_search_goes_back_to_the_launch_when_there_is_no_record() -> None:
    stream, job = Stream(), new_job_id()
    stream.noise(50)
    stream.write(job, LAUNCH_TYPE, {"service": "s", "sent": 1.0})
    stream.noise(7_000)
    stream.write(job, STARTED_TYPE, {"attempt": 1, "time": 2.0, "service": "s", "worker": {"id": "w"}})
    stream.noise(3_000)
    search = stream.search(BackSearch(job))
    status = search.history.status()
    assert status is not None and status["state"] == "resuming" and status["attempt"] == 1
    assert search.history.launch is not None
    # With enough: a status stops at the newest start.
    stream.delivered = 0
    short = stream.search(BackSearch(job, enough=lambda es: any(e.kind == STARTED_TYPE for e in es)))
    assert short.history.status()["state"] == "resuming"  # type: ignore[index]
    assert stream.delivered < 6_000  # not back to its launch, 10,000 entries ago


def test_an_unknown_job_is_not_found_and_a_bad_entry_is_skipped() -> None:
    stream, job = Stream(), new_job_id()
    stream.noise(300)
    assert stream.search(BackSearch(job)).not_found
    at = len(stream.messages)
    stream.messages.append(Incoming(b"{not json", codec.JSON, job, RECORD_TYPE, None, "", at))
    stream.write(job, CHECKPOINT_TYPE, {"job_id": "someone-else", "attempt": 1, "time": 3.0, "state": {}})
    search = stream.search(BackSearch(job))
    assert search.history.record is None and search.history.checkpoint is None


def test_a_window_at_an_offset_reads_exactly_that_entry() -> None:
    stream, job = Stream(), new_job_id()
    stream.noise(250)
    at = stream.write(job, CHECKPOINT_TYPE, {"attempt": 2, "time": 5.0, "state": {"n": 1}})
    stream.noise(10)
    window = stream.read(JournalWindow(job, at, at + 1))
    assert [(e.offset, e.kind, e.body["state"]) for e in window.entries] == [(at, CHECKPOINT_TYPE, {"n": 1})]
    assert stream.delivered <= CHUNK + 2  # the chunk that holds it, and no further


def test_a_worker_makes_a_bounded_number_of_journal_reads_at_once(monkeypatch: Any) -> None:
    # After a broker restart every claim is verified again and every lease comes back: with
    # 10,000 of them, each a read, only READS_AT_ONCE run together; the rest wait their turn,
    # and the wait does not count against a read's time limit.
    import asyncio

    from brokerexec.transport.rabbitmq.worker import journal_writer

    running, most = 0, 0

    async def read_journal(_connection: Any, window: JournalWindow, seconds: float) -> None:
        nonlocal running, most
        assert seconds > journal_writer.READ_TIMEOUT - 1  # its own time, not the queue's
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        window.done = True
        running -= 1

    monkeypatch.setattr(journal_writer, "read_journal", read_journal)

    async def main() -> int:
        writer = journal_writer.JournalWriter(None, {}, max_checkpoint_bytes=1)  # type: ignore[arg-type]
        reads = [writer.read_at(new_job_id(), n) for n in range(200)]
        await asyncio.gather(*reads)
        return writer.reads_waiting

    assert asyncio.run(main()) == 0
    assert most == journal_writer.READS_AT_ONCE
