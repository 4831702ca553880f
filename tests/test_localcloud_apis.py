"""localcloud's Google APIs other than Cloud Run, driven by the unmodified official
clients over a loopback gRPC channel, and the localcloud command line."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import label_pb2, metric_pb2
from google.api_core import exceptions, operation
from google.cloud import (
    artifactregistry_v1,
    iam_credentials_v1,
    monitoring_v3,
    run_v2,
    secretmanager_v1,
)
from google.cloud.artifactregistry_v1.services.artifact_registry.transports import (
    ArtifactRegistryGrpcTransport,
)
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
from google.cloud.logging_v2.types import LogEntry, LogMetric
from google.cloud.monitoring_v3.services.alert_policy_service.transports import (
    AlertPolicyServiceGrpcTransport,
)
from google.cloud.monitoring_v3.services.notification_channel_service import (
    transports as channel_transports,
)
from google.cloud.run_v2.services.services.transports import ServicesGrpcTransport
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)
from google.longrunning import operations_pb2

from localcloud import __main__ as cli
from localcloud.api import (
    artifacts,
    filters,
    iamcredentials,
    monitoring,
    operations,
    secrets,
)
from localcloud.api import logging as logging_api
from localcloud.api.logging import LogSink
from localcloud.api.operations import Operations
from localcloud.server import ENDPOINTS_FILE, LocalCloud

PROJECT = "projects/demo"
LOCATION = f"{PROJECT}/locations/us-central1"
ACCOUNT = "projects/-/serviceAccounts/llm@demo.iam.gserviceaccount.com"


@dataclass
class Clients:
    channel: grpc.Channel
    secrets: secretmanager_v1.SecretManagerServiceClient
    artifacts: artifactregistry_v1.ArtifactRegistryClient
    logging: LoggingServiceV2Client
    metrics: MetricsServiceV2Client
    policies: monitoring_v3.AlertPolicyServiceClient
    channels: monitoring_v3.NotificationChannelServiceClient
    credentials: iam_credentials_v1.IAMCredentialsClient
    run: run_v2.ServicesClient


def make_cloud(state_dir: Path) -> LocalCloud:
    cloud = LocalCloud(state_dir)
    cloud.operations = Operations(cloud)
    cloud.logs = LogSink(cloud)
    return cloud


@pytest.fixture
def cloud(tmp_path: Path) -> LocalCloud:
    return make_cloud(tmp_path / "state")


@pytest.fixture
def clients(cloud: LocalCloud) -> Iterator[Clients]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    modules = (operations, secrets, artifacts, logging_api, monitoring, iamcredentials)
    for module in modules:
        server.add_generic_rpc_handlers(module.handlers(cloud))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Clients(
        channel=channel,
        secrets=secretmanager_v1.SecretManagerServiceClient(
            transport=SecretManagerServiceGrpcTransport(channel=channel)
        ),
        artifacts=artifactregistry_v1.ArtifactRegistryClient(
            transport=ArtifactRegistryGrpcTransport(channel=channel)
        ),
        logging=LoggingServiceV2Client(
            transport=LoggingServiceV2GrpcTransport(channel=channel)
        ),
        metrics=MetricsServiceV2Client(
            transport=MetricsServiceV2GrpcTransport(channel=channel)
        ),
        policies=monitoring_v3.AlertPolicyServiceClient(
            transport=AlertPolicyServiceGrpcTransport(channel=channel)
        ),
        channels=monitoring_v3.NotificationChannelServiceClient(
            transport=channel_transports.NotificationChannelServiceGrpcTransport(
                channel=channel
            )
        ),
        credentials=iam_credentials_v1.IAMCredentialsClient(
            transport=IAMCredentialsGrpcTransport(channel=channel)
        ),
        run=run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel)),
    )
    channel.close()
    server.stop(grace=None)


# Operations


def run_operation_future(
    clients: Clients, raw: Any, result_type: Any = run_v2.Service
) -> operation.Operation:
    transport = clients.run._transport
    assert isinstance(transport, ServicesGrpcTransport)
    return operation.from_gapic(
        raw, transport.operations_client, result_type, metadata_type=run_v2.Service
    )


def test_operation_result_waits_for_completion(
    cloud: LocalCloud, clients: Clients
) -> None:
    raw = cloud.operations.create(LOCATION, metadata=run_v2.Service(name="s"))
    service = run_v2.Service(name=f"{LOCATION}/services/llm", uri="http://x")
    timer = threading.Timer(0.3, cloud.operations.complete, (raw.name, service))
    timer.start()

    result = run_operation_future(clients, raw).result(timeout=30)

    assert result.name == service.name
    assert result.uri == "http://x"


def test_failed_operation_raises_its_status(
    cloud: LocalCloud, clients: Clients
) -> None:
    raw = cloud.operations.create(LOCATION)
    cloud.operations.fail(raw.name, grpc.StatusCode.INVALID_ARGUMENT, "bad template")

    with pytest.raises(exceptions.GoogleAPICallError) as caught:
        run_operation_future(clients, raw).result(timeout=10)

    assert caught.value.code == 400
    assert "bad template" in str(caught.value)


def test_operation_keeps_first_outcome(cloud: LocalCloud) -> None:
    raw = cloud.operations.create(LOCATION)
    cloud.operations.complete(raw.name, run_v2.Service(name="first"))
    cloud.operations.fail(raw.name, grpc.StatusCode.INTERNAL, "late failure")

    stored = cloud.operations.get(raw.name)

    assert stored.done
    assert stored.HasField("response")


def wait_operation(
    clients: Clients, name: str, timeout_seconds: float
) -> operations_pb2.Operation:
    # The run_v2 client's wait_operation (google-cloud-run 0.16.2) registers no response
    # deserializer and returns raw bytes, so this calls the method through a plain stub.
    stub = clients.channel.unary_unary(
        "/google.longrunning.Operations/WaitOperation",
        request_serializer=operations_pb2.WaitOperationRequest.SerializeToString,
        response_deserializer=operations_pb2.Operation.FromString,
    )
    request = operations_pb2.WaitOperationRequest(name=name)
    request.timeout.FromTimedelta(timedelta(seconds=timeout_seconds))
    result: operations_pb2.Operation = stub(request, timeout=30)
    return result


def test_wait_operation_returns_when_done(cloud: LocalCloud, clients: Clients) -> None:
    raw = cloud.operations.create(LOCATION)
    timer = threading.Timer(
        0.2, cloud.operations.complete, (raw.name, run_v2.Service())
    )
    timer.start()

    waited = wait_operation(clients, raw.name, timeout_seconds=20)

    assert waited.done


def test_wait_operation_is_bounded_by_request_timeout(
    cloud: LocalCloud, clients: Clients
) -> None:
    raw = cloud.operations.create(LOCATION)
    started = time.monotonic()

    waited = wait_operation(clients, raw.name, timeout_seconds=0.3)

    assert not waited.done
    assert time.monotonic() - started < 5


def test_get_unknown_operation_is_not_found(clients: Clients) -> None:
    with pytest.raises(exceptions.NotFound):
        clients.run.get_operation(request={"name": f"{LOCATION}/operations/nope"})


def test_list_operations_filters_on_done(cloud: LocalCloud, clients: Clients) -> None:
    finished = cloud.operations.create(LOCATION)
    cloud.operations.complete(finished.name, run_v2.Service())
    cloud.operations.create(LOCATION)

    done = clients.run.list_operations(
        request={"name": LOCATION, "filter": "done=true"}
    )

    assert [item.name for item in done.operations] == [finished.name]


def test_operations_survive_restart(cloud: LocalCloud) -> None:
    raw = cloud.operations.create(LOCATION)
    cloud.operations.complete(raw.name, run_v2.Service(name="kept"))

    restarted = make_cloud(cloud.state_dir)

    assert restarted.operations.get(raw.name).done


# Secret Manager


def create_secret(clients: Clients, secret_id: str = "api-key", **fields: Any) -> Any:
    secret = {"replication": {"automatic": {}}, **fields}
    return clients.secrets.create_secret(
        parent=PROJECT, secret_id=secret_id, secret=secretmanager_v1.Secret(secret)
    )


def add_version(clients: Clients, secret_name: str, data: bytes) -> Any:
    return clients.secrets.add_secret_version(
        parent=secret_name, payload=secretmanager_v1.SecretPayload(data=data)
    )


def test_crc32c_matches_known_vector() -> None:
    assert secrets.crc32c(b"123456789") == 0xE3069283


def test_secret_create_and_get(clients: Clients) -> None:
    created = create_secret(clients, labels={"env": "dev"})

    fetched = clients.secrets.get_secret(name=created.name)

    assert fetched.name == f"{PROJECT}/secrets/api-key"
    assert fetched.labels["env"] == "dev"
    assert fetched.etag


@pytest.mark.parametrize("secret_id", ["", "has space", "dot.ted", "x" * 256])
def test_secret_id_is_validated(clients: Clients, secret_id: str) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        create_secret(clients, secret_id=secret_id)


def test_secret_needs_replication(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="replication"):
        clients.secrets.create_secret(
            parent=PROJECT, secret_id="s", secret=secretmanager_v1.Secret()
        )


def test_duplicate_secret_already_exists(clients: Clients) -> None:
    create_secret(clients)

    with pytest.raises(exceptions.AlreadyExists):
        create_secret(clients)


def test_invalid_label_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="label"):
        create_secret(clients, labels={"Env": "dev"})


def test_access_returns_payload_and_checksum(clients: Clients) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"hunter2")

    response = clients.secrets.access_secret_version(name=version.name)

    assert response.payload.data == b"hunter2"
    assert response.payload.data_crc32c == secrets.crc32c(b"hunter2")
    assert response.name == f"{secret.name}/versions/1"


def test_latest_is_the_newest_version(clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"one")
    add_version(clients, secret.name, b"two")

    response = clients.secrets.access_secret_version(
        name=f"{secret.name}/versions/latest"
    )

    assert response.payload.data == b"two"
    assert response.name.endswith("/versions/2")


def test_latest_disabled_version_fails(clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"one")
    newest = add_version(clients, secret.name, b"two")
    clients.secrets.disable_secret_version(name=newest.name)

    with pytest.raises(exceptions.FailedPrecondition, match="DISABLED state"):
        clients.secrets.access_secret_version(name=f"{secret.name}/versions/latest")


def test_latest_without_versions_is_not_found(clients: Clients) -> None:
    secret = create_secret(clients)

    with pytest.raises(exceptions.NotFound, match="has no versions"):
        clients.secrets.access_secret_version(name=f"{secret.name}/versions/latest")


def test_checksum_mismatch_is_rejected(clients: Clients) -> None:
    secret = create_secret(clients)

    with pytest.raises(exceptions.InvalidArgument, match="data_crc32c"):
        clients.secrets.add_secret_version(
            parent=secret.name,
            payload=secretmanager_v1.SecretPayload(data=b"abc", data_crc32c=12345),
        )


def test_matching_checksum_is_recorded(clients: Clients) -> None:
    secret = create_secret(clients)

    version = clients.secrets.add_secret_version(
        parent=secret.name,
        payload=secretmanager_v1.SecretPayload(
            data=b"abc", data_crc32c=secrets.crc32c(b"abc")
        ),
    )

    assert version.client_specified_payload_checksum


def test_payload_over_64_kib_is_rejected(clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"x" * 65536)

    with pytest.raises(exceptions.InvalidArgument, match="64 KiB"):
        add_version(clients, secret.name, b"x" * 65537)


def test_payload_file_is_private(cloud: LocalCloud, clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"hunter2")

    files = list((cloud.state_dir / "secret-payloads").iterdir())

    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_disabled_version_fails_then_enables(clients: Clients) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"v1")
    clients.secrets.disable_secret_version(name=version.name)

    with pytest.raises(exceptions.FailedPrecondition, match="DISABLED"):
        clients.secrets.access_secret_version(name=version.name)

    clients.secrets.enable_secret_version(name=version.name)
    assert (
        clients.secrets.access_secret_version(name=version.name).payload.data == b"v1"
    )


def test_destroy_removes_payload(cloud: LocalCloud, clients: Clients) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"v1")

    destroyed = clients.secrets.destroy_secret_version(name=version.name)

    assert destroyed.state == secretmanager_v1.SecretVersion.State.DESTROYED
    assert destroyed.destroy_time is not None
    assert list((cloud.state_dir / "secret-payloads").iterdir()) == []
    with pytest.raises(exceptions.FailedPrecondition, match="DESTROYED state"):
        clients.secrets.access_secret_version(name=version.name)


def test_destroyed_version_cannot_be_enabled(clients: Clients) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"v1")
    clients.secrets.destroy_secret_version(name=version.name)

    with pytest.raises(exceptions.FailedPrecondition):
        clients.secrets.enable_secret_version(name=version.name)


def test_destroy_with_delay_disables_first(clients: Clients) -> None:
    secret = create_secret(clients, version_destroy_ttl={"seconds": 86400})
    version = add_version(clients, secret.name, b"v1")

    scheduled = clients.secrets.destroy_secret_version(name=version.name)

    assert scheduled.state == secretmanager_v1.SecretVersion.State.DISABLED
    assert scheduled.scheduled_destroy_time is not None


def test_unknown_version_is_not_found(clients: Clients) -> None:
    secret = create_secret(clients)

    with pytest.raises(exceptions.NotFound):
        clients.secrets.access_secret_version(name=f"{secret.name}/versions/7")


def test_unknown_secret_is_not_found(clients: Clients) -> None:
    with pytest.raises(exceptions.NotFound):
        clients.secrets.get_secret(name=f"{PROJECT}/secrets/missing")


def test_versions_list_newest_first_with_state_filter(clients: Clients) -> None:
    secret = create_secret(clients)
    for data in (b"1", b"2", b"3"):
        add_version(clients, secret.name, data)
    clients.secrets.disable_secret_version(name=f"{secret.name}/versions/2")

    every = clients.secrets.list_secret_versions(request={"parent": secret.name})
    enabled = clients.secrets.list_secret_versions(
        request={"parent": secret.name, "filter": "state:ENABLED"}
    )

    assert [v.name.rsplit("/", 1)[1] for v in every] == ["3", "2", "1"]
    assert [v.name.rsplit("/", 1)[1] for v in enabled] == ["3", "1"]


def test_update_secret_applies_mask(clients: Clients) -> None:
    secret = create_secret(clients, labels={"env": "dev"}, annotations={"a": "1"})

    updated = clients.secrets.update_secret(
        secret=secretmanager_v1.Secret(name=secret.name, labels={"env": "prod"}),
        update_mask={"paths": ["labels"]},
    )

    assert updated.labels["env"] == "prod"
    assert updated.annotations["a"] == "1"
    assert updated.etag != secret.etag


def test_update_secret_needs_mask(clients: Clients) -> None:
    secret = create_secret(clients)

    with pytest.raises(exceptions.InvalidArgument, match="update_mask"):
        clients.secrets.update_secret(
            secret=secretmanager_v1.Secret(name=secret.name, labels={"a": "b"})
        )


def test_version_alias_resolves(clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"one")
    add_version(clients, secret.name, b"two")
    clients.secrets.update_secret(
        secret=secretmanager_v1.Secret(name=secret.name, version_aliases={"stable": 1}),
        update_mask={"paths": ["version_aliases"]},
    )

    response = clients.secrets.access_secret_version(
        name=f"{secret.name}/versions/stable"
    )

    assert response.payload.data == b"one"


def test_alias_to_missing_version_is_rejected(clients: Clients) -> None:
    secret = create_secret(clients)

    with pytest.raises(exceptions.InvalidArgument, match="does not exist"):
        clients.secrets.update_secret(
            secret=secretmanager_v1.Secret(
                name=secret.name, version_aliases={"stable": 4}
            ),
            update_mask={"paths": ["version_aliases"]},
        )


def test_delete_secret_removes_versions(cloud: LocalCloud, clients: Clients) -> None:
    secret = create_secret(clients)
    add_version(clients, secret.name, b"one")

    clients.secrets.delete_secret(name=secret.name)

    with pytest.raises(exceptions.NotFound):
        clients.secrets.get_secret(name=secret.name)
    assert list((cloud.state_dir / "secret-payloads").iterdir()) == []


def test_secret_iam_policy_round_trip(clients: Clients) -> None:
    secret = create_secret(clients)
    member = "serviceAccount:llm@demo.iam.gserviceaccount.com"
    policy = {
        "bindings": [
            {"role": "roles/secretmanager.secretAccessor", "members": [member]}
        ]
    }

    clients.secrets.set_iam_policy(request={"resource": secret.name, "policy": policy})
    fetched = clients.secrets.get_iam_policy(request={"resource": secret.name})

    assert list(fetched.bindings[0].members) == [member]
    assert fetched.etag


def test_secrets_survive_restart(cloud: LocalCloud, clients: Clients) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"kept")

    restarted = make_cloud(cloud.state_dir)

    assert secrets.access_secret_version(restarted, version.name) == b"kept"


def test_access_function_raises_on_disabled(
    cloud: LocalCloud, clients: Clients
) -> None:
    secret = create_secret(clients)
    version = add_version(clients, secret.name, b"v1")
    clients.secrets.disable_secret_version(name=version.name)

    with pytest.raises(secrets.SecretAccessError, match="DISABLED"):
        secrets.access_secret_version(cloud, version.name)


def test_access_function_raises_on_missing(cloud: LocalCloud) -> None:
    with pytest.raises(secrets.SecretAccessError, match="not found"):
        secrets.access_secret_version(cloud, f"{PROJECT}/secrets/none/versions/latest")


# Artifact Registry


def create_repository(clients: Clients, repository_id: str = "models") -> Any:
    future = clients.artifacts.create_repository(
        parent=LOCATION,
        repository_id=repository_id,
        repository=artifactregistry_v1.Repository(
            format_=artifactregistry_v1.Repository.Format.DOCKER
        ),
    )
    return future.result(timeout=10)


def test_repository_create_returns_operation_result(clients: Clients) -> None:
    repository = create_repository(clients)

    assert repository.name == f"{LOCATION}/repositories/models"
    assert repository.registry_uri == "us-central1-docker.pkg.dev/demo/models"


@pytest.mark.parametrize(
    "repository_id", ["Models", "1models", "models-", "a_b", "x" * 64]
)
def test_repository_id_is_validated(clients: Clients, repository_id: str) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        create_repository(clients, repository_id)


def test_repository_needs_docker_format(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="format"):
        clients.artifacts.create_repository(
            parent=LOCATION,
            repository_id="pkgs",
            repository=artifactregistry_v1.Repository(),
        )


def test_duplicate_repository_already_exists(clients: Clients) -> None:
    create_repository(clients)

    with pytest.raises(exceptions.AlreadyExists):
        create_repository(clients)


def test_repository_list_get_and_delete(clients: Clients) -> None:
    create_repository(clients, "models")
    create_repository(clients, "tools")

    listed = [
        r.name.rsplit("/", 1)[1]
        for r in clients.artifacts.list_repositories(parent=LOCATION)
    ]
    clients.artifacts.delete_repository(name=f"{LOCATION}/repositories/tools").result(
        timeout=10
    )

    assert listed == ["models", "tools"]
    with pytest.raises(exceptions.NotFound):
        clients.artifacts.get_repository(name=f"{LOCATION}/repositories/tools")


def test_image_path_maps_to_repository(cloud: LocalCloud, clients: Clients) -> None:
    create_repository(clients)

    found = artifacts.find_docker_repository(
        cloud, "us-central1-docker.pkg.dev/demo/models/llm:latest"
    )
    missing = artifacts.find_docker_repository(
        cloud, "us-central1-docker.pkg.dev/demo/other/llm"
    )

    assert found is not None
    assert found.name == f"{LOCATION}/repositories/models"
    assert missing is None


# Logging query language


FILTER_DOCUMENT = {
    "logName": "projects/demo/logs/run.googleapis.com%2Fstdout",
    "severity": "ERROR",
    "timestamp": "2026-01-02T03:04:05.123456789Z",
    "textPayload": "Prompt Injection detected",
    "resource": {"type": "cloud_run_revision", "labels": {"service_name": "llm"}},
    "labels": {"instance": "a1"},
    "jsonPayload": {"event": "denied_tool", "detail": {"tool": "shell"}, "count": 3},
    "httpRequest": {"status": 503, "requestMethod": "POST"},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("severity>=WARNING", True),
        ("severity>=CRITICAL", False),
        ('severity="error"', True),
        ("severity<ERROR", False),
        ('resource.type="cloud_run_revision"', True),
        ("resource.labels.service_name=llm", True),
        ("resource.labels.service_name!=llm", False),
        ("labels.instance:a", True),
        ('jsonPayload.event="denied_tool"', True),
        ("jsonPayload.detail.tool=shell", True),
        ("jsonPayload.count>2", True),
        ("jsonPayload.count<3", False),
        ("textPayload:injection", True),
        ("textPayload:robot", False),
        ("NOT textPayload:robot", True),
        ("-textPayload:robot", True),
        ("httpRequest.status>=500", True),
        ('httpRequest.requestMethod="GET"', False),
        ("http_request.status=503", True),
        ('timestamp>="2026-01-02T00:00:00Z"', True),
        ('timestamp<"2026-01-02T03:04:05Z"', False),
        ('timestamp>"2026-01-02T05:04:05+02:00"', True),
        ("jsonPayload.missing:*", False),
        ("jsonPayload.event:*", True),
        ("jsonPayload.missing!=x", False),
        ("NOT jsonPayload.missing=x", True),
        ("severity=(INFO OR ERROR)", True),
        ("severity=(INFO OR DEBUG)", False),
        ("severity=ERROR jsonPayload.event=denied_tool", True),
        ("severity=ERROR AND jsonPayload.event=other", False),
        # OR binds tighter than AND: this reads as ERROR AND (other OR denied_tool).
        (
            "severity=ERROR AND jsonPayload.event=other OR jsonPayload.event:denied",
            True,
        ),
        (
            "severity=INFO AND jsonPayload.event=other OR jsonPayload.event:denied",
            False,
        ),
        (
            "(severity=INFO AND jsonPayload.event=other) OR jsonPayload.event:denied",
            True,
        ),
        ('log_id("run.googleapis.com/stdout")', True),
        ('log_id("run.googleapis.com/stderr")', False),
        ('"prompt injection"', True),
        ("shell", True),
        ('textPayload=~"^Prompt"', True),
        ('textPayload=~"^prompt"', False),
        ('textPayload!~"robot"', True),
    ],
)
def test_filter_matches(text: str, expected: bool) -> None:
    parsed = filters.parse(text, normalize_field=logging_api.log_field_path)

    assert parsed.matches(FILTER_DOCUMENT) is expected


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("severity>=", 10),
        ('textPayload="open', 12),
        ("(severity=ERROR", 15),
        ("severity=ERROR)", 14),
        ("severity = = ERROR", 11),
        ('unknown_fn("x")', 0),
    ],
)
def test_filter_syntax_error_names_position(text: str, position: int) -> None:
    with pytest.raises(filters.FilterSyntaxError) as caught:
        filters.parse(text)

    assert caught.value.position == position


# Logging API


def write_entries(
    clients: Clients, entries: list[dict[str, Any]], **request: Any
) -> None:
    clients.logging.write_log_entries(
        request={
            "log_name": f"{PROJECT}/logs/app",
            "resource": {
                "type": "cloud_run_revision",
                "labels": {"service_name": "llm"},
            },
            "entries": entries,
            **request,
        }
    )


def list_entries(
    clients: Clients, text: str = "", order_by: str = ""
) -> list[LogEntry]:
    pager = clients.logging.list_log_entries(
        request={"resource_names": [PROJECT], "filter": text, "order_by": order_by}
    )
    return list(pager)


def test_write_applies_request_defaults(clients: Clients) -> None:
    write_entries(
        clients,
        [{"text_payload": "hello", "labels": {"a": "entry"}}],
        labels={"a": "request", "b": "request"},
    )

    [entry] = list_entries(clients)

    assert entry.log_name == f"{PROJECT}/logs/app"
    assert entry.resource.type == "cloud_run_revision"
    assert dict(entry.labels) == {"a": "entry", "b": "request"}
    assert entry.insert_id
    assert entry.receive_timestamp is not None


def test_list_filters_by_severity_and_payload(clients: Clients) -> None:
    write_entries(
        clients,
        [
            {"severity": "INFO", "json_payload": {"event": "ok"}},
            {"severity": "ERROR", "json_payload": {"event": "denied_tool"}},
            {"severity": "WARNING", "json_payload": {"event": "rate_limited"}},
        ],
    )

    found = list_entries(
        clients, 'severity>=WARNING AND jsonPayload.event="denied_tool"'
    )

    assert [entry.json_payload["event"] for entry in found] == ["denied_tool"]


def test_list_orders_by_timestamp(clients: Clients) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    stamps = [base + timedelta(minutes=minutes) for minutes in (2, 0, 1)]
    write_entries(
        clients,
        [{"text_payload": str(i), "timestamp": s} for i, s in enumerate(stamps)],
    )

    ascending = [e.text_payload for e in list_entries(clients)]
    descending = [
        e.text_payload for e in list_entries(clients, order_by="timestamp desc")
    ]

    assert ascending == ["1", "2", "0"]
    assert descending == ["0", "2", "1"]


def test_list_pages_through_entries(clients: Clients) -> None:
    write_entries(clients, [{"text_payload": str(i)} for i in range(120)])

    pager = clients.logging.list_log_entries(
        request={"resource_names": [PROJECT], "page_size": 50}
    )
    pages = list(pager.pages)

    assert [len(page.entries) for page in pages] == [50, 50, 20]


def test_list_keeps_to_resource_names(clients: Clients) -> None:
    write_entries(clients, [{"text_payload": "mine"}])
    write_entries(
        clients, [{"text_payload": "other"}], log_name="projects/other/logs/app"
    )

    assert [e.text_payload for e in list_entries(clients)] == ["mine"]


def test_invalid_filter_names_position(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="position 9"):
        list_entries(clients, "severity>")


def test_invalid_order_by_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="order_by"):
        list_entries(clients, order_by="severity desc")


def test_entry_without_resource_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="resource"):
        clients.logging.write_log_entries(
            request={
                "log_name": f"{PROJECT}/logs/app",
                "entries": [{"text_payload": "x"}],
            }
        )


def test_entry_with_invalid_log_name_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="log_name"):
        write_entries(clients, [{"text_payload": "x"}], log_name="logs/app")


def test_partial_success_writes_valid_entries(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="1 rejected"):
        write_entries(
            clients,
            [{"text_payload": "good"}, {"text_payload": "bad", "log_name": "bad"}],
            partial_success=True,
        )

    assert [e.text_payload for e in list_entries(clients)] == ["good"]


def test_dry_run_writes_nothing(clients: Clients) -> None:
    write_entries(clients, [{"text_payload": "x"}], dry_run=True)

    assert list_entries(clients) == []


def test_log_sink_is_bounded(
    cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging_api, "MAX_ENTRIES", 5)
    sink = LogSink(make_cloud(cloud.state_dir / "bounded"))
    entry = {"log_name": f"{PROJECT}/logs/app", "resource": {"type": "global"}}

    sink.write([LogEntry(entry, text_payload=str(i)) for i in range(8)])

    assert [e.text_payload for e in sink.list("")] == ["3", "4", "5", "6", "7"]


def test_log_sink_survives_restart(cloud: LocalCloud, clients: Clients) -> None:
    write_entries(clients, [{"text_payload": "kept", "severity": "ERROR"}])

    restarted = LogSink(cloud)

    assert restarted.count_matching("severity=ERROR textPayload:kept") == 1


def test_count_matching_counts_filter(cloud: LocalCloud, clients: Clients) -> None:
    write_entries(
        clients,
        [{"json_payload": {"event": "denied_tool"}} for _ in range(3)]
        + [{"json_payload": {"event": "ok"}}],
    )

    assert cloud.logs.count_matching('jsonPayload.event="denied_tool"') == 3


# Log-based metrics


def counter_metric(name: str = "denied_tools", **fields: Any) -> LogMetric:
    descriptor = metric_pb2.MetricDescriptor(
        labels=[label_pb2.LabelDescriptor(key="tool")]
    )
    values: dict[str, Any] = {
        "name": name,
        "filter": 'jsonPayload.event="denied_tool"',
        "metric_descriptor": descriptor,
        "label_extractors": {"tool": "EXTRACT(jsonPayload.tool)"},
    }
    values.update(fields)
    return LogMetric(values)


def test_metric_create_fills_descriptor(clients: Clients) -> None:
    created = clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric())

    fetched = clients.metrics.get_log_metric(
        metric_name=f"{PROJECT}/metrics/denied_tools"
    )

    assert fetched.metric_descriptor.type == "logging.googleapis.com/user/denied_tools"
    assert fetched.metric_descriptor.metric_kind == metric_pb2.MetricDescriptor.DELTA
    assert fetched.metric_descriptor.value_type == metric_pb2.MetricDescriptor.INT64
    assert fetched.create_time == created.create_time


@pytest.mark.parametrize("name", ["/leading", "has space", "x" * 101, "semi;colon"])
def test_metric_name_is_validated(clients: Clients, name: str) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="metric name"):
        clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric(name))


def test_metric_name_allows_documented_characters(clients: Clients) -> None:
    name = "llm/denied_tools-v1.2,+!*'()%"

    created = clients.metrics.create_log_metric(
        parent=PROJECT, metric=counter_metric(name)
    )

    assert created.name == name


def test_metric_needs_filter(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="filter is required"):
        clients.metrics.create_log_metric(
            parent=PROJECT, metric=counter_metric(filter="")
        )


def test_metric_filter_must_parse(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="position"):
        clients.metrics.create_log_metric(
            parent=PROJECT, metric=counter_metric(filter='jsonPayload.event="open')
        )


def test_extractor_without_descriptor_is_rejected(clients: Clients) -> None:
    metric = counter_metric(label_extractors={"caller": "EXTRACT(jsonPayload.caller)"})

    with pytest.raises(exceptions.InvalidArgument, match="no label descriptor"):
        clients.metrics.create_log_metric(parent=PROJECT, metric=metric)


def test_regexp_extractor_needs_one_group(clients: Clients) -> None:
    metric = counter_metric(
        label_extractors={"tool": 'REGEXP_EXTRACT(textPayload, "(a)(b)")'}
    )

    with pytest.raises(exceptions.InvalidArgument, match="one capture group"):
        clients.metrics.create_log_metric(parent=PROJECT, metric=metric)


def test_value_extractor_needs_distribution(clients: Clients) -> None:
    metric = counter_metric(value_extractor="EXTRACT(jsonPayload.latency_ms)")

    with pytest.raises(exceptions.InvalidArgument, match="DISTRIBUTION"):
        clients.metrics.create_log_metric(parent=PROJECT, metric=metric)


def test_distribution_metric_with_value_extractor(clients: Clients) -> None:
    descriptor = metric_pb2.MetricDescriptor(
        metric_kind=metric_pb2.MetricDescriptor.DELTA,
        value_type=metric_pb2.MetricDescriptor.DISTRIBUTION,
        unit="ms",
    )
    metric = LogMetric(
        name="latency",
        filter="httpRequest.status>=200",
        metric_descriptor=descriptor,
        value_extractor="EXTRACT(jsonPayload.latency_ms)",
    )

    created = clients.metrics.create_log_metric(parent=PROJECT, metric=metric)

    assert created.metric_descriptor.unit == "ms"


def test_duplicate_metric_already_exists(clients: Clients) -> None:
    clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric())

    with pytest.raises(exceptions.AlreadyExists):
        clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric())


def test_metric_update_creates_and_replaces(clients: Clients) -> None:
    metric_name = f"{PROJECT}/metrics/denied_tools"
    first = clients.metrics.update_log_metric(
        metric_name=metric_name, metric=counter_metric()
    )

    second = clients.metrics.update_log_metric(
        metric_name=metric_name, metric=counter_metric(description="v2")
    )

    assert second.description == "v2"
    assert second.create_time == first.create_time


def test_metric_list_and_delete(clients: Clients) -> None:
    clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric("a"))
    clients.metrics.create_log_metric(parent=PROJECT, metric=counter_metric("b"))

    clients.metrics.delete_log_metric(metric_name=f"{PROJECT}/metrics/a")

    assert [m.name for m in clients.metrics.list_log_metrics(parent=PROJECT)] == ["b"]
    with pytest.raises(exceptions.NotFound):
        clients.metrics.delete_log_metric(metric_name=f"{PROJECT}/metrics/a")


# Monitoring


def create_channel(clients: Clients) -> Any:
    return clients.channels.create_notification_channel(
        name=PROJECT,
        notification_channel=monitoring_v3.NotificationChannel(
            type_="webhook_tokenauth",
            display_name="local webhook",
            labels={"url": "http://127.0.0.1:9/alerts"},
        ),
    )


def log_match_policy(channel_names: list[str], **fields: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "display_name": "denied tools",
        "conditions": [
            {
                "display_name": "denied tool event",
                "condition_matched_log": {"filter": 'jsonPayload.event="denied_tool"'},
            }
        ],
        "alert_strategy": {"notification_rate_limit": {"period": {"seconds": 300}}},
        "notification_channels": channel_names,
    }
    policy.update(fields)
    return policy


def threshold_condition(name: str) -> dict[str, Any]:
    return {
        "display_name": name,
        "condition_threshold": {
            "filter": f'metric.type="logging.googleapis.com/user/{name}"',
            "comparison": "COMPARISON_GT",
            "duration": {"seconds": 60},
        },
    }


def test_channel_descriptors_cover_served_types(clients: Clients) -> None:
    descriptors = clients.channels.list_notification_channel_descriptors(name=PROJECT)

    assert {d.type_ for d in descriptors} == {"email", "pubsub", "webhook_tokenauth"}


def test_channel_create_and_get(clients: Clients) -> None:
    created = create_channel(clients)

    fetched = clients.channels.get_notification_channel(name=created.name)

    assert fetched.name.startswith(f"{PROJECT}/notificationChannels/")
    assert fetched.labels["url"] == "http://127.0.0.1:9/alerts"
    assert fetched.enabled


def test_channel_unknown_type_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="type"):
        clients.channels.create_notification_channel(
            name=PROJECT,
            notification_channel=monitoring_v3.NotificationChannel(
                type_="carrier_pigeon"
            ),
        )


def test_channel_missing_label_is_rejected(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="email_address"):
        clients.channels.create_notification_channel(
            name=PROJECT,
            notification_channel=monitoring_v3.NotificationChannel(type_="email"),
        )


def test_log_match_policy_is_created(clients: Clients) -> None:
    channel = create_channel(clients)

    policy = clients.policies.create_alert_policy(
        name=PROJECT,
        alert_policy=monitoring_v3.AlertPolicy(log_match_policy([channel.name])),
    )

    assert policy.name.startswith(f"{PROJECT}/alertPolicies/")
    assert policy.conditions[0].name.startswith(f"{policy.name}/conditions/")
    assert policy.enabled
    assert policy.creation_record.mutate_time is not None


def test_log_match_policy_needs_rate_limit(clients: Clients) -> None:
    policy = log_match_policy([], alert_strategy={})

    with pytest.raises(exceptions.InvalidArgument, match="notification_rate_limit"):
        clients.policies.create_alert_policy(
            name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(policy)
        )


def test_log_match_policy_allows_one_condition(clients: Clients) -> None:
    policy = log_match_policy([])
    policy["conditions"] = policy["conditions"] * 2
    policy["combiner"] = "OR"

    with pytest.raises(exceptions.InvalidArgument, match="exactly one condition"):
        clients.policies.create_alert_policy(
            name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(policy)
        )


def test_log_match_filter_must_parse(clients: Clients) -> None:
    policy = log_match_policy([])
    policy["conditions"][0]["condition_matched_log"]["filter"] = "severity>="

    with pytest.raises(exceptions.InvalidArgument, match="position"):
        clients.policies.create_alert_policy(
            name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(policy)
        )


def test_policy_with_two_conditions_needs_combiner(clients: Clients) -> None:
    policy = {
        "display_name": "two",
        "conditions": [threshold_condition("a"), threshold_condition("b")],
    }

    with pytest.raises(exceptions.InvalidArgument, match="combiner"):
        clients.policies.create_alert_policy(
            name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(policy)
        )


def test_policy_needs_display_name(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="display_name"):
        clients.policies.create_alert_policy(
            name=PROJECT,
            alert_policy=monitoring_v3.AlertPolicy(
                log_match_policy([], display_name="")
            ),
        )


def test_policy_with_unknown_channel_is_rejected(clients: Clients) -> None:
    missing = f"{PROJECT}/notificationChannels/123"

    with pytest.raises(exceptions.NotFound, match="123"):
        clients.policies.create_alert_policy(
            name=PROJECT,
            alert_policy=monitoring_v3.AlertPolicy(log_match_policy([missing])),
        )


def test_policy_list_filters_by_display_name(clients: Clients) -> None:
    clients.policies.create_alert_policy(
        name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(log_match_policy([]))
    )
    clients.policies.create_alert_policy(
        name=PROJECT,
        alert_policy=monitoring_v3.AlertPolicy(
            log_match_policy([], display_name="auth failures")
        ),
    )

    found = clients.policies.list_alert_policies(
        request={"name": PROJECT, "filter": 'display_name="auth failures"'}
    )

    assert [p.display_name for p in found] == ["auth failures"]


def test_policy_update_applies_mask(clients: Clients) -> None:
    created = clients.policies.create_alert_policy(
        name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(log_match_policy([]))
    )

    updated = clients.policies.update_alert_policy(
        alert_policy=monitoring_v3.AlertPolicy(
            name=created.name, display_name="renamed"
        ),
        update_mask={"paths": ["display_name"]},
    )

    assert updated.display_name == "renamed"
    assert updated.conditions[0].name == created.conditions[0].name


def test_policy_delete(clients: Clients) -> None:
    created = clients.policies.create_alert_policy(
        name=PROJECT, alert_policy=monitoring_v3.AlertPolicy(log_match_policy([]))
    )

    clients.policies.delete_alert_policy(name=created.name)

    with pytest.raises(exceptions.NotFound):
        clients.policies.get_alert_policy(name=created.name)


def test_channel_in_use_needs_force(clients: Clients) -> None:
    channel = create_channel(clients)
    policy = clients.policies.create_alert_policy(
        name=PROJECT,
        alert_policy=monitoring_v3.AlertPolicy(log_match_policy([channel.name])),
    )

    with pytest.raises(exceptions.FailedPrecondition, match="force"):
        clients.channels.delete_notification_channel(name=channel.name)
    clients.channels.delete_notification_channel(name=channel.name, force=True)

    remaining = clients.policies.get_alert_policy(name=policy.name)
    assert list(remaining.notification_channels) == []


# IAM Credentials


def test_id_token_verifies_with_email(cloud: LocalCloud, clients: Clients) -> None:
    response = clients.credentials.generate_id_token(
        name=ACCOUNT, audience="https://llm.example", include_email=True
    )

    claims = cloud.tokens.verify_id_token(response.token, ["https://llm.example"])

    assert claims["email"] == "llm@demo.iam.gserviceaccount.com"


def test_id_token_without_email(cloud: LocalCloud, clients: Clients) -> None:
    response = clients.credentials.generate_id_token(
        name=ACCOUNT, audience="https://llm.example"
    )

    claims = cloud.tokens.verify_id_token(response.token, ["https://llm.example"])

    assert "email" not in claims


def test_id_token_needs_audience(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="audience"):
        clients.credentials.generate_id_token(name=ACCOUNT, audience="")


@pytest.mark.parametrize(
    "name",
    [
        "llm@demo.iam.gserviceaccount.com",
        "projects/demo/serviceAccounts/llm@demo.iam.gserviceaccount.com",
        "projects/-/serviceAccounts/not-an-email",
    ],
)
def test_malformed_account_is_rejected(clients: Clients, name: str) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="serviceAccounts"):
        clients.credentials.generate_id_token(name=name, audience="https://x")


def test_access_token_expires_within_lifetime(clients: Clients) -> None:
    before = datetime.now(UTC)

    response = clients.credentials.generate_access_token(
        name=ACCOUNT, scope=["https://www.googleapis.com/auth/cloud-platform"]
    )

    assert response.access_token.startswith("ya29.")
    assert before + timedelta(minutes=59) < response.expire_time
    assert response.expire_time < before + timedelta(minutes=61)


def test_access_token_lifetime_is_capped(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="lifetime"):
        clients.credentials.generate_access_token(
            name=ACCOUNT, scope=["x"], lifetime={"seconds": 7200}
        )


def test_access_token_needs_scope(clients: Clients) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="scope"):
        clients.credentials.generate_access_token(name=ACCOUNT, scope=[])


# Command line


def run_cli(
    state_dir: Path, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_status_without_server_exits_1(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "status")

    assert result.returncode == 1
    assert "not running" in result.stderr


def test_stop_without_server_succeeds(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "stop").returncode == 0


def test_stale_endpoints_are_ignored(tmp_path: Path) -> None:
    dead_pid = _exited_pid()
    endpoints = {
        "grpc": "127.0.0.1:1",
        "registry": "127.0.0.1:1",
        "hub": "",
        "pid": dead_pid,
    }
    (tmp_path / ENDPOINTS_FILE).write_text(json.dumps(endpoints))

    assert cli.running_endpoints(tmp_path) is None


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_cli_start_status_stop(tmp_path: Path) -> None:
    state_dir = tmp_path / "cloud"

    started = run_cli(state_dir, "start")
    try:
        assert started.returncode == 0, started.stderr + _log_tail(state_dir)
        endpoints = json.loads(started.stdout)
        status = run_cli(state_dir, "status")
        again = run_cli(state_dir, "start")
    finally:
        stopped = run_cli(state_dir, "stop")

    assert json.loads(status.stdout)["pid"] == endpoints["pid"]
    assert json.loads(again.stdout)["pid"] == endpoints["pid"]
    assert stopped.returncode == 0
    assert not (state_dir / ENDPOINTS_FILE).exists()
    assert not cli.process_running(endpoints["pid"])


def _log_tail(state_dir: Path) -> str:
    log = state_dir / cli.LOG_FILE
    return log.read_text()[-3000:] if log.exists() else ""
