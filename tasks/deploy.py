"""Deploy the hardened services as candidate revisions, then promote or roll back.

A candidate is a new revision with 0% of the traffic under the `candidate` tag, so it
has its own URL for the checks while the previous revision keeps serving. Revision
names are derived from the model sha, the image digest and the key version, so a rerun
after a crash finds the revision it already created instead of creating another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.protobuf import field_mask_pb2
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients
from tasks.config import LlmSettings, McpSettings, RefreshConfig, ServiceSettings
from tasks.errors import DeployError
from tasks.secrets import SecretVersionRef

CANDIDATE_TAG = "candidate"
ROLLBACK_TAG = "rollback"
INGRESS_PORT = 8080
MODEL_DIR = "/models/model"
LABEL_MODEL_SHA = "model-sha"
LABEL_MANAGED_BY = "managed-by"
INVOKER_ROLE = "roles/run.invoker"
OPERATION_TIMEOUT_SECONDS = 900

_INGRESS = {
    "internal": run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
    "internal-and-cloud-load-balancing": (
        run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER
    ),
}
_REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION


@dataclass(frozen=True)
class Serving:
    """What a service serves now: the revision holding all traffic and its model sha."""

    service: str
    revision: str | None
    model_sha: str | None
    uri: str
    secret_versions: frozenset[
        str
    ]  # full version names referenced by serving revisions


@dataclass(frozen=True)
class Candidate:
    service: str  # full resource name
    revision: str  # short revision name
    tag_url: str
    service_url: str
    previous: str | None  # revision that served 100% before this deploy
    created: bool  # False when the revision already existed (rerun after a crash)


def service_name(clients: Clients, service_id: str) -> str:
    return f"{clients.location}/services/{service_id}"


def revision_name(
    service_id: str, model_sha: str, image: str, key_version: str = ""
) -> str:
    """Name a revision after what it runs, so the same inputs give the same name."""
    digest = image.rsplit("@sha256:", 1)[-1]
    suffix = hashlib.sha256(f"{image}|{key_version}".encode()).hexdigest()[:6]
    name = f"{service_id}-{model_sha[:7]}-{digest[:7]}-{suffix}"
    return name[:63].rstrip("-")


@task(cache_policy=NO_CACHE)
def read_serving(clients: Clients, service_id: str) -> Serving | None:
    """Return what the service serves now, or None when it does not exist yet."""
    name = service_name(clients, service_id)
    try:
        service = clients.services.get_service(name=name)
    except gexc.NotFound:
        return None

    revision = _full_traffic_revision(service)
    model_sha = None
    versions: set[str] = set()
    for status in service.traffic_statuses:
        if not status.revision or (status.percent == 0 and not status.tag):
            continue
        try:
            rev = clients.revisions.get_revision(
                name=f"{name}/revisions/{status.revision}"
            )
        except gexc.NotFound:
            continue
        versions.update(_secret_versions(clients, rev.containers))
        # A sha counts as serving only once a promotion recorded it on the service,
        # so a first deploy that failed its checks is retried, not skipped.
        promoted = service.labels.get(LABEL_MODEL_SHA)
        if status.revision == revision and rev.labels.get(LABEL_MODEL_SHA) == promoted:
            model_sha = promoted
    return Serving(name, revision, model_sha, service.uri, frozenset(versions))


def _full_traffic_revision(service: run_v2.Service) -> str | None:
    for status in service.traffic_statuses:
        if status.percent == 100:
            return status.revision or service.latest_ready_revision.rsplit("/", 1)[-1]
    return None


def _secret_versions(
    clients: Clients, containers: Iterable[run_v2.Container]
) -> set[str]:
    versions = set()
    for container in containers:
        for env in container.env:
            ref = env.value_source.secret_key_ref
            if ref.secret:
                secret = ref.secret
                if not secret.startswith("projects/"):
                    secret = f"projects/{clients.target.project}/secrets/{secret}"
                versions.add(f"{secret}/versions/{ref.version}")
    return versions


def _vpc_access(settings: ServiceSettings) -> run_v2.VpcAccess:
    egress = (
        run_v2.VpcAccess.VpcEgress.PRIVATE_RANGES_ONLY
        if settings.allow_external_egress
        else run_v2.VpcAccess.VpcEgress.ALL_TRAFFIC
    )
    return run_v2.VpcAccess(
        network_interfaces=[
            run_v2.VpcAccess.NetworkInterface(
                network=settings.network, subnetwork=settings.subnetwork
            )
        ],
        egress=egress,
    )


def _base_template(
    settings: ServiceSettings, revision: str, model_sha: str
) -> run_v2.RevisionTemplate:
    return run_v2.RevisionTemplate(
        revision=revision,
        labels={LABEL_MODEL_SHA: model_sha, LABEL_MANAGED_BY: "model-refresh"},
        service_account=settings.service_account,
        scaling=run_v2.RevisionScaling(
            min_instance_count=settings.min_instances,
            max_instance_count=settings.max_instances,
        ),
        vpc_access=_vpc_access(settings),
        execution_environment=run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2,
        timeout="300s",
    )


def llm_template(
    settings: LlmSettings,
    image: str,
    key: SecretVersionRef,
    model_sha: str,
    listen_host: str,
) -> run_v2.RevisionTemplate:
    """Build the LLM revision: the guard takes requests, the engine sidecar serves."""
    template = _base_template(
        settings, revision_name(settings.name, model_sha, image, key.version), model_sha
    )
    engine_url = f"http://127.0.0.1:{settings.engine_port}"
    guard = run_v2.Container(
        name="guard",
        image=image,
        command=["python3", "-m", "containers.llm.guard"],
        ports=[run_v2.ContainerPort(name="http1", container_port=INGRESS_PORT)],
        env=[
            run_v2.EnvVar(name="HOST", value=listen_host),
            run_v2.EnvVar(name="ENGINE_URL", value=engine_url),
            run_v2.EnvVar(
                name="MAX_REQUEST_BYTES", value=str(settings.max_request_bytes)
            ),
            run_v2.EnvVar(name="MAX_TOKENS_CAP", value=str(settings.max_tokens_cap)),
        ],
        resources=run_v2.ResourceRequirements(
            limits={"cpu": settings.guard_cpu, "memory": settings.guard_memory}
        ),
        depends_on=["engine"],
    )
    probe_period = 10
    engine_limits = {"cpu": settings.cpu, "memory": settings.memory}
    if settings.gpu is not None:
        engine_limits["nvidia.com/gpu"] = str(settings.gpu.count)
    engine = run_v2.Container(
        name="engine",
        image=image,
        command=settings.engine_command,
        env=[
            run_v2.EnvVar(name="MODEL_DIR", value=MODEL_DIR),
            run_v2.EnvVar(name="SERVED_MODEL_NAME", value=settings.served_model_name),
            run_v2.EnvVar(
                name="LLM_API_KEY",
                value_source=run_v2.EnvVarSource(
                    secret_key_ref=run_v2.SecretKeySelector(
                        secret=key.secret, version=key.version
                    )
                ),
            ),
        ],
        resources=run_v2.ResourceRequirements(limits=engine_limits, cpu_idle=False),
        startup_probe=run_v2.Probe(
            http_get=run_v2.HTTPGetAction(path="/health", port=settings.engine_port),
            period_seconds=probe_period,
            timeout_seconds=5,
            failure_threshold=max(1, settings.startup_timeout_seconds // probe_period),
        ),
    )
    template.containers = [guard, engine]
    if settings.gpu is not None:
        template.node_selector = run_v2.NodeSelector(accelerator=settings.gpu.type)
        template.gpu_zonal_redundancy_disabled = not settings.gpu.zonal_redundancy
    return template


def mcp_template(
    settings: McpSettings,
    image: str,
    model_repo: str,
    model_sha: str,
    listen_host: str,
) -> run_v2.RevisionTemplate:
    template = _base_template(
        settings, revision_name(settings.name, model_sha, image), model_sha
    )
    template.containers = [
        run_v2.Container(
            name="mcp",
            image=image,
            command=["python3", "-m", "containers.mcp.server"],
            ports=[run_v2.ContainerPort(name="http1", container_port=INGRESS_PORT)],
            env=[
                run_v2.EnvVar(name="HOST", value=listen_host),
                run_v2.EnvVar(
                    name="MCP_TOOL_ALLOWLIST", value=",".join(settings.tool_allowlist)
                ),
                run_v2.EnvVar(name="MODEL_ID", value=model_repo),
                run_v2.EnvVar(name="MODEL_SHA", value=model_sha),
            ],
            resources=run_v2.ResourceRequirements(
                limits={"cpu": settings.cpu, "memory": settings.memory}
            ),
            startup_probe=run_v2.Probe(
                tcp_socket=run_v2.TCPSocketAction(port=INGRESS_PORT),
                period_seconds=2,
                failure_threshold=30,
            ),
        )
    ]
    return template


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def deploy_candidate(
    clients: Clients, settings: ServiceSettings, template: run_v2.RevisionTemplate
) -> Candidate:
    """Create or update the service so `template` runs under the candidate tag at 0%."""
    logger = get_run_logger()
    name = service_name(clients, settings.name)
    revision = template.revision
    try:
        current = clients.services.get_service(name=name)
    except gexc.NotFound:
        current = None

    if current is None:
        # A first deploy has nothing to keep serving: the candidate takes all traffic.
        service = run_v2.Service(
            template=template,
            ingress=_INGRESS[settings.ingress],
            invoker_iam_disabled=False,
            labels={LABEL_MANAGED_BY: "model-refresh"},
            traffic=[
                run_v2.TrafficTarget(
                    type_=_REVISION, revision=revision, percent=100, tag=CANDIDATE_TAG
                )
            ],
        )
        operation = clients.services.create_service(
            parent=clients.location, service=service, service_id=settings.name
        )
        _wait(operation, name, revision)
        logger.info("Created service %s with revision %s", name, revision)
        return _candidate(clients, name, revision, previous=None, created=True)

    previous = _full_traffic_revision(current)
    exists = _revision_exists(clients, name, revision)
    traffic = [
        run_v2.TrafficTarget(
            type_=_REVISION, revision=status.revision, percent=status.percent
        )
        for status in current.traffic_statuses
        if status.percent > 0 and status.revision and status.revision != revision
    ]
    if previous == revision:
        traffic = [
            run_v2.TrafficTarget(type_=_REVISION, revision=revision, percent=100)
        ]
    if not traffic:
        raise DeployError(
            f"{name} routes traffic to no named revision: fix its traffic in the "
            "console"
            "or with `gcloud run services update-traffic` and rerun"
        )
    traffic.append(
        run_v2.TrafficTarget(
            type_=_REVISION, revision=revision, percent=0, tag=CANDIDATE_TAG
        )
    )
    if previous and previous != revision:
        traffic.append(
            run_v2.TrafficTarget(
                type_=_REVISION, revision=previous, percent=0, tag=ROLLBACK_TAG
            )
        )
    if exists:
        # Rerun after a crash: the revision is already there, so only traffic changes.
        # Sending its name back in a template would be rejected as a reused name.
        operation = clients.services.update_service(
            service=run_v2.Service(name=name, traffic=_merge_traffic(traffic)),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic"]),
        )
    else:
        updated = run_v2.Service(
            name=name,
            template=template,
            ingress=_INGRESS[settings.ingress],
            invoker_iam_disabled=False,
            labels=dict(current.labels) | {LABEL_MANAGED_BY: "model-refresh"},
            traffic=_merge_traffic(traffic),
        )
        operation = clients.services.update_service(service=updated)
    _wait(operation, name, revision)
    logger.info(
        "%s revision %s as candidate of %s (previous %s)",
        "Tagged existing" if exists else "Deployed",
        revision,
        name,
        previous,
    )
    return _candidate(clients, name, revision, previous=previous, created=not exists)


def _merge_traffic(targets: list[run_v2.TrafficTarget]) -> list[run_v2.TrafficTarget]:
    """Keep one percent-carrying entry per revision; tags go on 0% entries."""
    merged: dict[str, int] = {}
    tagged = []
    for target in targets:
        if target.tag:
            tagged.append(target)
        else:
            merged[target.revision] = merged.get(target.revision, 0) + target.percent
    plain = [
        run_v2.TrafficTarget(type_=_REVISION, revision=rev, percent=pct)
        for rev, pct in merged.items()
        if pct > 0
    ]
    return plain + tagged


def _revision_exists(clients: Clients, service: str, revision: str) -> bool:
    try:
        clients.revisions.get_revision(name=f"{service}/revisions/{revision}")
    except gexc.NotFound:
        return False
    return True


def _wait(operation: object, service: str, revision: str) -> None:
    try:
        operation.result(timeout=OPERATION_TIMEOUT_SECONDS)  # type: ignore[attr-defined]
    except gexc.GoogleAPICallError as exc:
        raise DeployError(
            f"revision {revision} of {service} did not become ready: {exc.message}"
        ) from exc


def _candidate(
    clients: Clients, name: str, revision: str, previous: str | None, created: bool
) -> Candidate:
    service = clients.services.get_service(name=name)
    tag_url = next(
        (s.uri for s in service.traffic_statuses if s.tag == CANDIDATE_TAG and s.uri),
        "",
    )
    if not tag_url:
        raise DeployError(
            f"{name} has no URL for tag {CANDIDATE_TAG!r} after the deploy"
        )
    return Candidate(name, revision, tag_url, service.uri, previous, created)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def promote(clients: Clients, candidate: Candidate) -> None:
    """Send all traffic to the candidate; tag the previous revision `rollback`."""
    traffic = [
        run_v2.TrafficTarget(type_=_REVISION, revision=candidate.revision, percent=100)
    ]
    if candidate.previous and candidate.previous != candidate.revision:
        traffic.append(
            run_v2.TrafficTarget(
                type_=_REVISION,
                revision=candidate.previous,
                percent=0,
                tag=ROLLBACK_TAG,
            )
        )
    revision = clients.revisions.get_revision(
        name=f"{candidate.service}/revisions/{candidate.revision}"
    )
    labels = dict(clients.services.get_service(name=candidate.service).labels)
    labels[LABEL_MODEL_SHA] = revision.labels[LABEL_MODEL_SHA]
    _set_traffic(clients, candidate.service, traffic, labels)
    get_run_logger().info(
        "Promoted %s to 100%% of %s", candidate.revision, candidate.service
    )


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def roll_back(clients: Clients, candidate: Candidate) -> None:
    """Leave the previous revision serving 100% and drop the candidate's tag."""
    logger = get_run_logger()
    if not candidate.previous or candidate.previous == candidate.revision:
        logger.warning(
            "%s has no earlier revision to roll back to; %s keeps its traffic",
            candidate.service,
            candidate.revision,
        )
        return
    _set_traffic(
        clients,
        candidate.service,
        [
            run_v2.TrafficTarget(
                type_=_REVISION, revision=candidate.previous, percent=100
            )
        ],
    )
    logger.warning(
        "Rolled back %s: %s serves 100%%, candidate %s has no traffic",
        candidate.service,
        candidate.previous,
        candidate.revision,
    )


def _set_traffic(
    clients: Clients,
    name: str,
    traffic: list[run_v2.TrafficTarget],
    labels: dict[str, str] | None = None,
) -> None:
    """Change traffic (and labels) only; a masked update never creates a revision."""
    paths = ["traffic"] if labels is None else ["traffic", "labels"]
    operation = clients.services.update_service(
        service=run_v2.Service(name=name, traffic=traffic, labels=labels or {}),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    _wait(operation, name, traffic[0].revision)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def set_invokers(clients: Clients, settings: ServiceSettings) -> None:
    """Make roles/run.invoker hold exactly the configured members."""
    logger = get_run_logger()
    name = service_name(clients, settings.name)
    policy = clients.services.get_iam_policy(request={"resource": name})
    wanted = sorted(settings.invokers)
    current = sorted(
        m for b in policy.bindings if b.role == INVOKER_ROLE for m in b.members
    )
    if (
        current == wanted
        and len([b for b in policy.bindings if b.role == INVOKER_ROLE]) == 1
    ):
        logger.info("Invokers of %s already match the config", name)
        return

    bindings = [b for b in policy.bindings if b.role != INVOKER_ROLE]
    bindings.append(policy_pb2.Binding(role=INVOKER_ROLE, members=wanted))
    new_policy = policy_pb2.Policy(
        bindings=bindings, etag=policy.etag, version=policy.version
    )
    clients.services.set_iam_policy(request={"resource": name, "policy": new_policy})
    logger.info("Set invokers of %s to %s", name, ", ".join(wanted))


def refresh_is_current(serving: Serving | None, model_sha: str) -> bool:
    return (
        serving is not None
        and serving.model_sha == model_sha
        and serving.revision is not None
    )


def in_use_versions(*servings: Serving | None) -> set[str]:
    return {v for serving in servings if serving for v in serving.secret_versions}


def describe_config(config: RefreshConfig) -> dict[str, str]:
    return {"llm": config.llm.name, "mcp": config.mcp.name}
