"""``brokerexec web`` as a process: the broker, the store, the live feed and the HTTP server.

One blocking :class:`~brokerexec.Client` reaches the broker (controls, the fleet, its single
subscription to every job event, which feeds ``live.py``). The history store is read
directly (``--store``: the store the fleet's ``brokerexec history`` indexer writes); when no
indexer answers on the broker, this process runs one itself, into that store, so the view
needs nothing but the broker. uvicorn serves the application (``app.py``) on a socket bound
here first, so that ``--port 0`` gets a free port that can be printed.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import HistoryUnavailable, Timeout
from .app import WebView, create_app
from .live import EventHub
from .security import Access, Guard

if TYPE_CHECKING:
    from ..client.blocking import Client
    from ..history.store import HistoryStore

__all__ = ["WebServer"]

log = logging.getLogger(__name__)


@dataclass
class WebServer:
    """The web view of ``broker``, from ``store``, on ``host:port`` (0: any free port)."""

    broker: str
    store_url: str
    access: Access
    host: str = "127.0.0.1"
    port: int = 8080
    read_only: bool = False
    embed_indexer: bool | None = None  # None: when no indexer answers on the broker

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.socket: socket.socket | None = None
        self.client: Client | None = None
        self.store: HistoryStore | None = None
        self.hub = EventHub()
        self.indexing = False

    def open(self) -> int:
        """Connect, open (and migrate) the store, start an indexer if need be, bind the
        socket; return the port."""
        from ..client.blocking import Client
        from ..history.store import HistoryStore

        self.client = Client(self.broker)
        self.store = HistoryStore(self.store_url)
        self.store.migrate()
        embed = self.embed_indexer if self.embed_indexer is not None else not self._indexer_runs()
        if embed:
            self._start_indexer()
        self.client.subscribe("#", self.hub.publish)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.socket = sock
        return int(sock.getsockname()[1])

    def _indexer_runs(self) -> bool:
        assert self.client is not None
        try:
            self.client.history(limit=1, timeout=2.0)
        except (HistoryUnavailable, Timeout):
            return False
        return True

    def _start_indexer(self) -> None:
        from ..history.indexer import Indexer

        assert self.store is not None
        indexer = Indexer(self.store, self.broker)
        thread = threading.Thread(target=indexer.run, args=(self._stop,), name="web-indexer", daemon=True)
        thread.start()
        self._threads.append(thread)
        self.indexing = True
        log.info("no history indexer answered on the broker: this process indexes into %s",
                 self.store.redacted_url)

    def serve(self) -> None:
        """Serve until SIGTERM or Ctrl-C (uvicorn's own handling), then close everything."""
        import uvicorn

        assert self.client is not None and self.store is not None and self.socket is not None
        view = WebView(self.client, self.store, self.hub, Guard(self.access), self.read_only)
        config = uvicorn.Config(create_app(view), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on")
        try:
            uvicorn.Server(config).run(sockets=[self.socket])
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        if self.client is not None:
            self.client.close()
        if self.store is not None:
            self.store.close()
        if self.socket is not None:
            self.socket.close()
