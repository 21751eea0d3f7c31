"""Structured logs: one line per state change and per error, always carrying domid/devid when known."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# The xenbus layer tags a device's records with its backend path only (`device=`), and the data path names
# its queues by that path in the message: both are turned into the fields operators grep for.
_BACKEND_PATH = re.compile(r"/local/domain/\d+/backend/([a-z][a-z0-9_-]*)/(\d+)/(\d+)")


def device_fields(record: logging.LogRecord) -> dict[str, Any]:
    """type/domid/devid of the device a record is about, when it names one and does not say them itself."""
    if "domid" in vars(record) and "devid" in vars(record):
        return {}
    for text in (getattr(record, "device", None), record.getMessage()):
        m = _BACKEND_PATH.search(text) if isinstance(text, str) else None
        if m is not None:
            return {"type": m.group(1), "domid": int(m.group(2)), "devid": int(m.group(3))}
    return {}


class _KeyValueFormatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(device_fields(record))
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                fields[k] = v
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return json.dumps(s)
    return s


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(as_json=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
