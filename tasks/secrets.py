"""Rotate the LLM API key in Secret Manager, and retire old versions in stages.

A rotation adds one version and the deploy pins that version's number. If an earlier run
added a version and then died before a revision started using it, the rerun reuses that
version instead of adding another, so repeated attempts never pile up versions.

Retirement is staged so that nothing a revision may still start with disappears. A
version that no revision with traffic or a tag references is first recorded as
unreferenced. It is disabled once the rollback window has passed since then, and
destroyed once the destroy grace period has passed since it was disabled. The
timestamps of these stages are kept as annotations on the secret, so every step
survives a crash and a rerun continues where the last run stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import google_crc32c
from google.api_core import exceptions as gexc
from google.cloud import secretmanager_v1
from google.protobuf import field_mask_pb2
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients
from tasks.config import RefreshConfig
from tasks.errors import SecretError

API_KEY_BYTES = 32
# Annotation keys on the secret that record when a version entered a retirement stage.
UNREFERENCED_SINCE = "unreferenced-since-v"
DISABLED_SINCE = "disabled-since-v"
_ENABLED = secretmanager_v1.SecretVersion.State.ENABLED
_DISABLED = secretmanager_v1.SecretVersion.State.DISABLED


@dataclass(frozen=True)
class SecretVersionRef:
    secret: str  # secret id
    version: str  # version number, never "latest"
    name: str  # full resource name

    @property
    def number(self) -> int:
        return int(self.version)


def ensure_secret(clients: Clients, secret_id: str) -> str:
    project = f"projects/{clients.target.project}"
    name = f"{project}/secrets/{secret_id}"
    try:
        clients.secrets.get_secret(name=name)
    except gexc.NotFound:
        # A concurrent run may create it between our read and write.
        with contextlib.suppress(gexc.AlreadyExists):
            clients.secrets.create_secret(
                parent=project,
                secret_id=secret_id,
                secret=secretmanager_v1.Secret(
                    replication=secretmanager_v1.Replication(
                        automatic=secretmanager_v1.Replication.Automatic()
                    ),
                    labels={"managed-by": "model-refresh"},
                ),
            )
    return name


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def rotate_api_key(
    clients: Clients, secret_id: str, in_use: set[str]
) -> SecretVersionRef:
    """Return a fresh enabled version of the key that no serving revision uses yet.

    `in_use` holds the version names that revisions with traffic reference.
    """
    logger = get_run_logger()
    name = ensure_secret(clients, secret_id)

    newest = _newest_enabled(clients, name)
    if newest is not None and newest.name not in in_use:
        logger.info("Reusing %s: added earlier and not yet serving", newest.name)
        return _ref(secret_id, newest.name)

    payload = secrets.token_urlsafe(API_KEY_BYTES).encode()
    checksum = google_crc32c.Checksum(payload)
    version = clients.secrets.add_secret_version(
        parent=name,
        payload=secretmanager_v1.SecretPayload(
            data=payload, data_crc32c=int.from_bytes(checksum.digest(), "big")
        ),
    )
    logger.info("Added %s", version.name)
    return _ref(secret_id, version.name)


def access_secret(clients: Clients, ref: SecretVersionRef) -> str:
    response = clients.secrets.access_secret_version(name=ref.name)
    return response.payload.data.decode()


def _ref(secret_id: str, name: str) -> SecretVersionRef:
    return SecretVersionRef(secret=secret_id, version=name.rsplit("/", 1)[1], name=name)


def _number(version_name: str) -> int:
    return int(version_name.rsplit("/", 1)[1])


def _newest_enabled(
    clients: Clients, secret_name: str
) -> secretmanager_v1.SecretVersion | None:
    enabled = [
        version
        for version in clients.secrets.list_secret_versions(
            request={"parent": secret_name, "filter": "state:ENABLED"}
        )
        if version.state == _ENABLED
    ]
    return max(enabled, key=lambda v: _number(v.name), default=None)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def pin_secret_version(clients: Clients, secret_id: str) -> SecretVersionRef:
    """Return the newest enabled version of a secret, by number, never `latest`.

    Raises SecretError when the secret has no enabled version, because a revision
    pinned to a disabled or destroyed version cannot start.
    """
    name = f"projects/{clients.target.project}/secrets/{secret_id}"
    try:
        newest = _newest_enabled(clients, name)
    except gexc.NotFound as exc:
        raise SecretError(
            f"secret {name} not found: create it and add a version, or let the "
            "refresh rotate it"
        ) from exc
    if newest is None:
        raise SecretError(
            f"secret {name} has no enabled version, so no revision can start with "
            "it: add a version or enable one, then rerun"
        )
    get_run_logger().info("Pinning %s", newest.name)
    return _ref(secret_id, newest.name)


@dataclass(frozen=True)
class Retirement:
    """The versions one retirement pass moved to each stage."""

    marked: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def retire_secret_versions(
    clients: Clients,
    secret_id: str,
    referenced: Iterable[str],
    rollback_window: timedelta,
    destroy_grace: timedelta,
    now: datetime | None = None,
) -> Retirement:
    """Advance each version of a secret that nothing references one retirement stage.

    `referenced` contains the full version names that revisions with traffic or a
    tag (such as `rollback`) pin. Those versions are never disabled. The newest enabled
    version is kept too, because the next deploy pins it.
    """
    logger = get_run_logger()
    now = now or datetime.now(UTC)
    name = f"projects/{clients.target.project}/secrets/{secret_id}"
    keep = set(referenced)
    try:
        secret = clients.secrets.get_secret(name=name)
    except gexc.NotFound:
        return Retirement()
    annotations = dict(secret.annotations)
    versions = list(clients.secrets.list_secret_versions(request={"parent": name}))
    newest = max(
        (v for v in versions if v.state == _ENABLED),
        key=lambda v: _number(v.name),
        default=None,
    )
    if newest is not None:
        keep.add(newest.name)

    result = Retirement()
    for version in sorted(versions, key=lambda v: _number(v.name)):
        number = _number(version.name)
        unreferenced_key = f"{UNREFERENCED_SINCE}{number}"
        disabled_key = f"{DISABLED_SINCE}{number}"
        if version.name in keep:
            # Referenced again (for example by a rollback): start over next time.
            annotations.pop(unreferenced_key, None)
            annotations.pop(disabled_key, None)
            continue
        if version.state == _ENABLED:
            since = _parse_time(annotations.get(unreferenced_key))
            if since is None:
                annotations[unreferenced_key] = _format_time(now)
                result.marked.append(version.name)
            elif now - since >= rollback_window:
                clients.secrets.disable_secret_version(request={"name": version.name})
                annotations[disabled_key] = _format_time(now)
                result.disabled.append(version.name)
                logger.info("Disabled %s: unreferenced since %s", version.name, since)
        elif version.state == _DISABLED:
            since = _parse_time(annotations.get(disabled_key))
            if since is None:
                # Disabled by someone else: the grace period starts now.
                annotations[disabled_key] = _format_time(now)
            elif now - since >= destroy_grace:
                clients.secrets.destroy_secret_version(request={"name": version.name})
                result.destroyed.append(version.name)
                annotations.pop(unreferenced_key, None)
                annotations.pop(disabled_key, None)
                logger.info("Destroyed %s: disabled since %s", version.name, since)
        else:
            annotations.pop(unreferenced_key, None)
            annotations.pop(disabled_key, None)

    if annotations != dict(secret.annotations):
        clients.secrets.update_secret(
            secret=secretmanager_v1.Secret(name=name, annotations=annotations),
            update_mask=field_mask_pb2.FieldMask(paths=["annotations"]),
        )
    return result


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def retire_old_keys(clients: Clients, config: RefreshConfig) -> Retirement:
    """Retire the API key versions that neither service's revisions reference.

    Runs after a promotion: the previous revision keeps its `rollback` tag, so its
    version stays enabled until a later promotion moves that tag.
    """
    referenced: set[str] = set()
    for service_id in (config.llm.name, config.mcp.name):
        referenced |= referenced_secret_versions(clients, service_id)
    return retire_secret_versions(
        clients,
        config.llm.api_key_secret,
        referenced,
        rollback_window=timedelta(hours=config.llm.key_rollback_window_hours),
        destroy_grace=timedelta(hours=config.llm.key_destroy_grace_hours),
    )


def referenced_secret_versions(clients: Clients, service_id: str) -> set[str]:
    """Return the secret versions pinned by the revisions of a service that have
    traffic or a tag, as full version names."""
    service_name = f"{clients.location}/services/{service_id}"
    try:
        service = clients.services.get_service(name=service_name)
    except gexc.NotFound:
        return set()
    latest = service.latest_ready_revision.rsplit("/", 1)[-1]
    versions: set[str] = set()
    for status in service.traffic_statuses:
        revision = status.revision or latest
        if not revision or (status.percent == 0 and not status.tag):
            continue
        try:
            found = clients.revisions.get_revision(
                name=f"{service_name}/revisions/{revision}"
            )
        except gexc.NotFound:
            continue
        for container in found.containers:
            for env in container.env:
                ref = env.value_source.secret_key_ref
                if not ref.secret:
                    continue
                secret = ref.secret
                if not secret.startswith("projects/"):
                    secret = f"projects/{clients.target.project}/secrets/{secret}"
                versions.add(f"{secret}/versions/{ref.version}")
    return versions


def rollout_canary(api_key: str, model_sha: str) -> str:
    """Return the system-prompt canary of one rollout: `canary-` and 24 hex digits.

    It is an HMAC of the model sha under the API key, so a rerun after a crash gets
    the same canary and therefore the same revision spec. Without the key the canary
    cannot be predicted.
    """
    digest = hmac.new(api_key.encode(), model_sha.encode(), hashlib.sha256)
    return f"canary-{digest.hexdigest()[:24]}"
