"""Cloud Run Admin API v2 (`google.cloud.run.v2.Services`, `Revisions`) for localcloud.

Services and revisions live in the store; the runtime runs them. Create and Update
return long-running operations that complete when the new revision is Ready (its
instance started and its startup probe passed) or fail with the revision's condition
message. Validation follows the limits Cloud Run documents, so a spec that Cloud Run
would reject fails here first, with INVALID_ARGUMENT and the field path.

Every change is written in an order that `RunApi.recover` can finish after a crash:
a new revision before the service generation that names it, and the operation last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import json
import logging
import re
import secrets
import string
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.longrunning import operations_pb2

from localcloud.api.resources import (
    apply_update_mask,
    from_document,
    now_timestamp,
    paginate,
    to_document,
)
from localcloud.rpc import (
    RpcError,
    aborted,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    service_handler,
)
from localcloud.runtime.instance import DEFAULT_PROBE_PERIOD_SECONDS, StartupError
from localcloud.runtime.runtime import RuntimeStopped

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

SERVICES_KIND = "run.services"
REVISIONS_KIND = "run.revisions"
POLICIES_KIND = "run.iam-policies"

LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
BY_REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
SUCCEEDED = run_v2.Condition.State.CONDITION_SUCCEEDED
FAILED = run_v2.Condition.State.CONDITION_FAILED
RECONCILING = run_v2.Condition.State.CONDITION_RECONCILING
SERVICE_TYPE_URL = "type.googleapis.com/google.cloud.run.v2.Service"

# How long Create and Update wait for a quick deploy before returning the operation
# unfinished; clients then poll it with GetOperation.
INLINE_WAIT_SECONDS = 3.0

SERVICE_ID = re.compile(r"^[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?$")
REVISION_ID = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
TAG = re.compile(r"^[a-z](?:[-a-z0-9]*[a-z0-9])?$")
LOCATION_PARENT = re.compile(r"^projects/([^/]+)/locations/([^/]+)$")
SERVICE_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/services/([^/]+)$")
REVISION_NAME = re.compile(
    r"^projects/([^/]+)/locations/([^/]+)/services/([^/]+)/revisions/([^/]+)$"
)
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

# Cloud Run sets these itself and rejects them in a container's env.
RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"})
RESERVED_KEY_PREFIXES = (
    "run.googleapis.com",
    "cloud.googleapis.com",
    "serving.knative.dev",
    "autoscaling.knative.dev",
)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_ACCELERATORS = frozenset({"nvidia-l4", "nvidia-rtx-pro-6000"})
GPU_MIN_CPU = 4.0
GPU_MIN_MEMORY = 16 * 2**30
MAX_CPU = 8.0
MIN_MEMORY = 128 * 2**20
MAX_STARTUP_PROBE_SECONDS = 240
MAX_REQUEST_TIMEOUT = timedelta(hours=1)
MAX_CONCURRENCY = 1000
DEFAULT_CPU = "1000m"
DEFAULT_MEMORY = "512Mi"
DEFAULT_CONCURRENCY = 80
DEFAULT_MAX_INSTANCES = 100
DEFAULT_TIMEOUT = timedelta(seconds=300)

# vCPU -> (minimum, maximum) memory that Cloud Run allows with it.
MEMORY_BOUNDS = {
    1.0: (0, 4 * 2**30),
    2.0: (0, 8 * 2**30),
    4.0: (2 * 2**30, 16 * 2**30),
    6.0: (4 * 2**30, 24 * 2**30),
    8.0: (4 * 2**30, 32 * 2**30),
}

IAM_ROLES = frozenset(
    {
        "roles/run.invoker",
        "roles/run.admin",
        "roles/run.developer",
        "roles/run.viewer",
        "roles/viewer",
        "roles/editor",
        "roles/owner",
    }
)
MEMBER_PREFIXES = ("user:", "serviceAccount:", "group:", "domain:", "deleted:")
PRINCIPAL_PREFIXES = ("principal://", "principalSet://")
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})
# The etag Google returns for a resource whose policy was never set.
EMPTY_POLICY_ETAG = b"ACAB"
RUN_PERMISSIONS = frozenset(
    {
        "run.routes.invoke",
        "run.services.get",
        "run.services.update",
        "run.services.delete",
        "run.services.getIamPolicy",
        "run.services.setIamPolicy",
        "run.revisions.get",
        "run.revisions.list",
        "run.revisions.delete",
    }
)

_MEMORY_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([A-Za-z]*)$")


# ------------------------------------------------------------------------------------
# Helpers shared with the runtime and the front door


def load_service(cloud: LocalCloud, name: str) -> run_v2.Service | None:
    document = cloud.store.get(SERVICES_KIND, name)
    return from_document(run_v2.Service, document["service"]) if document else None


def list_all_services(cloud: LocalCloud) -> list[run_v2.Service]:
    return [
        from_document(run_v2.Service, document["service"])
        for _, document in cloud.store.list(SERVICES_KIND)
    ]


def load_revision(cloud: LocalCloud, name: str) -> run_v2.Revision | None:
    document = cloud.store.get(REVISIONS_KIND, name)
    return from_document(run_v2.Revision, document["revision"]) if document else None


def members_with_roles(
    cloud: LocalCloud, service_name: str, roles: Iterable[str]
) -> set[str]:
    """Return every member bound to one of `roles` in the service's IAM policy."""
    document = cloud.store.get(POLICIES_KIND, service_name) or {}
    role_names = set(roles)
    members: set[str] = set()
    for binding in document.get("bindings", []):
        if binding["role"] in role_names:
            members.update(binding["members"])
    return members


# ------------------------------------------------------------------------------------
# Validation


def parse_cpu(value: str, field: str) -> float:
    text = value.strip()
    try:
        cpu = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        invalid_argument(
            f"{field}: CPU {value!r} is invalid; use a number of vCPUs such as '1', "
            "'4' or '1000m'."
        )
    if cpu <= 0:
        invalid_argument(f"{field}: CPU {value!r} must be positive.")
    return cpu


def parse_memory(value: str, field: str) -> int:
    match = _QUANTITY.match(value.strip())
    unit = match.group(2) if match else ""
    if match is None or (unit and unit not in _MEMORY_UNITS):
        invalid_argument(
            f"{field}: memory {value!r} is invalid; use a quantity such as '512Mi' or "
            "'16Gi'."
        )
    return int(float(match.group(1)) * _MEMORY_UNITS.get(unit, 1))


def _check_keys(keys: Iterable[str], field: str) -> None:
    for key in keys:
        if key.split("/", 1)[0].endswith(RESERVED_KEY_PREFIXES):
            invalid_argument(
                f"{field}: key {key!r} uses a namespace reserved by Cloud Run "
                f"({', '.join(RESERVED_KEY_PREFIXES)}); set the matching field of the "
                "v2 API instead."
            )


def validate_service_id(service_id: str) -> None:
    if not SERVICE_ID.match(service_id):
        invalid_argument(
            f"service_id {service_id!r} is invalid: it must begin with a lowercase "
            "letter, contain only lowercase letters, digits and hyphens, not end "
            "with a hyphen, and have at most 49 characters."
        )


def validate_revision_id(revision_id: str, service_id: str) -> None:
    field = "template.revision"
    if not revision_id.startswith(service_id + "-"):
        invalid_argument(
            f"{field}: revision name {revision_id!r} must start with the service name "
            f"followed by a hyphen ({service_id}-...)."
        )
    if not REVISION_ID.match(revision_id):
        invalid_argument(
            f"{field}: revision name {revision_id!r} is invalid: use lowercase "
            "letters, digits and hyphens, start with a letter, end with a letter or "
            "digit, and stay within 63 characters."
        )
    if "latest" in revision_id[len(service_id) + 1 :]:
        invalid_argument(
            f"{field}: revision name {revision_id!r} contains 'latest', which is "
            "reserved; choose another revision suffix."
        )


def validate_template(template: run_v2.RevisionTemplate) -> None:
    """Raise INVALID_ARGUMENT for a revision template that Cloud Run would reject."""
    _check_keys(template.labels, "template.labels")
    _check_keys(template.annotations, "template.annotations")

    containers = list(template.containers)
    if not containers:
        invalid_argument(
            "template.containers: at least one container is required; add a container "
            "with an image."
        )
    if template.volumes:
        raise RpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            "template.volumes: localcloud does not run volumes; pass files in the "
            "image and secrets as environment variables.",
        )

    _validate_container_set(containers)
    for index, container in enumerate(containers):
        _validate_container(container, f"template.containers[{index}]")
    _validate_resources(template)
    _validate_scaling(template)

    if "timeout" in template and template.timeout > MAX_REQUEST_TIMEOUT:
        invalid_argument(
            f"template.timeout: {template.timeout} exceeds Cloud Run's maximum request "
            "timeout of 3600s."
        )
    concurrency = template.max_instance_request_concurrency
    if concurrency < 0 or concurrency > MAX_CONCURRENCY:
        invalid_argument(
            f"template.max_instance_request_concurrency: {concurrency} is out of "
            f"range; use 1 to {MAX_CONCURRENCY}."
        )
    if template.service_account and not EMAIL.match(template.service_account):
        invalid_argument(
            f"template.service_account: {template.service_account!r} is not a service "
            "account email such as NAME@PROJECT.iam.gserviceaccount.com."
        )


def _validate_container_set(containers: list[run_v2.Container]) -> None:
    names = [container.name for container in containers if container.name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        invalid_argument(
            f"template.containers: container names must be unique; {duplicates} "
            "appear more than once."
        )
    with_ports = [
        index for index, container in enumerate(containers) if container.ports
    ]
    if len(with_ports) > 1:
        invalid_argument(
            f"template.containers: containers {with_ports} all declare ports, but only "
            "one container (the ingress container) may."
        )
    if len(containers) > 1 and not with_ports:
        invalid_argument(
            "template.containers: a revision with sidecars needs exactly one ingress "
            "container; declare ports on the container that receives requests."
        )
    if len(containers) > 1 and len(names) != len(containers):
        invalid_argument(
            "template.containers: every container of a multi-container revision needs "
            "a name, so depends_on can refer to it."
        )
    known = set(names)
    for index, container in enumerate(containers):
        for dependency in container.depends_on:
            if dependency not in known or dependency == container.name:
                invalid_argument(
                    f"template.containers[{index}].depends_on: {dependency!r} is not "
                    "another container of this revision."
                )
    _check_dependency_cycles(containers)


def _check_dependency_cycles(containers: list[run_v2.Container]) -> None:
    graph = {container.name: list(container.depends_on) for container in containers}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            invalid_argument(
                f"template.containers: depends_on forms a cycle ({cycle}); remove one "
                "of the dependencies."
            )
        if name in done:
            return
        for dependency in graph.get(name, []):
            visit(dependency, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def _validate_container(container: run_v2.Container, field: str) -> None:
    if not container.image:
        invalid_argument(
            f"{field}.image: an image is required, for example REPO@sha256:..."
        )
    if len(container.ports) > 1:
        invalid_argument(f"{field}.ports: a container may declare at most one port.")
    for port in container.ports:
        if not 0 <= port.container_port <= 65535:
            invalid_argument(
                f"{field}.ports[0].container_port: {port.container_port} is not a TCP "
                "port number (1-65535)."
            )
        if port.name and port.name not in ("http1", "h2c"):
            invalid_argument(
                f"{field}.ports[0].name: {port.name!r} is invalid; use 'http1' or "
                "'h2c'."
            )
    seen: set[str] = set()
    for index, variable in enumerate(container.env):
        _validate_env(variable, f"{field}.env[{index}]", seen)
    _validate_probe(container.startup_probe, f"{field}.startup_probe", startup=True)
    _validate_probe(container.liveness_probe, f"{field}.liveness_probe", startup=False)


def _validate_env(variable: run_v2.EnvVar, field: str, seen: set[str]) -> None:
    if not ENV_NAME.match(variable.name):
        invalid_argument(
            f"{field}.name: {variable.name!r} is not a valid environment variable name."
        )
    if variable.name in RESERVED_ENV:
        invalid_argument(
            f"{field}.name: {variable.name} is reserved; Cloud Run sets "
            f"{', '.join(sorted(RESERVED_ENV))} itself. Remove it from the env list."
        )
    if variable.name in seen:
        invalid_argument(f"{field}.name: {variable.name} is set more than once.")
    seen.add(variable.name)
    if "value_source" not in variable:
        return
    reference = variable.value_source.secret_key_ref
    if "secret_key_ref" not in variable.value_source or not reference.secret:
        invalid_argument(
            f"{field}.value_source: only secret_key_ref with a secret is supported; "
            "name a Secret Manager secret."
        )
    secret = reference.secret
    if "/" in secret and not re.match(r"^projects/[^/]+/secrets/[^/]+$", secret):
        invalid_argument(
            f"{field}.value_source.secret_key_ref.secret: {secret!r} is invalid; use "
            "SECRET or projects/PROJECT/secrets/SECRET."
        )
    if not reference.version:
        invalid_argument(
            f"{field}.value_source.secret_key_ref.version: a version is required; pin "
            "a version number such as '3'."
        )


def _validate_probe(probe: run_v2.Probe, field: str, startup: bool) -> None:
    kinds = [kind for kind in ("http_get", "tcp_socket", "grpc") if kind in probe]
    if not kinds:
        return
    limit = MAX_STARTUP_PROBE_SECONDS if startup else 3600
    if probe.period_seconds > limit:
        invalid_argument(
            f"{field}.period_seconds: {probe.period_seconds} exceeds the maximum of "
            f"{limit}; raise failure_threshold instead to allow a longer start."
        )
    if probe.initial_delay_seconds > limit:
        invalid_argument(
            f"{field}.initial_delay_seconds: {probe.initial_delay_seconds} exceeds the "
            f"maximum of {limit}."
        )
    period = probe.period_seconds or 10
    if probe.timeout_seconds > period:
        invalid_argument(
            f"{field}.timeout_seconds: {probe.timeout_seconds} must not exceed "
            f"period_seconds ({period})."
        )
    if "grpc" in probe:
        raise RpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{field}.grpc: localcloud runs only http_get and tcp_socket probes; "
            "use one of those.",
        )


def _validate_resources(template: run_v2.RevisionTemplate) -> None:
    total_cpu = 0.0
    total_memory = 0
    gpus = 0
    for index, container in enumerate(template.containers):
        field = f"template.containers[{index}].resources.limits"
        limits = container.resources.limits
        total_cpu += parse_cpu(limits.get("cpu", DEFAULT_CPU), field + ".cpu")
        total_memory += parse_memory(
            limits.get("memory", DEFAULT_MEMORY), field + ".memory"
        )
        if GPU_RESOURCE in limits:
            if limits[GPU_RESOURCE] != "1":
                invalid_argument(
                    f"{field}['{GPU_RESOURCE}']: {limits[GPU_RESOURCE]!r} is invalid; "
                    "Cloud Run attaches exactly one GPU per instance ('1')."
                )
            gpus += 1
            if container.resources.cpu_idle:
                invalid_argument(
                    f"template.containers[{index}].resources.cpu_idle: a GPU needs CPU "
                    "always allocated; set cpu_idle to false."
                )

    if total_cpu > MAX_CPU:
        invalid_argument(
            f"template.containers: the containers request {total_cpu:g} vCPU in total, "
            f"over Cloud Run's maximum of {MAX_CPU:g}."
        )
    if total_cpu > 1 and total_cpu not in MEMORY_BOUNDS:
        invalid_argument(
            f"template.containers: {total_cpu:g} vCPU is not allowed; above 1 vCPU use "
            "2, 4, 6 or 8."
        )
    bucket = 1.0 if total_cpu <= 1 else total_cpu
    low, high = MEMORY_BOUNDS[bucket]
    if total_memory < max(low, MIN_MEMORY) or total_memory > high:
        invalid_argument(
            f"template.containers: {_gib(total_memory)} of memory is not allowed with "
            f"{total_cpu:g} vCPU; use {_gib(max(low, MIN_MEMORY))} to {_gib(high)}."
        )
    _validate_gpu(template, gpus, total_cpu, total_memory)


def _validate_gpu(
    template: run_v2.RevisionTemplate, gpus: int, total_cpu: float, total_memory: int
) -> None:
    accelerator = template.node_selector.accelerator
    if gpus > 1:
        invalid_argument(
            "template.containers: only one container may request a GPU; remove "
            f"'{GPU_RESOURCE}' from the others."
        )
    if accelerator and accelerator not in GPU_ACCELERATORS:
        invalid_argument(
            f"template.node_selector.accelerator: {accelerator!r} is not a Cloud Run "
            f"GPU type; use one of {sorted(GPU_ACCELERATORS)}."
        )
    if accelerator and not gpus:
        invalid_argument(
            "template.node_selector.accelerator is set but no container requests "
            f"'{GPU_RESOURCE}': '1'; add the GPU limit to the container that uses it."
        )
    if gpus and not accelerator:
        invalid_argument(
            f"template.containers requests '{GPU_RESOURCE}' but "
            "template.node_selector.accelerator is empty; set it to 'nvidia-l4'."
        )
    if gpus and (total_cpu < GPU_MIN_CPU or total_memory < GPU_MIN_MEMORY):
        invalid_argument(
            f"template.containers: a GPU needs at least {GPU_MIN_CPU:g} vCPU and "
            f"{_gib(GPU_MIN_MEMORY)} of memory, got {total_cpu:g} vCPU and "
            f"{_gib(total_memory)}; raise the limits (8 vCPU and 32Gi suit an L4)."
        )


def _validate_scaling(template: run_v2.RevisionTemplate) -> None:
    scaling = template.scaling
    if scaling.min_instance_count < 0 or scaling.max_instance_count < 0:
        invalid_argument("template.scaling: instance counts must not be negative.")
    if (
        scaling.max_instance_count
        and scaling.max_instance_count < scaling.min_instance_count
    ):
        invalid_argument(
            f"template.scaling: max_instance_count ({scaling.max_instance_count}) is "
            f"below min_instance_count ({scaling.min_instance_count}); raise the "
            "maximum."
        )


def _gib(size: int) -> str:
    """Format a byte count as a Kubernetes quantity (Gi when whole, else Mi)."""
    if size % 2**30 == 0:
        return f"{size // 2**30}Gi"
    return f"{size / 2**20:g}Mi"


def validate_traffic(
    traffic: list[run_v2.TrafficTarget], known_revisions: set[str]
) -> None:
    total = 0
    tags: set[str] = set()
    for index, target in enumerate(traffic):
        field = f"traffic[{index}]"
        if target.type_ not in (LATEST, BY_REVISION):
            invalid_argument(
                f"{field}.type: set TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST or "
                "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION."
            )
        if target.type_ == BY_REVISION and not target.revision:
            invalid_argument(
                f"{field}.revision: a REVISION target needs a revision name."
            )
        if target.type_ == LATEST and target.revision:
            invalid_argument(
                f"{field}.revision: a LATEST target must not name a revision "
                f"(got {target.revision!r})."
            )
        if target.revision and target.revision not in known_revisions:
            invalid_argument(
                f"{field}.revision: revision {target.revision!r} does not exist in "
                "this service."
            )
        if not 0 <= target.percent <= 100:
            invalid_argument(f"{field}.percent: {target.percent} is not within 0-100.")
        total += target.percent
        if target.tag:
            _validate_tag(target.tag, field, tags)
    if traffic and total != 100:
        invalid_argument(
            f"traffic: percentages add up to {total}, but they must add up to 100."
        )


def _validate_tag(tag: str, field: str, seen: set[str]) -> None:
    if not TAG.match(tag) or len(tag) > 63:
        invalid_argument(
            f"{field}.tag: {tag!r} is invalid; use lowercase letters, digits and "
            "hyphens, starting with a letter."
        )
    if tag == "latest":
        invalid_argument(f"{field}.tag: 'latest' is reserved; choose another tag.")
    if tag in seen:
        invalid_argument(f"{field}.tag: tag {tag!r} is used by more than one target.")
    seen.add(tag)


# ------------------------------------------------------------------------------------
# Defaults Cloud Run fills in on output


def default_service_account(project: str) -> str:
    """Return the Compute Engine default service account (made-up project number)."""
    number = int(hashlib.sha256(project.encode()).hexdigest()[:12], 16) % 10**12
    return f"{number}-compute@developer.gserviceaccount.com"


def fill_template_defaults(template: run_v2.RevisionTemplate, project: str) -> None:
    if not template.service_account:
        template.service_account = default_service_account(project)
    if "timeout" not in template:
        template.timeout = DEFAULT_TIMEOUT
    if not template.max_instance_request_concurrency:
        template.max_instance_request_concurrency = DEFAULT_CONCURRENCY
    if not template.scaling.max_instance_count:
        template.scaling.max_instance_count = DEFAULT_MAX_INSTANCES
    for container in template.containers:
        limits = container.resources.limits
        limits.setdefault("cpu", DEFAULT_CPU)
        limits.setdefault("memory", DEFAULT_MEMORY)
    if len(template.containers) == 1 and not template.containers[0].ports:
        template.containers[0].ports.append(run_v2.ContainerPort(name="http1"))
    for container in template.containers:
        for port in container.ports:
            port.name = port.name or "http1"
            port.container_port = port.container_port or 8080
        if container.ports and not _has_probe(container.startup_probe):
            container.startup_probe = run_v2.Probe(
                timeout_seconds=DEFAULT_PROBE_PERIOD_SECONDS,
                period_seconds=DEFAULT_PROBE_PERIOD_SECONDS,
                failure_threshold=1,
                tcp_socket=run_v2.TCPSocketAction(
                    port=container.ports[0].container_port
                ),
            )


def _has_probe(probe: run_v2.Probe) -> bool:
    return any(kind in probe for kind in ("http_get", "tcp_socket", "grpc"))


def _template_key(template: run_v2.RevisionTemplate) -> str:
    """Return the digest of a template. Equal digests mean no new revision."""
    document = to_document(template)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _etag(document: dict[str, Any]) -> str:
    content = json.dumps(document, sort_keys=True).encode()
    return '"' + hashlib.sha256(content).hexdigest()[:24] + '"'


def _condition(
    type_: str,
    state: int,
    message: str = "",
    reason: str = "",
) -> run_v2.Condition:
    """Build a condition; `reason` names a RevisionReason or CommonReason member."""
    condition = run_v2.Condition(
        type_=type_,
        state=state,
        message=message,
        last_transition_time=now_timestamp(),
    )
    if state == FAILED:
        condition.severity = run_v2.Condition.Severity.ERROR  # type: ignore[assignment]
    if reason in run_v2.Condition.RevisionReason.__members__:
        condition.revision_reason = getattr(run_v2.Condition.RevisionReason, reason)
    elif reason in run_v2.Condition.CommonReason.__members__:
        condition.reason = getattr(run_v2.Condition.CommonReason, reason)
    return condition


def _random_suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))


# ------------------------------------------------------------------------------------
# The API


class RunApi:
    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self._locks: dict[str, threading.Lock] = {}
        self._workers: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._guard = threading.Lock()

    # Services

    def create_service(
        self, request: run_v2.CreateServiceRequest
    ) -> operations_pb2.Operation:
        match = LOCATION_PARENT.match(request.parent)
        if not match:
            invalid_argument(
                f"parent {request.parent!r} is invalid; use projects/PROJECT/locations/"
                "LOCATION."
            )
        validate_service_id(request.service_id)
        name = f"{request.parent}/services/{request.service_id}"
        with self._lock(name):
            if self.cloud.store.get(SERVICES_KIND, name) is not None:
                already_exists(f"Resource '{name}' already exists.")
            service = self._new_service(request.service, name, match.group(1))
            operation_name, future = self._apply(None, service, request.validate_only)
        return self._await(operation_name, future)

    def update_service(
        self, request: run_v2.UpdateServiceRequest
    ) -> operations_pb2.Operation:
        name = request.service.name
        match = SERVICE_NAME.match(name)
        if not match:
            invalid_argument(
                f"service.name {name!r} is invalid; use projects/PROJECT/locations/"
                "LOCATION/services/SERVICE."
            )
        with self._lock(name):
            current = load_service(self.cloud, name)
            if current is None:
                if not request.allow_missing:
                    not_found(f"Resource '{name}' was not found.")
                validate_service_id(match.group(3))
                service = self._new_service(request.service, name, match.group(1))
                operation_name, future = self._apply(
                    None, service, request.validate_only
                )
                return self._await(operation_name, future)
            if request.service.etag and request.service.etag != current.etag:
                aborted(
                    f"etag {request.service.etag} does not match the current etag "
                    f"{current.etag} of {name}; read the service again and retry."
                )
            service = self._merged(current, request)
            operation_name, future = self._apply(
                current, service, request.validate_only
            )
        return self._await(operation_name, future)

    def get_service(self, request: run_v2.GetServiceRequest) -> run_v2.Service:
        service = load_service(self.cloud, request.name)
        if service is None:
            not_found(f"Resource '{request.name}' was not found.")
        return self._present(service)

    def list_services(
        self, request: run_v2.ListServicesRequest
    ) -> run_v2.ListServicesResponse:
        match = LOCATION_PARENT.match(request.parent)
        if not match:
            invalid_argument(
                f"parent {request.parent!r} is invalid; use projects/PROJECT/locations/"
                "LOCATION ('-' for all locations)."
            )
        project, location = match.groups()
        services = [
            self._present(service)
            for service in list_all_services(self.cloud)
            if service.name.split("/")[1] == project
            and location in ("-", service.name.split("/")[3])
        ]
        page, token = paginate(services, request.page_size, request.page_token)
        return run_v2.ListServicesResponse(services=page, next_page_token=token)

    def delete_service(
        self, request: run_v2.DeleteServiceRequest
    ) -> operations_pb2.Operation:
        with self._lock(request.name):
            service = load_service(self.cloud, request.name)
            if service is None:
                not_found(f"Resource '{request.name}' was not found.")
            if request.etag and request.etag != service.etag:
                aborted(
                    f"etag {request.etag} does not match the current etag "
                    f"{service.etag}; read the service again and retry."
                )
            presented = self._present(service)
            parent = request.name.rsplit("/services/", 1)[0]
            resume = None
            if not request.validate_only:
                resume = {"action": "delete_service", "service": request.name}
            operation = self.cloud.operations.create(
                parent, metadata=presented, resume=resume
            )
            if not request.validate_only:
                self._delete_service_resources(request.name)
                presented.delete_time = now_timestamp()
            self.cloud.operations.complete(
                operation.name, presented, metadata=presented
            )
            return self.cloud.operations.get(operation.name)

    # Revisions

    def get_revision(self, request: run_v2.GetRevisionRequest) -> run_v2.Revision:
        revision = load_revision(self.cloud, request.name)
        if revision is None:
            not_found(f"Resource '{request.name}' was not found.")
        return revision

    def list_revisions(
        self, request: run_v2.ListRevisionsRequest
    ) -> run_v2.ListRevisionsResponse:
        match = SERVICE_NAME.match(request.parent)
        if not match:
            invalid_argument(
                f"parent {request.parent!r} is invalid; use projects/PROJECT/locations/"
                "LOCATION/services/SERVICE ('-' for all services)."
            )
        project, location, service_id = match.groups()
        revisions = []
        for name, document in self.cloud.store.list(REVISIONS_KIND):
            parts = name.split("/")
            if parts[1] != project or location not in ("-", parts[3]):
                continue
            if service_id not in ("-", parts[5]):
                continue
            revisions.append(from_document(run_v2.Revision, document["revision"]))
        revisions.sort(key=lambda revision: revision.create_time, reverse=True)
        page, token = paginate(revisions, request.page_size, request.page_token)
        return run_v2.ListRevisionsResponse(revisions=page, next_page_token=token)

    def delete_revision(
        self, request: run_v2.DeleteRevisionRequest
    ) -> operations_pb2.Operation:
        match = REVISION_NAME.match(request.name)
        if not match:
            invalid_argument(
                f"name {request.name!r} is invalid; use projects/PROJECT/locations/"
                "LOCATION/services/SERVICE/revisions/REVISION."
            )
        service_name = request.name.rsplit("/revisions/", 1)[0]
        with self._lock(service_name):
            revision = load_revision(self.cloud, request.name)
            if revision is None:
                not_found(f"Resource '{request.name}' was not found.")
            if request.etag and request.etag != revision.etag:
                aborted(f"etag {request.etag} does not match the revision's etag.")
            service = load_service(self.cloud, service_name)
            short = match.group(4)
            if service is not None and short in _serving_revisions(service):
                failed_precondition(
                    f"Revision {short} is serving traffic or holds a tag; move its "
                    "traffic and tags to another revision before deleting it."
                )
            parent = request.name.split("/services/", 1)[0]
            resume = None
            if not request.validate_only:
                resume = {"action": "delete_revision", "revision": request.name}
            operation = self.cloud.operations.create(
                parent, metadata=revision, resume=resume
            )
            if not request.validate_only:
                self._delete_revision_resources(request.name)
            self.cloud.operations.complete(operation.name, revision, metadata=revision)
            return self.cloud.operations.get(operation.name)

    # IAM

    def get_iam_policy(
        self, request: iam_policy_pb2.GetIamPolicyRequest
    ) -> policy_pb2.Policy:
        self._require_service(request.resource)
        return self._policy(request.resource)

    def set_iam_policy(
        self, request: iam_policy_pb2.SetIamPolicyRequest
    ) -> policy_pb2.Policy:
        with self._lock(request.resource):
            self._require_service(request.resource)
            current = self._policy(request.resource)
            if request.policy.etag and request.policy.etag != current.etag:
                aborted(
                    "There were concurrent policy changes: the policy etag does not "
                    "match. Read the policy again, apply the change and retry."
                )
            bindings = _validated_bindings(request.policy)
            document = {
                "version": request.policy.version or 1,
                "bindings": bindings,
                "etag": secrets.token_hex(8),
            }
            self.cloud.store.put(POLICIES_KIND, request.resource, document)
            logger.info("set IAM policy of %s: %s", request.resource, bindings)
            return self._policy(request.resource)

    def test_iam_permissions(
        self, request: iam_policy_pb2.TestIamPermissionsRequest
    ) -> iam_policy_pb2.TestIamPermissionsResponse:
        self._require_service(request.resource)
        # The local channel carries no caller identity, so the caller is granted every
        # Cloud Run permission, as a project owner would be.
        granted = [name for name in request.permissions if name in RUN_PERMISSIONS]
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    # Recovery after a crash

    def recover(self) -> set[str]:
        """Repair what a killed localcloud left half-written, and resume every
        reconciliation it left unfinished. Returns the operations it takes over.

        Call it once at start, after the runtime has started and before the gRPC
        server accepts calls: resumed reconciliations are queued on each service's
        worker first, so later requests run after them, as they would have.
        """
        claimed: set[str] = set()
        jobs: dict[str, list[_Job]] = {}
        for operation, resume in self.cloud.operations.pending():
            resume = resume or _resume_from_metadata(operation)
            if resume is None:
                continue
            claimed.add(operation.name)
            action = resume["action"]
            if action == "delete_service":
                self._finish_delete(operation, resume["service"], None)
            elif action == "delete_revision":
                revision_name = resume["revision"]
                service_name = revision_name.rsplit("/revisions/", 1)[0]
                self._finish_delete(operation, service_name, revision_name)
            else:
                job = _Job(resume["generation"], resume["revision"], operation.name)
                jobs.setdefault(resume["service"], []).append(job)

        services = {service.name: service for service in list_all_services(self.cloud)}
        self._drop_unreferenced(services)
        for service in services.values():
            self._repair_references(service)
        self._add_unowned_jobs(services, jobs)

        for service_name, service_jobs in sorted(jobs.items()):
            for job in sorted(service_jobs, key=lambda item: item.generation):
                logger.info(
                    "resuming reconciliation of %s generation %d (revision %s)",
                    service_name,
                    job.generation,
                    job.revision,
                )
                self._worker(service_name).submit(
                    self._reconcile,
                    service_name,
                    job.generation,
                    job.revision,
                    job.operation,
                )
        return claimed

    def _finish_delete(
        self,
        operation: operations_pb2.Operation,
        service_name: str,
        revision_name: str | None,
    ) -> None:
        """Finish a DeleteService (revision_name None) or DeleteRevision cut short.

        Both were validated before their operation was stored, so they complete.
        """
        with self._lock(service_name):
            if revision_name is None:
                self._delete_service_resources(service_name)
                result: Any = run_v2.Service.deserialize(operation.metadata.value)
                result.delete_time = now_timestamp()
            else:
                self._delete_revision_resources(revision_name)
                result = run_v2.Revision.deserialize(operation.metadata.value)
        logger.warning("finished %s, which a crash interrupted", operation.name)
        self.cloud.operations.complete(operation.name, result, metadata=result)

    def _drop_unreferenced(self, services: dict[str, run_v2.Service]) -> None:
        """Delete revisions, policies and URLs that no stored service owns.

        A revision is stored before the service generation that creates it, so a
        crash between the two writes leaves a revision whose service is missing (a
        create) or older than the revision (an update). The request never took effect
        and its client got no operation, so the revision goes, as Cloud Run would not
        have created it either. A delete that was cut short leaves the same leftovers.
        """
        from localcloud.runtime.frontdoor import PORTS_KIND

        store = self.cloud.store
        for name, document in store.list(REVISIONS_KIND):
            service = services.get(name.rsplit("/revisions/", 1)[0])
            generation = document.get("service_generation", 0)
            if service is not None and generation <= service.generation:
                continue
            logger.warning(
                "deleting revision %s: a crash stopped the request that created it "
                "before its service was stored",
                name,
            )
            self._delete_revision_resources(name)
        for name, _ in store.list(POLICIES_KIND):
            if name not in services:
                store.delete(POLICIES_KIND, name)
        for name, _ in store.list(PORTS_KIND):
            if name not in services:
                self.cloud.runtime.remove_service(name)

    def _repair_references(self, service: run_v2.Service) -> None:
        """Fail a service cleanly when it names revisions that are not stored.

        localcloud never writes such a service, but state from an older version or
        edited by hand can contain one. Routes to missing revisions are dropped, and
        the service's terminal condition names the traffic targets to fix.
        """
        prefix = service.name + "/revisions/"
        revisions = {
            name: from_document(run_v2.Revision, document["revision"])
            for name, document in self.cloud.store.list(REVISIONS_KIND, prefix)
        }
        stored = {name.rsplit("/", 1)[1] for name in revisions}
        changed = False
        if service.latest_created_revision and (
            service.latest_created_revision not in revisions
        ):
            service.latest_created_revision = _newest(revisions.values(), ready=False)
            changed = True
        if service.latest_ready_revision and (
            service.latest_ready_revision not in revisions
        ):
            service.latest_ready_revision = _newest(revisions.values(), ready=True)
            changed = True
        statuses = [
            status
            for status in service.traffic_statuses
            if not status.revision or status.revision in stored
        ]
        if len(statuses) != len(service.traffic_statuses):
            service.traffic_statuses = statuses
            changed = True
        missing = sorted(
            {target.revision for target in service.traffic if target.revision} - stored
        )
        if missing:
            message = (
                f"Traffic names revisions that do not exist: {', '.join(missing)}. "
                "Update the service's traffic to name existing revisions."
            )
            service.reconciling = False
            service.terminal_condition = _condition(
                "Ready", FAILED, message, "REVISION_FAILED"
            )
            changed = True
        if not changed:
            return
        logger.warning(
            "service %s named revisions that are not stored; repaired it (missing "
            "traffic targets: %s)",
            service.name,
            missing or "none",
        )
        with self._lock(service.name):
            self._save_service(service)
        self.cloud.runtime.update_routing(service, start_instances=False)

    def _add_unowned_jobs(
        self, services: dict[str, run_v2.Service], jobs: dict[str, list[_Job]]
    ) -> None:
        """Add a job for each reconciling revision or service that no pending
        operation covers: a crash came after the service was stored but before its
        operation was, or the client deleted the operation."""
        for name, document in self.cloud.store.list(REVISIONS_KIND):
            revision = from_document(run_v2.Revision, document["revision"])
            service = services.get(name.rsplit("/revisions/", 1)[0])
            if not revision.reconciling or service is None:
                continue
            service_jobs = jobs.setdefault(service.name, [])
            if any(job.revision == name for job in service_jobs):
                continue
            generation = document.get("service_generation", 0)
            if not generation and name == service.latest_created_revision:
                # Stored before revisions recorded their generation.
                generation = service.generation
            service_jobs.append(_Job(generation, name, None))
        for service in services.values():
            if not service.reconciling:
                continue
            service_jobs = jobs.setdefault(service.name, [])
            if not any(job.generation == service.generation for job in service_jobs):
                service_jobs.append(_Job(service.generation, None, None))

    # Internals

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _worker(self, name: str) -> concurrent.futures.ThreadPoolExecutor:
        # One worker per service keeps its reconciliations in request order.
        with self._guard:
            if name not in self._workers:
                self._workers[name] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="reconcile"
                )
            return self._workers[name]

    def _require_service(self, name: str) -> None:
        if (
            not SERVICE_NAME.match(name)
            or self.cloud.store.get(SERVICES_KIND, name) is None
        ):
            not_found(f"Resource '{name}' was not found.")

    def _policy(self, name: str) -> policy_pb2.Policy:
        document = self.cloud.store.get(POLICIES_KIND, name)
        if document is None:
            return policy_pb2.Policy(version=1, etag=EMPTY_POLICY_ETAG)
        return policy_pb2.Policy(
            version=document["version"],
            etag=bytes.fromhex(document["etag"]),
            bindings=[
                policy_pb2.Binding(role=binding["role"], members=binding["members"])
                for binding in document["bindings"]
            ],
        )

    def _new_service(
        self, requested: run_v2.Service, name: str, project: str
    ) -> run_v2.Service:
        service = run_v2.Service(requested)
        service.name = name
        service.uid = str(uuid.uuid4())
        service.generation = 0
        service.create_time = now_timestamp()
        service.latest_ready_revision = ""
        service.latest_created_revision = ""
        _clear_output_fields(service)
        _validate_service(service, project)
        return service

    def _merged(
        self, current: run_v2.Service, request: run_v2.UpdateServiceRequest
    ) -> run_v2.Service:
        project = current.name.split("/")[1]
        requested = run_v2.Service(request.service)
        _clear_output_fields(requested)
        paths = list(request.update_mask.paths)
        if not paths:
            merged = copy.deepcopy(requested)
            for field_name in ("name", "uid", "generation", "create_time"):
                setattr(merged, field_name, getattr(current, field_name))
            merged.latest_ready_revision = current.latest_ready_revision
            merged.latest_created_revision = current.latest_created_revision
            merged.traffic_statuses = current.traffic_statuses
            merged.observed_generation = current.observed_generation
        else:
            target = to_document(current)
            apply_update_mask(target, to_document(requested), paths, UPDATABLE_FIELDS)
            merged = from_document(run_v2.Service, target)
        _validate_service(merged, project)
        return merged

    def _apply(
        self,
        current: run_v2.Service | None,
        service: run_v2.Service,
        validate_only: bool,
    ) -> tuple[str, concurrent.futures.Future[None] | None]:
        """Record a new generation of `service` and start reconciling it.

        Returns the operation name and the future of the reconciliation (None when
        `validate_only` left nothing to do).
        """
        project = service.name.split("/")[1]
        service_id = service.name.rsplit("/", 1)[1]
        fill_template_defaults(service.template, project)
        revision, template_key = self._revision_for(current, service, service_id)
        known = {
            name.rsplit("/", 1)[1]
            for name, _ in self.cloud.store.list(
                REVISIONS_KIND, service.name + "/revisions/"
            )
        }
        if revision is not None:
            known.add(revision.name.rsplit("/", 1)[1])
        if not service.traffic:
            service.traffic = [run_v2.TrafficTarget(type_=LATEST, percent=100)]
        validate_traffic(list(service.traffic), known)

        service.generation = (current.generation if current else 0) + 1
        service.update_time = now_timestamp()
        service.reconciling = True
        service.terminal_condition = _condition("Ready", RECONCILING)
        if revision is not None:
            service.latest_created_revision = revision.name
        parent = service.name.rsplit("/services/", 1)[0]

        if validate_only:
            operation = self.cloud.operations.create(parent, metadata=service)
            self.cloud.operations.complete(operation.name, service, metadata=service)
            return operation.name, None

        # Crash-safe order, see recover(): the revision first, marked with the
        # generation that creates it, then the service, then the operation.
        if revision is not None:
            self._save_revision(revision, template_key, service.generation)
        self._save_service(service)
        operation = self.cloud.operations.create(
            parent,
            metadata=self._present(service),
            resume={
                "action": "reconcile",
                "service": service.name,
                "generation": service.generation,
                "revision": revision.name if revision else None,
            },
        )
        logger.info(
            "service %s generation %d: %s",
            service.name,
            service.generation,
            f"new revision {revision.name}" if revision else "no new revision",
        )
        future = self._worker(service.name).submit(
            self._reconcile,
            service.name,
            service.generation,
            revision.name if revision else None,
            operation.name,
        )
        return operation.name, future

    def _await(
        self, operation_name: str, future: concurrent.futures.Future[None] | None
    ) -> operations_pb2.Operation:
        if future is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(timeout=INLINE_WAIT_SECONDS)
        return self.cloud.operations.get(operation_name)

    def _revision_for(
        self, current: run_v2.Service | None, service: run_v2.Service, service_id: str
    ) -> tuple[run_v2.Revision | None, str]:
        """Return the revision a changed template creates (None when it is unchanged)
        and the template's digest."""
        template = service.template
        key = _template_key(template)
        if current is not None and _template_key(current.template) == key:
            return None, key
        generation = (current.generation if current else 0) + 1
        revision_id = (
            template.revision or f"{service_id}-{generation:05d}-{_random_suffix()}"
        )
        if template.revision:
            validate_revision_id(template.revision, service_id)
        name = f"{service.name}/revisions/{revision_id}"
        existing = self.cloud.store.get(REVISIONS_KIND, name)
        if existing is not None:
            if existing.get("template_key") == key:
                return None, key
            already_exists(
                f"Revision named '{revision_id}' with different configuration already "
                "exists. Choose a new template.revision or leave it empty so Cloud Run "
                "names the revision."
            )
        return _revision_from_template(service, template, name), key

    def _reconcile(
        self,
        service_name: str,
        generation: int,
        revision_name: str | None,
        operation_name: str | None,
    ) -> None:
        """Bring up `revision_name` (when given) and route `generation` of the service,
        then finish the operation (None when a crash lost it before it was stored)."""
        try:
            self._reconcile_steps(
                service_name, generation, revision_name, operation_name
            )
        except RuntimeStopped:
            # Nothing is recorded, so the next start resumes this reconciliation.
            logger.info(
                "localcloud is stopping; %s generation %d stays reconciling",
                service_name,
                generation,
            )
        except Exception as exc:
            logger.exception("reconciling %s failed", service_name)
            if operation_name is not None:
                self.cloud.operations.fail(
                    operation_name,
                    grpc.StatusCode.INTERNAL,
                    f"Reconciling failed: {exc}",
                )

    def _reconcile_steps(
        self,
        service_name: str,
        generation: int,
        revision_name: str | None,
        operation_name: str | None,
    ) -> None:
        readiness_error = ""
        if revision_name is not None:
            revision = load_revision(self.cloud, revision_name)
            if revision is None:
                readiness_error = (
                    f"Revision {revision_name} was deleted while deploying."
                )
            else:
                readiness_error = self._bring_up(revision)

        with self._lock(service_name):
            service = load_service(self.cloud, service_name)
            if service is None:
                if operation_name is not None:
                    self.cloud.operations.fail(
                        operation_name,
                        grpc.StatusCode.NOT_FOUND,
                        f"Service {service_name} was deleted while deploying.",
                    )
                return
            if not readiness_error:
                if revision_name is not None and self._is_newest_ready(
                    service, revision_name
                ):
                    service.latest_ready_revision = revision_name
                readiness_error = self._route(service)
            if service.generation == generation:
                self._finish(service, readiness_error)
            elif revision_name is not None and not readiness_error:
                # A newer generation exists and its job, queued behind this one,
                # routes again. When that job has already finished, before a restart,
                # it failed if its traffic named this revision, so it finishes again
                # once the revision it created is Ready.
                if not service.reconciling and self._latest_created_ready(service):
                    self._finish(service, "")
                else:
                    self._save_service(service)
        if operation_name is None:
            return
        if readiness_error:
            self.cloud.operations.fail(
                operation_name, grpc.StatusCode.FAILED_PRECONDITION, readiness_error
            )
        else:
            self.cloud.operations.complete(
                operation_name, self._present(service), metadata=self._present(service)
            )

    def _is_newest_ready(self, service: run_v2.Service, revision_name: str) -> bool:
        """Return whether `revision_name` is newer than the service's latest ready
        revision, so that a resumed older revision never moves it back."""
        current = load_revision(self.cloud, service.latest_ready_revision)
        candidate = load_revision(self.cloud, revision_name)
        if current is None or candidate is None:
            return True
        return bool(candidate.create_time >= current.create_time)

    def _latest_created_ready(self, service: run_v2.Service) -> bool:
        revision = load_revision(self.cloud, service.latest_created_revision)
        return revision is not None and _is_ready(revision)

    def _bring_up(self, revision: run_v2.Revision) -> str:
        """Start a reconciling revision and record its Ready condition; return why it
        is not ready, or "".

        A revision whose Ready condition is already final (a crash came after it was
        recorded) is not started again, and its recorded outcome is kept.
        """
        if revision.reconciling:
            readiness = self.cloud.runtime.deploy_revision(revision)
            self._record_readiness(
                revision, readiness.ready, readiness.reason, readiness.message
            )
            ready, message = readiness.ready, readiness.message
        else:
            ready = _is_ready(revision)
            message = next(
                (c.message for c in revision.conditions if c.type_ == "Ready"), ""
            )
        if ready:
            return ""
        short = revision.name.rsplit("/", 1)[1]
        return f"Revision '{short}' is not ready and cannot serve traffic. {message}"

    def _route(self, service: run_v2.Service) -> str:
        """Point traffic_statuses at the service's traffic; return an error or ""."""
        previous = run_v2.Service(service)
        latest_ready = service.latest_ready_revision.rsplit("/", 1)[-1]
        statuses = []
        for target in service.traffic:
            short = target.revision
            if target.type_ == LATEST:
                short = latest_ready
            if not short:
                return (
                    "Traffic targets the latest ready revision, but the service has no "
                    "ready revision."
                )
            revision = load_revision(self.cloud, f"{service.name}/revisions/{short}")
            if revision is None or not _is_ready(revision):
                return f"Revision '{short}' is not ready and cannot serve traffic."
            statuses.append(
                run_v2.TrafficTargetStatus(
                    type_=target.type_,
                    revision=target.revision,
                    percent=target.percent,
                    tag=target.tag,
                )
            )
        service.traffic_statuses = statuses
        try:
            self.cloud.runtime.update_routing(service)
        except RuntimeStopped:
            raise
        except StartupError as exc:
            self.cloud.runtime.update_routing(previous, start_instances=False)
            service.traffic_statuses = previous.traffic_statuses
            return f"A revision with traffic failed to start: {exc.message}"
        return ""

    def _finish(self, service: run_v2.Service, error: str) -> None:
        service.reconciling = False
        if error:
            service.terminal_condition = _condition(
                "Ready", FAILED, error, "REVISION_FAILED"
            )
        else:
            service.observed_generation = service.generation
            service.terminal_condition = _condition("Ready", SUCCEEDED)
        service.conditions = [
            _condition("RoutesReady", FAILED if error else SUCCEEDED, error),
            _condition("ConfigurationsReady", SUCCEEDED),
        ]
        self._save_service(service)

    def _record_readiness(
        self, revision: run_v2.Revision, ready: bool, reason: str, message: str
    ) -> None:
        revision.reconciling = False
        revision.observed_generation = revision.generation
        revision.update_time = now_timestamp()
        if ready:
            revision.conditions = [
                _condition("Ready", SUCCEEDED),
                _condition("ContainerHealthy", SUCCEEDED),
                _condition("ResourcesAvailable", SUCCEEDED),
            ]
        else:
            revision.conditions = [
                _condition("Ready", FAILED, message, reason),
                _condition("ContainerHealthy", FAILED, message, reason),
            ]
        self._save_revision(revision)

    def _save_service(self, service: run_v2.Service) -> None:
        service.etag = ""
        document = to_document(service)
        service.etag = _etag(document)
        document["etag"] = service.etag
        self.cloud.store.put(SERVICES_KIND, service.name, {"service": document})

    def _save_revision(
        self,
        revision: run_v2.Revision,
        template_key: str = "",
        service_generation: int = 0,
    ) -> None:
        """Store a revision. `template_key` is the digest of the template it came
        from and `service_generation` the service generation that created it. Both
        are given on the first save and kept afterwards."""
        revision.etag = ""
        document = to_document(revision)
        revision.etag = _etag(document)
        document["etag"] = revision.etag
        existing = self.cloud.store.get(REVISIONS_KIND, revision.name) or {}
        record = {
            "revision": document,
            "template_key": template_key or existing.get("template_key", ""),
            "service_generation": (
                service_generation or existing.get("service_generation", 0)
            ),
        }
        self.cloud.store.put(REVISIONS_KIND, revision.name, record)

    def _delete_service_resources(self, name: str) -> None:
        # The service document goes first: a crash after it leaves only revisions and
        # a policy without a service, which recover() deletes.
        self.cloud.store.delete(SERVICES_KIND, name)
        self.cloud.runtime.remove_service(name)
        for revision_name, _ in self.cloud.store.list(
            REVISIONS_KIND, name + "/revisions/"
        ):
            self.cloud.store.delete(REVISIONS_KIND, revision_name)
        self.cloud.store.delete(POLICIES_KIND, name)
        logger.info("deleted service %s", name)

    def _delete_revision_resources(self, name: str) -> None:
        self.cloud.runtime.remove_revision(name)
        self.cloud.store.delete(REVISIONS_KIND, name)
        logger.info("deleted revision %s", name)

    def _present(self, service: run_v2.Service) -> run_v2.Service:
        """Return the service with its URLs, which the runtime assigns."""
        presented = run_v2.Service(service)
        presented.uri = self.cloud.runtime.url_for(service.name)
        presented.urls = [presented.uri]
        for status in presented.traffic_statuses:
            if status.tag:
                status.uri = self.cloud.runtime.url_for(service.name, status.tag)
        return presented


@dataclass(frozen=True)
class _Job:
    """One reconciliation to resume: a service generation and the revision it
    created (None when the template did not change), with its operation if stored."""

    generation: int
    revision: str | None
    operation: str | None


def _resume_from_metadata(operation: operations_pb2.Operation) -> dict[str, Any] | None:
    """Return the resume data of a pending Create or Update operation stored without
    it (by a localcloud older than `recover`), or None for any other operation."""
    if operation.metadata.type_url != SERVICE_TYPE_URL:
        return None
    service = run_v2.Service.deserialize(operation.metadata.value)
    if not service.reconciling or not SERVICE_NAME.match(service.name):
        return None
    return {
        "action": "reconcile",
        "service": service.name,
        "generation": service.generation,
        "revision": service.latest_created_revision or None,
    }


def _newest(revisions: Iterable[run_v2.Revision], ready: bool) -> str:
    """Return the name of the newest revision (the newest Ready one with `ready`)."""
    candidates = [
        revision for revision in revisions if not ready or _is_ready(revision)
    ]
    if not candidates:
        return ""
    return max(candidates, key=lambda revision: revision.create_time).name


UPDATABLE_FIELDS = {
    "description",
    "labels",
    "annotations",
    "client",
    "client_version",
    "ingress",
    "launch_stage",
    "binary_authorization",
    "template",
    "traffic",
    "scaling",
    "invoker_iam_disabled",
    "default_uri_disabled",
    "iap_enabled",
    "custom_audiences",
    "etag",
}


def _clear_output_fields(service: run_v2.Service) -> None:
    for field in (
        "urls",
        "conditions",
        "traffic_statuses",
    ):
        setattr(service, field, [])
    service.uri = ""
    service.reconciling = False
    service.observed_generation = 0
    service.etag = ""


def _validate_service(service: run_v2.Service, project: str) -> None:
    if len(service.description) > 512:
        invalid_argument(
            f"description has {len(service.description)} characters; the limit is 512."
        )
    _check_keys(service.labels, "labels")
    _check_keys(service.annotations, "annotations")
    if service.scaling.min_instance_count < 0:
        invalid_argument("scaling.min_instance_count must not be negative.")
    validate_template(service.template)


def _revision_from_template(
    service: run_v2.Service, template: run_v2.RevisionTemplate, name: str
) -> run_v2.Revision:
    now = now_timestamp()
    parts = name.split("/")
    revision = run_v2.Revision(
        name=name,
        uid=str(uuid.uuid4()),
        generation=1,
        labels=dict(template.labels),
        annotations=dict(template.annotations),
        create_time=now,
        update_time=now,
        launch_stage=service.launch_stage,
        service=service.name,
        scaling=template.scaling,
        vpc_access=template.vpc_access,
        max_instance_request_concurrency=template.max_instance_request_concurrency,
        timeout=template.timeout,
        service_account=template.service_account,
        containers=list(template.containers),
        execution_environment=template.execution_environment,
        encryption_key=template.encryption_key,
        session_affinity=template.session_affinity,
        node_selector=template.node_selector,
        gpu_zonal_redundancy_disabled=template.gpu_zonal_redundancy_disabled,
        reconciling=True,
        conditions=[_condition("Ready", RECONCILING)],
        log_uri=(
            "https://console.cloud.google.com/logs/viewer?project="
            f"{parts[1]}&resource=cloud_run_revision/service_name/{parts[5]}"
            f"/revision_name/{parts[7]}"
        ),
    )
    return revision


def _is_ready(revision: run_v2.Revision) -> bool:
    return any(
        condition.type_ == "Ready" and condition.state == SUCCEEDED
        for condition in revision.conditions
    )


def _serving_revisions(service: run_v2.Service) -> set[str]:
    latest = service.latest_ready_revision.rsplit("/", 1)[-1]
    names = set()
    for status in service.traffic_statuses:
        short = latest if status.type_ == LATEST else status.revision
        if status.percent or status.tag:
            names.add(short)
    return names


def _validated_bindings(policy: policy_pb2.Policy) -> list[dict[str, Any]]:
    if policy.version > 3:
        invalid_argument(f"policy.version {policy.version} is invalid; use 1 or 3.")
    merged: dict[str, set[str]] = {}
    for index, binding in enumerate(policy.bindings):
        field = f"policy.bindings[{index}]"
        if binding.role not in IAM_ROLES:
            invalid_argument(
                f"{field}.role: {binding.role!r} is not supported for Cloud Run "
                f"services; use one of {sorted(IAM_ROLES)}."
            )
        if binding.HasField("condition"):
            invalid_argument(
                f"{field}.condition: Cloud Run service policies do not take "
                "conditions; remove the condition."
            )
        for member in binding.members:
            _validate_member(member, field)
        merged.setdefault(binding.role, set()).update(binding.members)
    return [
        {"role": role, "members": sorted(members)}
        for role, members in sorted(merged.items())
        if members
    ]


def _validate_member(member: str, field: str) -> None:
    if member in PUBLIC_MEMBERS or member.startswith(PRINCIPAL_PREFIXES):
        return
    prefix, _, identity = member.partition(":")
    if f"{prefix}:" not in MEMBER_PREFIXES or not identity:
        invalid_argument(
            f"{field}.members: {member!r} is invalid; use user:EMAIL, "
            "serviceAccount:EMAIL, group:EMAIL, domain:DOMAIN, allUsers or "
            "allAuthenticatedUsers."
        )
    if prefix in ("user", "serviceAccount", "group") and not EMAIL.match(identity):
        invalid_argument(f"{field}.members: {member!r} does not contain a valid email.")


# ------------------------------------------------------------------------------------
# gRPC wiring


def handlers(cloud: LocalCloud) -> list[grpc.GenericRpcHandler]:
    api = RunApi(cloud)
    # LocalCloud.start calls api.recover() before the server accepts calls.
    cloud.run_api = api
    operation = operations_pb2.Operation
    services = service_handler(
        "google.cloud.run.v2.Services",
        {
            "CreateService": (
                run_v2.CreateServiceRequest,
                operation,
                api.create_service,
            ),
            "GetService": (run_v2.GetServiceRequest, run_v2.Service, api.get_service),
            "ListServices": (
                run_v2.ListServicesRequest,
                run_v2.ListServicesResponse,
                api.list_services,
            ),
            "UpdateService": (
                run_v2.UpdateServiceRequest,
                operation,
                api.update_service,
            ),
            "DeleteService": (
                run_v2.DeleteServiceRequest,
                operation,
                api.delete_service,
            ),
            "GetIamPolicy": (
                iam_policy_pb2.GetIamPolicyRequest,
                policy_pb2.Policy,
                api.get_iam_policy,
            ),
            "SetIamPolicy": (
                iam_policy_pb2.SetIamPolicyRequest,
                policy_pb2.Policy,
                api.set_iam_policy,
            ),
            "TestIamPermissions": (
                iam_policy_pb2.TestIamPermissionsRequest,
                iam_policy_pb2.TestIamPermissionsResponse,
                api.test_iam_permissions,
            ),
        },
    )
    revisions = service_handler(
        "google.cloud.run.v2.Revisions",
        {
            "GetRevision": (
                run_v2.GetRevisionRequest,
                run_v2.Revision,
                api.get_revision,
            ),
            "ListRevisions": (
                run_v2.ListRevisionsRequest,
                run_v2.ListRevisionsResponse,
                api.list_revisions,
            ),
            "DeleteRevision": (
                run_v2.DeleteRevisionRequest,
                operation,
                api.delete_revision,
            ),
        },
    )
    return [services, revisions]
