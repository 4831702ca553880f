"""Cloud Logging v2: log entries (`google.logging.v2.LoggingServiceV2`) and log-based
metrics (`google.logging.v2.MetricsServiceV2`).

`LogSink` keeps the newest entries in memory and in `<state_dir>/logs/entries.jsonl`,
one LogEntry per line in its JSON form, so filters address the camelCase field names
that the Logging query language documents (`jsonPayload.event`, `httpRequest.status`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import threading
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.api import metric_pb2
from google.cloud.logging_v2.types import (
    CreateLogMetricRequest,
    DeleteLogMetricRequest,
    GetLogMetricRequest,
    ListLogEntriesRequest,
    ListLogEntriesResponse,
    ListLogMetricsRequest,
    ListLogMetricsResponse,
    LogEntry,
    LogMetric,
    UpdateLogMetricRequest,
    WriteLogEntriesRequest,
    WriteLogEntriesResponse,
)
from google.protobuf import empty_pb2

from localcloud.api import filters
from localcloud.api.log_metrics import (
    EXTRACT,
    METRIC_KIND,
    REGEXP_EXTRACT,
    LogMetricSeries,
)
from localcloud.api.resources import (
    from_document,
    now_timestamp,
    paginate,
    to_document,
)
from localcloud.rpc import (
    Method,
    already_exists,
    invalid_argument,
    not_found,
    service_handler,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

LOGGING_SERVICE = "google.logging.v2.LoggingServiceV2"
METRICS_SERVICE = "google.logging.v2.MetricsServiceV2"

MAX_ENTRIES = 50_000
# Cloud Logging rejects entries larger than 256 KiB.
MAX_ENTRY_BYTES = 256 * 1024
DEFAULT_LIST_PAGE_SIZE = 50
MAX_METRIC_LABELS = 10

_LOG_NAME = re.compile(
    r"^(projects|organizations|folders|billingAccounts)/([^/]+)/logs/([^/]+)$"
)
_LOG_ID = re.compile(r"^[A-Za-z0-9/_.\-]{1,512}$")
_RESOURCE_NAME = re.compile(r"^(projects|organizations|folders|billingAccounts)/[^/]+$")
_METRIC_ID = re.compile(r"^[A-Za-z0-9_\-.,+!*'()%/]{1,100}$")
_METRIC_NAME = re.compile(r"^(projects/[^/]+)/metrics/(.+)$")

# Fields whose keys are chosen by the writer, so filters keep their spelling as is.
_FREE_FORM_FIELDS = {"labels", "jsonPayload", "protoPayload"}


def log_field_path(parts: list[str]) -> list[str]:
    """Map a filter field path to LogEntry JSON names (`log_name` -> `logName`)."""
    mapped: list[str] = []
    for index, part in enumerate(parts):
        head, *rest = part.split("_")
        camel = head + "".join(word[:1].upper() + word[1:] for word in rest)
        mapped.append(camel)
        if camel in _FREE_FORM_FIELDS:
            mapped.extend(parts[index + 1 :])
            break
    return mapped


def parse_log_filter(text: str, field: str = "filter") -> filters.Filter:
    """Parse a Logging query or reject the request with INVALID_ARGUMENT."""
    return filters.parse_or_reject(text, field, normalize_field=log_field_path)


def _entry_document(entry: LogEntry) -> dict[str, Any]:
    text = LogEntry.to_json(entry, use_integers_for_enums=False, indent=None)
    document: dict[str, Any] = json.loads(text)
    # JSON omits default values, but filters compare severity against DEFAULT too.
    document.setdefault("severity", "DEFAULT")
    return document


def _sort_key(document: dict[str, Any]) -> float:
    stamp = document.get("timestamp", "")
    parsed = filters.parse_time(stamp) if stamp else None
    return parsed.timestamp() if parsed else 0.0


EntryListener = Callable[[list[dict[str, Any]]], None]


class LogSink:
    """The log entries of this localcloud, bounded to the newest MAX_ENTRIES.

    Every stored entry is also counted by the log metrics (`metric_series`) and passed,
    as its JSON document, to each listener added with `add_listener`.
    """

    def __init__(self, cloud: LocalCloud) -> None:
        self._path: Path = cloud.state_dir / "logs" / "entries.jsonl"
        self._lock = threading.Lock()
        self._entries: deque[tuple[float, int, dict[str, Any]]] = deque(
            maxlen=MAX_ENTRIES
        )
        self._sequence = 0
        self._lines_in_file = 0
        self._listeners: builtins.list[EntryListener] = []
        self.metric_series = LogMetricSeries(
            cloud.state_dir, cloud.store, log_field_path
        )
        self._load()

    def add_listener(self, listener: EntryListener) -> None:
        """Call `listener` with the documents of every later write, after storing them.

        Listeners run on the writer's thread, so they must return quickly.
        """
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: EntryListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def write(self, entries: list[LogEntry]) -> None:
        """Store `entries`, filling insert_id, timestamp and receive_timestamp."""
        received = now_timestamp()
        documents = []
        for entry in entries:
            entry = LogEntry(entry)
            if not entry.insert_id:
                entry.insert_id = uuid.uuid4().hex
            if "timestamp" not in entry:
                entry.timestamp = received
            entry.receive_timestamp = received
            documents.append(_entry_document(entry))
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("a", encoding="utf-8") as handle:
                for document in documents:
                    handle.write(json.dumps(document, separators=(",", ":")) + "\n")
            for document in documents:
                self._append(document)
            self._lines_in_file += len(documents)
            if self._lines_in_file > 2 * MAX_ENTRIES:
                self._compact()
            listeners = builtins.list(self._listeners)
        self._notify(documents, listeners)

    def _notify(
        self,
        documents: builtins.list[dict[str, Any]],
        listeners: builtins.list[EntryListener],
    ) -> None:
        # The entries are stored already, so a failure here must not fail the write.
        try:
            self.metric_series.record(documents)
        except Exception:
            logger.exception(
                "counting %d entries for log metrics failed", len(documents)
            )
        for listener in listeners:
            try:
                listener(documents)
            except Exception:
                logger.exception("log entry listener %r failed", listener)

    def list(self, filter: str, order_desc: bool = False) -> list[LogEntry]:
        """Return the entries matching the Logging query `filter`, oldest first unless
        `order_desc`. An invalid filter raises RpcError with INVALID_ARGUMENT."""
        documents = self._matching(filter)
        if order_desc:
            documents.reverse()
        return [
            LogEntry.from_json(json.dumps(item), ignore_unknown_fields=True)
            for item in documents
        ]

    def count_matching(self, filter: str) -> int:
        """Return how many stored entries match the Logging query `filter`."""
        return len(self._matching(filter))

    def _matching(self, filter_text: str) -> builtins.list[dict[str, Any]]:
        parsed = parse_log_filter(filter_text)
        with self._lock:
            ordered = sorted(self._entries, key=lambda item: (item[0], item[1]))
        return [document for _, _, document in ordered if parsed.matches(document)]

    def _append(self, document: dict[str, Any]) -> None:
        self._sequence += 1
        self._entries.append((_sort_key(document), self._sequence, document))

    def _load(self) -> None:
        if not self._path.exists():
            return
        with self._path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                self._lines_in_file += 1
                try:
                    self._append(json.loads(line))
                except json.JSONDecodeError:
                    # A crash during a write can leave the last line incomplete.
                    logger.warning(
                        "skipping unreadable log entry at %s:%d", self._path, number
                    )

    def _compact(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for _, _, document in self._entries:
                handle.write(json.dumps(document, separators=(",", ":")) + "\n")
        os.replace(tmp, self._path)
        self._lines_in_file = len(self._entries)


class LoggingService:
    def __init__(self, cloud: LocalCloud) -> None:
        self._sink = cloud.logs

    def write_log_entries(
        self, request: WriteLogEntriesRequest
    ) -> WriteLogEntriesResponse:
        accepted: list[LogEntry] = []
        problems: list[str] = []
        for index, entry in enumerate(request.entries):
            entry = _with_request_defaults(LogEntry(entry), request)
            problem = _entry_problem(entry)
            if problem:
                problems.append(f"entries[{index}]: {problem}")
            else:
                accepted.append(entry)
        if problems and not request.partial_success:
            invalid_argument(
                "no entries were written: " + "; ".join(problems[:5]) + _more(problems)
            )
        if not request.dry_run:
            self._sink.write(accepted)
        if problems:
            invalid_argument(
                f"{len(accepted)} entries were written and {len(problems)} rejected: "
                + "; ".join(problems[:5])
                + _more(problems)
            )
        return WriteLogEntriesResponse()

    def list_log_entries(
        self, request: ListLogEntriesRequest
    ) -> ListLogEntriesResponse:
        if not request.resource_names:
            invalid_argument(
                "resource_names is required; list at least one parent such as "
                "projects/PROJECT."
            )
        for name in request.resource_names:
            if not _RESOURCE_NAME.match(name):
                invalid_argument(
                    f"resource name {name!r} is not supported; use projects/PROJECT "
                    "(log views and buckets are not served by localcloud)."
                )
        order = " ".join(request.order_by.lower().split())
        if order not in ("", "timestamp asc", "timestamp desc"):
            invalid_argument(
                f"order_by {request.order_by!r} is invalid; use 'timestamp asc' or "
                "'timestamp desc'."
            )
        prefixes = tuple(f"{name}/logs/" for name in request.resource_names)
        entries = [
            entry
            for entry in self._sink.list(
                request.filter, order_desc=order == "timestamp desc"
            )
            if entry.log_name.startswith(prefixes)
        ]
        page, next_token = paginate(
            entries, request.page_size, request.page_token, DEFAULT_LIST_PAGE_SIZE
        )
        return ListLogEntriesResponse(entries=page, next_page_token=next_token)


def _more(problems: Sequence[str]) -> str:
    return f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""


def _with_request_defaults(
    entry: LogEntry, request: WriteLogEntriesRequest
) -> LogEntry:
    # The request-level log_name, resource and labels apply to entries that omit them,
    # and an entry's own labels win over the request's.
    if not entry.log_name:
        entry.log_name = request.log_name
    if "resource" not in entry and "resource" in request:
        entry.resource = request.resource
    if request.labels:
        labels = dict(request.labels)
        labels.update(entry.labels)
        entry.labels = labels
    return entry


def _entry_problem(entry: LogEntry) -> str:
    match = _LOG_NAME.match(entry.log_name)
    if not match:
        return (
            f"log_name {entry.log_name!r} is invalid; use projects/PROJECT/logs/LOG_ID "
            "with the LOG_ID URL-encoded, on the entry or the request"
        )
    log_id = urllib.parse.unquote(match.group(3))
    if not _LOG_ID.match(log_id):
        return (
            f"log id {log_id!r} is invalid; use up to 512 letters, digits, and the "
            "characters / _ - ."
        )
    if "resource" not in entry or not entry.resource.type:
        return "resource is required; set resource.type on the entry or the request"
    size = len(LogEntry.serialize(entry))
    if size > MAX_ENTRY_BYTES:
        return f"entry is {size} bytes, more than the {MAX_ENTRY_BYTES}-byte limit"
    return ""


class MetricsService:
    def __init__(self, cloud: LocalCloud) -> None:
        self._store = cloud.store
        self._sink = cloud.logs

    def create(self, request: CreateLogMetricRequest) -> LogMetric:
        if not re.match(r"^projects/[^/]+$", request.parent):
            invalid_argument(
                f"parent {request.parent!r} is invalid; use projects/PROJECT."
            )
        metric = LogMetric(request.metric)
        _validate_metric(metric)
        name = f"{request.parent}/metrics/{metric.name}"
        with self._store.lock:
            if self._store.get(METRIC_KIND, name) is not None:
                already_exists(f"Metric {metric.name} already exists.")
            saved = self._save(request.parent, metric, created=None)
        logger.info("created log metric %s", name)
        return saved

    def get(self, metric_name: str) -> LogMetric:
        _split_metric_name(metric_name)
        document = self._store.get(METRIC_KIND, metric_name)
        if document is None:
            not_found(f"Metric {metric_name} does not exist.")
        return from_document(LogMetric, document)

    def list_metrics(self, request: ListLogMetricsRequest) -> ListLogMetricsResponse:
        documents = [
            document
            for _, document in self._store.list(
                METRIC_KIND, f"{request.parent}/metrics/"
            )
        ]
        page, next_token = paginate(documents, request.page_size, request.page_token)
        return ListLogMetricsResponse(
            metrics=[from_document(LogMetric, item) for item in page],
            next_page_token=next_token,
        )

    def update(self, request: UpdateLogMetricRequest) -> LogMetric:
        # UpdateLogMetric creates the metric when it does not exist yet.
        parent, metric_id = _split_metric_name(request.metric_name)
        metric = LogMetric(request.metric)
        if metric.name and metric.name != metric_id:
            invalid_argument(
                f"metric.name {metric.name!r} does not match the metric in metric_name "
                f"({metric_id!r}); a metric cannot be renamed."
            )
        metric.name = metric_id
        _validate_metric(metric)
        with self._store.lock:
            existing = self._store.get(METRIC_KIND, request.metric_name)
            created = existing.get("create_time") if existing else None
            saved = self._save(parent, metric, created)
        logger.info("updated log metric %s", request.metric_name)
        return saved

    def delete(self, metric_name: str) -> None:
        _split_metric_name(metric_name)
        if not self._store.delete(METRIC_KIND, metric_name):
            not_found(f"Metric {metric_name} does not exist.")
        self._sink.metric_series.forget(metric_name)
        logger.info("deleted log metric %s", metric_name)

    def _save(self, parent: str, metric: LogMetric, created: str | None) -> LogMetric:
        descriptor = metric.metric_descriptor
        metric_type = f"logging.googleapis.com/user/{metric.name}"
        descriptor.name = f"{parent}/metricDescriptors/{metric_type}"
        descriptor.type = metric_type
        if (
            descriptor.metric_kind
            == metric_pb2.MetricDescriptor.METRIC_KIND_UNSPECIFIED
        ):
            descriptor.metric_kind = metric_pb2.MetricDescriptor.DELTA
        if descriptor.value_type == metric_pb2.MetricDescriptor.VALUE_TYPE_UNSPECIFIED:
            descriptor.value_type = metric_pb2.MetricDescriptor.INT64
        if (
            not descriptor.unit
            and descriptor.value_type == metric_pb2.MetricDescriptor.INT64
        ):
            descriptor.unit = "1"
        metric.metric_descriptor = descriptor
        metric.update_time = now_timestamp()
        document = to_document(metric)
        document["create_time"] = created or document["update_time"]
        self._store.put(METRIC_KIND, f"{parent}/metrics/{metric.name}", document)
        return from_document(LogMetric, document)


def _split_metric_name(metric_name: str) -> tuple[str, str]:
    match = _METRIC_NAME.match(metric_name)
    if not match:
        invalid_argument(
            f"metric_name {metric_name!r} is invalid; use "
            "projects/PROJECT/metrics/METRIC_ID."
        )
    return match.group(1), match.group(2)


def _validate_metric(metric: LogMetric) -> None:
    if not _METRIC_ID.match(metric.name) or metric.name.startswith("/"):
        invalid_argument(
            f"metric name {metric.name!r} is invalid; use 1 to 100 letters, digits and "
            "the characters _-.,+!*',()%/, not starting with a slash."
        )
    if not metric.filter.strip():
        invalid_argument("metric.filter is required; give the Logging query to count.")
    parse_log_filter(metric.filter, field="metric.filter")

    descriptor = metric.metric_descriptor
    kinds = (
        metric_pb2.MetricDescriptor.METRIC_KIND_UNSPECIFIED,
        metric_pb2.MetricDescriptor.DELTA,
    )
    if descriptor.metric_kind not in kinds:
        invalid_argument(
            f"metric_descriptor.metric_kind "
            f"{metric_pb2.MetricDescriptor.MetricKind.Name(descriptor.metric_kind)} is "
            "invalid; log-based metrics are DELTA metrics."
        )
    value_types = (
        metric_pb2.MetricDescriptor.VALUE_TYPE_UNSPECIFIED,
        metric_pb2.MetricDescriptor.INT64,
        metric_pb2.MetricDescriptor.DISTRIBUTION,
    )
    if descriptor.value_type not in value_types:
        invalid_argument(
            f"metric_descriptor.value_type "
            f"{metric_pb2.MetricDescriptor.ValueType.Name(descriptor.value_type)} is "
            "invalid; use INT64 for a counter or DISTRIBUTION."
        )
    distribution = descriptor.value_type == metric_pb2.MetricDescriptor.DISTRIBUTION
    if metric.value_extractor and not distribution:
        invalid_argument(
            "value_extractor is set but metric_descriptor.value_type is not "
            "DISTRIBUTION; remove the extractor or make the metric a DISTRIBUTION "
            "metric."
        )
    if distribution and not metric.value_extractor:
        invalid_argument(
            "a DISTRIBUTION metric needs value_extractor, for example "
            "EXTRACT(jsonPayload.latency_ms)."
        )
    if metric.value_extractor:
        validate_extractor(metric.value_extractor, "value_extractor")

    label_keys = {label.key for label in descriptor.labels}
    if len(label_keys) > MAX_METRIC_LABELS:
        invalid_argument(
            f"metric_descriptor.labels has {len(label_keys)} labels; a log-based "
            f"metric has at most {MAX_METRIC_LABELS}."
        )
    for key, expression in metric.label_extractors.items():
        if key not in label_keys:
            invalid_argument(
                f"label_extractors key {key!r} has no label descriptor; add a label "
                f"with key {key!r} to metric_descriptor.labels."
            )
        validate_extractor(expression, f"label_extractors[{key!r}]")


def validate_extractor(expression: str, field: str) -> None:
    """Reject an extractor that is not EXTRACT(field) or a one-group REGEXP_EXTRACT."""
    text = expression.strip()
    if EXTRACT.match(text):
        return
    match = REGEXP_EXTRACT.match(text)
    if match:
        try:
            groups = re.compile(match.group(2)).groups
        except re.error as exc:
            invalid_argument(
                f"{field} {expression!r} has an invalid regular expression: {exc}."
            )
        if groups != 1:
            invalid_argument(
                f"{field} {expression!r} must have exactly one capture group, "
                f"found {groups}."
            )
        return
    invalid_argument(
        f"{field} {expression!r} is invalid; use EXTRACT(field) or "
        'REGEXP_EXTRACT(field, "regex with one (group)").'
    )


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    entries = LoggingService(cloud)
    metrics = MetricsService(cloud)

    def delete_metric(request: DeleteLogMetricRequest) -> Any:
        metrics.delete(request.metric_name)
        return empty_pb2.Empty()

    logging_methods: dict[str, Method] = {
        "WriteLogEntries": (
            WriteLogEntriesRequest,
            WriteLogEntriesResponse,
            entries.write_log_entries,
        ),
        "ListLogEntries": (
            ListLogEntriesRequest,
            ListLogEntriesResponse,
            entries.list_log_entries,
        ),
    }
    metric_methods: dict[str, Method] = {
        "CreateLogMetric": (CreateLogMetricRequest, LogMetric, metrics.create),
        "GetLogMetric": (
            GetLogMetricRequest,
            LogMetric,
            lambda request: metrics.get(request.metric_name),
        ),
        "UpdateLogMetric": (UpdateLogMetricRequest, LogMetric, metrics.update),
        "ListLogMetrics": (
            ListLogMetricsRequest,
            ListLogMetricsResponse,
            metrics.list_metrics,
        ),
        "DeleteLogMetric": (DeleteLogMetricRequest, empty_pb2.Empty, delete_metric),
    }
    return [
        service_handler(LOGGING_SERVICE, logging_methods),
        service_handler(METRICS_SERVICE, metric_methods),
    ]
