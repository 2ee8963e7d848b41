"""structlog configuration, called only by entry points (the CLI and long-running daemons).

JSON lines when stderr is not a terminal, readable console output when it is. A last-line-of-
defence processor redacts fields whose names suggest secrets; code must not log secrets at all.

structlog is imported by `configure`, not by this module: its import is about a third of the start
of a process that barely logs (the platform), which `configure_deferred` and `get_logger` serve
without it until something at or above its level is logged.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any

_SECRET_WORDS = ("secret", "password", "token", "private", "data_key", "kek", "seed")


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if key != "event" and any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "[redacted]"
    return event


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "exception": 40, "critical": 50}
_deferred: tuple[str, bool | None] | None = None  # configure_deferred's arguments, until used


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog for this process; `json=None` picks by whether stderr is a terminal."""
    global _deferred  # noqa: PLW0603 - the process's one logging configuration
    _deferred = None
    import logging  # noqa: PLC0415 - with structlog, which imports it anyway

    import structlog  # noqa: PLC0415 - see the module's docstring

    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # Resolved at each use, so a replaced sys.stderr (tests, daemons) is honoured.
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def configure_deferred(level: str = "info", *, json: bool | None = None) -> None:
    """`configure(level, json=json)`, done at the first event at or above `level` logged through
    a `get_logger()` logger; events below it are dropped without importing structlog."""
    global _deferred  # noqa: PLW0603 - the process's one logging configuration
    _deferred = (level, json)


class _Logger:
    """structlog's logger, looked up at each use: `configure_deferred` is honoured first."""

    def __getattr__(self, method: str) -> Any:
        if _deferred is not None:
            level, json = _deferred
            if _LEVELS.get(method, _LEVELS["critical"]) < _LEVELS[level]:
                return _drop
            configure(level, json=json)
        import structlog  # noqa: PLC0415 - see the module's docstring

        return getattr(structlog.get_logger(), method)


def _drop(*_args: Any, **_kwargs: Any) -> None:
    return None


def get_logger() -> Any:
    """A logger for modules of processes that may configure logging with `configure_deferred`
    (what structlog.get_logger() gives, once structlog is configured)."""
    return _Logger()
