"""Cloud Monitoring v3 `MetricService.ListTimeSeries` for user-defined log metrics.

`TimeSeriesReader.read` selects the series of one `logging.googleapis.com/user/NAME`
metric with a Monitoring filter, then aligns and reduces them as an `Aggregation`
specifies.
The alert evaluator (`localcloud/alerting.py`) reads through the same code.

Alignment periods end at the end of the requested interval and step back from it, so a
request for the last 5 minutes with a 300 s period returns one point covering exactly
that window. NOTE: that Cloud Monitoring anchors periods at the interval's end is not
confirmed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.api import metric_pb2, monitored_resource_pb2
from google.cloud.monitoring_v3 import types
from google.protobuf import timestamp_pb2

from localcloud.api import filters
from localcloud.api.log_metrics import METRIC_KIND, USER_METRIC_PREFIX, SeriesPoints
from localcloud.api.resources import paginate
from localcloud.rpc import (
    Method,
    RpcError,
    invalid_argument,
    not_found,
    service_handler,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

METRIC_SERVICE = "google.monitoring.v3.MetricService"

# The Aggregation reference: "The value must be at least 60 seconds."
MIN_ALIGNMENT_SECONDS = 60
# ListTimeSeries documents 100,000 as the largest effective page size.
MAX_TIME_SERIES_PAGE = 100_000

Aligner = types.Aggregation.Aligner
Reducer = types.Aggregation.Reducer

SUPPORTED_ALIGNERS = {Aligner.ALIGN_DELTA, Aligner.ALIGN_SUM, Aligner.ALIGN_RATE}
# Valid for DELTA INT64 metrics in Cloud Monitoring, but their results depend on the raw
# sample period, which differs here (1 s instead of 60 s), so they are not served.
UNSERVED_ALIGNERS = {
    Aligner.ALIGN_MIN,
    Aligner.ALIGN_MAX,
    Aligner.ALIGN_MEAN,
    Aligner.ALIGN_COUNT,
    Aligner.ALIGN_STDDEV,
    Aligner.ALIGN_PERCENT_CHANGE,
}
SUPPORTED_REDUCERS = {
    Reducer.REDUCE_NONE,
    Reducer.REDUCE_SUM,
    Reducer.REDUCE_MEAN,
    Reducer.REDUCE_MIN,
    Reducer.REDUCE_MAX,
    Reducer.REDUCE_COUNT,
}

_METRIC_TYPE = re.compile(r'\bmetric\.type\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+))')
_FUNCTION = re.compile(
    r"\b(starts_with|ends_with|has_substring|one_of|monitoring\.regex\.full_match)"
    r"\s*\("
)


@dataclass
class Point:
    start: float  # epoch seconds
    end: float
    value: int | float


@dataclass
class Series:
    metric_type: str
    metric_labels: dict[str, str]
    resource_type: str
    resource_labels: dict[str, str]
    metric_kind: str  # "DELTA" or "GAUGE"
    value_type: str  # "INT64" or "DOUBLE"
    points: list[Point] = field(default_factory=list)  # newest first

    def key(self) -> tuple[str, ...]:
        return (
            self.resource_type,
            *sorted(f"resource.{k}={v}" for k, v in self.resource_labels.items()),
            *sorted(f"metric.{k}={v}" for k, v in self.metric_labels.items()),
        )


@dataclass(frozen=True)
class Alignment:
    period: float  # seconds; 0 for raw points
    aligner: int
    reducer: int
    group_by: tuple[str, ...]


def monitoring_field_path(parts: list[str]) -> list[str]:
    """Map `metric.label.KEY` and `resource.label.KEY` to the `labels` maps."""
    if len(parts) > 2 and parts[0] in ("metric", "resource") and parts[1] == "label":
        return [parts[0], "labels", *parts[2:]]
    return parts


def _filter_error(text: str, problem: str) -> RpcError:
    return RpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Field filter had an invalid value of {text!r}: {problem}",
    )


def metric_type_of(filter_text: str) -> str:
    """Return the one metric type that a Monitoring filter selects.

    Raises RpcError(INVALID_ARGUMENT) when the filter names no type or several.
    """
    # findall returns "" for the alternative (quoted or bare) that did not match.
    types_named = {quoted or bare for quoted, bare in _METRIC_TYPE.findall(filter_text)}
    if len(types_named) != 1:
        raise _filter_error(
            filter_text,
            "the filter must specify a single metric type, for example "
            'metric.type = "logging.googleapis.com/user/METRIC".',
        )
    return next(iter(types_named))


def parse_monitoring_filter(filter_text: str) -> filters.Filter:
    function = _FUNCTION.search(filter_text)
    if function:
        raise RpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"the filter function {function.group(1)}() is not served by localcloud; "
            "compare with =, != or =~ instead.",
        )
    try:
        return filters.parse(filter_text, normalize_field=monitoring_field_path)
    except filters.FilterSyntaxError as exc:
        raise _filter_error(
            filter_text, f"{exc.problem} at position {exc.position}."
        ) from None


def alignment_of(aggregation: types.Aggregation | None, field: str) -> Alignment:
    """Validate an Aggregation for a DELTA INT64 log metric and return its settings."""
    if aggregation is None:
        return Alignment(0.0, Aligner.ALIGN_NONE, Reducer.REDUCE_NONE, ())
    aligner = aggregation.per_series_aligner
    reducer = aggregation.cross_series_reducer
    period = aggregation.alignment_period.total_seconds()
    if aligner != Aligner.ALIGN_NONE:
        if period < MIN_ALIGNMENT_SECONDS:
            invalid_argument(
                f"Field {field}.alignmentPeriod had an invalid value of "
                f'"{period:g}s": the alignment period must be at least '
                f"{MIN_ALIGNMENT_SECONDS} seconds when a per-series aligner is set."
            )
        if aligner in UNSERVED_ALIGNERS:
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{field}.perSeriesAligner {aligner.name} is not served by localcloud; "
                "use ALIGN_DELTA, ALIGN_SUM or ALIGN_RATE.",
            )
        if aligner not in SUPPORTED_ALIGNERS:
            invalid_argument(
                f"Field {field}.perSeriesAligner had an invalid value of "
                f"{aligner.name}: it is not valid for a DELTA INT64 metric; use "
                "ALIGN_DELTA, ALIGN_SUM or ALIGN_RATE."
            )
    if reducer != Reducer.REDUCE_NONE:
        if aligner == Aligner.ALIGN_NONE:
            invalid_argument(
                f"Field {field}.crossSeriesReducer had an invalid value of "
                f"{reducer.name}: a cross-series reducer needs a per-series aligner "
                "and an alignment period."
            )
        if reducer not in SUPPORTED_REDUCERS:
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{field}.crossSeriesReducer {reducer.name} is not served by "
                "localcloud; use REDUCE_SUM, REDUCE_MEAN, REDUCE_MIN, REDUCE_MAX or "
                "REDUCE_COUNT.",
            )
    group_by = tuple(aggregation.group_by_fields)
    for name in group_by:
        if _group_value_path(name) is None:
            invalid_argument(
                f"Field {field}.groupByFields had an invalid value of {name!r}: use "
                "resource.type, metric.type, resource.label.KEY or metric.label.KEY."
            )
    return Alignment(period if aligner else 0.0, aligner, reducer, group_by)


def _group_value_path(name: str) -> list[str] | None:
    parts = monitoring_field_path(name.split("."))
    if parts in (["metric", "type"], ["resource", "type"]):
        return parts
    if len(parts) == 3 and parts[0] in ("metric", "resource") and parts[1] == "labels":
        return parts
    return None


class TimeSeriesReader:
    def __init__(self, cloud: LocalCloud) -> None:
        self._cloud = cloud

    def read(
        self,
        project: str,
        filter_text: str,
        start: float,
        end: float,
        alignment: Alignment,
    ) -> list[Series]:
        """Return the series of the filter's log metric with points in [start, end]."""
        if not filter_text.strip():
            invalid_argument(
                "Field filter had an invalid value of '': the filter must specify a "
                'single metric type, for example metric.type = "logging.googleapis.com'
                '/user/METRIC".'
            )
        matcher = parse_monitoring_filter(filter_text)
        metric_type = metric_type_of(filter_text)
        metric_name = self._metric_name(project, metric_type)
        project_id = project.split("/", 1)[1]
        selected: list[Series] = []
        for raw in self._cloud.logs.metric_series.series(metric_name):
            document = {
                "metric": {"type": metric_type, "labels": raw.metric_labels},
                "resource": {"type": raw.resource_type, "labels": raw.resource_labels},
                "project": project_id,
            }
            if not matcher.matches(document):
                continue
            series = _raw_series(metric_type, raw, start, end, alignment)
            if series.points:
                selected.append(series)
        if alignment.reducer != Reducer.REDUCE_NONE:
            selected = _reduce(selected, alignment)
        return sorted(selected, key=Series.key)

    def _metric_name(self, project: str, metric_type: str) -> str:
        metric_id = metric_type.removeprefix(USER_METRIC_PREFIX)
        metric_name = f"{project}/metrics/{metric_id}"
        if (
            not metric_type.startswith(USER_METRIC_PREFIX)
            or self._cloud.store.get(METRIC_KIND, metric_name) is None
        ):
            # NOTE: the code and message of Cloud Monitoring for an unknown metric
            # type are not confirmed; this follows its "Cannot find metric(s)" error.
            not_found(
                f'Cannot find metric(s) that match type = "{metric_type}". localcloud '
                "serves the time series of the project's user-defined log metrics "
                f"({USER_METRIC_PREFIX}NAME) only."
            )
        return metric_name


def _raw_series(
    metric_type: str,
    raw: SeriesPoints,
    start: float,
    end: float,
    alignment: Alignment,
) -> Series:
    series = Series(
        metric_type,
        raw.metric_labels,
        raw.resource_type,
        raw.resource_labels,
        "DELTA",
        "INT64",
    )
    if alignment.aligner == Aligner.ALIGN_NONE:
        # A bucket contains the entries of the second (end - 1, end].
        series.points = [
            Point(bucket - 1, bucket, count)
            for bucket, count in sorted(raw.buckets.items(), reverse=True)
            if (start < bucket <= end) or (start == end and bucket - 1 < end <= bucket)
        ]
        return series

    period = alignment.period
    totals: dict[int, int] = {}
    for bucket, count in raw.buckets.items():
        if bucket > end:
            continue
        index = math.floor((end - bucket) / period)
        if index > 0 and end - index * period <= start:
            continue
        totals[index] = totals.get(index, 0) + count
    rate = alignment.aligner == Aligner.ALIGN_RATE
    if rate:
        series.metric_kind, series.value_type = "GAUGE", "DOUBLE"
    for index in sorted(totals):
        period_end = end - index * period
        if rate:
            series.points.append(Point(period_end, period_end, totals[index] / period))
        else:
            # NOTE: ALIGN_SUM output is reported as DELTA, like ALIGN_DELTA; the kind
            # Cloud Monitoring gives ALIGN_SUM of a DELTA metric is not confirmed.
            series.points.append(Point(period_end - period, period_end, totals[index]))
    return series


def _group_value(series: Series, name: str) -> str:
    path = _group_value_path(name) or []
    if path == ["metric", "type"]:
        return series.metric_type
    if path == ["resource", "type"]:
        return series.resource_type
    labels = series.metric_labels if path[0] == "metric" else series.resource_labels
    return labels.get(path[2], "")


def _reduce(selected: list[Series], alignment: Alignment) -> list[Series]:
    groups: dict[tuple[str, ...], list[Series]] = {}
    for series in selected:
        key = tuple(_group_value(series, name) for name in alignment.group_by)
        groups.setdefault(key, []).append(series)
    reduced = []
    for key, members in groups.items():
        first = members[0]
        metric_labels: dict[str, str] = {}
        resource_labels: dict[str, str] = {}
        for name, value in zip(alignment.group_by, key, strict=True):
            path = _group_value_path(name) or []
            if len(path) == 3:
                target = metric_labels if path[0] == "metric" else resource_labels
                target[path[2]] = value
        out = Series(
            first.metric_type,
            metric_labels,
            first.resource_type,
            resource_labels,
            first.metric_kind,
            first.value_type,
        )
        by_end: dict[float, list[Point]] = {}
        for member in members:
            for point in member.points:
                by_end.setdefault(point.end, []).append(point)
        for point_end in sorted(by_end, reverse=True):
            points = by_end[point_end]
            out.points.append(
                Point(points[0].start, point_end, _combine(points, alignment.reducer))
            )
        if alignment.reducer == Reducer.REDUCE_MEAN:
            out.value_type = "DOUBLE"
        elif alignment.reducer == Reducer.REDUCE_COUNT:
            out.value_type = "INT64"
        reduced.append(out)
    return reduced


def _combine(points: Sequence[Point], reducer: int) -> int | float:
    values = [point.value for point in points]
    if reducer == Reducer.REDUCE_SUM:
        return sum(values)
    if reducer == Reducer.REDUCE_MEAN:
        return sum(values) / len(values)
    if reducer == Reducer.REDUCE_MIN:
        return min(values)
    if reducer == Reducer.REDUCE_MAX:
        return max(values)
    return len(values)  # REDUCE_COUNT


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    whole = math.floor(seconds)
    stamp.seconds = whole
    stamp.nanos = round((seconds - whole) * 1e9) % 1_000_000_000
    return stamp


def to_message(series: Series, headers_only: bool) -> types.TimeSeries:
    message = types.TimeSeries(
        metric=metric_pb2.Metric(type=series.metric_type, labels=series.metric_labels),
        resource=monitored_resource_pb2.MonitoredResource(
            type=series.resource_type, labels=series.resource_labels
        ),
        metric_kind=series.metric_kind,
        value_type=series.value_type,
        unit="1",
    )
    if headers_only:
        return message
    for point in series.points:
        if series.value_type == "INT64":
            value = types.TypedValue(int64_value=int(point.value))
        else:
            value = types.TypedValue(double_value=float(point.value))
        message.points.append(
            types.Point(
                interval=types.TimeInterval(
                    start_time=_timestamp(point.start), end_time=_timestamp(point.end)
                ),
                value=value,
            )
        )
    return message


def _interval(request: types.ListTimeSeriesRequest) -> tuple[float, float]:
    interval = types.TimeInterval.pb(request.interval)
    if not interval.HasField("end_time"):
        invalid_argument(
            "Request was missing field interval.endTime; set interval.end_time, and "
            "interval.start_time for a window."
        )
    end = interval.end_time.seconds + interval.end_time.nanos / 1e9
    if not interval.HasField("start_time"):
        return end, end
    start = interval.start_time.seconds + interval.start_time.nanos / 1e9
    if start > end:
        invalid_argument(
            f"Field interval.startTime had an invalid value of "
            f'"{interval.start_time.ToJsonString()}": the start time must not be later '
            f'than the end time ("{interval.end_time.ToJsonString()}").'
        )
    return start, end


class MetricService:
    def __init__(self, cloud: LocalCloud) -> None:
        self._reader = TimeSeriesReader(cloud)

    def list_time_series(
        self, request: types.ListTimeSeriesRequest
    ) -> types.ListTimeSeriesResponse:
        if not re.match(r"^projects/[^/]+$", request.name):
            invalid_argument(
                f"name {request.name!r} is invalid; use projects/PROJECT "
                "(organizations and folders are not served by localcloud)."
            )
        if request.order_by:
            invalid_argument(
                f"Field order_by had an invalid value of {request.order_by!r}: it is "
                "unsupported and must be left blank."
            )
        if "secondary_aggregation" in request:
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                "secondary_aggregation is not served by localcloud; send one "
                "aggregation.",
            )

        start, end = _interval(request)
        aggregation = request.aggregation if "aggregation" in request else None
        alignment = alignment_of(aggregation, "aggregation")
        series = self._reader.read(request.name, request.filter, start, end, alignment)

        view = types.ListTimeSeriesRequest.TimeSeriesView
        headers_only = request.view == view.HEADERS
        messages: list[Any] = [to_message(item, headers_only) for item in series]
        page, next_token = paginate(
            messages,
            request.page_size,
            request.page_token,
            default_page_size=MAX_TIME_SERIES_PAGE,
            max_page_size=MAX_TIME_SERIES_PAGE,
        )
        return types.ListTimeSeriesResponse(
            time_series=page, next_page_token=next_token
        )


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    service = MetricService(cloud)
    methods: dict[str, Method] = {
        "ListTimeSeries": (
            types.ListTimeSeriesRequest,
            types.ListTimeSeriesResponse,
            service.list_time_series,
        ),
    }
    return [service_handler(METRIC_SERVICE, methods)]
