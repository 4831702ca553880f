"""Time series of user-defined counter log metrics (`logging.googleapis.com/user/NAME`).

Every entry that `LogSink` stores passes through `LogMetricSeries.record`, which adds 1
to each enabled counter metric whose filter matches it. Counts are kept per time series
(the metric, its extracted labels and the entry's monitored resource) in one-second
buckets keyed by the entry timestamp, and appended to
`<state_dir>/monitoring/log_metric_points.jsonl` so they survive a restart.

As in Cloud Logging, a metric counts only entries received after it was created, and an
entry time-stamped more than 24 hours before or 10 minutes after its receipt is not
counted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localcloud.api import filters

if TYPE_CHECKING:
    from localcloud.store import Store

logger = logging.getLogger(__name__)

METRIC_KIND = "logging.metrics"
USER_METRIC_PREFIX = "logging.googleapis.com/user/"

# Cloud Logging does not count entries time-stamped more than 24 hours before or 10
# minutes after they are received (Cloud Logging docs, "Troubleshoot log-based
# metrics").
MAX_ENTRY_AGE_SECONDS = 24 * 3600
MAX_ENTRY_LEAD_SECONDS = 10 * 60
# Points older than this are dropped. Cloud Monitoring keeps them for 6 weeks, but 25
# hours covers the longest alignment period an alert policy may use.
RETENTION_SECONDS = 25 * 3600

EXTRACT = re.compile(r"^EXTRACT\(\s*([A-Za-z0-9_.]+)\s*\)$")
REGEXP_EXTRACT = re.compile(
    r'^REGEXP_EXTRACT\(\s*([A-Za-z0-9_.]+)\s*,\s*"(.*)"\s*\)$', re.S
)

FieldPath = Callable[[list[str]], list[str]]


@dataclass
class SeriesPoints:
    """The counts of one time series: bucket end (whole epoch seconds) -> entries."""

    resource_type: str
    resource_labels: dict[str, str]
    metric_labels: dict[str, str]
    buckets: dict[int, int] = field(default_factory=dict)


def series_key(
    resource_type: str, resource_labels: dict[str, str], metric_labels: dict[str, str]
) -> str:
    return json.dumps([resource_type, resource_labels, metric_labels], sort_keys=True)


def extract_value(
    expression: str, document: dict[str, Any], field_path: FieldPath
) -> str | None:
    """Evaluate an EXTRACT or REGEXP_EXTRACT expression on an entry document.

    Returns None when the field is missing or the expression does not match, so the
    label is left out of the time series.
    """
    text = expression.strip()
    match = EXTRACT.match(text) or REGEXP_EXTRACT.match(text)
    if match is None:
        return None
    value: Any = document
    for part in field_path(match.group(1).split(".")):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    value_text = str(value).lower() if isinstance(value, bool) else str(value)
    if match.re is EXTRACT:
        return value_text
    found = re.search(match.group(2), value_text)
    return found.group(1) if found else None


def _epoch(stamp: str | None) -> float | None:
    parsed = filters.parse_time(stamp) if stamp else None
    return parsed.timestamp() if parsed else None


class LogMetricSeries:
    """Counts of matching log entries for every counter log metric in the store."""

    def __init__(self, state_dir: Path, store: Store, field_path: FieldPath) -> None:
        self._store = store
        self._field_path = field_path
        self._path = state_dir / "monitoring" / "log_metric_points.jsonl"
        self._lock = threading.Lock()
        # metric resource name -> series key -> points
        self._series: dict[str, dict[str, SeriesPoints]] = {}
        self._filters: dict[str, filters.Filter] = {}
        self._lines_in_file = 0
        self._load()

    def record(self, documents: Iterable[dict[str, Any]]) -> None:
        """Count `documents` (LogEntry JSON with timestamps) against every metric."""
        documents = list(documents)
        if not documents:
            return
        increments: dict[tuple[str, str, int], int] = {}
        identities: dict[tuple[str, str], tuple[str, dict[str, str], dict[str, str]]]
        identities = {}
        for name, metric in self._store.list(METRIC_KIND):
            if not self._counts(metric):
                continue
            created = _epoch(metric.get("create_time")) or 0.0
            matcher = self._filter(metric.get("filter", ""))
            if matcher is None:
                continue
            # A metric counts the entries of its own project only.
            logs_prefix = name.split("/metrics/", 1)[0] + "/logs/"
            for document in documents:
                if not str(document.get("logName", "")).startswith(logs_prefix):
                    continue
                bucket = self._bucket(document, created)
                if bucket is None or not matcher.matches(document):
                    continue
                identity = self._identity(metric, document)
                key = series_key(*identity)
                identities[(name, key)] = identity
                increments[(name, key, bucket)] = (
                    increments.get((name, key, bucket), 0) + 1
                )
        if increments:
            self._add(increments, identities)

    def series(self, metric_name: str) -> list[SeriesPoints]:
        """Return a copy of the time series of the metric `metric_name`."""
        with self._lock:
            return [
                SeriesPoints(
                    item.resource_type,
                    dict(item.resource_labels),
                    dict(item.metric_labels),
                    dict(item.buckets),
                )
                for _, item in sorted(self._series.get(metric_name, {}).items())
            ]

    def forget(self, metric_name: str) -> None:
        """Drop the points of a deleted metric, so a new one starts empty."""
        with self._lock:
            if self._series.pop(metric_name, None) is not None:
                self._compact()

    # Counting

    @staticmethod
    def _counts(metric: dict[str, Any]) -> bool:
        if metric.get("disabled"):
            return False
        # NOTE: DISTRIBUTION metrics produce no time series in localcloud.
        value_type = metric.get("metric_descriptor", {}).get("value_type", "INT64")
        return value_type in ("INT64", "VALUE_TYPE_UNSPECIFIED")

    def _filter(self, text: str) -> filters.Filter | None:
        cached = self._filters.get(text)
        if cached is None:
            try:
                cached = filters.parse(text, normalize_field=self._field_path)
            except filters.FilterSyntaxError:
                # Stored metrics were validated on write, so this is a parser change.
                logger.warning("log metric filter %r no longer parses", text)
                return None
            self._filters[text] = cached
        return cached

    @staticmethod
    def _bucket(document: dict[str, Any], created: float) -> int | None:
        received = _epoch(document.get("receiveTimestamp"))
        stamp = _epoch(document.get("timestamp"))
        if received is None or stamp is None or received < created:
            return None
        if stamp < received - MAX_ENTRY_AGE_SECONDS:
            return None
        if stamp > received + MAX_ENTRY_LEAD_SECONDS:
            return None
        # A bucket covers (end - 1 s, end], so its point is reported once `end` passed.
        return math.floor(stamp) + 1

    def _identity(
        self, metric: dict[str, Any], document: dict[str, Any]
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        resource = document.get("resource", {})
        labels: dict[str, str] = {}
        for key, expression in sorted(metric.get("label_extractors", {}).items()):
            value = extract_value(expression, document, self._field_path)
            if value is not None:
                labels[key] = value
        return (
            str(resource.get("type", "global")),
            {str(k): str(v) for k, v in resource.get("labels", {}).items()},
            labels,
        )

    def _add(
        self,
        increments: dict[tuple[str, str, int], int],
        identities: dict[tuple[str, str], tuple[str, dict[str, str], dict[str, str]]],
    ) -> None:
        lines = []
        with self._lock:
            for (name, key, bucket), count in increments.items():
                self._apply(name, identities[(name, key)], bucket, count)
                resource_type, resource_labels, metric_labels = identities[(name, key)]
                record = {
                    "metric": name,
                    "resource": {"type": resource_type, "labels": resource_labels},
                    "labels": metric_labels,
                    "end": bucket,
                    "count": count,
                }
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
            self._lines_in_file += len(lines)
            self._prune(time.time())
            live = sum(
                len(item.buckets)
                for series in self._series.values()
                for item in series.values()
            )
            if self._lines_in_file > 2 * live + 1000:
                self._compact()

    def _apply(
        self,
        name: str,
        identity: tuple[str, dict[str, str], dict[str, str]],
        bucket: int,
        count: int,
    ) -> None:
        key = series_key(*identity)
        series = self._series.setdefault(name, {})
        item = series.get(key)
        if item is None:
            item = series[key] = SeriesPoints(*identity)
        item.buckets[bucket] = item.buckets.get(bucket, 0) + count

    def _prune(self, now: float) -> None:
        oldest = now - RETENTION_SECONDS
        for name in list(self._series):
            series = self._series[name]
            for key in list(series):
                buckets = series[key].buckets
                for bucket in [b for b in buckets if b < oldest]:
                    del buckets[bucket]
                if not buckets:
                    del series[key]
            if not series:
                del self._series[name]

    # Persistence

    def _load(self) -> None:
        if not self._path.exists():
            return
        with self._path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                self._lines_in_file += 1
                try:
                    record = json.loads(line)
                    resource = record["resource"]
                    identity = (
                        resource["type"],
                        resource["labels"],
                        record["labels"],
                    )
                    self._apply(
                        record["metric"], identity, record["end"], record["count"]
                    )
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A crash during a write can leave the last line incomplete.
                    logger.warning(
                        "skipping unreadable metric point at %s:%d", self._path, number
                    )
        self._prune(time.time())

    def _compact(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with tmp.open("w", encoding="utf-8") as handle:
            for name, series in self._series.items():
                for item in series.values():
                    for bucket, value in sorted(item.buckets.items()):
                        record = {
                            "metric": name,
                            "resource": {
                                "type": item.resource_type,
                                "labels": item.resource_labels,
                            },
                            "labels": item.metric_labels,
                            "end": bucket,
                            "count": value,
                        }
                        handle.write(json.dumps(record, separators=(",", ":")) + "\n")
                        count += 1
        os.replace(tmp, self._path)
        self._lines_in_file = count
