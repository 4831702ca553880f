"""Delivery of alert notifications to Cloud Monitoring notification channels.

localcloud never sends traffic off the machine, so the channel types deliver locally:

- `email` appends the notification as one JSON line to
  `<state_dir>/notifications/email.jsonl`, with the channel name and address added;
- `webhook_tokenauth` POSTs the notification as JSON to the channel's `url`, but only
  when its host is a literal loopback address (127.0.0.0/8 or ::1). Any other host,
  host names such as `localhost` included, is rejected before a connection is opened,
  and a warning is logged;
- `pubsub` is not delivered, and a warning is logged.

The notification follows the JSON that Cloud Monitoring sends to webhooks (schema
version 1.2: `{"version": "1.2", "incident": {...}}`) and carries no log entry payload.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import threading
import urllib.parse
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DELIVERY_TIMEOUT_SECONDS = 5.0
EMAIL_FILE = Path("notifications") / "email.jsonl"


def loopback_host(url: str) -> str | None:
    """Return the host of `url` when it is a literal loopback IP address, else None."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            return None
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return host if address.is_loopback else None


class Notifier:
    """Sends notifications to the channels of one localcloud."""

    def __init__(self, state_dir: Path) -> None:
        self.email_path = state_dir / EMAIL_FILE
        self._file_lock = threading.Lock()

    def send(
        self, name: str, kind: str, labels: dict[str, str], payload: dict[str, Any]
    ) -> bool:
        """Deliver `payload` to the channel `name` of type `kind` with `labels`.

        Returns whether it was delivered. Connection, HTTP and URL errors are logged,
        not raised, so one bad channel cannot stop the evaluator.
        """
        try:
            if kind == "email":
                self._append_email(name, labels.get("email_address", ""), payload)
                return True
            if kind == "webhook_tokenauth":
                return self._post_webhook(name, labels.get("url", ""), payload)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            logger.warning("notification to channel %s failed: %r", name, exc)
            return False
        logger.warning(
            "notification channel %s has type %r, which localcloud does not deliver; "
            "the notification was dropped",
            name,
            kind,
        )
        return False

    def _append_email(
        self, channel_name: str, address: str, payload: dict[str, Any]
    ) -> None:
        record = {
            "notification_channel": channel_name,
            "email_address": address,
            **payload,
        }
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        with self._file_lock:
            self.email_path.parent.mkdir(parents=True, exist_ok=True)
            with self.email_path.open("a", encoding="utf-8") as handle:
                handle.write(line)

    def _post_webhook(
        self, channel_name: str, url: str, payload: dict[str, Any]
    ) -> bool:
        # The URL may carry an auth token, so only its host is ever logged.
        host = loopback_host(url)
        if host is None:
            host_name = urllib.parse.urlsplit(url).hostname or "(none)"
            logger.warning(
                "webhook of notification channel %s was not sent: host %s is not a "
                "loopback address, and localcloud sends nothing off this machine; use "
                "a URL on 127.0.0.1",
                channel_name,
                host_name,
            )
            return False

        parts = urllib.parse.urlsplit(url)
        connection_type = (
            http.client.HTTPSConnection
            if parts.scheme == "https"
            else http.client.HTTPConnection
        )
        # http.client ignores proxy variables and never follows redirects, so the
        # request goes to this host only.
        connection = connection_type(host, parts.port, timeout=DELIVERY_TIMEOUT_SECONDS)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        body = json.dumps(payload).encode()

        try:
            connection.request(
                "POST",
                path,
                body=body,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()

        if response.status >= 300:
            logger.warning(
                "webhook of notification channel %s returned HTTP %d",
                channel_name,
                response.status,
            )
            return False
        return True
