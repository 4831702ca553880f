"""The one client factory: every Google client the tasks use, built for a target.

A GCP target gets the default clients (Application Default Credentials, TLS, the public
endpoints). A local target gets the same client classes on an insecure gRPC channel to
localcloud, because `client_options` with a loopback endpoint alone still negotiates
TLS. Compute has only a REST transport, so its clients send plain HTTP to localcloud's
Compute port instead. No other module depends on which target the clients talk to.
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
from google.auth import credentials as ga_credentials
from google.cloud import (
    artifactregistry_v1,
    compute_v1,
    monitoring_v3,
    run_v2,
    secretmanager_v1,
)
from google.cloud.artifactregistry_v1.services.artifact_registry import (
    transports as artifact_transports,
)
from google.cloud.compute_v1.services.global_operations.transports import (
    GlobalOperationsRestTransport,
)
from google.cloud.compute_v1.services.ssl_policies.transports import (
    SslPoliciesRestTransport,
)
from google.cloud.compute_v1.services.target_https_proxies.transports import (
    TargetHttpsProxiesRestTransport,
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
from google.cloud.monitoring_v3.services.metric_service.transports import (
    MetricServiceGrpcTransport,
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
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# The service account the pipeline acts as on localcloud, which has no Application
# Default Credentials: its access tokens come from IAM Credentials instead.
LOCAL_PIPELINE_ACCOUNT = "model-refresh@{project}.iam.gserviceaccount.com"


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
    time_series: monitoring_v3.MetricServiceClient
    iam_credentials: IAMCredentialsClient
    ssl_policies: compute_v1.SslPoliciesClient
    target_https_proxies: compute_v1.TargetHttpsProxiesClient
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
    iam_credentials = IAMCredentialsClient(
        transport=IAMCredentialsGrpcTransport(channel=channel)
    )
    credentials = _IamAccessTokenCredentials(
        iam_credentials, LOCAL_PIPELINE_ACCOUNT.format(project=target.project)
    )

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
        time_series=monitoring_v3.MetricServiceClient(
            transport=MetricServiceGrpcTransport(channel=channel)
        ),
        iam_credentials=iam_credentials,
        ssl_policies=compute_v1.SslPoliciesClient(
            transport=_local_compute_transport(SslPoliciesRestTransport, endpoints)
        ),
        target_https_proxies=compute_v1.TargetHttpsProxiesClient(
            transport=_local_compute_transport(
                TargetHttpsProxiesRestTransport, endpoints
            )
        ),
        hub_endpoint=target.hub_endpoint or endpoints.hub,
        # Every Artifact Registry host maps to localcloud's one registry, behind a
        # front that checks access tokens as Artifact Registry does.
        registry_base_url=oci.local_endpoint(endpoints.registry),
        registry_headers=functools.partial(_registry_headers, credentials),
    )


def _local_compute_transport(transport_class: Any, endpoints: Any) -> Any:
    """Build a Compute REST transport that sends plain HTTP to localcloud only.

    The transport polls operations through a GlobalOperationsClient that it builds
    with the default host, compute.googleapis.com. That client is replaced here by
    one on the same loopback port, so polling can never leave the machine.
    """
    url = urllib.parse.urlsplit(endpoints.compute)
    if url.scheme != "http" or url.hostname != "127.0.0.1":
        raise ConfigError(
            f"localcloud's Compute endpoint {endpoints.compute!r} is not plain HTTP "
            "on 127.0.0.1: restart localcloud so it rewrites endpoints.json"
        )

    def rest_transport(cls: Any) -> Any:
        return cls(
            host=url.netloc,
            credentials=ga_credentials.AnonymousCredentials(),
            url_scheme="http",
        )

    transport = rest_transport(transport_class)
    # NOTE: private attribute of google-cloud-compute 1.57 transports; a rename
    # raises AttributeError here rather than polling the public endpoint.
    operations = transport._extended_operations_services
    operations["global_operations"] = compute_v1.GlobalOperationsClient(
        transport=rest_transport(GlobalOperationsRestTransport)
    )
    return transport


def _gcp_clients(target: Target) -> Clients:
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])

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
        time_series=monitoring_v3.MetricServiceClient(),
        iam_credentials=IAMCredentialsClient(),
        ssl_policies=compute_v1.SslPoliciesClient(),
        target_https_proxies=compute_v1.TargetHttpsProxiesClient(),
        hub_endpoint=target.hub_endpoint or HUGGING_FACE_HUB,
        registry_base_url=oci.gcp_endpoint,
        registry_headers=functools.partial(_registry_headers, credentials),
    )


def _access_token(credentials: ga_credentials.Credentials) -> str:
    import google.auth.transport.requests

    if not credentials.valid:
        credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)


def _registry_headers(credentials: ga_credentials.Credentials) -> dict[str, str]:
    # Artifact Registry's Docker API reference authenticates direct requests with the
    # access token as a bearer token. localcloud's registry front checks it the same
    # way, and also takes Basic oauth2accesstoken:TOKEN as `docker login` sends it.
    return {"Authorization": f"Bearer {_access_token(credentials)}"}


class _IamAccessTokenCredentials(ga_credentials.Credentials):
    """Access tokens of a service account minted with IAM Credentials
    GenerateAccessToken: the local target's stand-in for Application Default
    Credentials. They refresh like ADC tokens, shortly before they expire."""

    def __init__(self, iam_credentials: IAMCredentialsClient, account: str) -> None:
        super().__init__()
        self._iam_credentials = iam_credentials
        self._name = f"projects/-/serviceAccounts/{account}"

    def refresh(self, request: Any) -> None:
        response = self._iam_credentials.generate_access_token(
            name=self._name, scope=[CLOUD_PLATFORM_SCOPE]
        )
        self.token = response.access_token
        # google-auth compares `expiry` with a naive UTC datetime.
        self.expiry = response.expire_time.astimezone(UTC).replace(tzinfo=None)
