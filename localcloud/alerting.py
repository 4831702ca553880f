"""The alert evaluator: opens and closes incidents of the enabled alert policies and
notifies their channels.

A background thread evaluates every policy once per interval (`DEFAULT_INTERVAL_SECONDS`
unless `LocalCloud` gets another). Two condition types are evaluated:

- `condition_threshold` on a log metric: the time series its filter selects are read
  over the last alignment period with its first aggregation, and each series whose
  newest aligned value passes the comparison for `duration` violates. With the OR
  combiner (or one condition) each violating series opens its own incident, which
  closes at the first evaluation that finds the series no longer violating. With AND,
  one incident is open while every condition has enough violating series;
- `condition_matched_log`: entries are matched as they are written (a `LogSink`
  listener). The first match opens an incident and notifies. Later matches notify
  again only once `notification_rate_limit.period` has passed since the last
  notification, and the incident closes after `auto_close` without matches.

Incidents are kept in the resource store (kind `monitoring.incidents`), so after a
restart an open incident is neither notified again nor left open when it clears.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.cloud.monitoring_v3 import types

from localcloud.api import filters
from localcloud.api.logging import log_field_path
from localcloud.api.monitoring import CHANNEL_KIND, POLICY_KIND
from localcloud.api.resources import from_document
from localcloud.api.timeseries import Series, TimeSeriesReader, alignment_of
from localcloud.notifications import Notifier
from localcloud.rpc import RpcError

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

INCIDENT_KIND = "monitoring.incidents"
DEFAULT_INTERVAL_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 10.0
# NOTE: used when a log-match policy sets no auto_close; Cloud Monitoring's default for
# log-match incidents is not confirmed.
DEFAULT_LOG_MATCH_AUTO_CLOSE_SECONDS = 7 * 24 * 3600
# Closed incidents are kept this long, then removed from the store.
CLOSED_INCIDENT_RETENTION_SECONDS = 7 * 24 * 3600
# A condition without aggregations compares the newest raw point of this window.
RAW_WINDOW_SECONDS = 60.0

Comparison = types.ComparisonType
COMPARISONS: dict[int, Callable[[float, float], bool]] = {
    Comparison.COMPARISON_GT: lambda value, threshold: value > threshold,
    Comparison.COMPARISON_GE: lambda value, threshold: value >= threshold,
    Comparison.COMPARISON_LT: lambda value, threshold: value < threshold,
    Comparison.COMPARISON_LE: lambda value, threshold: value <= threshold,
    Comparison.COMPARISON_EQ: lambda value, threshold: value == threshold,
    Comparison.COMPARISON_NE: lambda value, threshold: value != threshold,
}
COMPARISON_TEXT = {
    Comparison.COMPARISON_GT: "above",
    Comparison.COMPARISON_GE: "at or above",
    Comparison.COMPARISON_LT: "below",
    Comparison.COMPARISON_LE: "at or below",
    Comparison.COMPARISON_EQ: "equal to",
    Comparison.COMPARISON_NE: "not equal to",
}
Prompt = types.AlertPolicy.AlertStrategy.NotificationPrompt
Combiner = types.AlertPolicy.ConditionCombinerType


@dataclass
class Violation:
    """One time series that violates a threshold condition at this evaluation."""

    condition: types.AlertPolicy.Condition
    series: Series
    value: float


@dataclass
class LogMatch:
    """The metadata of a matching entry, without its payload."""

    time: float
    log_name: str
    resource: dict[str, Any]
    severity: str
    insert_id: str


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


class AlertEvaluator:
    def __init__(
        self, cloud: LocalCloud, interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(
                f"alert evaluation interval must be positive, got {interval_seconds}"
            )
        self._cloud = cloud
        self._store = cloud.store
        self._reader = TimeSeriesReader(cloud)
        self.notifier = Notifier(cloud.state_dir)
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, list[LogMatch]] = {}
        self._log_filters: dict[str, filters.Filter] = {}
        # (policy, condition, series key) -> when the series started violating
        self._violating_since: dict[str, float] = {}
        self._warned: set[str] = set()
        # Completed evaluation passes; tests wait on it instead of sleeping.
        self.evaluations = 0

    def start(self) -> None:
        self._cloud.logs.add_listener(self._on_entries)
        self._thread = threading.Thread(
            target=self._run, name="localcloud-alerting", daemon=True
        )
        self._thread.start()
        logger.info(
            "alert evaluator started, evaluating every %.3g s", self.interval_seconds
        )

    def stop(self) -> None:
        self._stop.set()
        self._cloud.logs.remove_listener(self._on_entries)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                logger.warning(
                    "alert evaluator did not stop within %d s", STOP_TIMEOUT_SECONDS
                )
        logger.info("alert evaluator stopped")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.evaluate(time.time())
            except Exception:
                logger.exception("alert evaluation failed; retrying next interval")
            self.evaluations += 1

    # Log-match conditions: matched on the writer's thread, handled by the evaluator

    def _on_entries(self, documents: list[dict[str, Any]]) -> None:
        for name, policy in self._store.list(POLICY_KIND):
            if policy.get("enabled") is False:
                continue
            conditions = policy.get("conditions", [])
            if len(conditions) != 1 or "condition_matched_log" not in conditions[0]:
                continue
            matcher = self._log_filter(conditions[0]["condition_matched_log"])
            if matcher is None:
                continue
            # A policy matches the entries of its own project only.
            logs_prefix = name.split("/alertPolicies/", 1)[0] + "/logs/"
            matches = [
                _log_match(document)
                for document in documents
                if str(document.get("logName", "")).startswith(logs_prefix)
                and matcher.matches(document)
            ]
            if matches:
                with self._lock:
                    self._pending.setdefault(name, []).extend(matches)

    def _log_filter(self, log_match: dict[str, Any]) -> filters.Filter | None:
        text = log_match.get("filter", "")
        cached = self._log_filters.get(text)
        if cached is None:
            try:
                cached = filters.parse(text, normalize_field=log_field_path)
            except filters.FilterSyntaxError:
                self._warn_once(text, "log-match filter %r no longer parses", text)
                return None
            self._log_filters[text] = cached
        return cached

    # Evaluation

    def evaluate(self, now: float) -> None:
        """Evaluate every enabled policy once, as of `now` (epoch seconds)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        policies = {
            name: from_document(types.AlertPolicy, document)
            for name, document in self._store.list(POLICY_KIND)
        }
        incidents = {
            document["key"]: document for _, document in self._store.list(INCIDENT_KIND)
        }
        for name, policy in policies.items():
            if not policy.enabled:
                continue
            kinds = [
                types.AlertPolicy.Condition.pb(c).WhichOneof("condition")
                for c in policy.conditions
            ]
            if kinds == ["condition_matched_log"]:
                self._evaluate_log_match(policy, pending.get(name, []), incidents, now)
            else:
                self._evaluate_thresholds(policy, incidents, now)
        self._close_orphans(policies, incidents, now)

    def _evaluate_thresholds(
        self,
        policy: types.AlertPolicy,
        incidents: dict[str, dict[str, Any]],
        now: float,
    ) -> None:
        per_condition: list[dict[str, Violation]] = []
        for condition in policy.conditions:
            if "condition_threshold" not in condition:
                # NOTE: absent conditions are stored but never evaluated.
                self._warn_once(
                    condition.name,
                    "condition %s of alert policy %s is not a threshold condition "
                    "and is not evaluated",
                    condition.name,
                    policy.name,
                )
                per_condition.append({})
                continue
            per_condition.append(self._violations(policy, condition, incidents, now))

        violating: dict[str, Violation] = {}
        if policy.combiner in (Combiner.AND, Combiner.AND_WITH_MATCHING_RESOURCE):
            # NOTE: AND_WITH_MATCHING_RESOURCE is evaluated as AND.
            if per_condition and all(per_condition):
                first = next(iter(per_condition[0].values()))
                violating[f"{policy.name}|all"] = first
        else:
            for violations in per_condition:
                for key, violation in violations.items():
                    violating[f"{policy.name}|{violation.condition.name}|{key}"] = (
                        violation
                    )

        prefix = f"{policy.name}|"
        for key, violation in violating.items():
            if key not in incidents or incidents[key]["state"] != "open":
                incidents[key] = self._open_threshold(policy, key, violation, now)
        for key, incident in incidents.items():
            if (
                key.startswith(prefix)
                and incident["state"] == "open"
                and key not in violating
            ):
                self._close(policy, key, incident, now, "the condition cleared")

    def _violations(
        self,
        policy: types.AlertPolicy,
        condition: types.AlertPolicy.Condition,
        incidents: dict[str, dict[str, Any]],
        now: float,
    ) -> dict[str, Violation]:
        threshold = condition.condition_threshold
        if threshold.denominator_filter:
            self._warn_once(
                condition.name,
                "condition %s uses a denominator_filter, which localcloud does not "
                "evaluate",
                condition.name,
            )
            return {}
        project = policy.name.split("/alertPolicies/", 1)[0]
        try:
            aggregation = threshold.aggregations[0] if threshold.aggregations else None
            alignment = alignment_of(aggregation, "aggregations[0]")
            window = alignment.period or RAW_WINDOW_SECONDS
            selected = self._reader.read(
                project, threshold.filter, now - window, now, alignment
            )
        except RpcError as exc:
            self._warn_once(
                condition.name,
                "condition %s of alert policy %s cannot be evaluated: %s",
                condition.name,
                policy.name,
                exc.message,
            )
            return {}
        compare = COMPARISONS.get(threshold.comparison)
        if compare is None:
            return {}
        violating: dict[str, Violation] = {}
        for series in selected:
            if not series.points:
                continue
            value = float(series.points[0].value)
            if compare(value, threshold.threshold_value):
                key = "|".join(series.key())
                violating[key] = Violation(condition, series, value)

        duration = threshold.duration.total_seconds()
        since_prefix = f"{condition.name}|"
        for key in [k for k in self._violating_since if k.startswith(since_prefix)]:
            if key.removeprefix(since_prefix) not in violating:
                del self._violating_since[key]
        for key in violating:
            # An incident open before a restart keeps its start as the violation's
            # start, so `duration` does not have to pass again.
            incident = incidents.get(f"{policy.name}|{condition.name}|{key}")
            if incident is not None and incident["state"] == "open":
                self._violating_since.setdefault(
                    since_prefix + key, incident["started_at"]
                )
        lasting = {
            key: violation
            for key, violation in violating.items()
            if now - self._violating_since.setdefault(since_prefix + key, now)
            >= duration
        }
        return (
            lasting if _trigger_met(threshold.trigger, len(lasting), selected) else {}
        )

    def _evaluate_log_match(
        self,
        policy: types.AlertPolicy,
        matches: list[LogMatch],
        incidents: dict[str, dict[str, Any]],
        now: float,
    ) -> None:
        key = f"{policy.name}|log"
        incident = incidents.get(key)
        strategy = policy.alert_strategy
        rate_limit = strategy.notification_rate_limit.period.total_seconds()
        auto_close = (
            strategy.auto_close.total_seconds()
            if "auto_close" in strategy
            else DEFAULT_LOG_MATCH_AUTO_CLOSE_SECONDS
        )
        if matches:
            last = matches[-1]
            if incident is None or incident["state"] != "open":
                incidents[key] = self._open_log_match(policy, key, last, now)
                return
            incident["last_match"] = last.time
            if now - incident.get("last_notified", 0.0) >= rate_limit:
                incident["last_notified"] = now
                incident["summary"] = _log_summary(policy, last, len(matches))
                self._notify(policy, incident, "open")
            self._save(incident)
        elif (
            incident is not None
            and incident["state"] == "open"
            and now - incident.get("last_match", incident["started_at"]) >= auto_close
        ):
            self._close(policy, key, incident, now, "no matching entry arrived")

    # Incidents

    def _open_threshold(
        self, policy: types.AlertPolicy, key: str, violation: Violation, now: float
    ) -> dict[str, Any]:
        condition = violation.condition
        threshold = condition.condition_threshold
        series = violation.series
        incident = _new_incident(policy, condition, key, now)
        incident.update(
            {
                "resource": {
                    "type": series.resource_type,
                    "labels": series.resource_labels,
                },
                "metric": {
                    "type": series.metric_type,
                    "labels": series.metric_labels,
                },
                "observed_value": f"{violation.value:g}",
                "threshold_value": f"{threshold.threshold_value:g}",
                "summary": (
                    f"{series.metric_type} for {series.resource_type} "
                    f"{_labels_text(series.resource_labels)} with value "
                    f"{violation.value:g} is "
                    f"{COMPARISON_TEXT.get(threshold.comparison, 'past')} the "
                    f"threshold of {threshold.threshold_value:g}."
                ),
            }
        )
        self._save(incident)
        logger.info(
            "incident %s opened for alert policy %s (%s)",
            incident["incident_id"],
            policy.name,
            incident["summary"],
        )
        self._notify(policy, incident, "open")
        return incident

    def _open_log_match(
        self, policy: types.AlertPolicy, key: str, match: LogMatch, now: float
    ) -> dict[str, Any]:
        incident = _new_incident(policy, policy.conditions[0], key, now)
        incident.update(
            {
                "resource": match.resource,
                "last_match": match.time,
                "last_notified": now,
                "summary": _log_summary(policy, match, 1),
            }
        )
        self._save(incident)
        logger.info(
            "incident %s opened for alert policy %s (log match in %s)",
            incident["incident_id"],
            policy.name,
            match.log_name,
        )
        self._notify(policy, incident, "open")
        return incident

    def _close(
        self,
        policy: types.AlertPolicy | None,
        key: str,
        incident: dict[str, Any],
        now: float,
        reason: str,
    ) -> None:
        incident["state"] = "closed"
        incident["ended_at"] = now
        incident["summary"] = f"{incident['summary']} Closed: {reason}."
        self._save(incident)
        logger.info(
            "incident %s of alert policy %s closed: %s",
            incident["incident_id"],
            incident["policy"],
            reason,
        )
        if policy is not None:
            self._notify(policy, incident, "closed")

    def _close_orphans(
        self,
        policies: dict[str, types.AlertPolicy],
        incidents: dict[str, dict[str, Any]],
        now: float,
    ) -> None:
        for key, incident in incidents.items():
            policy = policies.get(incident["policy"])
            if incident["state"] == "open" and (policy is None or not policy.enabled):
                # NOTE: closing silently when a policy is deleted or disabled is a
                # guess at Cloud Monitoring's behaviour.
                reason = "the alert policy was deleted or disabled"
                self._close(None, key, incident, now, reason)
            elif (
                incident["state"] == "closed"
                and now - incident.get("ended_at", now)
                > CLOSED_INCIDENT_RETENTION_SECONDS
            ):
                self._store.delete(INCIDENT_KIND, _store_name(key))

    def _notify(
        self, policy: types.AlertPolicy, incident: dict[str, Any], state: str
    ) -> None:
        prompts = set(policy.alert_strategy.notification_prompts)
        expected = Prompt.OPENED if state == "open" else Prompt.CLOSED
        if prompts and expected not in prompts:
            return
        payload = _payload(policy, incident)
        for channel_name in policy.notification_channels:
            document = self._store.get(CHANNEL_KIND, channel_name)
            if document is None:
                continue
            channel = from_document(types.NotificationChannel, document)
            if not channel.enabled:
                continue
            labels = dict(channel.labels)
            try:
                sent = self.notifier.send(channel_name, channel.type_, labels, payload)
            except Exception:
                logger.exception(
                    "notifying channel %s of incident %s failed",
                    channel_name,
                    incident["incident_id"],
                )
                continue
            if sent:
                logger.info(
                    "notified channel %s of incident %s (%s)",
                    channel_name,
                    incident["incident_id"],
                    state,
                )

    def _save(self, incident: dict[str, Any]) -> None:
        self._store.put(INCIDENT_KIND, _store_name(incident["key"]), incident)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)


def _store_name(key: str) -> str:
    # Keys name the policy, condition and series, too long for a file name.
    project = key.split("/alertPolicies/", 1)[0]
    return f"{project}/incidents/{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _trigger_met(
    trigger: types.AlertPolicy.Condition.Trigger, lasting: int, selected: list[Series]
) -> bool:
    if lasting == 0:
        return False
    if trigger.percent:
        return lasting * 100.0 >= trigger.percent * max(len(selected), 1)
    return lasting >= (trigger.count or 1)


def _new_incident(
    policy: types.AlertPolicy,
    condition: types.AlertPolicy.Condition,
    key: str,
    now: float,
) -> dict[str, Any]:
    return {
        "incident_id": uuid.uuid4().hex,
        "key": key,
        "policy": policy.name,
        "condition": condition.name,
        "state": "open",
        "started_at": now,
        "ended_at": None,
    }


def _log_match(document: dict[str, Any]) -> LogMatch:
    stamp = filters.parse_time(document.get("receiveTimestamp", ""))
    return LogMatch(
        time=stamp.timestamp() if stamp else time.time(),
        log_name=str(document.get("logName", "")),
        resource=document.get("resource", {}),
        severity=str(document.get("severity", "DEFAULT")),
        insert_id=str(document.get("insertId", "")),
    )


def _log_summary(policy: types.AlertPolicy, match: LogMatch, count: int) -> str:
    # The entry's payload may hold a prompt, so only its metadata is summarized.
    return (
        f"{count} log {'entry' if count == 1 else 'entries'} matched the filter of "
        f"{policy.conditions[0].display_name or policy.conditions[0].name}; the last "
        f"one: log {match.log_name}, resource {match.resource.get('type', '')} "
        f"{_labels_text(match.resource.get('labels', {}))}, severity "
        f"{match.severity}, insert id {match.insert_id}."
    )


def _labels_text(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _payload(policy: types.AlertPolicy, incident: dict[str, Any]) -> dict[str, Any]:
    """Build the notification in Cloud Monitoring's webhook schema, version 1.2."""
    condition = next(
        (c for c in policy.conditions if c.name == incident["condition"]),
        policy.conditions[0],
    )
    project = policy.name.split("/")[1]
    ended = incident.get("ended_at")
    body: dict[str, Any] = {
        "incident_id": incident["incident_id"],
        "scoping_project_id": project,
        "policy_name": policy.display_name,
        "condition_name": condition.display_name,
        "condition": {"name": condition.name, "displayName": condition.display_name},
        "state": incident["state"],
        "started_at": int(incident["started_at"]),
        "ended_at": int(ended) if ended is not None else None,
        "summary": incident["summary"],
        "severity": types.AlertPolicy.Severity(policy.severity).name,
        "resource": incident.get("resource", {}),
        # Not in Cloud Monitoring's schema: the policy's resource name and times in
        # RFC 3339, for readers of the local file.
        "policy_resource_name": policy.name,
        "started": _rfc3339(incident["started_at"]),
        "ended": _rfc3339(ended) if ended is not None else None,
    }
    for optional in ("metric", "observed_value", "threshold_value"):
        if optional in incident:
            body[optional] = incident[optional]
    if policy.documentation.content:
        body["documentation"] = {
            "content": policy.documentation.content,
            "mime_type": policy.documentation.mime_type,
        }
    return {"version": "1.2", "incident": body}
