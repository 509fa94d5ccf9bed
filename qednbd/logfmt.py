"""Log formats for ``qednbd serve``: readable text, or one JSON object per line.

JSON lines carry the message and every field a log call passed in ``extra`` (the connection lines
add client, export, seconds, requests, bytes_read, bytes_written, errors, tls), so a log pipeline
can filter and sum them without parsing sentences.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

TEXT_FORMAT: Final = "qednbd: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def formatter(name: str) -> logging.Formatter:
    """``text`` or ``json``."""
    if name == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)
