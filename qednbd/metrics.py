"""Counters the server keeps per export, and their Prometheus exposition (``--metrics``).

Why this shape: a 4 KiB request costs the server ~7 µs, so per-request metric objects (a labelled
prometheus_client Counter costs ~1 µs an increment) would be a tax on every request. Instead the
server adds plain ints — per received batch, not per request, on the fast paths — to an
:class:`ExportStats`, and :class:`Collector` turns them into metric families only when someone
scrapes. Latency is the server's own time for a request: from the start of the pass that parsed it
to its reply being handed to the socket (for flushes and large reads, to the worker's completion);
requests answered in one pass share one observation.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from qednbd.nbd.constants import Errno
from qednbd.nbd.transmission import command_name

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# Seconds. Fast-path batches land in the first buckets; flushes and cold reads in the last.
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0
)  # fmt: skip
_BOUNDS: Final = (*(repr(b) for b in LATENCY_BUCKETS), "+Inf")
N_COMMANDS: Final = 16  # NBD command numbers are small; BLOCK_STATUS is 7, RESIZE 8


class ExportStats:
    """What was asked of one export. Only the event-loop thread writes; a scrape only reads."""

    def __init__(self) -> None:
        self.requests = [0] * N_COMMANDS
        self.bytes = [0] * N_COMMANDS  # READ and WRITE payload bytes
        self.latency_counts = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in range(N_COMMANDS)]
        self.latency_sum = [0.0] * N_COMMANDS
        self.errors: dict[int, int] = {}  # NBD errno -> replies
        self.connections = 0  # open right now
        self.connections_total = 0

    def record(self, command: int, count: int, nbytes: int, seconds: float) -> None:
        """``count`` requests of ``command`` answered, ``nbytes`` of data, each in ``seconds``."""
        if not 0 <= command < N_COMMANDS:
            return
        self.requests[command] += count
        self.bytes[command] += nbytes
        self.latency_counts[command][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.latency_sum[command] += seconds * count

    def error(self, nbd_errno: int) -> None:
        self.errors[nbd_errno] = self.errors.get(nbd_errno, 0) + 1


class ExportView:
    """What the collector needs to know about one export at scrape time."""

    def __init__(
        self,
        name: str,
        stats: ExportStats,
        dirty: Callable[[], bool],
        startup: str,
        startup_counts: dict[str, int],
    ) -> None:
        self.name = name
        self.stats = stats
        self.dirty = dirty
        self.startup = startup  # clean | repaired | nothing-to-repair | dirty-read-only
        self.startup_counts = startup_counts  # corruptions_fixed, leaks_fixed, ...


class Collector:
    """A prometheus_client collector over :class:`ExportView` objects (read at scrape time)."""

    def __init__(self, exports: Callable[[], Iterable[ExportView]]) -> None:
        self._exports = exports

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ex, ex_cmd = ["export"], ["export", "command"]
        requests = CounterMetricFamily("qednbd_requests", "NBD requests answered", labels=ex_cmd)
        data = CounterMetricFamily("qednbd_bytes", "READ and WRITE payload bytes", labels=ex_cmd)
        errors = CounterMetricFamily("qednbd_errors", "error replies by NBD errno", labels=[*ex, "errno"])
        latency = HistogramMetricFamily("qednbd_request_seconds", "server time per request", labels=ex_cmd)
        open_now = GaugeMetricFamily("qednbd_connections", "open client connections", labels=ex)
        opened = CounterMetricFamily("qednbd_connections_opened", "client connections", labels=ex)
        dirty = GaugeMetricFamily("qednbd_dirty", "1 while the image's NEED_CHECK bit is set", labels=ex)
        startup = GaugeMetricFamily(
            "qednbd_startup_check", "what opening the image found (1: this outcome)", labels=[*ex, "outcome"]
        )
        startup_counts = GaugeMetricFamily(
            "qednbd_startup_repair", "what the repair at start-up changed", labels=[*ex, "what"]
        )
        for view in self._exports():
            s, name = view.stats, view.name
            for command in range(N_COMMANDS):
                if not s.requests[command]:
                    continue
                cmd = command_name(command)
                requests.add_metric([name, cmd], s.requests[command])
                if s.bytes[command]:
                    data.add_metric([name, cmd], s.bytes[command])
                cumulative, buckets = 0, []
                for bound, count in zip(
                    (*LATENCY_BUCKETS, float("inf")), s.latency_counts[command], strict=True
                ):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                latency.add_metric([name, cmd], buckets, s.latency_sum[command])
            for code, count in sorted(s.errors.items()):
                errors.add_metric([name, _errno_name(code)], count)
            open_now.add_metric([name], s.connections)
            opened.add_metric([name], s.connections_total)
            dirty.add_metric([name], 1.0 if view.dirty() else 0.0)
            startup.add_metric([name, view.startup], 1.0)
            for what, count in view.startup_counts.items():
                startup_counts.add_metric([name, what], count)
        yield from (requests, data, errors, latency, open_now, opened, dirty, startup, startup_counts)


def _errno_name(code: int) -> str:
    try:
        return Errno(code).name
    except ValueError:
        return str(code)


def serve_metrics(address: str, port: int, exports: Callable[[], Iterable[ExportView]]) -> tuple[str, int]:
    """Start the exposition HTTP server (a daemon thread); returns the address it listens on."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(exports))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    host, bound_port = server.server_address[:2]
    return str(host), int(bound_port)
