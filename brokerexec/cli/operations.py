"""The CLI verbs of operations: ``sweep`` launches one, ``op`` finds and steers it by id.

``sweep`` stays until every request is launched (the requests go with the process that
launches them), then prints the operation's id; ``--follow`` watches it to its end. The
``op`` verbs reattach by id (``client.operation_of``: the journal holds every operation),
so they work from any machine, also after the launching one was killed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import click

from .input import ask, broker_option, json_option, loads_strict, need_shared_broker
from .output import EPILOG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, emit, exit_on_errors, fail

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..client.operation import Operation

__all__ = ["op", "sweep"]


def _grid(text: str) -> Any:
    from ..operations.requests import grid

    axes = loads_strict(text)
    if not isinstance(axes, dict):
        fail('--grid takes a JSON object of axes, each a list: {"a": [1, 2], "b": [3]}', EXIT_USAGE)
    return grid(**axes)


def _lines(file: IO[str]) -> Iterator[dict[str, Any]]:
    """The requests of a JSON-lines file, one at a time (blank lines skipped)."""
    for number, line in enumerate(file, 1):
        if line.strip():
            try:
                request = loads_strict(line)
            except ValueError as exc:
                fail(f"--requests line {number}: not JSON ({exc})", EXIT_USAGE)
            if not isinstance(request, dict):
                fail(f"--requests line {number}: a request is a JSON object", EXIT_USAGE)
            yield request


def _max_failures(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            fail(f"--max-failures takes a count or a fraction, not {text!r}", EXIT_USAGE)


def _client(broker: str) -> Client:
    from ..client.blocking import Client

    return Client(broker)


def _status_text(op: Operation) -> str:
    status = op.status()
    counts = ", ".join(f"{n} {state}" for state, n in status.counts.items() if n)
    rate = f"{status.throughput:.2f}/s" if status.throughput else "-"
    eta = f"{status.eta:.0f} s" if status.eta is not None else "-"
    best = _best_text(op)
    return (f"{op.id} {op.name}: {status.done}/{status.total} done ({counts}); {rate}, ETA {eta}"
            + (f"; {best}" if best else ""))


def _best_text(op: Operation) -> str:
    """The best improved value so far: the highest of the first numeric field the items
    report (``op.status(best=...)``), as ``best FIELD = VALUE``; "" while none reports one."""
    from ..operations.registry import first_number_field

    field = first_number_field(item.improved for item in op.items())
    if field is None:
        return ""
    best = op.status(best=field).best
    return f"best {field} = {(best.improved or {}).get(field)}" if best is not None else ""


def _status_document(op: Operation) -> dict[str, Any]:
    return {"id": op.id, "name": op.name, "service": op.service, "stopped": op.stopped,
            **op.status().encode()}



def _failures(op: Operation) -> list[dict[str, Any]]:
    return [{"key": item.key, "job_id": item.job_id, "state": item.state.value, "error": item.error}
            for state in ("failed", "aborted") for item in op.items(state)]


def _follow(op: Operation, as_json: bool) -> None:
    """Watch ``op`` to its end: a bar on a terminal, else a line whenever its counts move."""
    from ..errors import Timeout

    bar = None
    if not as_json and sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task(op.name, total=op.status().total)
    shown = ""
    try:
        while True:
            try:
                op.wait(1.0)
                break
            except Timeout:
                pass
            if bar is not None:
                status = op.status()
                rate = f", {status.throughput:.1f}/s" if status.throughput else ""
                best = _best_text(op)
                bar.update(task, total=status.total, completed=status.done,
                           description=f"{op.name} ({status.counts['failed']} failed{rate}"
                                       f"{'; ' + best if best else ''})")
            elif not as_json and (text := _status_text(op)) != shown:
                click.echo(text, err=True)
                shown = text
    finally:
        if bar is not None:
            bar.stop()


def _end(op: Operation, as_json: bool) -> None:
    """The summary of an ended operation, and the exit code: 1 if any item did not finish."""
    failures = _failures(op)
    invalid = [item.key for item in op.invalid()]
    if as_json:
        click.echo(json.dumps({**_status_document(op), "failures": failures, "invalid": invalid}))
    else:
        click.echo(_status_text(op))
        if failures:
            click.echo(f"  {'state':<8} {'item':<16} {'job':<32}  error")
        for failure in failures:
            click.echo(f"  {failure['state']:<8} {failure['key'][:16]:<16} {failure['job_id'] or '-'}  "
                       f"{failure['error'] or ''}")
        if invalid:
            click.echo(f"{len(invalid)} item(s) do not validate against the service's inputs "
                       f"(InvalidRequest above): their requests need changing")
    sys.exit(EXIT_FAILED if failures else EXIT_OK)


@click.command(epilog=EPILOG)
@click.argument("service")
@click.option("--grid", "grid_text",
              help='Axes as JSON, each a list: {"a": [1, 2], "b": [3]} (every combination).')
@click.option("--requests", "requests_file", type=click.File("r"),
              help="A file of requests, one JSON object a line ('-': standard input).")
@click.option("--name", help="The operation's name.")
@click.option("--fail-fast", is_flag=True, help="Abort the rest at the first failure.")
@click.option("--max-failures", "max_failures_text", metavar="N",
              help="Abort the rest after N failures (or, below 1, that fraction of the items).")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="At most N jobs launched and not ended.")
@click.option("--follow", is_flag=True, help="Watch it to its end, then list what did not finish.")
@click.option("--dry-run", is_flag=True,
              help="Say what it would skip, resume, run again and launch; launch nothing.")
@click.option("--fresh", is_flag=True, help="A new operation, even if one of --name exists.")
@broker_option
@json_option
def sweep(service: str, grid_text: str | None, requests_file: IO[str] | None, name: str | None,
          fail_fast: bool, max_failures_text: str | None, max_in_flight: int | None, follow: bool,
          dry_run: bool, fresh: bool, broker: str, as_json: bool) -> None:
    """Launch one job of SERVICE per request, as one operation; print its id.

    The requests are --grid's every combination or --requests' lines. The command stays
    until every request is launched; `brokerexec op` steers the operation from then on.
    With the --name of an operation of SERVICE made in the last day, it resumes that one:
    finished items are skipped, those under way go on, failed and aborted ones run again.
    """
    if (grid_text is None) == (requests_file is None):
        fail("give the requests with --grid or with --requests (one of them)", EXIT_USAGE)
    from ..transport.schemes import scheme_of

    with exit_on_errors():
        shared = scheme_of(broker).shared
    if not shared and not follow:
        fail(f"a sweep on {broker} runs in this process: add --follow to wait for it", EXIT_USAGE)
    requests: Any = _grid(grid_text) if grid_text is not None else _lines(requests_file)  # type: ignore[arg-type]
    max_failures = _max_failures(max_failures_text)
    with exit_on_errors(), _client(broker) as client:
        if dry_run:
            _dry_run(client, service, requests, None if fresh else name, as_json)
            return
        op = client.operation(service, requests, name=name, max_failures=max_failures, resume=not fresh,
                              on_error="fail_fast" if fail_fast else "continue", max_in_flight=max_in_flight)
        if not as_json:
            click.echo(f"operation {op.id}", err=True)
        if follow:
            _follow(op, as_json)
            _end(op, as_json)
        op.wait_launched()  # the requests go with this process: launched, it may go
        if op.launch_error is not None:
            raise op.launch_error
        emit({"id": op.id, "name": op.name, "service": service, "items": len(op.items())}, as_json,
             lambda value: value["id"])


def _dry_run(client: Client, service: str, requests: Any, name: str | None, as_json: bool) -> None:
    plan = client.operation_plan(service, requests, name=name)
    counts = plan.counts()

    def text(value: dict[str, Any]) -> str:
        what = f"resume operation {plan.operation}" if plan.operation else "a new operation"
        parts = ", ".join(f"{n} {part.replace('_', ' ')}" for part, n in counts.items())
        return f"{what}: {parts} (nothing launched)"

    emit({**plan.encode(), "counts": counts}, as_json, text)


@click.group(epilog=EPILOG)
def op() -> None:
    """Find, watch and steer an operation (`brokerexec sweep` launches one) by its id."""


def _found(broker: str, operation_id: str) -> tuple[Client, Operation]:
    need_shared_broker(broker)
    client = _client(broker)
    try:
        return client, client.operation_of(operation_id)
    except BaseException:
        client.close()
        raise


@op.command(name="list", epilog=EPILOG)
@click.option("--since", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Made in the last HOURS.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@broker_option
@json_option
def list_(since: float, limit: int, broker: str, as_json: bool) -> None:
    """The operations made lately, newest first."""
    need_shared_broker(broker)
    with exit_on_errors(), _client(broker) as client:
        found = client.operations(time.time() - since * 3600, limit)
    emit(found, as_json, lambda rows: "\n".join(
        f"{row['id']}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['created']))}  "
        f"{row['service']:<16} {row['expected'] if row['expected'] is not None else '?':>7}  {row['name']}"
        for row in rows) or "no operations")


def _with_operation(verb: str) -> Callable[[Callable[..., None]], click.Command]:
    """An ``op`` verb of ``action(operation, as_json, **its options)``, the operation found by ID."""
    def decorate(action: Callable[..., None]) -> click.Command:
        @op.command(name=verb, epilog=EPILOG, help=action.__doc__)
        @click.argument("operation_id", metavar="ID")
        @broker_option
        @json_option
        def command(operation_id: str, broker: str, as_json: bool, **options: Any) -> None:
            with exit_on_errors():
                client, found = _found(broker, operation_id)
                with client, found:
                    action(found, as_json, **options)

        command.params[1:1] = list(reversed(getattr(action, "__click_params__", [])))  # as click.command
        return command
    return decorate


@op.command(epilog=EPILOG)
@click.argument("operation_id", metavar="ID")
@click.option("--journal", "from_journal", is_flag=True,
              help="Read the journal even when a history indexer runs (then also throughput and ETA).")
@broker_option
@json_option
def status(operation_id: str, from_journal: bool, broker: str, as_json: bool) -> None:
    """How operation ID stands: counts by state and fraction done, at once from the history
    store when an indexer runs; else (or with --journal) from the journal, with throughput
    and ETA."""
    from ..errors import HistoryUnavailable, Timeout

    def counted(client: Client) -> dict[str, int] | None:
        try:
            return client.operation_counts(operation_id)
        except (HistoryUnavailable, Timeout):  # no indexer, or an older one: the journal tells
            return None

    counts = None if from_journal else ask(broker, counted)
    if counts:  # an operation the store has no job of yet is read from the journal
        document = _counted(operation_id, counts)
        moved = ", ".join(f"{n} {state}" for state, n in document["counts"].items() if n)
        text = f"{operation_id}: {document['done']}/{document['total']} done ({moved}), in the history store"
        emit(document, as_json, lambda _: text)
        return
    with exit_on_errors():
        client, found = _found(broker, operation_id)
        with client, found:
            emit({**_status_document(found), "from": "journal"}, as_json, lambda _: _status_text(found))


def _counted(operation_id: str, counts: dict[str, int]) -> dict[str, Any]:
    """A status document from the history store's counts of an operation's jobs by state."""
    from ..operations.registry import ENDED, ItemState

    by_state = {state.value: counts.get(state.value, 0) for state in ItemState}
    by_state["queued"] += counts.get("created", 0)
    total = sum(by_state.values())
    done = sum(by_state[state.value] for state in ENDED)
    return {"id": operation_id, "name": None, "service": None, "stopped": None, "total": total,
            "counts": by_state, "done": done, "fraction": done / total if total else 1.0,
            "throughput": None, "eta": None, "best": None, "from": "history"}


@_with_operation("watch")
def watch(found: Operation, as_json: bool) -> None:
    """Watch operation ID to its end, then list what did not finish (exit 1 if any)."""
    _follow(found, as_json)
    _end(found, as_json)


@click.option("--state", type=click.Choice(["queued", "running", "paused", "resuming", "finished", "failed",
                                            "aborted", "skipped"]))
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def _items(found: Operation, as_json: bool, state: str | None, offset: int, limit: int) -> None:
    """A page of operation ID's items: key, state, job, runs, worker, error."""
    rows = [item.encode() for item in found.items(state, offset=offset, limit=limit)]
    emit(rows, as_json, lambda rows: "\n".join(
        f"{row['key'][:16]:<16} {row['state']:<9} {row['job_id'] or '-':<32} {row['runs']} "
        f"{row['worker'] or '-'} {row['error'] or ''}" for row in rows) or "no items")


items = _with_operation("items")(_items)


@click.option("--ordered", is_flag=True, help="In the order of the requests, not as they ended.")
def _results(found: Operation, as_json: bool, ordered: bool) -> None:
    """Operation ID's outcomes so far, one JSON object a line (a JSON list with --json)."""
    outcomes = [outcome.encode() for outcome in found.outcomes()]
    if ordered:
        order = {item.key: n for n, item in enumerate(found.items())}
        outcomes.sort(key=lambda outcome: order.get(outcome["key"], 0))
    if as_json:
        click.echo(json.dumps(outcomes))
    else:
        for outcome in outcomes:
            click.echo(json.dumps(outcome))


results = _with_operation("results")(_results)


@click.argument("how")
@click.option("--output", type=click.Path(dir_okay=False),
              help="For collect: write JSON lines (or CSV, .csv) there.")
def _consolidate(found: Operation, as_json: bool, how: str, output: str | None) -> None:
    """One answer of operation ID's outcomes so far: HOW is collect, stats, best:FIELD or
    best:-FIELD (the lowest)."""
    emit(found.consolidate(how, output), as_json)


consolidate = _with_operation("consolidate")(_consolidate)


@click.option("--follow", is_flag=True, help="Watch it to its end.")
def _rerun(found: Operation, as_json: bool, follow: bool) -> None:
    """Launch operation ID's failed, aborted and lost items again; keep every finished one."""
    launched = found.rerun()
    if follow:
        _follow(found, as_json)
        _end(found, as_json)
    emit({"id": found.id, "launched": launched}, as_json, lambda value: f"{value['launched']} launched again")


rerun = _with_operation("rerun")(_rerun)


def _steer(verb: str) -> click.Command:
    @op.command(name=verb, epilog=EPILOG)
    @click.argument("operation_id", metavar="ID")
    @broker_option
    @json_option
    def command(operation_id: str, broker: str, as_json: bool) -> None:
        need_shared_broker(broker)
        with exit_on_errors(), _client(broker) as client:
            document = _steered_by_the_store(client, operation_id, verb)
            if document is None:  # no indexer, or it has not the operation yet: the journal
                with client.operation_of(operation_id) as found:
                    document = {"id": found.id, verb: getattr(found, verb)(), "from": "journal"}
        emit(document, as_json,
             lambda value: f"{verb} sent to the operation's {value[verb]} item(s) not ended")

    what = {"pause": "Hold every item of operation ID at its next ready() (queued: at start).",
            "resume": "Let operation ID's paused items go on.",
            "abort": "Abort every item of operation ID not ended (queued ones never start)."}[verb]
    command.help = (f"{what} One control message, sent at once when a history indexer runs; else "
                    f"after reading the operation from the journal.")
    return command


def _steered_by_the_store(client: Client, operation_id: str, verb: str) -> dict[str, Any] | None:
    """Steer the operation with what the history store knows of it (its service, its jobs'
    counts), without reading the journal: at once, whatever its size. None if the store
    cannot tell (then nothing was sent)."""
    from ..client.operation_index import stored_header
    from ..errors import HistoryUnavailable, Timeout
    from ..protocol.intents import Intent
    from ..protocol.messages import Control
    from ..protocol.states import TERMINAL

    header = stored_header(client.transport, operation_id, client.timeout)
    if header is None:
        return None
    try:
        counts = client.operation_counts(operation_id)
    except (HistoryUnavailable, Timeout):
        return None
    if not counts:  # the store has none of its jobs yet: the journal counts them
        return None
    client.transport.control(Control(Intent(verb), header.service, time.time(), operation=operation_id))
    ended = {state.value for state in TERMINAL}
    return {"id": operation_id, verb: sum(n for state, n in counts.items() if state not in ended),
            "from": "history"}


pause, resume, abort = (_steer(verb) for verb in ("pause", "resume", "abort"))
