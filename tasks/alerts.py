"""Log-based anomaly alerts as code: log metrics and Cloud Monitoring alert policies.

Everything is keyed by a stable name (the metric name, the policy display name), read
first and then created or updated, so a rerun converges instead of adding duplicates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from google.api_core import exceptions as gexc
from google.cloud import monitoring_v3
from google.cloud.logging_v2.types import LogMetric
from google.protobuf import duration_pb2
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients
from tasks.config import RefreshConfig

CHANNEL_DISPLAY_NAME = "model-refresh anomalies"
_RUN_REVISION = 'resource.type="cloud_run_revision"'


@dataclass(frozen=True)
class AnomalyRule:
    metric: str
    description: str
    filter: str
    threshold: float  # events per 5 minutes that open an incident


@dataclass(frozen=True)
class AlertSummary:
    metrics: tuple[str, ...]
    policies: tuple[str, ...]
    channel: str


def anomaly_rules(config: RefreshConfig) -> list[AnomalyRule]:
    llm = f'{_RUN_REVISION} AND resource.labels.service_name="{config.llm.name}"'
    mcp = f'{_RUN_REVISION} AND resource.labels.service_name="{config.mcp.name}"'
    both = (
        f'{_RUN_REVISION} AND (resource.labels.service_name="{config.llm.name}" OR '
        f'resource.labels.service_name="{config.mcp.name}")'
    )
    return [
        AnomalyRule(
            "model_refresh/llm_rejected_requests",
            "Requests the LLM guard rejected (size, max_tokens, malformed)",
            f'{llm} AND jsonPayload.event="request_rejected"',
            20,
        ),
        AnomalyRule(
            "model_refresh/mcp_denied_tools",
            "MCP calls to tools outside the allowlist or with invalid input",
            f'{mcp} AND (jsonPayload.event="tool_denied" OR '
            'jsonPayload.event="invalid_input")',
            5,
        ),
        AnomalyRule(
            "model_refresh/auth_failures",
            "Requests the Cloud Run front door rejected with 401 or 403",
            f"{both} AND (httpRequest.status=401 OR httpRequest.status=403)",
            50,
        ),
    ]


def output_blocked_filter(config: RefreshConfig) -> str:
    return (
        f'{_RUN_REVISION} AND resource.labels.service_name="{config.llm.name}" '
        'AND jsonPayload.event="output_blocked"'
    )


def ensure_log_metric(clients: Clients, rule: AnomalyRule) -> str:
    parent = f"projects/{clients.target.project}"
    name = f"{parent}/metrics/{rule.metric}"
    wanted = LogMetric(
        name=rule.metric, description=rule.description, filter=rule.filter
    )
    try:
        current = clients.metrics.get_log_metric(metric_name=name)
    except gexc.NotFound:
        # A concurrent run may create it between our read and write.
        with contextlib.suppress(gexc.AlreadyExists):
            clients.metrics.create_log_metric(parent=parent, metric=wanted)
        return name
    if current.filter != rule.filter or current.description != rule.description:
        clients.metrics.update_log_metric(metric_name=name, metric=wanted)
    return name


def ensure_channel(clients: Clients, email: str) -> str:
    project = f"projects/{clients.target.project}"
    for channel in clients.channels.list_notification_channels(name=project):
        if channel.display_name == CHANNEL_DISPLAY_NAME:
            if channel.labels.get("email_address") != email:
                channel.labels["email_address"] = email
                clients.channels.update_notification_channel(
                    notification_channel=channel
                )
            return channel.name
    created = clients.channels.create_notification_channel(
        name=project,
        notification_channel=monitoring_v3.NotificationChannel(
            type_="email",
            display_name=CHANNEL_DISPLAY_NAME,
            labels={"email_address": email},
        ),
    )
    return created.name


def _threshold_policy(
    rule: AnomalyRule, channel: str, rate_limit: int
) -> monitoring_v3.AlertPolicy:
    Policy = monitoring_v3.AlertPolicy
    return Policy(
        display_name=f"model-refresh: {rule.metric.split('/', 1)[1]}",
        documentation=Policy.Documentation(
            content=rule.description, mime_type="text/markdown"
        ),
        combiner=Policy.ConditionCombinerType.OR,
        conditions=[
            Policy.Condition(
                display_name=rule.description,
                condition_threshold=Policy.Condition.MetricThreshold(
                    filter=(
                        f'metric.type="logging.googleapis.com/user/{rule.metric}" AND '
                        'resource.type="cloud_run_revision"'
                    ),
                    comparison=monitoring_v3.ComparisonType.COMPARISON_GT,
                    threshold_value=rule.threshold,
                    duration=duration_pb2.Duration(seconds=0),
                    aggregations=[
                        monitoring_v3.Aggregation(
                            alignment_period=duration_pb2.Duration(seconds=300),
                            per_series_aligner=monitoring_v3.Aggregation.Aligner.ALIGN_SUM,
                        )
                    ],
                ),
            )
        ],
        notification_channels=[channel],
        alert_strategy=Policy.AlertStrategy(
            auto_close=duration_pb2.Duration(seconds=86400)
        ),
        severity=Policy.Severity.WARNING,
        enabled=True,
    )


def _log_match_policy(config: RefreshConfig, channel: str) -> monitoring_v3.AlertPolicy:
    """Build the log-match policy: one condition plus the required rate limit."""
    Policy = monitoring_v3.AlertPolicy
    return Policy(
        display_name="model-refresh: llm_output_blocked",
        documentation=Policy.Documentation(
            content="The LLM guard blocked a completion that leaked the system prompt "
            "canary or a secret-looking value.",
            mime_type="text/markdown",
        ),
        combiner=Policy.ConditionCombinerType.OR,
        conditions=[
            Policy.Condition(
                display_name="LLM output blocked",
                condition_matched_log=Policy.Condition.LogMatch(
                    filter=output_blocked_filter(config)
                ),
            )
        ],
        notification_channels=[channel],
        alert_strategy=Policy.AlertStrategy(
            notification_rate_limit=Policy.AlertStrategy.NotificationRateLimit(
                period=duration_pb2.Duration(seconds=config.alerts.rate_limit_seconds)
            ),
            auto_close=duration_pb2.Duration(seconds=86400),
        ),
        severity=Policy.Severity.CRITICAL,
        enabled=True,
    )


def ensure_policy(clients: Clients, policy: monitoring_v3.AlertPolicy) -> str:
    project = f"projects/{clients.target.project}"
    for existing in clients.alert_policies.list_alert_policies(name=project):
        if existing.display_name == policy.display_name:
            policy.name = existing.name
            clients.alert_policies.update_alert_policy(alert_policy=policy)
            return existing.name
    created = clients.alert_policies.create_alert_policy(
        name=project, alert_policy=policy
    )
    return created.name


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def ensure_anomaly_alerts(clients: Clients, config: RefreshConfig) -> AlertSummary:
    """Create or update the log metrics and alert policies for the services' events."""
    logger = get_run_logger()
    channel = ensure_channel(clients, config.alerts.notification_email)
    rules = anomaly_rules(config)
    metrics = [ensure_log_metric(clients, rule) for rule in rules]
    policies = [
        ensure_policy(
            clients, _threshold_policy(rule, channel, config.alerts.rate_limit_seconds)
        )
        for rule in rules
    ]
    policies.append(ensure_policy(clients, _log_match_policy(config, channel)))
    logger.info(
        "Ensured %d log metrics and %d alert policies", len(metrics), len(policies)
    )
    return AlertSummary(tuple(metrics), tuple(policies), channel)
