"""The Cloud Run runtime of localcloud: revisions run as local processes from images.

`Runtime` pulls each revision's images from the local registry into a folder per
revision, and the registry checks every digest. It starts the containers with the host
interpreter, the revision's env and its pinned secret versions. It writes their stdout
and stderr to Logging as Cloud Run does, and routes each service URL and tag URL
through an IAM front door.

Instances follow Cloud Run's scale-to-zero contract loosely. A revision with traffic or
a tag is started on deploy and restarted on its next request when it is not running
(after a restart of localcloud, or when its process died); other revisions are stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.api import monitored_resource_pb2
from google.cloud import run_v2
from google.cloud.logging_v2.types import LogEntry
from google.logging.type import log_severity_pb2
from google.protobuf import struct_pb2

from localcloud.api.resources import now_timestamp
from localcloud.runtime.frontdoor import FrontDoors, Route
from localcloud.runtime.instance import (
    DEFAULT_INGRESS_PORT,
    ContainerPlan,
    Instance,
    StartupError,
    StartupProbe,
    free_loopback_port,
    plan_container,
    resolve_argv,
    stop_recorded_processes,
)

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

logger = logging.getLogger(__name__)

RUNTIME_DIR = "runtime"
EXTRACTED_MARKER = "extracted.json"
# Under RUNTIME_DIR: one record per running container process, see Instance. Project
# ids start with a letter, so this name never collides with a project's folder.
PROCESS_RECORDS_DIR = "_processes"

# Prefixes of the `logging.googleapis.com/*` fields that Cloud Logging's agent lifts out
# of a JSON line into the entry itself.
_TRACE_FIELD = "logging.googleapis.com/trace"
_SPAN_FIELD = "logging.googleapis.com/spanId"
_SAMPLED_FIELD = "logging.googleapis.com/trace_sampled"
_LABELS_FIELD = "logging.googleapis.com/labels"

_SEVERITY_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "TRACE": "DEBUG"}


@dataclass(frozen=True)
class Readiness:
    """The outcome of starting a revision: Ready, or the reason and message why not."""

    ready: bool
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class RevisionName:
    project: str
    location: str
    service: str
    revision: str

    @classmethod
    def parse(cls, name: str) -> RevisionName:
        parts = name.split("/")
        if len(parts) != 8 or parts[0::2] != [
            "projects",
            "locations",
            "services",
            "revisions",
        ]:
            raise ValueError(
                f"revision name {name!r} is invalid; expected "
                "projects/P/locations/L/services/S/revisions/R"
            )
        return cls(parts[1], parts[3], parts[5], parts[7])

    @property
    def service_name(self) -> str:
        return (
            f"projects/{self.project}/locations/{self.location}/services/{self.service}"
        )


# How long stop() waits for one instance start that is in flight.
STOP_WAIT_SECONDS = 60.0


class RuntimeStopped(StartupError):
    """An instance start was refused or cut short because localcloud is stopping.

    The error is not a fault of the revision, so a deploy that gets it leaves the
    revision reconciling for the next start of localcloud to resume.
    """

    def __init__(self, revision_name: str) -> None:
        super().__init__(
            f"localcloud is shutting down; {revision_name} was not started.", "INTERNAL"
        )


class Runtime:
    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.root = cloud.state_dir / RUNTIME_DIR
        self.frontdoors = FrontDoors(self)
        self._instances: dict[str, Instance] = {}
        self._revision_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # Set by stop(): a deploy still running in another thread must not leave an
        # instance behind once the process is shutting down.
        self._stopped = False

    # Lifecycle

    def start(self) -> None:
        """Stop instances left by a killed localcloud, then open the front door of
        every stored service. Instances start on demand."""
        from localcloud.api import run

        stopped = stop_recorded_processes(self.root / PROCESS_RECORDS_DIR)
        if stopped:
            logger.warning(
                "stopped %d container process(es) left by a localcloud that was "
                "killed: %s",
                len(stopped),
                stopped,
            )
        self.frontdoors.start()
        for service in run.list_all_services(self.cloud):
            self.update_routing(service, start_instances=False)

    def stop(self) -> None:
        self.frontdoors.stop()
        with self._lock:
            self._stopped = True
            revision_locks = list(self._revision_locks.values())
        # Wait for starts in flight: each holds its revision lock and, seeing the
        # stop flag, stops what it started before releasing the lock.
        for lock in revision_locks:
            if lock.acquire(timeout=STOP_WAIT_SECONDS):
                lock.release()
        with self._lock:
            instances, self._instances = self._instances, {}
        for name, instance in instances.items():
            logger.info("stopping instance of %s", name)
            instance.stop()

    # Used by the Cloud Run API

    def url_for(self, service_name: str, tag: str | None = None) -> str:
        """Return the loopback URL of a service, or of one of its tags."""
        port = self.frontdoors.ensure_port(service_name, tag or "")
        return f"http://127.0.0.1:{port}"

    def deploy_revision(self, revision: run_v2.Revision) -> Readiness:
        """Start an instance of `revision` and report whether it became Ready.

        Raises RuntimeStopped when localcloud stops before the outcome is known.
        """
        try:
            self.ensure_running(revision.name, revision)
        except RuntimeStopped:
            raise
        except StartupError as exc:
            logger.info("revision %s is not ready: %s", revision.name, exc.message)
            return Readiness(False, exc.reason, exc.message)
        return Readiness(True, "", "")

    def update_routing(
        self, service: run_v2.Service, start_instances: bool = True
    ) -> None:
        """Route the service URL and tag URLs by `service.traffic_statuses`.

        Revisions that keep neither traffic nor a tag are stopped.
        """
        route = Route.from_service(service)
        self.frontdoors.set_route(service.name, route)
        keep = set(route.revisions())
        prefix = service.name + "/revisions/"
        with self._lock:
            stale = [
                name
                for name in self._instances
                if name.startswith(prefix) and name not in keep
            ]
        for name in stale:
            self.stop_revision(name)
        if start_instances:
            for name in keep:
                self.ensure_running(name)

    def remove_service(self, service_name: str) -> None:
        self.frontdoors.remove_service(service_name)
        prefix = service_name + "/revisions/"
        with self._lock:
            names = [name for name in self._instances if name.startswith(prefix)]
        for name in names:
            self.stop_revision(name)
        shutil.rmtree(self._service_dir(service_name), ignore_errors=True)

    def remove_revision(self, revision_name: str) -> None:
        self.stop_revision(revision_name)
        shutil.rmtree(self._revision_dir(revision_name), ignore_errors=True)

    def stop_revision(self, revision_name: str) -> None:
        with self._lock:
            instance = self._instances.pop(revision_name, None)
        if instance is not None:
            logger.info("stopping instance of %s", revision_name)
            instance.stop()

    # Used by the front door

    def ensure_running(
        self, revision_name: str, revision: run_v2.Revision | None = None
    ) -> Instance:
        """Return the running instance of a revision, starting one when none runs.

        Raises StartupError when the instance cannot start.
        """
        with self._lock:
            lock = self._revision_locks.setdefault(revision_name, threading.Lock())
        with lock:
            with self._lock:
                instance = self._instances.get(revision_name)
            if instance is not None and instance.running():
                return instance
            if instance is not None:
                logger.warning(
                    "instance of %s stopped running (exit codes %s); restarting it",
                    revision_name,
                    instance.exit_codes(),
                )
                self.stop_revision(revision_name)
            if revision is None:
                revision = self._load_revision(revision_name)
            self._raise_if_stopped(revision_name)
            instance = self._start_instance(revision)
            with self._lock:
                stopped = self._stopped
                if not stopped:
                    self._instances[revision_name] = instance
            if stopped:
                instance.stop()
                self._raise_if_stopped(revision_name)
            return instance

    def _raise_if_stopped(self, revision_name: str) -> None:
        with self._lock:
            stopped = self._stopped
        if stopped:
            raise RuntimeStopped(revision_name)

    def write_logs(self, entries: list[LogEntry]) -> None:
        try:
            self.cloud.logs.write(entries)
        except Exception:
            logger.exception("writing %d log entries failed", len(entries))

    # Instances

    def _load_revision(self, revision_name: str) -> run_v2.Revision:
        from localcloud.api import run

        revision = run.load_revision(self.cloud, revision_name)
        if revision is None:
            raise StartupError(
                f"Revision {revision_name} no longer exists.", "INTERNAL"
            )
        return revision

    def _start_instance(self, revision: run_v2.Revision) -> Instance:
        name = RevisionName.parse(revision.name)
        instance_id = secrets.token_hex(16)
        plans = self._plan(revision, name)
        resource = _revision_resource(name)

        def log_line(container: str, stream: str, line: str) -> None:
            entry = container_log_entry(
                resource, name, container, stream, line, instance_id
            )
            self.write_logs([entry])

        instance = Instance(plans, log_line, self.root / PROCESS_RECORDS_DIR)
        logger.info("starting instance %s of %s", instance_id[:8], revision.name)
        instance.start()
        return instance

    def _plan(
        self, revision: run_v2.Revision, name: RevisionName
    ) -> list[ContainerPlan]:
        containers = list(revision.containers)
        ports = _declared_ports(containers)
        cloud_run_env = {
            "K_SERVICE": name.service,
            "K_REVISION": name.revision,
            "K_CONFIGURATION": name.service,
        }
        plans = []
        for index, container in enumerate(containers):
            rootfs, config = self._extract(revision.name, container.image)
            container_name = container.name or f"container-{index}"
            env = _image_env(config)
            env.update(self._spec_env(name.project, container_name, container))
            env.update(cloud_run_env)
            own_port = _own_port(container)
            plans.append(
                plan_container(
                    name=container_name,
                    argv=resolve_argv(
                        container.command,
                        container.args,
                        config.get("Entrypoint") or [],
                        config.get("Cmd") or [],
                    ),
                    env=env,
                    working_dir=container.working_dir or config.get("WorkingDir") or "",
                    rootfs=rootfs,
                    ports=ports,
                    own_port=own_port,
                    ingress=bool(container.ports),
                    startup_probe=_startup_probe(container, own_port, ports),
                    depends_on=list(container.depends_on),
                )
            )
        return plans

    def _extract(self, revision_name: str, image: str) -> tuple[Path, dict[str, Any]]:
        """Pull `image` into the revision's folder once; later starts reuse it."""
        from localcloud.registry import ImagePullError

        digest = image.rsplit("@", 1)[1] if "@" in image else image
        key = hashlib.sha256(digest.encode()).hexdigest()[:16]
        folder = self._revision_dir(revision_name) / key
        rootfs = folder / "rootfs"
        marker = folder / EXTRACTED_MARKER
        if marker.exists():
            recorded = json.loads(marker.read_text())
            if recorded.get("image") == image:
                return rootfs, recorded["config"]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            config = self.cloud.registry.extract_image(image, rootfs)
        except ImagePullError as exc:
            raise StartupError(
                f"Image '{image}' cannot be pulled: {exc}. Push the image to the local "
                "registry and deploy it by digest.",
                reason="CONTAINER_MISSING",
            ) from exc
        marker.write_text(json.dumps({"image": image, "config": config}))
        return rootfs, config

    def _spec_env(
        self, project: str, container_name: str, container: run_v2.Container
    ) -> dict[str, str]:
        env = {}
        for variable in container.env:
            if "value_source" in variable:
                env[variable.name] = self._secret_value(
                    project, container_name, variable
                )
            else:
                env[variable.name] = variable.value
        return env

    def _secret_value(
        self, project: str, container_name: str, variable: run_v2.EnvVar
    ) -> str:
        from localcloud.api.secrets import SecretAccessError, access_secret_version

        reference = variable.value_source.secret_key_ref
        secret = reference.secret
        if not secret.startswith("projects/"):
            secret = f"projects/{project}/secrets/{secret}"
        version_name = f"{secret}/versions/{reference.version or 'latest'}"
        try:
            payload = access_secret_version(self.cloud, version_name)
        except SecretAccessError as exc:
            raise StartupError(
                f"Environment variable {variable.name} of container '{container_name}' "
                f"references secret version {version_name}, which cannot be accessed: "
                f"{exc}. Pin an enabled version in the revision template.",
                reason="SECRETS_ACCESS_CHECK_FAILED",
            ) from exc
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StartupError(
                f"Secret version {version_name} for environment variable "
                f"{variable.name} is not UTF-8 text, so it cannot be an environment "
                "value. Mount binary secrets as files instead.",
                reason="SECRETS_ACCESS_CHECK_FAILED",
            ) from exc

    def _service_dir(self, service_name: str) -> Path:
        parts = service_name.split("/")
        return self.root / parts[1] / parts[3] / parts[5]

    def _revision_dir(self, revision_name: str) -> Path:
        name = RevisionName.parse(revision_name)
        return self._service_dir(name.service_name) / name.revision


def _declared_ports(containers: Sequence[run_v2.Container]) -> dict[int, int]:
    """Map each port the containers declare (ingress, probe ports) to a free one."""
    declared: set[int] = set()
    for container in containers:
        own = _own_port(container)
        if own is not None:
            declared.add(own)
    return {port: free_loopback_port() for port in sorted(declared)}


def _own_port(container: run_v2.Container) -> int | None:
    """Return the port a container listens on: its container_port, else its probe's."""
    if container.ports:
        return container.ports[0].container_port or DEFAULT_INGRESS_PORT
    probe = container.startup_probe
    if "tcp_socket" in probe and probe.tcp_socket.port:
        return int(probe.tcp_socket.port)
    if "http_get" in probe and probe.http_get.port:
        return int(probe.http_get.port)
    return None


def _startup_probe(
    container: run_v2.Container, own_port: int | None, ports: dict[int, int]
) -> StartupProbe | None:
    spec = container.startup_probe
    has_probe = "tcp_socket" in spec or "http_get" in spec
    if not has_probe:
        if not container.ports or own_port is None:
            return None
        return StartupProbe(kind="tcp", declared_port=own_port, port=ports[own_port])
    declared = own_port or DEFAULT_INGRESS_PORT
    timing: dict[str, Any] = {
        "initial_delay_seconds": spec.initial_delay_seconds,
        "timeout_seconds": spec.timeout_seconds or 1,
        "period_seconds": spec.period_seconds or 10,
        "failure_threshold": spec.failure_threshold or 3,
    }
    if "http_get" in spec:
        declared = spec.http_get.port or declared
        return StartupProbe(
            kind="http",
            declared_port=declared,
            port=ports.get(declared, declared),
            path=spec.http_get.path or "/",
            headers=tuple(
                (header.name, header.value) for header in spec.http_get.http_headers
            ),
            **timing,
        )
    declared = spec.tcp_socket.port or declared
    return StartupProbe(
        kind="tcp", declared_port=declared, port=ports.get(declared, declared), **timing
    )


def _image_env(config: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in config.get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _revision_resource(name: RevisionName) -> monitored_resource_pb2.MonitoredResource:
    return monitored_resource_pb2.MonitoredResource(
        type="cloud_run_revision",
        labels={
            "project_id": name.project,
            "service_name": name.service,
            "revision_name": name.revision,
            "location": name.location,
            "configuration_name": name.service,
        },
    )


def container_log_entry(
    resource: monitored_resource_pb2.MonitoredResource,
    name: RevisionName,
    container: str,
    stream: str,
    line: str,
    instance_id: str,
) -> LogEntry:
    """Turn one line of a container's stdout or stderr into a Cloud Run log entry.

    A line that is a JSON object becomes a json_payload. Its `severity` field becomes
    the entry severity, and its trace, span and labels fields move into the entry, as
    Cloud Logging does for Cloud Run. Any other line is a text_payload without severity.
    """
    stamp = now_timestamp()
    entry = LogEntry(
        log_name=f"projects/{name.project}/logs/run.googleapis.com%2F{stream}",
        resource=resource,
        timestamp=stamp,
        receive_timestamp=stamp,
        insert_id=secrets.token_hex(10),
        labels={"instanceId": instance_id, "container_name": container},
    )
    payload = _json_object(line)
    if payload is None:
        entry.text_payload = line
        return entry

    severity = payload.pop("severity", None)
    entry.severity = _severity(severity)
    trace = payload.pop(_TRACE_FIELD, None)
    if isinstance(trace, str):
        entry.trace = trace
    span = payload.pop(_SPAN_FIELD, None)
    if isinstance(span, str):
        entry.span_id = span
    sampled = payload.pop(_SAMPLED_FIELD, None)
    if isinstance(sampled, bool):
        entry.trace_sampled = sampled
    labels = payload.pop(_LABELS_FIELD, None)
    if isinstance(labels, dict):
        entry.labels.update({str(key): str(value) for key, value in labels.items()})
    struct = struct_pb2.Struct()
    struct.update(payload)
    entry.json_payload = struct
    return entry


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _severity(value: object) -> int:
    if isinstance(value, int) and value in log_severity_pb2.LogSeverity.values():
        return value
    if not isinstance(value, str):
        return log_severity_pb2.DEFAULT
    text = value.strip().upper()
    text = _SEVERITY_ALIASES.get(text, text)
    if text in log_severity_pb2.LogSeverity.keys():  # noqa: SIM118
        return int(log_severity_pb2.LogSeverity.Value(text))
    return log_severity_pb2.DEFAULT
