"""The deploy tasks against localcloud, through the unmodified google-cloud-run client.

Each test deploys its own service from small app images pushed to localcloud's
registry: an HTTP server that returns its revision name, an app that exits during
startup, and one that never listens. The tasks run through `.fn`, so no Prefect
server is needed; test_rollout_e2e.py runs them inside the flow under Prefect.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2, secretmanager_v1
from google.protobuf import field_mask_pb2
from prefect.logging import disable_run_logger

from localcloud.registry import BASE_REPOSITORY, BASE_TAG
from localcloud.server import LocalCloud
from tasks import oci
from tasks.clients import Clients, clients_for
from tasks.config import (
    LlmSettings,
    McpSettings,
    RefreshConfig,
    load_config,
    startup_probe_budget,
)
from tasks.deploy import (
    ANNOTATION_IMAGE,
    CANDIDATE_TAG,
    LABEL_IMAGE_DIGEST,
    LABEL_MODEL_SHA,
    ROLLBACK_TAG,
    Candidate,
    Serving,
    deploy_candidate,
    in_use_versions,
    llm_template,
    mcp_template,
    promote,
    read_serving,
    revision_name,
    roll_back,
    set_invokers,
)
from tasks.errors import ConfigError, DeployConflict, RevisionNotReady, SecretError
from tasks.secrets import SecretVersionRef, pin_secret_version
from tests.conftest import local_target_data, write_target

pytestmark = [
    pytest.mark.usefixtures("quiet_run_logger"),
    pytest.mark.skipif(
        not Path("/usr/bin/docker-registry").is_file(),
        reason="needs Debian's docker-registry: apt-get install docker-registry",
    ),
]

BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"
SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40
INVOKER = "refresh-probe@local-project.iam.gserviceaccount.com"
REQUEST_TIMEOUT_SECONDS = 30.0

REVISION_APP = b"""
import http.server, json, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"revision": os.environ.get("K_REVISION")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass

print("revision app starting", flush=True)
address = ("127.0.0.1", int(os.environ["PORT"]))
http.server.ThreadingHTTPServer(address, Handler).serve_forever()
"""

EXITING_APP = b"""
import sys
print("loading weights from /models/model", flush=True)
print("fatal: weights file truncated", file=sys.stderr, flush=True)
sys.exit(4)
"""

STALLING_APP = b"""
import time
print("loading weights, slowly", flush=True)
time.sleep(600)
"""

_ids = itertools.count(1)


@pytest.fixture
def quiet_run_logger() -> Iterator[None]:
    # The tasks run through `.fn`, without a Prefect server, so their run logger
    # has no run to attach to.
    with disable_run_logger():
        yield


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    instance = LocalCloud(tmp_path_factory.mktemp("localcloud"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def config(cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = local_target_data()
    data["target"]["localcloud_state_dir"] = str(cloud.state_dir)
    folder = tmp_path_factory.mktemp("target")
    return load_config(write_target(folder / "target.yaml", data))


@pytest.fixture(scope="module")
def clients(config: RefreshConfig) -> Clients:
    return clients_for(config.target)


def push_app(cloud: LocalCloud, name: str, source: bytes) -> str:
    def auth() -> dict[str, str]:
        return cloud.registry.auth_headers(
            "tests@local-project.iam.gserviceaccount.com"
        )

    with oci.RegistryClient(
        oci.local_endpoint(cloud.registry.address), auth
    ) as registry:
        return oci.append_layers(
            BASE,
            [oci.Layer.from_files({"/app/main.py": source})],
            f"us-central1-docker.pkg.dev/local-project/tests/{name}",
            oci.ConfigChanges(entrypoint=["python3", "/app/main.py"]),
            registry=registry,
        )


@pytest.fixture(scope="module")
def images(cloud: LocalCloud) -> dict[str, str]:
    return {
        "a": push_app(cloud, "revision-a", REVISION_APP),
        # The same app with a comment: another digest, so "which digest serves" is
        # a real question.
        "b": push_app(cloud, "revision-b", REVISION_APP + b"# build b\n"),
        "exits": push_app(cloud, "exits", EXITING_APP),
        "stalls": push_app(cloud, "stalls", STALLING_APP),
    }


def new_settings(config: RefreshConfig) -> McpSettings:
    return config.mcp.model_copy(update={"name": f"deploy-{next(_ids)}"})


def app_template(
    settings: McpSettings, image: str, model_sha: str
) -> run_v2.RevisionTemplate:
    """Return the hardened MCP template running the test app instead of the server."""
    template = mcp_template(settings, image, "local-models/tiny-llama", model_sha, "")
    template.containers[0].command = ["python3", "/app/main.py"]
    template.containers[0].env = [
        env for env in template.containers[0].env if env.name != "HOST"
    ]
    return template


def deploy_and_promote(
    clients: Clients, settings: McpSettings, template: run_v2.RevisionTemplate
) -> Candidate:
    candidate = deploy_candidate.fn(clients, settings, template)
    set_invokers.fn(clients, settings)
    promote.fn(clients, candidate)
    return candidate


def service(clients: Clients, settings: McpSettings) -> run_v2.Service:
    return clients.services.get_service(
        name=f"{clients.location}/services/{settings.name}"
    )


def split(service: run_v2.Service) -> dict[str, int]:
    return {s.revision: s.percent for s in service.traffic_statuses if s.percent}


def tags(service: run_v2.Service) -> dict[str, str]:
    return {s.tag: s.revision for s in service.traffic_statuses if s.tag}


def revision_names(clients: Clients, settings: McpSettings) -> list[str]:
    parent = f"{clients.location}/services/{settings.name}"
    return sorted(
        r.name.rsplit("/", 1)[1]
        for r in clients.revisions.list_revisions(parent=parent)
    )


def answering_revision(cloud: LocalCloud, url: str) -> str:
    token = cloud.tokens.issue_id_token(INVOKER, audience=url)
    response = httpx.get(
        url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    response.raise_for_status()
    revision: str = response.json()["revision"]
    return revision


# --- candidate and promotion --------------------------------------------------------


def test_candidate_gets_zero_percent_and_tag(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    current = service(clients, settings)
    assert split(current) == {first.revision: 100}
    assert tags(current)[CANDIDATE_TAG] == candidate.revision
    assert tags(current)[ROLLBACK_TAG] == first.revision
    assert candidate.previous == first.revision
    assert candidate.tag_url != candidate.service_url


def test_template_only_update_serves_after_promotion(
    cloud: LocalCloud,
    clients: Clients,
    config: RefreshConfig,
    images: dict[str, str],
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    # Traffic pinned to the first revision by name, as after any promotion: an
    # update of the template alone would leave the new revision without traffic.
    assert split(service(clients, settings)) == {first.revision: 100}

    second = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    promote.fn(clients, second)

    current = service(clients, settings)
    assert split(current) == {second.revision: 100}
    serving = clients.revisions.get_revision(
        name=f"{current.name}/revisions/{second.revision}"
    )
    assert serving.containers[0].image == images["b"]
    assert answering_revision(cloud, current.uri) == second.revision
    assert current.labels[LABEL_MODEL_SHA] == SHA_B


def test_latest_traffic_pinned_before_update(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    latest = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
    clients.services.update_service(
        service=run_v2.Service(
            name=service(clients, settings).name,
            traffic=[run_v2.TrafficTarget(type_=latest, percent=100)],
        ),
        update_mask={"paths": ["traffic"]},
    ).result(timeout=60)

    deploy_candidate.fn(clients, settings, app_template(settings, images["b"], SHA_B))

    assert split(service(clients, settings)) == {first.revision: 100}


def test_revision_labels_carry_sha_and_digest(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    revision = clients.revisions.get_revision(
        name=f"{candidate.service}/revisions/{candidate.revision}"
    )
    digest = images["a"].rsplit("@sha256:", 1)[1]
    assert revision.labels[LABEL_MODEL_SHA] == SHA_A
    assert revision.labels[LABEL_IMAGE_DIGEST] == f"sha256-{digest}"[:63]
    assert revision.annotations[ANNOTATION_IMAGE] == images["a"]


def test_hardened_service_spec_read_back(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    current = service(clients, settings)
    revision = clients.revisions.get_revision(
        name=f"{candidate.service}/revisions/{candidate.revision}"
    )
    internal = run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY
    gen2 = run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2
    all_traffic = run_v2.VpcAccess.VpcEgress.ALL_TRAFFIC
    assert current.ingress == internal
    assert current.invoker_iam_disabled is False
    assert revision.service_account == settings.service_account
    assert revision.execution_environment == gen2
    assert revision.vpc_access.egress == all_traffic
    assert len(revision.vpc_access.network_interfaces) == 1
    assert revision.scaling.max_instance_count == settings.max_instances
    assert revision.scaling.min_instance_count == 0


def test_invokers_set_exactly(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    deploy_candidate.fn(clients, settings, app_template(settings, images["a"], SHA_A))
    name = service(clients, settings).name
    stray = "serviceAccount:stray@local-project.iam.gserviceaccount.com"
    policy = clients.services.get_iam_policy(request={"resource": name})
    policy.bindings.add(role="roles/run.invoker", members=[stray])
    clients.services.set_iam_policy(request={"resource": name, "policy": policy})

    set_invokers.fn(clients, settings)

    policy = clients.services.get_iam_policy(request={"resource": name})
    invokers = [b for b in policy.bindings if b.role == "roles/run.invoker"]
    assert len(invokers) == 1
    assert sorted(invokers[0].members) == sorted(settings.invokers)


def test_invoke_roles_outside_config_removed(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    deploy_candidate.fn(clients, settings, app_template(settings, images["a"], SHA_A))
    name = service(clients, settings).name
    invoker = settings.invokers[0]
    outsider = "user:attacker@example.com"
    reader = "group:readers@example.com"
    policy = clients.services.get_iam_policy(request={"resource": name})
    policy.bindings.add(role="roles/run.admin", members=[outsider, invoker])
    policy.bindings.add(role="roles/owner", members=[outsider])
    policy.bindings.add(role="roles/run.viewer", members=[reader, outsider])
    clients.services.set_iam_policy(request={"resource": name, "policy": policy})

    set_invokers.fn(clients, settings)

    policy = clients.services.get_iam_policy(request={"resource": name})
    members = {b.role: sorted(b.members) for b in policy.bindings}
    assert members["roles/run.admin"] == [invoker]
    assert "roles/owner" not in members
    assert members["roles/run.viewer"] == sorted([reader, outsider])
    assert members["roles/run.invoker"] == sorted(settings.invokers)


# --- revision names ---------------------------------------------------------------


def test_same_spec_reuses_revision(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    first = deploy_candidate.fn(clients, settings, template)
    again = deploy_candidate.fn(clients, settings, template)
    assert again.revision == first.revision
    assert again.created is False
    assert revision_names(clients, settings) == [first.revision]


def test_read_back_template_gets_new_name(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    read_back = run_v2.RevisionTemplate(service(clients, settings).template)
    assert read_back.revision == first.revision
    read_back.containers[0].env.append(run_v2.EnvVar(name="LOG_LEVEL", value="debug"))

    second = deploy_candidate.fn(clients, settings, read_back)

    assert second.revision != first.revision
    assert second.created is True
    assert sorted(revision_names(clients, settings)) == sorted(
        [first.revision, second.revision]
    )


def test_reused_name_with_new_spec_is_conflict(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    deploy_and_promote(clients, settings, app_template(settings, images["a"], SHA_A))
    current = service(clients, settings)
    read_back = run_v2.RevisionTemplate(current.template)
    read_back.containers[0].env.append(run_v2.EnvVar(name="LOG_LEVEL", value="debug"))
    with pytest.raises(gexc.AlreadyExists, match="already exists"):
        clients.services.update_service(
            service=run_v2.Service(name=current.name, template=read_back)
        )


def test_foreign_revision_with_our_name_is_conflict(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    deploy_and_promote(clients, settings, app_template(settings, images["a"], SHA_A))
    ours = app_template(settings, images["b"], SHA_B)
    # Someone else deploys another spec under the name our spec will get.
    foreign = app_template(settings, images["a"], SHA_B)
    foreign.revision = revision_name(settings.name, ours)
    foreign.annotations.pop("model-refresh/spec-digest", None)
    clients.services.update_service(
        service=run_v2.Service(name=service(clients, settings).name, template=foreign)
    ).result(timeout=60)
    before = service(clients, settings)

    with pytest.raises(DeployConflict, match="already exists with another spec"):
        deploy_candidate.fn(clients, settings, ours)

    after = service(clients, settings)
    assert after.generation == before.generation


# --- secrets ----------------------------------------------------------------------


def make_secret(clients: Clients, secret_id: str, states: dict[int, str]) -> str:
    """Create a secret whose versions 1..N end in the given states."""
    parent = f"projects/{clients.target.project}"
    secret = clients.secrets.create_secret(
        parent=parent,
        secret_id=secret_id,
        secret=secretmanager_v1.Secret(
            replication={"automatic": {}},
        ),
    )
    for number in sorted(states):
        clients.secrets.add_secret_version(
            parent=secret.name,
            payload=secretmanager_v1.SecretPayload(data=f"key-{number}".encode()),
        )
    for number, state in states.items():
        version = f"{secret.name}/versions/{number}"
        if state == "disabled":
            clients.secrets.disable_secret_version(request={"name": version})
        elif state == "destroyed":
            clients.secrets.destroy_secret_version(request={"name": version})
    return secret.name


def test_pins_newest_enabled_version(clients: Clients) -> None:
    make_secret(
        clients,
        "pin-case",
        {1: "destroyed", 2: "disabled", 3: "enabled", 4: "destroyed"},
    )
    ref = pin_secret_version.fn(clients, "pin-case")
    assert ref.version == "3"


def test_llm_template_pins_version_number(config: RefreshConfig) -> None:
    key = SecretVersionRef(
        "pin-case", "3", "projects/local-project/secrets/pin-case/versions/3"
    )
    template = llm_template(
        config.llm, "img@sha256:" + "0" * 64, key, SHA_A, "127.0.0.1"
    )
    refs = [
        env.value_source.secret_key_ref
        for container in template.containers
        for env in container.env
        if env.value_source.secret_key_ref.secret
    ]
    assert [(ref.secret, ref.version) for ref in refs] == [("pin-case", "3")]


def test_deploy_pins_enabled_version(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    make_secret(
        clients,
        "deploy-pin",
        {1: "destroyed", 2: "disabled", 3: "enabled", 4: "destroyed"},
    )
    ref = pin_secret_version.fn(clients, "deploy-pin")
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    template.containers[0].env.append(secret_env("deploy-pin", ref.version))

    candidate = deploy_candidate.fn(clients, settings, template)

    revision = clients.revisions.get_revision(
        name=f"{candidate.service}/revisions/{candidate.revision}"
    )
    versions = [
        env.value_source.secret_key_ref.version
        for env in revision.containers[0].env
        if env.value_source.secret_key_ref.secret
    ]
    assert versions == ["3"]


def secret_env(secret_id: str, version: str) -> run_v2.EnvVar:
    return run_v2.EnvVar(
        name="API_KEY",
        value_source=run_v2.EnvVarSource(
            secret_key_ref=run_v2.SecretKeySelector(secret=secret_id, version=version)
        ),
    )


def test_no_enabled_version_fails_naming_secret(clients: Clients) -> None:
    make_secret(clients, "all-gone", {1: "destroyed", 2: "disabled"})
    with pytest.raises(SecretError, match="secrets/all-gone has no enabled version"):
        pin_secret_version.fn(clients, "all-gone")


@pytest.mark.parametrize("version", ["latest", "2", "1"])
def test_unusable_version_fails_before_deploy(
    clients: Clients, config: RefreshConfig, images: dict[str, str], version: str
) -> None:
    if not _secret_exists(clients, "unusable"):
        make_secret(clients, "unusable", {1: "destroyed", 2: "disabled"})
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    template.containers[0].env.append(secret_env("unusable", version))

    with pytest.raises(SecretError, match="secrets/unusable"):
        deploy_candidate.fn(clients, settings, template)

    with pytest.raises(gexc.NotFound):
        service(clients, settings)


def _secret_exists(clients: Clients, secret_id: str) -> bool:
    try:
        clients.secrets.get_secret(
            name=f"projects/{clients.target.project}/secrets/{secret_id}"
        )
    except gexc.NotFound:
        return False
    return True


# --- startup probe budget and GPU settings ------------------------------------------

GIB = 2**30


def gpu_settings(config: RefreshConfig, **fields: Any) -> LlmSettings:
    # With the guard's 1 vCPU and 512Mi, the instance gets 8 vCPU and 30.5 GiB.
    values: dict[str, Any] = {
        "cpu": "7",
        "memory": "30Gi",
        "gpu": {"type": "nvidia-l4", "zonal_redundancy": False},
    }
    values.update(fields)
    return LlmSettings.model_validate(config.llm.model_dump() | values)


def test_16_gib_model_probe_covers_6_minutes(config: RefreshConfig) -> None:
    settings = gpu_settings(
        config, model_load_mib_per_second=16 * 1024 / 360, startup_margin=1.5
    )
    period, threshold = startup_probe_budget(settings, 16 * GIB)
    assert period <= 240
    assert period * threshold >= 360 * 1.5


def test_16_gib_template_accepted_by_cloud_run(
    clients: Clients, config: RefreshConfig
) -> None:
    settings = gpu_settings(
        config,
        name=f"gpu-{next(_ids)}",
        model_load_mib_per_second=16 * 1024 / 360,
    )
    key = SecretVersionRef(
        "pin-case", "3", "projects/local-project/secrets/pin-case/versions/3"
    )
    template = llm_template(
        settings,
        "img@sha256:" + "0" * 64,
        key,
        SHA_A,
        "127.0.0.1",
        model_bytes=16 * GIB,
    )
    engine = next(c for c in template.containers if c.name == "engine")
    probe = engine.startup_probe
    assert probe.period_seconds <= 240
    assert probe.period_seconds * probe.failure_threshold >= 360
    assert engine.resources.cpu_idle is False
    assert template.node_selector.accelerator == "nvidia-l4"
    assert template.gpu_zonal_redundancy_disabled is True
    assert engine.resources.limits["nvidia.com/gpu"] == "1"

    # Cloud Run's own validation (GPU minimums, probe period) accepts the spec.
    operation = clients.services.create_service(
        request={
            "parent": clients.location,
            "service_id": settings.name,
            "service": run_v2.Service(template=template),
            "validate_only": True,
        }
    )
    operation.result(timeout=60)


def test_model_too_slow_to_load_rejected(config: RefreshConfig) -> None:
    with pytest.raises(ValueError, match=r"200.0 GiB model loads in about 4551 s"):
        gpu_settings(config, expected_model_gib=200, model_load_mib_per_second=45)


def test_model_too_slow_at_deploy_rejected(config: RefreshConfig) -> None:
    settings = gpu_settings(config, model_load_mib_per_second=45)
    with pytest.raises(ConfigError, match="over max_startup_seconds 1800"):
        startup_probe_budget(settings, 200 * GIB)


def test_gpu_with_small_cpu_rejected(config: RefreshConfig) -> None:
    with pytest.raises(ValueError, match="at least 4 vCPU"):
        gpu_settings(config, cpu="2")


def test_cpu_over_8_per_instance_rejected(config: RefreshConfig) -> None:
    with pytest.raises(ValueError, match="9 vCPU per instance"):
        gpu_settings(config, cpu="8")


def test_gpu_with_small_memory_rejected(config: RefreshConfig) -> None:
    with pytest.raises(ValueError, match="at least 16Gi"):
        gpu_settings(config, memory="8Gi")


def test_probe_period_over_240_rejected(config: RefreshConfig) -> None:
    with pytest.raises(ValueError, match="startup_probe_period_seconds"):
        gpu_settings(config, startup_probe_period_seconds=300)


# --- rollback ---------------------------------------------------------------------


def test_roll_back_keeps_previous_serving(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )

    roll_back.fn(clients, candidate)

    current = service(clients, settings)
    assert split(current) == {first.revision: 100}
    assert CANDIDATE_TAG not in tags(current)
    assert answering_revision(cloud, current.uri) == first.revision
    serving = read_serving.fn(clients, settings.name)
    assert serving is not None
    assert serving.model_sha == SHA_A


def test_roll_back_restores_rollback_tag(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    second = deploy_and_promote(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["a"], SHA_C)
    )

    outcome = roll_back.fn(clients, candidate)

    current = service(clients, settings)
    assert outcome == f"restored {second.revision} 100%"
    assert split(current) == {second.revision: 100}
    assert tags(current).get(ROLLBACK_TAG) == first.revision
    assert CANDIDATE_TAG not in tags(current)


def test_failed_forced_redeploy_keeps_serving(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    deploy_and_promote(clients, settings, app_template(settings, images["a"], SHA_A))
    promoted = deploy_and_promote(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    before = service(clients, settings)
    # The same spec again, as `--force` deploys it: the serving revision is reused.
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )

    outcome = roll_back.fn(clients, candidate)

    current = service(clients, settings)
    assert candidate.revision == promoted.revision
    assert outcome == f"kept {promoted.revision}"
    assert split(current) == {promoted.revision: 100}
    assert tags(current).get(ROLLBACK_TAG) == tags(before)[ROLLBACK_TAG]


def test_failed_first_deploy_deletes_service(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    first = deploy_candidate.fn(clients, settings, template)
    # A rerun after a crash finds the unchecked revision serving all traffic.
    rerun = deploy_candidate.fn(clients, settings, template)

    outcome = roll_back.fn(clients, rerun)

    assert first.created
    assert rerun.revision == first.revision
    assert outcome == f"deleted {rerun.service}"
    with pytest.raises(gexc.NotFound):
        service(clients, settings)
    assert read_serving.fn(clients, settings.name) is None
    # A second rollback of the same candidate finds nothing left to delete.
    assert roll_back.fn(clients, rerun) == outcome


@pytest.mark.parametrize(
    ("promoted_sha", "revision_sha", "reusable"),
    [
        (SHA_A, SHA_A, True),  # promoted by an earlier attempt of this refresh
        (None, SHA_A, True),  # first deploy of this refresh, crashed before checks
        (SHA_B, SHA_B, False),  # another model serves: its key stays in use
        (None, SHA_B, False),
    ],
)
def test_in_use_versions_of_serving_revision(
    promoted_sha: str | None, revision_sha: str, reusable: bool
) -> None:
    key = "projects/p/secrets/llm-api-key/versions/3"
    rollback_key = "projects/p/secrets/llm-api-key/versions/2"
    serving = Serving(
        service="projects/p/locations/r/services/llm",
        revision="llm-1",
        model_sha=promoted_sha,
        uri="http://127.0.0.1:1",
        secret_versions=frozenset({key, rollback_key}),
        serving_versions=frozenset({key}),
        revision_sha=revision_sha,
    )

    in_use = in_use_versions(serving, None, model_sha=SHA_A)

    assert (key not in in_use) == reusable
    assert rollback_key in in_use


LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST


def test_hand_made_service_survives_rollback(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    template.revision = ""
    # Created by hand, as `gcloud run deploy` does: no labels, LATEST traffic.
    clients.services.create_service(
        parent=clients.location,
        service=run_v2.Service(template=template),
        service_id=settings.name,
    ).result(timeout=120)
    # Its LATEST entry names no revision, so the rollback pins the one it served.
    hand_made = service(clients, settings).latest_ready_revision.rsplit("/", 1)[-1]

    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    outcome = roll_back.fn(clients, candidate)

    current = service(clients, settings)
    assert outcome.startswith("restored ")
    assert CANDIDATE_TAG not in tags(current)
    assert split(current) == {hand_made: 100}


def test_latest_traffic_restored_on_rollback(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    clients.services.update_service(
        service=run_v2.Service(
            name=service(clients, settings).name,
            traffic=[run_v2.TrafficTarget(type_=LATEST, percent=100)],
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["traffic"]),
    ).result(timeout=120)

    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )
    outcome = roll_back.fn(clients, candidate)

    current = service(clients, settings)
    assert outcome == f"restored {first.revision} 100%"
    assert split(current) == {first.revision: 100}
    assert CANDIDATE_TAG not in tags(current)


def test_unchecked_revision_not_restored(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    # A first deploy that crashed before its checks: its revision serves unchecked.
    deploy_candidate.fn(clients, settings, app_template(settings, images["a"], SHA_A))
    candidate = deploy_candidate.fn(
        clients, settings, app_template(settings, images["b"], SHA_B)
    )

    outcome = roll_back.fn(clients, candidate)

    assert outcome == f"deleted {candidate.service}"
    with pytest.raises(gexc.NotFound):
        service(clients, settings)


def test_relabelled_promoted_service_kept(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    template = app_template(settings, images["a"], SHA_A)
    promoted = deploy_and_promote(clients, settings, template)
    # Labels replaced by hand or by Terraform; the revision still passed the gate.
    clients.services.update_service(
        service=run_v2.Service(name=promoted.service, labels={"team": "ml"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
    ).result(timeout=120)

    candidate = deploy_candidate.fn(clients, settings, template)
    outcome = roll_back.fn(clients, candidate)

    assert outcome == f"kept {promoted.revision}"
    assert split(service(clients, settings)) == {promoted.revision: 100}


def test_exiting_revision_error_names_cause(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    broken = app_template(settings, images["exits"], SHA_B)

    with pytest.raises(RevisionNotReady) as caught:
        deploy_candidate.fn(clients, settings, broken)

    message = str(caught.value)
    assert "exited before its startup probe passed" in message
    assert "code 4" in message
    assert "fatal: weights file truncated" in message
    current = service(clients, settings)
    assert split(current) == {first.revision: 100}
    assert answering_revision(cloud, current.uri) == first.revision


def test_stalling_revision_error_says_timed_out(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    stalled = app_template(settings, images["stalls"], SHA_B)
    stalled.containers[0].startup_probe.period_seconds = 1
    stalled.containers[0].startup_probe.failure_threshold = 2

    with pytest.raises(RevisionNotReady) as caught:
        deploy_candidate.fn(clients, settings, stalled)

    message = str(caught.value)
    assert "timed out loading" in message
    assert "loading weights, slowly" in message
    current = service(clients, settings)
    assert split(current) == {first.revision: 100}
    assert answering_revision(cloud, current.uri) == first.revision


def test_failed_revision_rerun_fails_again_fast(
    clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    first = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    broken = app_template(settings, images["exits"], SHA_B)
    with pytest.raises(RevisionNotReady):
        deploy_candidate.fn(clients, settings, broken)
    names = revision_names(clients, settings)

    with pytest.raises(RevisionNotReady, match="exited"):
        deploy_candidate.fn(clients, settings, broken)

    assert revision_names(clients, settings) == names
    assert split(service(clients, settings)) == {first.revision: 100}


# --- ingress ------------------------------------------------------------------------

# A loopback source address outside localcloud's "VPC": it stands for the internet.
OUTSIDE_ADDRESS = "127.0.0.2"


def call_from(cloud: LocalCloud, url: str, source: str) -> int:
    token = cloud.tokens.issue_id_token(INVOKER, audience=url)
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        response = client.get(url, headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def test_internal_ingress_rejects_outside_caller(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    candidate = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    assert call_from(cloud, candidate.service_url, OUTSIDE_ADDRESS) == 404
    assert call_from(cloud, candidate.tag_url, OUTSIDE_ADDRESS) == 404
    assert call_from(cloud, candidate.service_url, "127.0.0.1") == 200


def test_all_ingress_admits_outside_caller(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig, images: dict[str, str]
) -> None:
    settings = new_settings(config)
    candidate = deploy_and_promote(
        clients, settings, app_template(settings, images["a"], SHA_A)
    )
    everyone = run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
    clients.services.update_service(
        service=run_v2.Service(name=candidate.service, ingress=everyone),
        update_mask={"paths": ["ingress"]},
    ).result(timeout=60)
    assert call_from(cloud, candidate.service_url, OUTSIDE_ADDRESS) == 200
