"""The broker's log lines: plain text for people, or one JSON object a line for log shippers
(`--log-format json`). Connection events (hello, quit, lost, replaced, kicked, ...) are
logged at INFO with their fields; whatever came from a client is escaped and cut short."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

MAX_FIELD: Final = 200  # characters of a client-given value in a log line


FORMAT = "text"  # the format setup() chose


def event(logger: logging.Logger, name: str, **fields: Any) -> None:
    """One structured line at INFO: `hello nick=ann resume=true`."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(name, extra={"fields": fields})


class Throttle:
    """At most `per_second` lines in any one-second window; counts the ones held back."""

    def __init__(self, per_second: int) -> None:
        self.per_second, self.window, self.lines, self.held = per_second, -1.0, 0, 0

    def allow(self, now: float) -> int | None:
        """None: do not log this one; else how many were held back since the last line."""
        if now >= self.window + 1.0:
            self.window, self.lines = now, 0
        if self.lines >= self.per_second:
            self.held += 1
            return None
        self.lines += 1
        held, self.held = self.held, 0
        return held


def clip(value: Any) -> Any:
    """A value as it may be logged: strings cut to MAX_FIELD characters."""
    if isinstance(value, bytes):
        value = value[:MAX_FIELD].decode("utf-8", "backslashreplace")
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "…"
    return value


def _text(value: Any) -> str:
    """key=value form: a plain word as it is, anything else quoted with escapes."""
    value = clip(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)  # escapes quotes, backslashes and control characters


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += "".join(f" {k}={_text(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            out["event"] = record.getMessage()
            out.update({k: clip(v) for k, v in fields.items()})
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str, fmt: str) -> None:
    global FORMAT
    FORMAT = fmt  # (the history writer, a process of ours, is started to log alike)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
