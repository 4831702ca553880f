"""Rotate the LLM API key in Secret Manager.

A rotation adds one version and the deploy pins that version's number. If an earlier run
added a version and then died before a revision started using it, the rerun reuses that
version instead of adding another, so repeated attempts never pile up versions.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass

import google_crc32c
from google.api_core import exceptions as gexc
from google.cloud import secretmanager_v1
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients

API_KEY_BYTES = 32


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

    enabled = [
        version
        for version in clients.secrets.list_secret_versions(
            request={"parent": name, "filter": "state:ENABLED"}
        )
        if version.state == secretmanager_v1.SecretVersion.State.ENABLED
    ]
    newest = max(enabled, key=lambda v: int(v.name.rsplit("/", 1)[1]), default=None)
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
