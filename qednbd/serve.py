"""``qednbd serve``: open (and if need be repair) every image, then hand them to the server.

Order matters: every image is opened before anything listens. A read-write open of a dirty
image checks and repairs it (:func:`qednbd.qed.repair.recover_on_open`, which logs the outcome);
an image that cannot be made safe ends the start-up with its reason, and the images opened so
far are closed again, so there is never a half-started server. A read-only export opens its
image read-only and serves a dirty image as it is (a read-only open never writes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

from qednbd import metrics, server
from qednbd.config import ServerConfig
from qednbd.errors import ConfigError, QednbdError
from qednbd.export import Export
from qednbd.qed.image import QedImage
from qednbd.qed.locking import SHARED_READER

log = logging.getLogger("qednbd.serve")


def inherited_fds(environ: Mapping[str, str]) -> list[int]:
    """Listening sockets passed by systemd socket activation, if they are meant for us."""
    return server.systemd_listen_fds(dict(environ), os.getpid())


# Start-up repair of a large image takes a while: say how far it got this often.
PROGRESS_LOG_SECONDS = 2.0


class LogProgress:
    """Progress of the start-up check and repair, in the log: nothing for a quick one, then a
    line every ``every`` seconds (the repair logs its result itself)."""

    def __init__(
        self, what: str, every: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._what = what
        self._every = PROGRESS_LOG_SECONDS if every is None else every
        self._clock = clock
        self._next: float | None = None

    def __call__(self, fraction: float) -> None:
        now = self._clock()
        if self._next is None:
            self._next = now + self._every
        elif now >= self._next and fraction < 1.0:
            log.info("%s was not closed cleanly: check and repair %.0f%% done", self._what, 100.0 * fraction)
            self._next = now + self._every


def _backing_outside(image: QedImage, allowed: Sequence[str]) -> str | None:
    """The first file of the backing chain that is neither in the image's directory (or below)
    nor in an allowed one (real paths: a symlink does not get a file out), or None."""
    roots = [os.path.dirname(os.path.realpath(image.path)), *allowed]
    layer = image.backing
    while layer is not None:
        real = os.path.realpath(layer.path)
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            return layer.path
        layer = layer.backing
    return None


def open_exports(conf: ServerConfig) -> server.ExportSet:
    seen: dict[str, bool] = {}
    opened: list[Export] = []
    try:
        for ec in conf.exports:
            real = os.path.realpath(ec.path)
            if real in seen and not (seen[real] and ec.read_only):
                raise ConfigError(f"{ec.path} is exported twice and at least once writable")
            seen[real] = ec.read_only
            try:
                image = QedImage.open(
                    ec.path,
                    read_only=ec.read_only,
                    recover_progress=LogProgress(ec.path),
                    access=SHARED_READER if ec.force_share else None,
                )
            except QednbdError as exc:
                raise ConfigError(f"{ec.path}: {exc}") from None
            except OSError as exc:
                raise ConfigError(f"{ec.path}: {exc.strerror or exc}") from None
            outside = _backing_outside(image, conf.allow_backing)
            if outside is not None:
                image.close()
                raise ConfigError(
                    f"{ec.path}: backing file {outside} is outside the image's directory "
                    "(allow it with --allow-backing DIR)"
                )
            if image.opened_dirty and ec.read_only:
                log.warning("%s was not closed cleanly; served read-only without repair", ec.path)
            opened.append(
                Export(
                    ec.name,
                    image,
                    description=ec.description,
                    read_only=ec.read_only,
                    tls_only=ec.tls_only,
                    # -e 1: a client that would open more connections must not be told to
                    multi_conn=conf.max_clients != 1,
                )
            )
    except BaseException:
        for export in opened:
            export.close()
        raise
    return server.ExportSet(opened, conf.default_export)


def _startup(export: Export) -> tuple[str, dict[str, int]]:
    """What opening the export's image found, for the metrics."""
    image = export.image
    r = image.recovery
    if r is None:
        return ("dirty-read-only" if image.opened_dirty else "clean"), {}
    counts = {
        "corruptions_fixed": r.corruptions_fixed,
        "leaks_fixed": r.leaks_fixed,
        "entries_cleared": r.entries_cleared,
        "clusters_truncated": r.clusters_truncated,
    }
    return ("repaired" if r.changed else "nothing-to-repair"), counts


def _views(exports: server.ExportSet) -> list[metrics.ExportView]:
    views = []
    for export in exports.exports.values():
        outcome, counts = _startup(export)
        views.append(
            metrics.ExportView(export.name, export.stats, functools.partial(_dirty, export), outcome, counts)
        )
    return views


def _dirty(export: Export) -> bool:
    return bool(export.image.header.need_check)


def serve(conf: ServerConfig, fds: Sequence[int]) -> int:
    # TLS credentials that cannot be used stop the start-up before an image is opened (or repaired)
    context = server.tls_context(conf.tls_creds, conf.tls_verify_peer) if conf.tls != "off" else None
    exports = open_exports(conf)

    def ready(uris: list[str]) -> None:
        for uri in uris:
            log.info("listening on %s", uri)
        for export in exports.exports.values():
            mode = "read-only" if export.read_only else "read-write"
            default = " (default export)" if export.name == conf.default_export else ""
            path, size = export.image.path, export.info.size
            log.info("export %r: %s, %d bytes, %s%s", export.name, path, size, mode, default)
        if conf.metrics is not None:
            host, port = conf.metrics
            try:
                host, port = metrics.serve_metrics(host, port, functools.partial(_views, exports))
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics on http://%s:%d/metrics", shown, port)
        if conf.pid_file:
            try:
                with open(conf.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                raise ConfigError(f"cannot write pid file {conf.pid_file}: {exc.strerror or exc}") from None

    try:
        return server.serve_forever(exports, conf, fds, ready, context)
    finally:
        if conf.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(conf.pid_file)
