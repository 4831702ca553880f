"""The one client factory: every Google client the tasks use, built for a target.

A GCP target gets the default clients (Application Default Credentials, TLS, the public
endpoints). A local target gets the same client classes on an insecure gRPC channel to
localcloud, because `client_options` with a loopback endpoint alone still negotiates
TLS. No other module depends on which target the clients talk to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.auth import credentials as ga_credentials
from google.cloud import artifactregistry_v1, monitoring_v3, run_v2, secretmanager_v1
from google.cloud.artifactregistry_v1.services.artifact_registry import (
    transports as artifact_transports,
)
from google.cloud.iam_credentials_v1 import IAMCredentialsClient
from google.cloud.iam_credentials_v1.services.iam_credentials.transports import (
    IAMCredentialsGrpcTransport,
)
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports import (
    LoggingServiceV2GrpcTransport,
)
from google.cloud.logging_v2.services.metrics_service_v2 import MetricsServiceV2Client
from google.cloud.logging_v2.services.metrics_service_v2.transports import (
    MetricsServiceV2GrpcTransport,
)
from google.cloud.monitoring_v3.services.alert_policy_service.transports import (
    AlertPolicyServiceGrpcTransport,
)
from google.cloud.monitoring_v3.services.notification_channel_service import (
    transports as channel_transports,
)
from google.cloud.run_v2.services.revisions import transports as revision_transports
from google.cloud.run_v2.services.services import transports as service_transports
from google.cloud.secretmanager_v1.services.secret_manager_service import (
    transports as secret_transports,
)

from tasks import oci
from tasks.config import Target
from tasks.errors import ConfigError

HUGGING_FACE_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Clients:
    target: Target
    services: run_v2.ServicesClient
    revisions: run_v2.RevisionsClient
    secrets: secretmanager_v1.SecretManagerServiceClient
    artifacts: artifactregistry_v1.ArtifactRegistryClient
    logging: LoggingServiceV2Client
    metrics: MetricsServiceV2Client
    alert_policies: monitoring_v3.AlertPolicyServiceClient
    channels: monitoring_v3.NotificationChannelServiceClient
    iam_credentials: IAMCredentialsClient
    hub_endpoint: str
    registry_base_url: Callable[[str], str]
    registry_headers: Callable[[], dict[str, str]]

    @property
    def location(self) -> str:
        return f"projects/{self.target.project}/locations/{self.target.region}"


def localcloud_endpoints(target: Target) -> Any:
    from localcloud.server import Endpoints

    state_dir = Path(target.localcloud_state_dir).resolve()
    try:
        return Endpoints.read(state_dir)
    except FileNotFoundError:
        raise ConfigError(
            f"no localcloud is running for state folder {str(state_dir)!r}: start one "
            "with `python -m localcloud --state-dir "
            f"{target.localcloud_state_dir} start`"
        ) from None


@functools.cache
def clients_for(target: Target) -> Clients:
    if target.kind == "local":
        return _local_clients(target)
    return _gcp_clients(target)


def _local_clients(target: Target) -> Clients:
    endpoints = localcloud_endpoints(target)
    channel = grpc.insecure_channel(endpoints.grpc)

    return Clients(
        target=target,
        services=run_v2.ServicesClient(
            transport=service_transports.ServicesGrpcTransport(channel=channel)
        ),
        revisions=run_v2.RevisionsClient(
            transport=revision_transports.RevisionsGrpcTransport(channel=channel)
        ),
        secrets=secretmanager_v1.SecretManagerServiceClient(
            transport=secret_transports.SecretManagerServiceGrpcTransport(
                channel=channel
            )
        ),
        artifacts=artifactregistry_v1.ArtifactRegistryClient(
            transport=artifact_transports.ArtifactRegistryGrpcTransport(channel=channel)
        ),
        logging=LoggingServiceV2Client(
            transport=LoggingServiceV2GrpcTransport(channel=channel)
        ),
        metrics=MetricsServiceV2Client(
            transport=MetricsServiceV2GrpcTransport(channel=channel)
        ),
        alert_policies=monitoring_v3.AlertPolicyServiceClient(
            transport=AlertPolicyServiceGrpcTransport(channel=channel)
        ),
        channels=monitoring_v3.NotificationChannelServiceClient(
            transport=channel_transports.NotificationChannelServiceGrpcTransport(
                channel=channel
            )
        ),
        iam_credentials=IAMCredentialsClient(
            transport=IAMCredentialsGrpcTransport(channel=channel)
        ),
        hub_endpoint=target.hub_endpoint or endpoints.hub,
        # Every Artifact Registry host maps to localcloud's one registry.
        registry_base_url=oci.local_endpoint(endpoints.registry),
        registry_headers=dict,
    )


def _gcp_clients(target: Target) -> Clients:
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"]
    )

    def registry_headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {_access_token(credentials)}"}

    return Clients(
        target=target,
        services=run_v2.ServicesClient(),
        revisions=run_v2.RevisionsClient(),
        secrets=secretmanager_v1.SecretManagerServiceClient(),
        artifacts=artifactregistry_v1.ArtifactRegistryClient(),
        logging=LoggingServiceV2Client(),
        metrics=MetricsServiceV2Client(),
        alert_policies=monitoring_v3.AlertPolicyServiceClient(),
        channels=monitoring_v3.NotificationChannelServiceClient(),
        iam_credentials=IAMCredentialsClient(),
        hub_endpoint=target.hub_endpoint or HUGGING_FACE_HUB,
        registry_base_url=oci.gcp_endpoint,
        registry_headers=registry_headers,
    )


def _access_token(credentials: ga_credentials.Credentials) -> str:
    import google.auth.transport.requests

    if not credentials.valid:
        credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)
