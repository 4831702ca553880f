"""Structured logging, environment parsing and startup shared by the services.

Cloud Run turns each JSON line on stdout into a log entry and lifts `severity`,
`message` and `logging.googleapis.com/trace` into the entry's own fields, so
log-based metrics can match on `jsonPayload.event`. See
https://cloud.google.com/run/docs/logging#special-fields
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import uvicorn

TRACE_HEADER: Final = "x-cloud-trace-context"
CALLER_HEADER: Final = "x-goog-authenticated-user-email"
MAX_LOGGED_VALUE_CHARS: Final = 256
DEFAULT_PORT: Final = 8080
# Loopback by default. Cloud Run only routes to an ingress container that listens
# on all interfaces, so the GCP target sets HOST=0.0.0.0 for the guard and MCP.
DEFAULT_HOST: Final = "127.0.0.1"

_TRACE_PATTERN: Final = re.compile(r"^([0-9a-fA-F]{32})(?:/(\d{1,20}))?(?:;o=[01])?$")


class ConfigError(Exception):
    """Invalid service configuration found at startup."""


def log_event(severity: str, message: str, event: str, **fields: Any) -> None:
    """Write one JSON log line to stdout and flush it, so no line is lost on exit."""
    record = {"severity": severity, "message": message, "event": event, **fields}
    sys.stdout.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def truncate(value: str, limit: int = MAX_LOGGED_VALUE_CHARS) -> str:
    """Shorten untrusted text before it reaches a log line."""
    return value if len(value) <= limit else value[:limit] + "..."


def trace_fields(headers: Mapping[str, str]) -> dict[str, str]:
    """Build the Cloud Logging trace fields from an X-Cloud-Trace-Context header.

    The header is `TRACE_ID/SPAN_ID;o=OPTIONS`. Cloud Logging links an entry to its
    trace only with the full `projects/PROJECT/traces/TRACE_ID` name, which needs
    GOOGLE_CLOUD_PROJECT; without it the bare trace id is logged. A malformed
    header is dropped rather than copied into the log.
    """
    match = _TRACE_PATTERN.match(headers.get(TRACE_HEADER, ""))
    if match is None:
        return {}
    trace_id, span_id = match.group(1), match.group(2)
    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "")
    trace = f"projects/{project}/traces/{trace_id}" if project else trace_id
    fields = {"logging.googleapis.com/trace": trace}
    if span_id:
        fields["logging.googleapis.com/spanId"] = span_id
    return fields


def caller_of(headers: Mapping[str, str]) -> str:
    """Return the authenticated caller that the Google front end forwarded."""
    return truncate(headers.get(CALLER_HEADER, "") or "unknown")


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_int(name: str, default: int, minimum: int, maximum: int) -> int:
    """Read an integer setting, raising ConfigError with the value and the bounds."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not an integer; set it to a whole number "
            f"between {minimum} and {maximum} or unset it for {default}"
        ) from None
    if not minimum <= value <= maximum:
        raise ConfigError(
            f"{name}={value} is out of range; set it between {minimum} and "
            f"{maximum} or unset it for {default}"
        )
    return value


def listen_address() -> tuple[str, int]:
    return env_str("HOST", DEFAULT_HOST), env_int("PORT", DEFAULT_PORT, 1, 65535)


def run_service(name: str, build_app: Callable[[], Any]) -> int:
    """Build the app from the environment and serve it until stopped.

    Returns the process exit code: 2 when the configuration is invalid, so a bad
    deploy fails its startup probe with the reason in the first log line.
    """
    try:
        host, port = listen_address()
        app = build_app()
    except ConfigError as exc:
        log_event("ERROR", f"{name} not started: {exc}", "config_invalid")
        return 2

    started = time.monotonic()
    log_event("INFO", f"{name} listening on {host}:{port}", "service_starting")
    # Access logs are off: the services write their own JSON request lines, and
    # uvicorn's plain-text lines would carry query strings into the log.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
    log_event(
        "INFO",
        f"{name} stopped after {time.monotonic() - started:.1f} s",
        "service_stopped",
    )
    return 0
