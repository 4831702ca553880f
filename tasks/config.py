"""Typed configuration: the target a refresh deploys to and the request a run serves.

Every rule here runs before any cloud call. A message names the field, shows the value
and states the fix, because the same models back the Prefect UI form.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError

# GPU types accepted in a revision's node_selector.accelerator. NOTE: listed by hand;
# add a type here when Cloud Run offers it.
GPU_TYPES = ("nvidia-l4", "nvidia-rtx-pro-6000")
PUBLIC_PRINCIPALS = ("allUsers", "allAuthenticatedUsers")
# Cloud Run limits: a startup probe period of at most 240 s, and with a GPU at least
# 4 vCPU and 16 GiB of memory.
MAX_PROBE_PERIOD_SECONDS = 240
GPU_MIN_CPU = 4.0
MAX_CPU = 8.0
GPU_MIN_MEMORY_GIB = 16
# Cloud Run CPU and memory rules, from "Configure CPU limits for services" and
# "Configure memory limits for services" (cloud.google.com/run/docs/configuring/
# services/cpu and .../memory-limits). A CPU limit is 0.08 to 1 in steps of 0.001,
# or a whole number above 1. An instance gets 1, 2, 4, 6 or 8 vCPU, and each of those
# allows the memory range below. Below 1 vCPU Cloud Run requires the first generation
# execution environment, but tasks.deploy deploys the second, whose memory minimum is
# 512 MiB.
MIN_CPU = 0.08
MAX_MEMORY_GIB = 32.0
MEMORY_RANGE_GIB: dict[float, tuple[float, float]] = {
    1.0: (0.5, 4.0),
    2.0: (0.5, 8.0),
    4.0: (2.0, 16.0),
    6.0: (4.0, 24.0),
    8.0: (4.0, 32.0),
}
# The port of the first container of each service; tasks.deploy deploys with it.
INGRESS_CONTAINER_PORT = 8080
# Product limits, not Cloud Run's, for values that later become a timedelta or an int
# of bytes, so no conversion overflows.
MAX_KEY_HOURS = 24 * 365
MAX_MODEL_GIB = 1024.0
MAX_LOAD_MIB_PER_SECOND = 1_000_000.0
MCP_SERVER_SOURCE = Path(__file__).resolve().parents[1] / "containers/mcp/server.py"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

SERVING_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# Hugging Face repository ids are namespace/name with letters, digits, '-', '_' and '.',
# no '--' or '..', at most 96 characters per part (huggingface_hub's validate_repo_id).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_SERVICE_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,47}[a-z0-9])?$")
_PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_REPOSITORY_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_SA_EMAIL = re.compile(
    r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z][a-z0-9-]{4,28}[a-z0-9]\.iam\.gserviceaccount\.com$"
)
_DEFAULT_COMPUTE_SA = re.compile(r"^\d+-compute@developer\.gserviceaccount\.com$")
_MEMBER = re.compile(r"^(serviceAccount|user|group|domain|principal|principalSet):\S+$")
# Compute resource names are RFC 1035 labels.
_COMPUTE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
# Google Cloud regions: a continent or area, a direction, and a number (us-central1,
# europe-west4, northamerica-northeast1).
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]{1,2}$")
_SERVICE_ACCOUNT = re.compile(
    r"^[a-z0-9-]+@[a-z0-9-]+(?:\.iam)?\.gserviceaccount\.com$"
)
_EMAIL = re.compile(r"^[^@\s]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+$")
# A CPU limit: vCPUs with at most three decimals, or whole millicores.
_CPU = re.compile(r"^(?:(?P<vcpu>[0-9]+(?:\.[0-9]{1,3})?)|(?P<millicores>[0-9]+)m)$")
# A memory limit with one of the units Cloud Run documents: M, G, Mi or Gi.
_MEMORY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>Mi|Gi|M|G)$")
_MEMORY_UNIT_GIB = {"Mi": 1 / 1024, "Gi": 1.0, "M": 10**6 / 2**30, "G": 10**9 / 2**30}
STRONG_TLS_PROFILES = ("MODERN", "RESTRICTED")
STRONG_TLS_VERSIONS = ("TLS_1_2", "TLS_1_3")


class _Strict(BaseModel):
    # allow_inf_nan=False rejects .inf and .nan in every float field, so no later
    # timedelta or int conversion overflows.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Target(_Strict):
    """The platform the official clients point at: real GCP, or localcloud."""

    kind: Literal["local", "gcp"] = Field("local", description="local or gcp")
    project: str = Field(description="Google Cloud project id")
    region: str = Field(
        "us-central1", description="Cloud Run and Artifact Registry region"
    )
    localcloud_state_dir: str = Field(
        ".localcloud", description="State folder of the localcloud to use (local only)"
    )
    hub_endpoint: str | None = Field(
        None, description="Hugging Face Hub URL; local targets read localcloud's"
    )
    hub_token_secret: str | None = Field(
        None,
        description="Secret Manager secret id of a Hugging Face read token, for "
        "gated or private repositories",
    )
    artifact_repository: str = Field(
        "model-refresh", description="Artifact Registry Docker repository id"
    )
    python_base_image: str = Field(
        description="Base image of the app images (pin by digest on GCP)"
    )
    llm_base_image: str = Field(description="Base image of the LLM engine image")
    listen_host: Literal["127.0.0.1", "0.0.0.0"] = Field(
        "127.0.0.1",
        description="Address the services bind: loopback on localcloud, all on GCP",
    )
    blob_uploads: Literal["monolithic", "streamed"] | None = Field(
        None,
        description="How a new layer is uploaded: monolithic (one pass measures it, "
        "then one PUT sends it, as Artifact Registry documents) or streamed (read "
        "once, sent in one PATCH). Default: streamed on local, monolithic on gcp",
    )

    @field_validator("project")
    @classmethod
    def _project_id(cls, value: str) -> str:
        if not _PROJECT_ID.match(value):
            raise ValueError(
                f"project {value!r} is not a valid project id: use 6-30 lowercase "
                "letters, digits or hyphens, starting with a letter"
            )
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise ValueError(
                f"region {value!r} is not a Google Cloud region: use a region id such "
                "as 'us-central1' or 'europe-west4'"
            )
        return value

    @field_validator("hub_token_secret")
    @classmethod
    def _hub_token_secret_id(cls, value: str | None) -> str | None:
        if value is not None and not _SECRET_ID.match(value):
            raise ValueError(
                f"hub_token_secret {value!r} is not a valid secret id: use letters, "
                "digits, '-' or '_'"
            )
        return value

    @field_validator("artifact_repository")
    @classmethod
    def _repository_id(cls, value: str) -> str:
        if not _REPOSITORY_ID.match(value):
            raise ValueError(
                f"artifact_repository {value!r} is invalid: use lowercase letters, "
                "digits and hyphens, starting with a letter"
            )
        return value

    @property
    def registry_host(self) -> str:
        return f"{self.region}-docker.pkg.dev"

    @property
    def image_repository(self) -> str:
        return f"{self.registry_host}/{self.project}/{self.artifact_repository}"


class Gpu(_Strict):
    type: str = Field("nvidia-l4", description="Cloud Run GPU type")
    count: int = Field(1, ge=1, le=1, description="GPUs per instance (Cloud Run: 1)")
    zonal_redundancy: bool = Field(
        False, description="Reserve zonal redundancy quota (costs more GPU quota)"
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in GPU_TYPES:
            raise ValueError(
                f"unknown GPU type {value!r}: Cloud Run offers {', '.join(GPU_TYPES)}"
            )
        return value


class ServiceSettings(_Strict):
    name: str = Field(description="Cloud Run service id")
    service_account: str = Field(
        description="Dedicated service account the service runs as"
    )
    invokers: list[str] = Field(
        min_length=1, description="IAM members granted roles/run.invoker"
    )
    ingress: Literal["internal", "internal-and-cloud-load-balancing"] = Field(
        "internal", description="Cloud Run ingress; 'all' is not allowed"
    )
    max_instances: int = Field(ge=1, le=1000, description="Upper bound on instances")
    min_instances: int = Field(0, ge=0, le=1000, description="Instances kept warm")
    cpu: str = Field("1", description="vCPU per instance")
    memory: str = Field("1Gi", description="Memory per instance")
    network: str = Field("default", description="VPC network for Direct VPC egress")
    subnetwork: str = Field("default", description="Subnetwork for Direct VPC egress")
    allow_external_egress: bool = Field(
        False, description="Route only private ranges through the VPC"
    )

    @field_validator("ingress", mode="before")
    @classmethod
    def _private_ingress(cls, value: object) -> object:
        if value == "all":
            raise ValueError(
                "ingress 'all' accepts requests from the internet: use 'internal', or "
                "'internal-and-cloud-load-balancing' behind a load balancer"
            )
        return value

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_as_text(cls, value: object) -> object:
        # YAML reads `cpu: 2` as an int; Cloud Run takes the limit as text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value:g}"
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu_limit(cls, value: str, info: ValidationInfo) -> str:
        parse_cpu(value, info.field_name or "cpu")
        return value

    @field_validator("memory")
    @classmethod
    def _memory_limit(cls, value: str, info: ValidationInfo) -> str:
        parse_memory_gib(value, info.field_name or "memory")
        return value

    @field_validator("name")
    @classmethod
    def _service_id(cls, value: str) -> str:
        if not _SERVICE_ID.match(value):
            raise ValueError(
                f"service name {value!r} is invalid: use at most 49 lowercase letters, "
                "digits or hyphens, starting with a letter"
            )
        return value

    @field_validator("service_account")
    @classmethod
    def _dedicated_identity(cls, value: str) -> str:
        if _DEFAULT_COMPUTE_SA.match(value):
            raise ValueError(
                f"service_account {value!r} is the Compute Engine default service "
                "account: create a dedicated service account for this service"
            )
        if not _SA_EMAIL.match(value):
            raise ValueError(
                f"service_account {value!r} is not a user-managed service account "
                "email (NAME@PROJECT.iam.gserviceaccount.com)"
            )
        return value

    @field_validator("invokers")
    @classmethod
    def _private_invokers(cls, members: list[str]) -> list[str]:
        for member in members:
            if member in PUBLIC_PRINCIPALS:
                raise ValueError(
                    f"invoker {member!r} makes the service public: list the service "
                    "accounts or groups that may call it instead"
                )
            if not _MEMBER.match(member):
                raise ValueError(
                    f"invoker {member!r} is not an IAM member: use a prefix such as "
                    "'serviceAccount:' or 'group:'"
                )
        return members

    @model_validator(mode="after")
    def _instance_bounds(self) -> ServiceSettings:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances {self.min_instances} exceeds max_instances "
                f"{self.max_instances}: lower min_instances"
            )
        return self


class LlmSettings(ServiceSettings):
    gpu: Gpu | None = Field(None, description="GPU per instance; none on localcloud")
    api_key_secret: str = Field("llm-api-key", description="Secret Manager secret id")
    served_model_name: str = Field("served-model", description="Model id in /v1/models")
    max_tokens_cap: int = Field(256, ge=1, le=32768, description="Guard max_tokens cap")
    max_request_bytes: int = Field(
        65536, ge=1024, le=32 * 1024 * 1024, description="Guard request body cap"
    )
    engine_port: int = Field(8081, ge=1024, le=65535, description="Engine sidecar port")
    guard_cpu: str = Field("1", description="vCPU of the guard container")
    guard_memory: str = Field("512Mi", description="Memory of the guard container")
    engine_command: list[str] = Field(
        default_factory=lambda: ["python3", "-m", "containers.llm.engine"],
        min_length=1,
        description="Engine sidecar command (vLLM's server on GCP)",
    )
    startup_timeout_seconds: int = Field(
        300,
        ge=10,
        le=3600,
        description="Shortest startup window of the engine in seconds, whatever the "
        "model size (process start, imports, GPU setup)",
    )
    model_load_mib_per_second: float = Field(
        100.0,
        gt=0,
        le=MAX_LOAD_MIB_PER_SECOND,
        description="Measured rate at which the engine loads weights, in MiB/s; "
        "sizes the startup probe",
    )
    startup_margin: float = Field(
        1.5, ge=1.0, le=10.0, description="Factor applied to the expected load time"
    )
    startup_probe_period_seconds: int = Field(
        10,
        ge=1,
        le=MAX_PROBE_PERIOD_SECONDS,
        description="Seconds between startup probes (Cloud Run allows at most 240)",
    )
    max_startup_seconds: int = Field(
        1800,
        ge=10,
        le=3600,
        description="Maximum startup window (failure_threshold * period) accepted",
    )
    expected_model_gib: float | None = Field(
        None,
        gt=0,
        le=MAX_MODEL_GIB,
        description="Size of the weights in GiB, checked against the startup window "
        "when the config loads",
    )
    key_rollback_window_hours: float = Field(
        24.0,
        ge=0,
        le=MAX_KEY_HOURS,
        description="Hours an API key version stays enabled after nothing references "
        "it, so a rollback can still start (at most 8760, one year)",
    )
    key_destroy_grace_hours: float = Field(
        72.0,
        ge=0,
        le=MAX_KEY_HOURS,
        description="Hours a disabled API key version waits before it is destroyed "
        "(at most 8760, one year)",
    )

    @field_validator("guard_cpu", "guard_memory", mode="before")
    @classmethod
    def _guard_number_as_text(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value:g}"
        return value

    @field_validator("guard_cpu")
    @classmethod
    def _guard_cpu_limit(cls, value: str) -> str:
        parse_cpu(value, "guard_cpu")
        return value

    @field_validator("guard_memory")
    @classmethod
    def _guard_memory_limit(cls, value: str) -> str:
        parse_memory_gib(value, "guard_memory")
        return value

    @field_validator("engine_port")
    @classmethod
    def _engine_port_free(cls, value: int) -> int:
        if value == INGRESS_CONTAINER_PORT:
            raise ValueError(
                f"engine_port {value} is the port of the guard container, which "
                "receives the service's requests: pick another port such as 8081"
            )
        return value

    @field_validator("engine_command")
    @classmethod
    def _engine_command_entries(cls, command: list[str]) -> list[str]:
        for index, argument in enumerate(command):
            if not argument.strip():
                raise ValueError(
                    f"engine_command entry {index} is {argument!r}, an empty argument: "
                    "remove it, and start the command with the executable such as "
                    "'python3'"
                )
        return command

    @field_validator("api_key_secret")
    @classmethod
    def _secret_id(cls, value: str) -> str:
        if not _SECRET_ID.match(value):
            raise ValueError(
                f"api_key_secret {value!r} is not a valid secret id: use letters, "
                "digits, '-' or '_'"
            )
        return value

    @model_validator(mode="after")
    def _startup_fits(self) -> LlmSettings:
        if self.startup_timeout_seconds > self.max_startup_seconds:
            raise ValueError(
                f"startup_timeout_seconds {self.startup_timeout_seconds} exceeds "
                f"max_startup_seconds {self.max_startup_seconds}: lower it"
            )
        if self.expected_model_gib is not None:
            startup_window_seconds(self, int(self.expected_model_gib * 2**30))
        return self

    @model_validator(mode="after")
    def _instance_cpu(self) -> LlmSettings:
        engine, guard = parse_cpu(self.cpu), parse_cpu(self.guard_cpu)
        if engine + guard > MAX_CPU:
            raise ValueError(
                f"cpu {self.cpu!r} plus guard_cpu {self.guard_cpu!r} is "
                f"{engine + guard:g} vCPU per instance, over Cloud Run's maximum of "
                f"{MAX_CPU:g}: lower cpu"
            )
        return self

    @model_validator(mode="after")
    def _gpu_minimums(self) -> LlmSettings:
        if self.gpu is None:
            return self
        cpu = parse_cpu(self.cpu)
        memory = parse_memory_gib(self.memory)
        if cpu < GPU_MIN_CPU:
            raise ValueError(
                f"cpu {self.cpu!r} is too small for a GPU: Cloud Run needs at least "
                f"{GPU_MIN_CPU:g} vCPU with a GPU (8 recommended for nvidia-l4, "
                "counting guard_cpu)"
            )
        if memory < GPU_MIN_MEMORY_GIB:
            raise ValueError(
                f"memory {self.memory!r} is too small for a GPU: Cloud Run needs at "
                f"least {GPU_MIN_MEMORY_GIB}Gi with a GPU (32Gi recommended)"
            )
        return self

    @model_validator(mode="after")
    def _instance_memory(self) -> LlmSettings:
        # Runs after the GPU minimums, so a GPU setting too small gets that message.
        # NOTE: the Cloud Run pages cited at MEMORY_RANGE_GIB state the rules per
        # instance. Applying them to the sum of the guard and engine limits is an
        # assumption, which localcloud makes too.
        check_instance_resources(
            parse_cpu(self.cpu) + parse_cpu(self.guard_cpu),
            parse_memory_gib(self.memory) + parse_memory_gib(self.guard_memory),
            f"cpu {self.cpu!r} plus guard_cpu {self.guard_cpu!r}, memory "
            f"{self.memory!r} plus guard_memory {self.guard_memory!r}",
        )
        return self


def startup_window_seconds(settings: LlmSettings, model_bytes: int | None) -> int:
    """Return the startup window that covers loading `model_bytes` plus the margin.

    Raises ValueError with the numbers when the window exceeds max_startup_seconds.
    """
    if not model_bytes:
        return settings.startup_timeout_seconds
    load_seconds = model_bytes / 2**20 / settings.model_load_mib_per_second
    window = max(
        settings.startup_timeout_seconds,
        math.ceil(load_seconds * settings.startup_margin),
    )
    if window > settings.max_startup_seconds:
        raise ValueError(
            f"a {model_bytes / 2**30:.1f} GiB model loads in about "
            f"{load_seconds:.0f} s at {settings.model_load_mib_per_second:g} MiB/s; "
            f"with margin {settings.startup_margin:g} the startup window is "
            f"{window} s, over max_startup_seconds {settings.max_startup_seconds}: "
            "raise max_startup_seconds, measure a faster load rate, or serve a "
            "smaller model"
        )
    return window


def startup_probe_budget(
    settings: LlmSettings, model_bytes: int | None
) -> tuple[int, int]:
    """Return (period_seconds, failure_threshold) of the engine's startup probe.

    The period stays at most 240 s (Cloud Run's limit); the threshold grows instead,
    so failure_threshold * period_seconds covers the whole startup window.
    """
    try:
        window = startup_window_seconds(settings, model_bytes)
    except ValueError as exc:
        raise ConfigError(f"llm startup probe: {exc}") from exc
    period = min(settings.startup_probe_period_seconds, MAX_PROBE_PERIOD_SECONDS)
    return period, math.ceil(window / period)


def parse_cpu(value: str, field: str = "cpu") -> float:
    """Return a Cloud Run CPU limit in vCPU; raise ValueError naming `field`."""
    match = _CPU.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{field} {value!r} is not a CPU limit: give vCPUs as a number such as "
            "'1' or '2', or millicores such as '500m'"
        )
    if match["millicores"] is not None:
        cpu = int(match["millicores"]) / 1000
    else:
        cpu = float(match["vcpu"])
    if cpu <= 0:
        raise ValueError(f"{field} {value!r} is not positive: give at least '1'")
    if cpu < MIN_CPU:
        raise ValueError(
            f"{field} {value!r} is under Cloud Run's minimum of {MIN_CPU:g} vCPU: "
            "raise it"
        )
    if cpu > MAX_CPU:
        raise ValueError(
            f"{field} {value!r} is over Cloud Run's maximum of {MAX_CPU:g} vCPU: "
            "lower it"
        )
    if cpu > 1 and not cpu.is_integer():
        raise ValueError(
            f"{field} {value!r} is invalid: above 1 vCPU Cloud Run accepts only whole "
            "numbers, such as '2' or '4'"
        )
    return round(cpu, 3)


def parse_memory_gib(value: str, field: str = "memory") -> float:
    """Return a Cloud Run memory limit in GiB; raise ValueError naming `field`."""
    match = _MEMORY.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{field} {value!r} is not a memory limit: give a positive number with a "
            "unit Mi, Gi, M or G, such as '512Mi' or '2Gi'"
        )
    gib = float(match["number"]) * _MEMORY_UNIT_GIB[match["unit"]]
    if gib <= 0:
        raise ValueError(f"{field} {value!r} is not positive: give at least '512Mi'")
    if gib > MAX_MEMORY_GIB:
        raise ValueError(
            f"{field} {value!r} is over Cloud Run's maximum of {MAX_MEMORY_GIB:g}Gi: "
            "lower it"
        )
    return gib


def check_instance_resources(cpu: float, memory_gib: float, limits: str) -> None:
    """Check one instance's total CPU and memory against Cloud Run's allowed pairs.

    `limits` names the settings behind the totals for the message.
    """
    cpu = round(cpu, 3)
    if cpu < 1:
        raise ValueError(
            f"{limits} give {cpu:g} vCPU per instance: below 1 vCPU Cloud Run requires "
            "the first generation execution environment, but the pipeline deploys "
            "the second, so use at least 1 vCPU"
        )
    if cpu not in MEMORY_RANGE_GIB:
        allowed = ", ".join(f"{count:g}" for count in MEMORY_RANGE_GIB)
        raise ValueError(
            f"{limits} give {cpu:g} vCPU per instance, which Cloud Run does not "
            f"offer: make the total one of {allowed}"
        )
    low, high = MEMORY_RANGE_GIB[cpu]
    if not low <= memory_gib <= high:
        raise ValueError(
            f"{limits} give {memory_gib:g} GiB of memory with {cpu:g} vCPU per "
            f"instance, but Cloud Run allows {low:g} to {high:g} GiB with {cpu:g} "
            "vCPU: change memory or cpu"
        )


class McpSettings(ServiceSettings):
    tool_allowlist: list[str] = Field(
        default=["model_card", "lookup_doc"],
        min_length=1,
        description="The only MCP tools the server registers",
    )

    @field_validator("tool_allowlist")
    @classmethod
    def _known_tools(cls, names: list[str]) -> list[str]:
        known = mcp_tool_names()
        for name in names:
            if name not in known:
                raise ValueError(
                    f"tool_allowlist entry {name!r} is not a tool of the MCP server: "
                    f"list one or more of {', '.join(known)}"
                )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"tool_allowlist lists {', '.join(map(repr, duplicates))} more than "
                "once: list each tool once"
            )
        return names

    @model_validator(mode="after")
    def _instance_memory(self) -> McpSettings:
        check_instance_resources(
            parse_cpu(self.cpu),
            parse_memory_gib(self.memory),
            f"cpu {self.cpu!r} and memory {self.memory!r}",
        )
        return self


@functools.cache
def mcp_tool_names() -> tuple[str, ...]:
    """Read the tool names of the MCP server from TOOL_FACTORIES in its source.

    The source is parsed, not imported, so loading a config does not import the MCP
    SDK.
    """
    tree = ast.parse(MCP_SERVER_SOURCE.read_text(encoding="utf-8"))
    for node in tree.body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        is_factories = isinstance(target, ast.Name) and target.id == "TOOL_FACTORIES"
        if is_factories and isinstance(value, ast.Dict):
            return tuple(
                key.value
                for key in value.keys
                if isinstance(key, ast.Constant) and isinstance(key.value, str)
            )
    raise RuntimeError(
        f"{MCP_SERVER_SOURCE} has no TOOL_FACTORIES dict literal, so the known MCP "
        "tools cannot be read: restore it as a dict of tool name to factory"
    )


class AlertSettings(_Strict):
    notification_email: str = Field(description="Email channel for anomaly alerts")
    rate_limit_seconds: int = Field(
        300, ge=300, le=86400, description="Minimum time between notifications"
    )

    @field_validator("notification_email")
    @classmethod
    def _email_address(cls, value: str) -> str:
        if not _EMAIL.fullmatch(value):
            raise ValueError(
                f"notification_email {value!r} is not an email address: give one "
                "such as 'oncall@example.com'"
            )
        return value


class LoadBalancerSettings(_Strict):
    """The external Application Load Balancer in front of the services.

    The pipeline does not create the load balancer. It creates or fixes the SSL policy
    and attaches it to the existing target HTTPS proxy.
    """

    target_https_proxy: str = Field(
        description="Name of the existing global target HTTPS proxy"
    )
    ssl_policy: str = Field(
        "model-refresh-tls",
        description="Name of the global SSL policy the pipeline creates and attaches",
    )
    profile: Literal["MODERN", "RESTRICTED"] = Field(
        "MODERN", description="SSL policy profile: MODERN or RESTRICTED"
    )
    min_tls_version: Literal["TLS_1_2", "TLS_1_3"] = Field(
        "TLS_1_2", description="Lowest TLS version clients may negotiate"
    )

    @field_validator("target_https_proxy", "ssl_policy")
    @classmethod
    def _compute_name(cls, value: str, info: ValidationInfo) -> str:
        if not _COMPUTE_NAME.match(value):
            raise ValueError(
                f"{info.field_name} {value!r} is not a valid Compute resource name: "
                "use 1-63 lowercase letters, digits or hyphens, starting with a "
                "letter and not ending with a hyphen"
            )
        return value

    @field_validator("profile", mode="before")
    @classmethod
    def _strong_profile(cls, value: object) -> object:
        if value == "COMPATIBLE":
            raise ValueError(
                "profile 'COMPATIBLE' is rejected: it allows TLS 1.0 and legacy "
                "cipher suites; use MODERN or RESTRICTED"
            )
        if value == "CUSTOM":
            raise ValueError(
                "profile 'CUSTOM' is rejected: the edge.tls-policy check accepts only "
                "MODERN or RESTRICTED; use one of them"
            )
        if value not in STRONG_TLS_PROFILES:
            raise ValueError(f"profile {value!r} is invalid: use MODERN or RESTRICTED")
        return value

    @field_validator("min_tls_version", mode="before")
    @classmethod
    def _modern_tls(cls, value: object) -> object:
        if value in ("TLS_1_0", "TLS_1_1"):
            raise ValueError(
                f"min_tls_version {value!r} is rejected: TLS 1.0 and 1.1 are "
                "deprecated (RFC 8996); use TLS_1_2 or TLS_1_3"
            )
        if value not in STRONG_TLS_VERSIONS:
            raise ValueError(
                f"min_tls_version {value!r} is invalid: use TLS_1_2 or TLS_1_3"
            )
        return value

    @model_validator(mode="after")
    def _tls_1_3_restricted(self) -> LoadBalancerSettings:
        # Compute rejects an SSL policy with min TLS 1.3 unless its profile is
        # RESTRICTED (google-cloud-compute 1.57, SslPolicy.min_tls_version).
        if self.min_tls_version == "TLS_1_3" and self.profile != "RESTRICTED":
            raise ValueError(
                f"min_tls_version 'TLS_1_3' needs profile 'RESTRICTED', not "
                f"{self.profile!r}: set profile to RESTRICTED or min_tls_version to "
                "TLS_1_2"
            )
        return self


class RefreshConfig(_Strict):
    """Everything about a deploy target that does not change from run to run."""

    target: Target
    llm: LlmSettings
    mcp: McpSettings
    probe_principal: str = Field(
        description="Service account email the live probes mint ID tokens for"
    )
    outsider_principal: str = Field(
        description="Service account without invoker rights, used to prove 403"
    )
    alerts: AlertSettings
    load_balancer: LoadBalancerSettings | None = Field(
        None,
        description="External load balancer whose SSL policy the pipeline keeps at "
        "modern TLS; leave out when no load balancer fronts the services",
    )
    report_dir: str = Field("reports", description="Folder for JSON reports")

    @field_validator("probe_principal", "outsider_principal")
    @classmethod
    def _service_account_email(cls, value: str, info: ValidationInfo) -> str:
        if not _SERVICE_ACCOUNT.fullmatch(value):
            raise ValueError(
                f"{info.field_name} {value!r} is not a service account email: give "
                "one such as 'NAME@PROJECT.iam.gserviceaccount.com'"
            )
        return value

    @model_validator(mode="after")
    def _distinct_services(self) -> RefreshConfig:
        if self.llm.name == self.mcp.name:
            raise ValueError(
                f"mcp.name {self.mcp.name!r} is also llm.name, so the MCP image would "
                "be deployed into the LLM service: give the services different names"
            )
        return self

    @model_validator(mode="after")
    def _probe_is_invoker(self) -> RefreshConfig:
        member = f"serviceAccount:{self.probe_principal}"
        for service in (self.llm, self.mcp):
            if member not in service.invokers:
                raise ValueError(
                    f"probe_principal {self.probe_principal!r} is not an invoker of "
                    f"{service.name}: add {member!r} to its invokers"
                )
        if self.outsider_principal == self.probe_principal:
            raise ValueError(
                f"outsider_principal {self.outsider_principal!r} is also the "
                "probe_principal, so the 403 check would probe with an invoker: pick "
                "an identity that must be denied"
            )
        outsider = f"serviceAccount:{self.outsider_principal}"
        if outsider in self.llm.invokers or outsider in self.mcp.invokers:
            raise ValueError(
                f"outsider_principal {self.outsider_principal!r} is an invoker: pick "
                "an identity that must be denied"
            )
        return self


RepoId = Annotated[str, Field(description="Hugging Face model repository (org/name)")]


class RefreshRequest(_Strict):
    """Parameters of one refresh run; the Prefect UI renders them as a form."""

    repo_id: RepoId = "local-models/tiny-llama"
    revision: str = Field("main", description="Branch, tag or 40-hex commit sha")
    # A plain default (not a factory) so the Prefect UI form shows the patterns;
    # pydantic copies it for each instance.
    allow_patterns: list[str] = Field(
        default=list(SERVING_PATTERNS),
        min_length=1,
        description="Files to download (glob patterns)",
    )
    target_config: str = Field(
        "deployments/targets/local.yaml", description="Path of the target config"
    )
    force: bool = Field(False, description="Redeploy even if the sha already serves")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO_ID.match(value) or "--" in value or ".." in value:
            raise ValueError(
                f"repo_id {value!r} is not a Hugging Face repository id: use "
                "'namespace/name' with letters, digits, '-', '_' or '.'"
            )
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        if not value or len(value) > 255 or any(c.isspace() for c in value):
            raise ValueError(
                f"revision {value!r} is invalid: give a branch, tag or commit sha"
            )
        return value

    @field_validator("allow_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if (
                not pattern.strip()
                or pattern != pattern.strip()
                or pattern.startswith("/")
                or ".." in pattern.split("/")
                or "//" in pattern
            ):
                raise ValueError(
                    f"allow_patterns entry {pattern!r} can never match a repository "
                    "file: use a relative glob such as '*.safetensors'"
                )
            if pattern.endswith(PICKLE_SUFFIXES):
                raise ValueError(
                    f"allow_patterns entry {pattern!r} matches only pickle-based "
                    "weights, which are never downloaded because loading them can run "
                    "code: remove it and use '*.safetensors'"
                )
        if not any(_may_match_weights(pattern) for pattern in patterns):
            raise ValueError(
                f"allow_patterns {patterns!r} match no safetensors weights: add "
                "'*.safetensors'"
            )
        return patterns


def _may_match_weights(pattern: str) -> bool:
    probes = (
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "x/y.safetensors",
    )
    return pattern.endswith(".safetensors") or any(
        fnmatch.fnmatch(probe, pattern) for probe in probes
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key repeated in one mapping.

    PyYAML keeps the last value of a repeated key, so a second `llm:` section would
    silently replace the first.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader rejects an unhashable key itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice; keep one of them",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> RefreshConfig:
    """Read and validate a target config file; ConfigError lists every problem."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(
            f"target config {str(file)!r} is a directory: pass the path of a YAML file "
            "such as deployments/targets/local.yaml"
        )
    if not file.is_file():
        raise ConfigError(
            f"target config {str(file)!r} not found: pass the path of a YAML file such "
            "as deployments/targets/local.yaml"
        )
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"target config {str(file)!r} is not UTF-8 text (byte "
            f"{exc.object[exc.start]:#04x} at offset {exc.start}): save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"target config {str(file)!r} cannot be read: {exc.strerror}; check its "
            "permissions"
        ) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"target config {str(file)!r} is not valid YAML: {exc}"
        ) from exc
    except RecursionError:
        raise ConfigError(
            f"target config {str(file)!r} nests too deeply to read: a target config "
            "has at most a few levels, as in deployments/targets/local.yaml"
        ) from None
    fields = RefreshConfig.model_fields
    sections = ", ".join(name for name, info in fields.items() if info.is_required())
    sections += " (optional: "
    sections += ", ".join(n for n, info in fields.items() if not info.is_required())
    sections += ")"
    if data is None:
        raise ConfigError(
            f"target config {str(file)!r} is empty: it needs the top-level sections "
            f"{sections}; start from deployments/targets/local.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"target config {str(file)!r} contains a YAML {type(data).__name__}, not "
            f"a mapping: it needs the top-level sections {sections}; start from "
            "deployments/targets/local.yaml"
        )
    try:
        return RefreshConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(f"target config {str(file)!r}", exc, RefreshConfig)
        ) from exc


def parse_request(values: RefreshRequest | dict[str, object]) -> RefreshRequest:
    if isinstance(values, RefreshRequest):
        return values
    try:
        return RefreshRequest.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error("refresh request", exc, RefreshRequest)
        ) from exc


def format_validation_error(
    source: str, exc: ValidationError, model: type[BaseModel] | None = None
) -> str:
    """Write one line per error: the field path, the problem, the value and the fix.

    With `model`, an unknown key lists the keys its section accepts.
    """
    lines = [f"{source} is invalid:"]
    for error in exc.errors():
        location = error["loc"]
        field = ".".join(str(part) for part in location) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(model, location)
        elif error["type"] != "value_error" and _is_scalar(error.get("input")):
            # pydantic's own messages (ranges, literals, finite numbers) state the
            # rule but not the value.
            message = f"{message}, got {error['input']!r}"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _unknown_key_message(
    model: type[BaseModel] | None, location: tuple[int | str, ...]
) -> str:
    key = location[-1] if location else ""
    section = _section_model(model, location[:-1]) if model is not None else None
    if section is None:
        return f"unknown key {key!r}: remove it or fix its spelling"
    where = ".".join(str(part) for part in location[:-1]) or "the top level"
    allowed = ", ".join(section.model_fields)
    return f"unknown key {key!r}: {where} accepts {allowed}; remove or rename it"


def _section_model(
    model: type[BaseModel], path: tuple[int | str, ...]
) -> type[BaseModel] | None:
    current = model
    for part in path:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        found = _model_in(field.annotation) if field is not None else None
        if found is None:
            return None
        current = found
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model inside an annotation such as `Gpu | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
