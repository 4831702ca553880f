"""localcloud's Cloud Run API and runtime, driven by the unmodified `run_v2` clients.

Images are real OCI images pushed to localcloud's registry on top of the host-python
base. Their entrypoint is a small HTTP server that returns its revision, selected env
values and the headers it received, so each test can see what the front door passed on.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.api_core import exceptions
from google.cloud import run_v2, secretmanager_v1
from google.cloud.logging_v2.types import LogEntry
from google.cloud.run_v2.services.revisions.transports import RevisionsGrpcTransport
from google.cloud.run_v2.services.services.transports import ServicesGrpcTransport
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import field_mask_pb2

from localcloud.registry import BASE_REPOSITORY, BASE_TAG
from localcloud.server import LocalCloud
from tasks.oci import (
    ConfigChanges,
    Layer,
    RegistryClient,
    append_layers,
    local_endpoint,
)

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").is_file(),
    reason="needs Debian's docker-registry: apt-get install docker-registry",
)

PROJECT = "proj"
PARENT = f"projects/{PROJECT}/locations/us-central1"
BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"
INVOKER = "invoker@proj.iam.gserviceaccount.com"
STRANGER = "stranger@proj.iam.gserviceaccount.com"
OPERATION_TIMEOUT = 60
LOG_TIMEOUT_SECONDS = 10.0

ECHO_SERVER = b"""
import http.server, json, os, urllib.parse

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        body = json.dumps({
            "revision": os.environ.get("K_REVISION"),
            "env": {name: os.environ.get(name) for name in query.get("env", [])},
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "cwd": os.getcwd(),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        size = int(self.headers.get("content-length", "0"))
        data = self.rfile.read(size)
        self.send_response(200)
        self.send_header("content-length", str(len(str(len(data)))))
        self.end_headers()
        self.wfile.write(str(len(data)).encode())

    def log_message(self, fmt, *args):
        event = {"severity": "warning", "message": "request served", "event": "probe"}
        print(json.dumps(event), flush=True)

print("echo server starting", flush=True)
address = ("127.0.0.1", int(os.environ["PORT"]))
http.server.ThreadingHTTPServer(address, Handler).serve_forever()
"""

FAILING_APP = b"""
import sys
print("loading configuration", flush=True)
print("fatal: configuration missing", file=sys.stderr, flush=True)
sys.exit(3)
"""

SILENT_APP = b"""
import time
print("busy, never listening", flush=True)
time.sleep(600)
"""

# An ingress container that returns the response of its sidecar at $UPSTREAM.
GATEWAY_APP = b"""
import http.server, os, urllib.request

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with urllib.request.urlopen(os.environ["UPSTREAM"] + "/?env=PORT") as upstream:
            body = upstream.read()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

address = ("127.0.0.1", int(os.environ["PORT"]))
http.server.ThreadingHTTPServer(address, Handler).serve_forever()
"""

_ids = itertools.count(1)


def service_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    instance = LocalCloud(tmp_path_factory.mktemp("localcloud"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def services(cloud: LocalCloud) -> run_v2.ServicesClient:
    channel = grpc.insecure_channel(cloud.grpc_address)
    return run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel))


@pytest.fixture(scope="module")
def revisions(cloud: LocalCloud) -> run_v2.RevisionsClient:
    channel = grpc.insecure_channel(cloud.grpc_address)
    return run_v2.RevisionsClient(transport=RevisionsGrpcTransport(channel=channel))


@pytest.fixture(scope="module")
def secrets_client(cloud: LocalCloud) -> secretmanager_v1.SecretManagerServiceClient:
    channel = grpc.insecure_channel(cloud.grpc_address)
    transport = SecretManagerServiceGrpcTransport(channel=channel)
    return secretmanager_v1.SecretManagerServiceClient(transport=transport)


def push_app(cloud: LocalCloud, name: str, source: bytes) -> str:
    def auth() -> dict[str, str]:
        return cloud.registry.auth_headers(f"tests@{PROJECT}.iam.gserviceaccount.com")

    with RegistryClient(local_endpoint(cloud.registry.address), auth) as registry:
        return append_layers(
            BASE,
            [Layer.from_files({"/app/main.py": source})],
            f"us-central1-docker.pkg.dev/{PROJECT}/apps/{name}",
            ConfigChanges(entrypoint=["python3", "/app/main.py"], working_dir="/app"),
            registry=registry,
        )


@pytest.fixture(scope="module")
def echo_image(cloud: LocalCloud) -> str:
    return push_app(cloud, "echo", ECHO_SERVER)


@pytest.fixture(scope="module")
def gateway_image(cloud: LocalCloud) -> str:
    return push_app(cloud, "gateway", GATEWAY_APP)


@pytest.fixture(scope="module")
def failing_image(cloud: LocalCloud) -> str:
    return push_app(cloud, "failing", FAILING_APP)


@pytest.fixture(scope="module")
def silent_image(cloud: LocalCloud) -> str:
    return push_app(cloud, "silent", SILENT_APP)


def template(image: str, **fields: Any) -> run_v2.RevisionTemplate:
    container_fields = fields.pop("container", {})
    return run_v2.RevisionTemplate(
        containers=[run_v2.Container(image=image, **container_fields)], **fields
    )


def deploy(
    services: run_v2.ServicesClient, service_id: str, service: run_v2.Service
) -> run_v2.Service:
    operation = services.create_service(
        parent=PARENT, service_id=service_id, service=service
    )
    result: run_v2.Service = operation.result(timeout=OPERATION_TIMEOUT)
    return result


def update(services: run_v2.ServicesClient, service: run_v2.Service) -> run_v2.Service:
    result: run_v2.Service = services.update_service(service=service).result(
        timeout=OPERATION_TIMEOUT
    )
    return result


def grant_invoker(services: run_v2.ServicesClient, name: str, member: str) -> None:
    policy = policy_pb2.Policy(
        bindings=[policy_pb2.Binding(role="roles/run.invoker", members=[member])]
    )
    services.set_iam_policy(
        request=iam_policy_pb2.SetIamPolicyRequest(resource=name, policy=policy)
    )


def bearer(cloud: LocalCloud, email: str, audience: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cloud.tokens.issue_id_token(email, audience)}"}


def wait_for_entries(
    cloud: LocalCloud, predicate: Callable[[LogEntry], bool], count: int = 1
) -> list[LogEntry]:
    deadline = time.monotonic() + LOG_TIMEOUT_SECONDS
    while True:
        matching = [entry for entry in cloud.logs.list("") if predicate(entry)]
        if len(matching) >= count or time.monotonic() > deadline:
            return matching
        time.sleep(0.05)


@pytest.fixture(scope="module")
def echo_service(
    cloud: LocalCloud, services: run_v2.ServicesClient, echo_image: str
) -> run_v2.Service:
    service = deploy(services, "echo", run_v2.Service(template=template(echo_image)))
    grant_invoker(services, service.name, f"serviceAccount:{INVOKER}")
    return service


# --- validation ----------------------------------------------------------------------


def create_rejected(
    services: run_v2.ServicesClient, service: run_v2.Service, service_id: str = "valid"
) -> str:
    with pytest.raises(exceptions.InvalidArgument) as caught:
        services.create_service(parent=PARENT, service_id=service_id, service=service)
    return str(caught.value.message)


def test_service_id_with_uppercase_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image)), "Bad_Name"
    )
    assert "'Bad_Name' is invalid" in message


def test_service_id_of_50_characters_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image)), "a" * 50
    )
    assert "at most 49 characters" in message


def test_gpu_with_two_cpu_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    resources = run_v2.ResourceRequirements(
        limits={"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    )
    spec = template(
        echo_image,
        container={"resources": resources},
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4"),
    )
    message = create_rejected(services, run_v2.Service(template=spec))
    assert "at least 4 vCPU and 16Gi" in message


def test_gpu_with_cpu_idle_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    resources = run_v2.ResourceRequirements(
        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}, cpu_idle=True
    )
    spec = template(
        echo_image,
        container={"resources": resources},
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4"),
    )
    message = create_rejected(services, run_v2.Service(template=spec))
    assert "CPU always allocated" in message


def test_gpu_without_accelerator_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    resources = run_v2.ResourceRequirements(
        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    )
    spec = template(echo_image, container={"resources": resources})
    message = create_rejected(services, run_v2.Service(template=spec))
    assert "node_selector.accelerator is empty" in message


def test_valid_gpu_spec_accepted(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    resources = run_v2.ResourceRequirements(
        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    )
    spec = template(
        echo_image,
        container={"resources": resources},
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4"),
    )
    operation = services.create_service(
        request=run_v2.CreateServiceRequest(
            parent=PARENT,
            service_id="gpu-ok",
            service=run_v2.Service(template=spec),
            validate_only=True,
        )
    )
    assert operation.result(timeout=OPERATION_TIMEOUT).name.endswith("/gpu-ok")


@pytest.mark.parametrize(
    ("cpu", "memory", "expected"),
    [
        ("1", "8Gi", "use 128Mi to 4Gi"),
        ("4", "1Gi", "use 2Gi to 16Gi"),
        ("3", "4Gi", "above 1 vCPU use 2, 4, 6 or 8"),
        ("16", "32Gi", "over Cloud Run's maximum of 8"),
    ],
)
def test_cpu_memory_pair_rejected(
    services: run_v2.ServicesClient,
    echo_image: str,
    cpu: str,
    memory: str,
    expected: str,
) -> None:
    resources = run_v2.ResourceRequirements(limits={"cpu": cpu, "memory": memory})
    spec = template(echo_image, container={"resources": resources})
    message = create_rejected(services, run_v2.Service(template=spec))
    assert expected in message


def test_startup_probe_period_over_240_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    probe = run_v2.Probe(period_seconds=300, tcp_socket=run_v2.TCPSocketAction())
    spec = template(echo_image, container={"startup_probe": probe})
    message = create_rejected(services, run_v2.Service(template=spec))
    assert "period_seconds: 300 exceeds the maximum of 240" in message


def test_max_instances_below_min_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    scaling = run_v2.RevisionScaling(min_instance_count=3, max_instance_count=2)
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image, scaling=scaling))
    )
    assert "below min_instance_count" in message


def test_two_ingress_containers_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    containers = [
        run_v2.Container(
            name=name,
            image=echo_image,
            ports=[run_v2.ContainerPort(container_port=port)],
        )
        for name, port in (("a", 8080), ("b", 8081))
    ]
    spec = run_v2.RevisionTemplate(containers=containers)
    message = create_rejected(services, run_v2.Service(template=spec))
    assert "only one container (the ingress container) may" in message


def test_reserved_env_port_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    env = [run_v2.EnvVar(name="PORT", value="9000")]
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image, container={"env": env}))
    )
    assert "PORT is reserved" in message


def test_secret_env_without_version_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    source = run_v2.EnvVarSource(
        secret_key_ref=run_v2.SecretKeySelector(secret="api-key")
    )
    env = [run_v2.EnvVar(name="API_KEY", value_source=source)]
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image, container={"env": env}))
    )
    assert "a version is required" in message


def test_traffic_not_summing_to_100_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    traffic = [
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST,
            percent=90,
        )
    ]
    message = create_rejected(
        services, run_v2.Service(template=template(echo_image), traffic=traffic)
    )
    assert "add up to 90" in message


def test_revision_name_without_service_prefix_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    spec = template(echo_image, revision="other-v1")
    message = create_rejected(services, run_v2.Service(template=spec), "named")
    assert "must start with the service name" in message


def test_revision_name_with_latest_rejected(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    spec = template(echo_image, revision="named-latest")
    message = create_rejected(services, run_v2.Service(template=spec), "named")
    assert "'latest'" in message


def test_validate_only_creates_nothing(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    request = run_v2.CreateServiceRequest(
        parent=PARENT,
        service_id="dry-run",
        service=run_v2.Service(template=template(echo_image)),
        validate_only=True,
    )
    services.create_service(request=request).result(timeout=OPERATION_TIMEOUT)
    with pytest.raises(exceptions.NotFound):
        services.get_service(name=f"{PARENT}/services/dry-run")


# --- deploy and front door -----------------------------------------------------------


def test_service_output_fields_filled(echo_service: run_v2.Service) -> None:
    assert echo_service.uri.startswith("http://127.0.0.1:")
    assert echo_service.urls == [echo_service.uri]
    assert echo_service.generation == 1
    assert echo_service.observed_generation == 1
    assert echo_service.reconciling is False
    assert (
        echo_service.terminal_condition.state
        == run_v2.Condition.State.CONDITION_SUCCEEDED
    )
    assert echo_service.latest_ready_revision == echo_service.latest_created_revision
    assert echo_service.traffic_statuses[0].percent == 100
    assert echo_service.etag


def test_revision_defaults_filled(
    echo_service: run_v2.Service, revisions: run_v2.RevisionsClient
) -> None:
    revision = revisions.get_revision(name=echo_service.latest_ready_revision)
    container = revision.containers[0]
    assert revision.name.split("/")[-1].startswith("echo-00001-")
    assert container.ports[0].container_port == 8080
    assert container.resources.limits["cpu"] == "1000m"
    assert container.startup_probe.tcp_socket.port == 8080
    assert revision.service_account.endswith("-compute@developer.gserviceaccount.com")
    assert revision.conditions[0].state == run_v2.Condition.State.CONDITION_SUCCEEDED


def test_request_without_token_gets_401(echo_service: run_v2.Service) -> None:
    assert httpx.get(echo_service.uri).status_code == 401


def test_access_token_gets_401(cloud: LocalCloud, echo_service: run_v2.Service) -> None:
    headers = {"Authorization": f"Bearer {cloud.tokens.issue_access_token()}"}
    assert httpx.get(echo_service.uri, headers=headers).status_code == 401


def test_token_for_other_audience_gets_401(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    headers = bearer(cloud, INVOKER, "http://127.0.0.1:1")
    assert httpx.get(echo_service.uri, headers=headers).status_code == 401


def test_non_invoker_gets_403(cloud: LocalCloud, echo_service: run_v2.Service) -> None:
    headers = bearer(cloud, STRANGER, echo_service.uri)
    assert httpx.get(echo_service.uri, headers=headers).status_code == 403


def test_invoker_reaches_container(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    response = httpx.get(
        echo_service.uri + "/?env=K_SERVICE&env=PORT",
        headers=bearer(cloud, INVOKER, echo_service.uri),
    )
    body = response.json()
    assert response.status_code == 200
    assert body["revision"] == echo_service.latest_ready_revision.rsplit("/", 1)[1]
    assert body["env"]["K_SERVICE"] == "echo"
    assert body["env"]["PORT"] != "8080"
    assert body["cwd"].endswith("/rootfs/app")


def test_forwarded_token_has_no_signature(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    headers = bearer(cloud, INVOKER, echo_service.uri)
    body = httpx.get(echo_service.uri, headers=headers).json()
    forwarded = body["headers"]["authorization"]
    assert forwarded.endswith(".SIGNATURE_REMOVED_BY_GOOGLE")
    assert forwarded != headers["Authorization"]


def test_serverless_authorization_leaves_authorization(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    token = cloud.tokens.issue_id_token(INVOKER, echo_service.uri)
    headers = {
        "X-Serverless-Authorization": f"Bearer {token}",
        "Authorization": "Basic YXBwOnNlY3JldA==",
    }
    body = httpx.get(echo_service.uri, headers=headers).json()
    assert body["headers"]["authorization"] == "Basic YXBwOnNlY3JldA=="
    assert body["headers"]["x-serverless-authorization"].endswith("REMOVED_BY_GOOGLE")


def test_body_over_32_mib_gets_413(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    headers = bearer(cloud, INVOKER, echo_service.uri)
    response = httpx.post(
        echo_service.uri, headers=headers, content=b"x" * (32 * 2**20 + 1), timeout=60
    )
    assert response.status_code == 413


def test_body_under_limit_reaches_container(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    headers = bearer(cloud, INVOKER, echo_service.uri)
    response = httpx.post(echo_service.uri, headers=headers, content=b"y" * 5000)
    assert response.text == "5000"


def test_request_logs_record_rejections(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    httpx.get(echo_service.uri + "/rejected-path")

    def rejected(entry: LogEntry) -> bool:
        return entry.log_name.endswith(
            "run.googleapis.com%2Frequests"
        ) and entry.http_request.request_url.endswith("/rejected-path")

    entries = wait_for_entries(cloud, rejected)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.http_request.status == 401
    assert entry.severity == 400  # WARNING
    assert entry.http_request.request_method == "GET"
    assert entry.http_request.remote_ip == "127.0.0.1"
    assert entry.resource.type == "cloud_run_revision"
    assert entry.resource.labels["service_name"] == "echo"
    assert entry.trace.startswith(f"projects/{PROJECT}/traces/")


def test_request_logs_never_contain_tokens(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    headers = bearer(cloud, INVOKER, echo_service.uri)
    httpx.get(echo_service.uri + "/token-check", headers=headers)
    token = headers["Authorization"].split()[1]
    entries = wait_for_entries(
        cloud, lambda entry: entry.http_request.request_url.endswith("/token-check")
    )
    assert entries
    assert all(token not in LogEntry.to_json(entry) for entry in cloud.logs.list(""))


def test_container_json_line_becomes_structured_entry(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    httpx.get(echo_service.uri, headers=bearer(cloud, INVOKER, echo_service.uri))

    def structured(entry: LogEntry) -> bool:
        return (
            entry.log_name.endswith("run.googleapis.com%2Fstdout")
            and entry.json_payload is not None
            and entry.json_payload.get("event") == "probe"
        )

    entries = wait_for_entries(cloud, structured)
    assert entries
    entry = entries[0]
    assert entry.severity == 400  # "warning" in the line
    assert entry.json_payload["message"] == "request served"
    assert "severity" not in entry.json_payload
    assert (
        entry.resource.labels["revision_name"]
        == echo_service.latest_ready_revision.rsplit("/", 1)[1]
    )


def test_container_text_line_becomes_text_entry(
    cloud: LocalCloud, echo_service: run_v2.Service
) -> None:
    entries = wait_for_entries(
        cloud, lambda entry: entry.text_payload == "echo server starting"
    )
    assert entries
    assert entries[0].severity == 0  # DEFAULT


# --- traffic, tags and revisions -----------------------------------------------------


def test_candidate_tag_serves_new_revision_at_zero_percent(
    cloud: LocalCloud, services: run_v2.ServicesClient, echo_image: str
) -> None:
    name = service_id("canary")
    first = deploy(services, name, run_v2.Service(template=template(echo_image)))
    grant_invoker(services, first.name, f"serviceAccount:{INVOKER}")
    stable = first.latest_ready_revision.rsplit("/", 1)[1]

    candidate = run_v2.Service(first)
    candidate.template = template(
        echo_image, revision=f"{name}-candidate", labels={"stage": "candidate"}
    )
    by_revision = (
        run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    )
    candidate.traffic = [
        run_v2.TrafficTarget(type_=by_revision, revision=stable, percent=100),
        run_v2.TrafficTarget(
            type_=by_revision, revision=f"{name}-candidate", percent=0, tag="candidate"
        ),
    ]
    updated = update(services, candidate)
    tag_status = next(status for status in updated.traffic_statuses if status.tag)
    main = httpx.get(updated.uri, headers=bearer(cloud, INVOKER, updated.uri)).json()
    tagged = httpx.get(
        tag_status.uri, headers=bearer(cloud, INVOKER, tag_status.uri)
    ).json()

    assert tag_status.uri != updated.uri
    assert main["revision"] == stable
    assert tagged["revision"] == f"{name}-candidate"
    assert updated.latest_created_revision.endswith(f"/{name}-candidate")


def test_reused_revision_name_with_new_spec_already_exists(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    name = service_id("reuse")
    first = deploy(
        services,
        name,
        run_v2.Service(template=template(echo_image, revision=f"{name}-v1")),
    )
    changed = run_v2.Service(first)
    changed.template.labels["changed"] = "yes"
    with pytest.raises(exceptions.AlreadyExists) as caught:
        services.update_service(service=changed)
    assert f"'{name}-v1' with different configuration" in str(caught.value.message)


def test_update_without_template_change_makes_no_revision(
    services: run_v2.ServicesClient, revisions: run_v2.RevisionsClient, echo_image: str
) -> None:
    name = service_id("same")
    first = deploy(services, name, run_v2.Service(template=template(echo_image)))
    again = run_v2.Service(first)
    again.labels["team"] = "ml"
    updated = update(services, again)
    listed = list(revisions.list_revisions(parent=first.name))
    assert updated.generation == 2
    assert len(listed) == 1


def test_template_only_update_keeps_pinned_traffic(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    name = service_id("pinned")
    first = deploy(services, name, run_v2.Service(template=template(echo_image)))
    stable = first.latest_ready_revision.rsplit("/", 1)[1]
    pinned = run_v2.Service(first)
    pinned.traffic = [
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
            revision=stable,
            percent=100,
        )
    ]
    update(services, pinned)
    changed = run_v2.Service(
        name=first.name, template=template(echo_image, labels={"v": "2"})
    )
    request = run_v2.UpdateServiceRequest(
        service=changed, update_mask=field_mask_pb2.FieldMask(paths=["template"])
    )
    updated = services.update_service(request=request).result(timeout=OPERATION_TIMEOUT)
    assert updated.latest_ready_revision != first.latest_ready_revision
    assert [status.revision for status in updated.traffic_statuses] == [stable]


def test_stale_service_etag_aborted(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    first = deploy(
        services, service_id("etag"), run_v2.Service(template=template(echo_image))
    )
    newer = run_v2.Service(first)
    newer.labels["round"] = "1"
    update(services, newer)
    stale = run_v2.Service(first)
    stale.labels["round"] = "2"
    with pytest.raises(exceptions.Aborted):
        services.update_service(service=stale)


def test_list_and_delete_service(
    services: run_v2.ServicesClient, revisions: run_v2.RevisionsClient, echo_image: str
) -> None:
    name = service_id("gone")
    service = deploy(services, name, run_v2.Service(template=template(echo_image)))
    listed = [item.name for item in services.list_services(parent=PARENT)]
    deleted = services.delete_service(name=service.name).result(
        timeout=OPERATION_TIMEOUT
    )
    assert service.name in listed
    assert deleted.name == service.name
    with pytest.raises(exceptions.NotFound):
        services.get_service(name=service.name)
    assert list(revisions.list_revisions(parent=service.name)) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(service.uri)


def test_traffic_split_reaches_both_revisions(
    cloud: LocalCloud, services: run_v2.ServicesClient, echo_image: str
) -> None:
    name = service_id("split")
    first = deploy(services, name, run_v2.Service(template=template(echo_image)))
    grant_invoker(services, first.name, f"serviceAccount:{INVOKER}")
    second = run_v2.Service(first)
    second.template = template(echo_image, labels={"v": "2"})
    by_revision = (
        run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    )
    old = first.latest_ready_revision.rsplit("/", 1)[1]
    second.traffic = [
        run_v2.TrafficTarget(type_=by_revision, revision=old, percent=50),
        run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST,
            percent=50,
        ),
    ]
    updated = update(services, second)
    headers = bearer(cloud, INVOKER, updated.uri)
    with httpx.Client(headers=headers) as client:
        seen = {client.get(updated.uri).json()["revision"] for _ in range(40)}
    assert seen == {old, updated.latest_ready_revision.rsplit("/", 1)[1]}


def test_sidecar_reached_on_declared_localhost_port(
    cloud: LocalCloud,
    services: run_v2.ServicesClient,
    echo_image: str,
    gateway_image: str,
) -> None:
    sidecar = run_v2.Container(
        name="engine",
        image=echo_image,
        startup_probe=run_v2.Probe(
            period_seconds=1,
            failure_threshold=10,
            tcp_socket=run_v2.TCPSocketAction(port=8888),
        ),
    )
    gateway = run_v2.Container(
        name="gateway",
        image=gateway_image,
        ports=[run_v2.ContainerPort(container_port=8080)],
        env=[run_v2.EnvVar(name="UPSTREAM", value="http://localhost:8888")],
        depends_on=["engine"],
    )
    spec = run_v2.RevisionTemplate(containers=[gateway, sidecar])
    service = deploy(services, service_id("sidecar"), run_v2.Service(template=spec))
    grant_invoker(services, service.name, f"serviceAccount:{INVOKER}")
    response = httpx.get(service.uri, headers=bearer(cloud, INVOKER, service.uri))
    body = response.json()
    assert response.status_code == 200
    assert body["revision"] == service.latest_ready_revision.rsplit("/", 1)[1]
    assert body["env"]["PORT"] != "8888"


def test_delete_revision_with_traffic_rejected(
    echo_service: run_v2.Service, revisions: run_v2.RevisionsClient
) -> None:
    with pytest.raises(exceptions.FailedPrecondition):
        revisions.delete_revision(name=echo_service.latest_ready_revision)


# --- failures ------------------------------------------------------------------------


def test_exiting_container_fails_operation(
    services: run_v2.ServicesClient, failing_image: str
) -> None:
    operation = services.create_service(
        parent=PARENT,
        service_id=service_id("exits"),
        service=run_v2.Service(template=template(failing_image)),
    )
    with pytest.raises(exceptions.FailedPrecondition) as caught:
        operation.result(timeout=OPERATION_TIMEOUT)
    message = str(caught.value.message)
    assert "exited with code 3" in message
    assert "fatal: configuration missing" in message


def test_failed_revision_leaves_previous_serving(
    cloud: LocalCloud,
    services: run_v2.ServicesClient,
    echo_image: str,
    silent_image: str,
) -> None:
    name = service_id("rollback")
    first = deploy(services, name, run_v2.Service(template=template(echo_image)))
    grant_invoker(services, first.name, f"serviceAccount:{INVOKER}")
    broken = run_v2.Service(first)
    probe = run_v2.Probe(
        period_seconds=1, timeout_seconds=1, failure_threshold=2, tcp_socket={}
    )
    broken.template = template(silent_image, container={"startup_probe": probe})
    with pytest.raises(exceptions.FailedPrecondition) as caught:
        update(services, broken)
    after = services.get_service(name=first.name)
    served = httpx.get(after.uri, headers=bearer(cloud, INVOKER, after.uri)).json()

    assert "did not pass its tcp startup probe" in str(caught.value.message)
    assert after.latest_ready_revision == first.latest_ready_revision
    assert after.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    assert served["revision"] == first.latest_ready_revision.rsplit("/", 1)[1]


def create_secret(
    client: secretmanager_v1.SecretManagerServiceClient, secret_id: str, value: bytes
) -> str:
    secret = client.create_secret(
        parent=f"projects/{PROJECT}",
        secret_id=secret_id,
        secret=secretmanager_v1.Secret(
            replication=secretmanager_v1.Replication(
                automatic=secretmanager_v1.Replication.Automatic()
            )
        ),
    )
    version = client.add_secret_version(
        parent=secret.name, payload=secretmanager_v1.SecretPayload(data=value)
    )
    return str(version.name)


def secret_env(secret_id: str, version: str) -> list[run_v2.EnvVar]:
    reference = run_v2.SecretKeySelector(secret=secret_id, version=version)
    return [
        run_v2.EnvVar(
            name="API_KEY", value_source=run_v2.EnvVarSource(secret_key_ref=reference)
        )
    ]


def test_pinned_secret_version_reaches_env(
    cloud: LocalCloud,
    services: run_v2.ServicesClient,
    secrets_client: secretmanager_v1.SecretManagerServiceClient,
    echo_image: str,
) -> None:
    create_secret(secrets_client, "env-key", b"value-one")
    spec = template(echo_image, container={"env": secret_env("env-key", "1")})
    service = deploy(services, service_id("secret"), run_v2.Service(template=spec))
    grant_invoker(services, service.name, f"serviceAccount:{INVOKER}")
    body = httpx.get(
        service.uri + "/?env=API_KEY", headers=bearer(cloud, INVOKER, service.uri)
    ).json()
    assert body["env"]["API_KEY"] == "value-one"


def test_disabled_secret_version_fails_start(
    services: run_v2.ServicesClient,
    secrets_client: secretmanager_v1.SecretManagerServiceClient,
    echo_image: str,
) -> None:
    version = create_secret(secrets_client, "disabled-key", b"value")
    secrets_client.disable_secret_version(name=version)
    spec = template(echo_image, container={"env": secret_env("disabled-key", "1")})
    operation = services.create_service(
        parent=PARENT,
        service_id=service_id("nosecret"),
        service=run_v2.Service(template=spec),
    )
    with pytest.raises(exceptions.FailedPrecondition) as caught:
        operation.result(timeout=OPERATION_TIMEOUT)
    assert "secrets/disabled-key/versions/1" in str(caught.value.message)


# --- IAM policy ----------------------------------------------------------------------


def test_default_policy_is_empty(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    service = deploy(
        services, service_id("policy"), run_v2.Service(template=template(echo_image))
    )
    policy = services.get_iam_policy(
        request=iam_policy_pb2.GetIamPolicyRequest(resource=service.name)
    )
    assert list(policy.bindings) == []
    assert policy.etag == b"ACAB"


def test_stale_policy_etag_aborted(
    services: run_v2.ServicesClient, echo_service: run_v2.Service
) -> None:
    stale = services.get_iam_policy(
        request=iam_policy_pb2.GetIamPolicyRequest(resource=echo_service.name)
    )
    grant_invoker(services, echo_service.name, f"serviceAccount:{INVOKER}")
    with pytest.raises(exceptions.Aborted):
        services.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(
                resource=echo_service.name, policy=stale
            )
        )


def test_unsupported_role_rejected(
    services: run_v2.ServicesClient, echo_service: run_v2.Service
) -> None:
    policy = policy_pb2.Policy(
        bindings=[
            policy_pb2.Binding(role="roles/storage.admin", members=["user:a@b.com"])
        ]
    )
    with pytest.raises(exceptions.InvalidArgument):
        services.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(
                resource=echo_service.name, policy=policy
            )
        )


def test_all_users_invoker_allows_anonymous(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    service = deploy(
        services, service_id("public"), run_v2.Service(template=template(echo_image))
    )
    grant_invoker(services, service.name, "allUsers")
    assert httpx.get(service.uri).status_code == 200


def test_invoker_iam_disabled_allows_anonymous(
    services: run_v2.ServicesClient, echo_image: str
) -> None:
    service = deploy(
        services,
        service_id("open"),
        run_v2.Service(template=template(echo_image), invoker_iam_disabled=True),
    )
    assert httpx.get(service.uri).status_code == 200


# --- restart -------------------------------------------------------------------------


def test_restart_keeps_url_and_restarts_instance(tmp_path: Path) -> None:
    first = LocalCloud(tmp_path / "state")
    first.start()
    try:
        image = push_app(first, "echo", ECHO_SERVER)
        channel = grpc.insecure_channel(first.grpc_address)
        client = run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel))
        service = deploy(client, "keep", run_v2.Service(template=template(image)))
        grant_invoker(client, service.name, f"serviceAccount:{INVOKER}")
    finally:
        first.stop()

    second = LocalCloud(tmp_path / "state")
    second.start()
    try:
        channel = grpc.insecure_channel(second.grpc_address)
        client = run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel))
        again = client.get_service(name=service.name)
        response = httpx.get(again.uri, headers=bearer(second, INVOKER, again.uri))
        assert again.uri == service.uri
        assert response.status_code == 200
        assert (
            json.loads(response.text)["revision"]
            == service.latest_ready_revision.rsplit("/", 1)[1]
        )
    finally:
        second.stop()
