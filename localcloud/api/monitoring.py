"""Cloud Monitoring v3 alert policies (`google.monitoring.v3.AlertPolicyService`) and
notification channels (`google.monitoring.v3.NotificationChannelService`). The handlers
include `MetricService.ListTimeSeries` from `localcloud/api/timeseries.py`; the
evaluator of the policies is `localcloud/alerting.py`.

Policies and channels are stored as documents with proto field names, so list filters
such as `display_name="api errors"` and update masks use the documented names.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud.monitoring_v3 import types
from google.protobuf import empty_pb2

from localcloud.api import filters, timeseries
from localcloud.api.logging import parse_log_filter, validate_extractor
from localcloud.api.resources import (
    apply_update_mask,
    from_document,
    now_timestamp,
    paginate,
    to_document,
)
from localcloud.rpc import (
    Method,
    failed_precondition,
    invalid_argument,
    not_found,
    service_handler,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

POLICY_SERVICE = "google.monitoring.v3.AlertPolicyService"
CHANNEL_SERVICE = "google.monitoring.v3.NotificationChannelService"
POLICY_KIND = "monitoring.alertPolicies"
CHANNEL_KIND = "monitoring.notificationChannels"

# Cloud Monitoring allows at most 6 conditions per alert policy.
MAX_CONDITIONS = 6
MUTATED_BY = "localcloud"

_PROJECT = re.compile(r"^projects/[^/]+$")
_POLICY_NAME = re.compile(r"^projects/[^/]+/alertPolicies/[^/]+$")
_CHANNEL_NAME = re.compile(r"^projects/[^/]+/notificationChannels/[^/]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TOPIC = re.compile(r"^projects/[^/]+/topics/[^/]+$")
_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")

UPDATABLE_POLICY_FIELDS = {
    "display_name",
    "documentation",
    "user_labels",
    "conditions",
    "combiner",
    "enabled",
    "validity",
    "notification_channels",
    "alert_strategy",
    "severity",
}
UPDATABLE_CHANNEL_FIELDS = {
    "display_name",
    "description",
    "labels",
    "user_labels",
    "enabled",
}


def _label(key: str, description: str) -> dict[str, str]:
    return {"key": key, "description": description}


# The channel types served here, with the labels each one requires.
CHANNEL_DESCRIPTORS: dict[str, dict[str, Any]] = {
    "email": {
        "display_name": "Email",
        "description": "Sends notifications by email.",
        "labels": [_label("email_address", "The address to send notifications to.")],
    },
    "pubsub": {
        "display_name": "Pub/Sub",
        "description": "Publishes notifications to a Pub/Sub topic.",
        "labels": [_label("topic", "The topic, as projects/PROJECT/topics/TOPIC.")],
    },
    "webhook_tokenauth": {
        "display_name": "Webhook with token authentication",
        "description": "Posts notifications as JSON to a URL.",
        "labels": [_label("url", "The URL to post to, including any token parameter.")],
    },
}


def _new_id() -> str:
    # Cloud Monitoring names policies, conditions and channels with decimal ids.
    return str(uuid.uuid4().int)[:19]


def _mutation_record() -> types.MutationRecord:
    return types.MutationRecord(mutate_time=now_timestamp(), mutated_by=MUTATED_BY)


def _check_project(name: str, field: str = "name") -> None:
    if not _PROJECT.match(name):
        invalid_argument(f"{field} {name!r} is invalid; use projects/PROJECT.")


def _list_documents(
    store: Any, kind: str, project: str, filter_text: str, order_by: str
) -> list[dict[str, Any]]:
    _check_project(project)
    parsed = filters.parse_or_reject(filter_text)
    documents = [
        doc for _, doc in store.list(kind, f"{project}/") if parsed.matches(doc)
    ]
    if not order_by:
        return documents
    keys = []
    for term in order_by.split(","):
        field = term.strip()
        descending = field.startswith("-")
        field = field.lstrip("-")
        if field not in ("name", "display_name"):
            invalid_argument(
                f"order_by {order_by!r} is not supported; sort by name or "
                "display_name, with a leading - for descending order."
            )
        keys.append((field, descending))
    for field, descending in reversed(keys):
        documents.sort(key=lambda doc: str(doc.get(field, "")), reverse=descending)
    return documents


class AlertPolicies:
    def __init__(self, cloud: LocalCloud, channels: NotificationChannels) -> None:
        self._store = cloud.store
        self._channels = channels
        self._lock = threading.RLock()

    def create(self, request: types.CreateAlertPolicyRequest) -> types.AlertPolicy:
        _check_project(request.name)
        policy = types.AlertPolicy(request.alert_policy)
        policy.name = f"{request.name}/alertPolicies/{_new_id()}"
        self._prepare(policy)
        policy.creation_record = _mutation_record()
        policy.mutation_record = policy.creation_record
        self._store.put(POLICY_KIND, policy.name, to_document(policy))
        logger.info("created alert policy %s (%s)", policy.name, policy.display_name)
        return policy

    def get(self, name: str) -> types.AlertPolicy:
        return from_document(types.AlertPolicy, self._document(name))

    def list_policies(self, request: types.ListAlertPoliciesRequest) -> Any:
        documents = _list_documents(
            self._store, POLICY_KIND, request.name, request.filter, request.order_by
        )
        page, next_token = paginate(documents, request.page_size, request.page_token)
        return types.ListAlertPoliciesResponse(
            alert_policies=[from_document(types.AlertPolicy, doc) for doc in page],
            next_page_token=next_token,
            total_size=len(documents),
        )

    def update(self, request: types.UpdateAlertPolicyRequest) -> types.AlertPolicy:
        name = request.alert_policy.name
        with self._lock:
            stored = self._document(name)
            sent = to_document(request.alert_policy)
            paths = list(request.update_mask.paths)
            if paths:
                updated = dict(stored)
                apply_update_mask(updated, sent, paths, UPDATABLE_POLICY_FIELDS)
            else:
                # Without a mask the sent policy replaces the stored one.
                updated = {
                    key: sent[key] for key in sent if key in UPDATABLE_POLICY_FIELDS
                }
                updated["name"] = name
                updated["creation_record"] = stored.get("creation_record")
            policy = from_document(types.AlertPolicy, updated)
            self._prepare(policy)
            policy.mutation_record = _mutation_record()
            self._store.put(POLICY_KIND, name, to_document(policy))
        logger.info("updated alert policy %s", name)
        return policy

    def delete(self, name: str) -> None:
        self._document(name)
        self._store.delete(POLICY_KIND, name)
        logger.info("deleted alert policy %s", name)

    def referencing(self, channel_name: str) -> list[str]:
        """Return the names of the policies that notify `channel_name`."""
        return [
            name
            for name, doc in self._store.list(POLICY_KIND)
            if channel_name in doc.get("notification_channels", [])
        ]

    def remove_channel(self, channel_name: str) -> None:
        for name in self.referencing(channel_name):
            document = self._document(name)
            document["notification_channels"] = [
                channel
                for channel in document["notification_channels"]
                if channel != channel_name
            ]
            self._store.put(POLICY_KIND, name, document)
            logger.info("removed channel %s from alert policy %s", channel_name, name)

    def _document(self, name: str) -> dict[str, Any]:
        if not _POLICY_NAME.match(name):
            invalid_argument(
                f"alert policy name {name!r} is invalid; use "
                "projects/PROJECT/alertPolicies/POLICY_ID."
            )
        document = self._store.get(POLICY_KIND, name)
        if document is None:
            not_found(f"Alert policy {name} does not exist.")
        return document

    def _prepare(self, policy: types.AlertPolicy) -> None:
        """Validate `policy` and fill the defaults and condition names."""
        _validate_policy(policy)
        for channel in policy.notification_channels:
            self._channels.get(channel)
        for condition in policy.conditions:
            if not condition.name.startswith(f"{policy.name}/conditions/"):
                condition.name = f"{policy.name}/conditions/{_new_id()}"
        if "enabled" not in policy:
            policy.enabled = True


def _validate_policy(policy: types.AlertPolicy) -> None:
    if not policy.display_name.strip():
        invalid_argument("alert_policy.display_name is required; name the policy.")
    conditions = list(policy.conditions)
    if not conditions:
        invalid_argument(
            "alert_policy.conditions is required; add at least one condition."
        )
    if len(conditions) > MAX_CONDITIONS:
        invalid_argument(
            f"alert_policy has {len(conditions)} conditions; at most {MAX_CONDITIONS} "
            "are allowed."
        )
    unspecified = types.AlertPolicy.ConditionCombinerType.COMBINE_UNSPECIFIED
    if len(conditions) > 1 and policy.combiner == unspecified:
        invalid_argument(
            "alert_policy.combiner is required when a policy has more than one "
            "condition; set AND, OR or AND_WITH_MATCHING_RESOURCE."
        )
    kinds = [
        _condition_kind(condition, index) for index, condition in enumerate(conditions)
    ]
    if "condition_matched_log" in kinds:
        _validate_log_match_policy(policy, kinds)
    for index, (condition, kind) in enumerate(zip(conditions, kinds, strict=True)):
        _validate_condition(condition, kind, index)


def _condition_kind(condition: types.AlertPolicy.Condition, index: int) -> str:
    kind = types.AlertPolicy.Condition.pb(condition).WhichOneof("condition")
    if kind is None:
        invalid_argument(
            f"alert_policy.conditions[{index}] has no condition; set one of "
            "condition_threshold, condition_absent or condition_matched_log."
        )
    return kind


def _validate_log_match_policy(policy: types.AlertPolicy, kinds: list[str]) -> None:
    # Log-match conditions are documented to stand alone in their policy and to need a
    # notification rate limit.
    if len(kinds) != 1:
        invalid_argument(
            f"alert_policy has {len(kinds)} conditions including "
            "condition_matched_log; a policy with a log-match condition must have "
            "exactly one condition. Create one policy per log-match condition."
        )
    if "period" not in policy.alert_strategy.notification_rate_limit:
        invalid_argument(
            "alert_policy.alert_strategy.notification_rate_limit.period is required "
            "for a policy with a log-match condition, for example 300s."
        )


def _validate_condition(
    condition: types.AlertPolicy.Condition, kind: str, index: int
) -> None:
    field = f"alert_policy.conditions[{index}]"
    if kind == "condition_matched_log":
        log_match = condition.condition_matched_log
        if not log_match.filter.strip():
            invalid_argument(f"{field}.condition_matched_log.filter is required.")
        parse_log_filter(
            log_match.filter, field=f"{field}.condition_matched_log.filter"
        )
        for key, expression in log_match.label_extractors.items():
            validate_extractor(expression, f"{field}.label_extractors[{key!r}]")
    elif kind in ("condition_threshold", "condition_absent"):
        if not getattr(condition, kind).filter.strip():
            invalid_argument(
                f"{field}.{kind}.filter is required; give the time series filter, for "
                'example metric.type="logging.googleapis.com/user/METRIC".'
            )
    else:
        invalid_argument(
            f"{field}.{kind} is not served by localcloud; use condition_threshold, "
            "condition_absent or condition_matched_log."
        )


class NotificationChannels:
    def __init__(self, cloud: LocalCloud) -> None:
        self._store = cloud.store
        self.policies: AlertPolicies | None = None

    def descriptors(self, project: str) -> list[types.NotificationChannelDescriptor]:
        _check_project(project)
        return [
            self.descriptor(f"{project}/notificationChannelDescriptors/{kind}")
            for kind in CHANNEL_DESCRIPTORS
        ]

    def descriptor(self, name: str) -> types.NotificationChannelDescriptor:
        kind = name.rsplit("/", 1)[-1]
        if (
            kind not in CHANNEL_DESCRIPTORS
            or "/notificationChannelDescriptors/" not in name
        ):
            not_found(f"Notification channel descriptor {name} does not exist.")
        spec = CHANNEL_DESCRIPTORS[kind]
        return types.NotificationChannelDescriptor(
            name=name,
            type_=kind,
            display_name=spec["display_name"],
            description=spec["description"],
            labels=spec["labels"],
        )

    def create(self, request: types.CreateNotificationChannelRequest) -> Any:
        _check_project(request.name)
        channel = types.NotificationChannel(request.notification_channel)
        _validate_channel(channel)
        channel.name = f"{request.name}/notificationChannels/{_new_id()}"
        if "enabled" not in channel:
            channel.enabled = True
        channel.creation_record = _mutation_record()
        self._store.put(CHANNEL_KIND, channel.name, to_document(channel))
        logger.info("created notification channel %s (%s)", channel.name, channel.type_)
        return channel

    def get(self, name: str) -> types.NotificationChannel:
        return from_document(types.NotificationChannel, self._document(name))

    def list_channels(self, request: types.ListNotificationChannelsRequest) -> Any:
        documents = _list_documents(
            self._store, CHANNEL_KIND, request.name, request.filter, request.order_by
        )
        page, next_token = paginate(documents, request.page_size, request.page_token)
        return types.ListNotificationChannelsResponse(
            notification_channels=[
                from_document(types.NotificationChannel, doc) for doc in page
            ],
            next_page_token=next_token,
            total_size=len(documents),
        )

    def update(self, request: types.UpdateNotificationChannelRequest) -> Any:
        name = request.notification_channel.name
        stored = self._document(name)
        sent = to_document(request.notification_channel)
        paths = list(request.update_mask.paths)
        if sent.get("type", stored.get("type")) != stored.get("type"):
            invalid_argument(
                f"the type of notification channel {name} cannot change; create a new "
                "channel of the other type."
            )
        updated = dict(stored)
        fields = paths or sorted(UPDATABLE_CHANNEL_FIELDS)
        apply_update_mask(updated, sent, fields, UPDATABLE_CHANNEL_FIELDS)
        channel = from_document(types.NotificationChannel, updated)
        _validate_channel(channel)
        channel.mutation_records.append(_mutation_record())
        self._store.put(CHANNEL_KIND, name, to_document(channel))
        logger.info("updated notification channel %s", name)
        return channel

    def delete(self, request: types.DeleteNotificationChannelRequest) -> None:
        self._document(request.name)
        assert self.policies is not None
        users = self.policies.referencing(request.name)
        if users and not request.force:
            failed_precondition(
                f"Notification channel {request.name} is used by alert policies "
                f"{', '.join(users)}; remove it from them first or delete with "
                "force=true."
            )
        if users:
            self.policies.remove_channel(request.name)
        self._store.delete(CHANNEL_KIND, request.name)
        logger.info("deleted notification channel %s", request.name)

    def _document(self, name: str) -> dict[str, Any]:
        if not _CHANNEL_NAME.match(name):
            invalid_argument(
                f"notification channel name {name!r} is invalid; use "
                "projects/PROJECT/notificationChannels/CHANNEL_ID."
            )
        document = self._store.get(CHANNEL_KIND, name)
        if document is None:
            not_found(f"Notification channel {name} does not exist.")
        return document


def _validate_channel(channel: types.NotificationChannel) -> None:
    if channel.type_ not in CHANNEL_DESCRIPTORS:
        invalid_argument(
            f"notification_channel.type {channel.type_!r} is not supported; use one of "
            f"{', '.join(sorted(CHANNEL_DESCRIPTORS))}."
        )
    required = {label["key"] for label in CHANNEL_DESCRIPTORS[channel.type_]["labels"]}
    labels = dict(channel.labels)
    unknown = sorted(set(labels) - required)
    if unknown:
        invalid_argument(
            f"notification_channel.labels {unknown} are not defined for type "
            f"{channel.type_}; it takes {sorted(required)}."
        )
    for key in sorted(required):
        if not labels.get(key):
            invalid_argument(
                f"notification_channel.labels.{key} is required for type "
                f"{channel.type_}."
            )
    checks = {"email_address": _EMAIL, "topic": _TOPIC, "url": _URL}
    for key, value in labels.items():
        if not checks[key].match(value):
            invalid_argument(
                f"notification_channel.labels.{key} {value!r} is not a valid {key}."
            )


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    channels = NotificationChannels(cloud)
    policies = AlertPolicies(cloud, channels)
    channels.policies = policies

    def delete_policy(request: types.DeleteAlertPolicyRequest) -> Any:
        policies.delete(request.name)
        return empty_pb2.Empty()

    def delete_channel(request: types.DeleteNotificationChannelRequest) -> Any:
        channels.delete(request)
        return empty_pb2.Empty()

    def list_descriptors(
        request: types.ListNotificationChannelDescriptorsRequest,
    ) -> Any:
        items = channels.descriptors(request.name)
        page, next_token = paginate(items, request.page_size, request.page_token)
        return types.ListNotificationChannelDescriptorsResponse(
            channel_descriptors=page, next_page_token=next_token
        )

    policy_methods: dict[str, Method] = {
        "CreateAlertPolicy": (
            types.CreateAlertPolicyRequest,
            types.AlertPolicy,
            policies.create,
        ),
        "GetAlertPolicy": (
            types.GetAlertPolicyRequest,
            types.AlertPolicy,
            lambda request: policies.get(request.name),
        ),
        "ListAlertPolicies": (
            types.ListAlertPoliciesRequest,
            types.ListAlertPoliciesResponse,
            policies.list_policies,
        ),
        "UpdateAlertPolicy": (
            types.UpdateAlertPolicyRequest,
            types.AlertPolicy,
            policies.update,
        ),
        "DeleteAlertPolicy": (
            types.DeleteAlertPolicyRequest,
            empty_pb2.Empty,
            delete_policy,
        ),
    }
    channel_methods: dict[str, Method] = {
        "ListNotificationChannelDescriptors": (
            types.ListNotificationChannelDescriptorsRequest,
            types.ListNotificationChannelDescriptorsResponse,
            list_descriptors,
        ),
        "GetNotificationChannelDescriptor": (
            types.GetNotificationChannelDescriptorRequest,
            types.NotificationChannelDescriptor,
            lambda request: channels.descriptor(request.name),
        ),
        "CreateNotificationChannel": (
            types.CreateNotificationChannelRequest,
            types.NotificationChannel,
            channels.create,
        ),
        "GetNotificationChannel": (
            types.GetNotificationChannelRequest,
            types.NotificationChannel,
            lambda request: channels.get(request.name),
        ),
        "ListNotificationChannels": (
            types.ListNotificationChannelsRequest,
            types.ListNotificationChannelsResponse,
            channels.list_channels,
        ),
        "UpdateNotificationChannel": (
            types.UpdateNotificationChannelRequest,
            types.NotificationChannel,
            channels.update,
        ),
        "DeleteNotificationChannel": (
            types.DeleteNotificationChannelRequest,
            empty_pb2.Empty,
            delete_channel,
        ),
    }
    return [
        service_handler(POLICY_SERVICE, policy_methods),
        service_handler(CHANNEL_SERVICE, channel_methods),
        *timeseries.handlers(cloud),
    ]
