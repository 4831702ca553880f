"""One instance of a Cloud Run revision, each of its containers run as a local process.

On Cloud Run the containers of an instance share one network namespace, so a sidecar
reaches the ingress container at `localhost:<port>`. Here every instance of every
revision shares the host's loopback. So each declared port (the ingress
`container_port` and the port of each startup probe) is mapped to a free loopback port,
and values that name a declared port are rewritten to the mapped one.

`plan_container` applies that mapping and the local image convention: the host
interpreter stands for the image's Python, and absolute image paths live under the
extracted rootfs. `Instance` starts the planned processes in dependency order and waits
for their startup probes.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# Cloud Run's default startup probe for the ingress container is a TCP check of its port
# with a 240 s period and one allowed failure.
DEFAULT_PROBE_PERIOD_SECONDS = 240
DEFAULT_INGRESS_PORT = 8080

# Cloud Run sends SIGTERM and then SIGKILL after 10 seconds when it stops an instance.
STOP_GRACE_SECONDS = 10.0

PROBE_POLL_SECONDS = 0.05
RECENT_LINES = 20
# Cloud Logging rejects entries above 256 KiB, so longer lines are cut.
MAX_LOG_LINE_BYTES = 256 * 1024

_HOST_PYTHON = re.compile(r"^(?:python3?(?:\.\d+)?|/usr(?:/local)?/bin/python[^/]*)$")
_LOOPBACK_ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1):(\d+)\b")
_PORT_FLAG = re.compile(r"^(--port=)(\d+)$")

LogLine = Callable[[str, str, str], None]


class StartupError(Exception):
    """An instance failed to start; `reason` is the Cloud Run condition reason name."""

    def __init__(
        self, message: str, reason: str = "HEALTH_CHECK_CONTAINER_ERROR"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class StartupProbe:
    kind: str  # "tcp" or "http"
    declared_port: int
    port: int  # the mapped loopback port
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay_seconds: int = 0
    timeout_seconds: int = 1
    period_seconds: int = DEFAULT_PROBE_PERIOD_SECONDS
    failure_threshold: int = 1

    @property
    def budget_seconds(self) -> int:
        """Time a container has to pass this probe, counted from its start."""
        return self.initial_delay_seconds + self.period_seconds * self.failure_threshold


@dataclass(frozen=True)
class ContainerPlan:
    """A container resolved to a local process: argv, env and cwd after all rewrites."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ingress: bool
    startup_probe: StartupProbe | None
    depends_on: tuple[str, ...] = ()


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def resolve_argv(
    command: Sequence[str],
    args: Sequence[str],
    entrypoint: Sequence[str],
    cmd: Sequence[str],
) -> list[str]:
    """Combine the spec's command/args with the image's Entrypoint/Cmd like Kubernetes.

    A spec command replaces both Entrypoint and Cmd; spec args alone replace only Cmd.
    """
    if command:
        return [*command, *args]
    if args:
        return [*entrypoint, *args]
    return [*entrypoint, *cmd]


def map_into_rootfs(value: str, rootfs: Path) -> str:
    """Rewrite an absolute image path, alone or after `--flag=`, to live under `rootfs`.

    Only paths whose first segment exists in the image are rewritten, so host paths such
    as `/tmp` or `/dev/null` keep their meaning.
    """
    prefix, sep, tail = value.partition("=")
    if sep and prefix.startswith("-") and tail.startswith("/"):
        return prefix + sep + map_into_rootfs(tail, rootfs)
    if not value.startswith("/") or value.startswith("//"):
        return value
    first = value.lstrip("/").split("/", 1)[0]
    if first and (rootfs / first).exists():
        return str(rootfs) + value
    return value


def map_loopback_ports(value: str, ports: Mapping[int, int]) -> str:
    """Rewrite the port of `localhost:P` and `127.0.0.1:P` to the mapping of P."""

    def replace(match: re.Match[str]) -> str:
        declared = int(match.group(2))
        mapped = ports.get(declared)
        return f"{match.group(1)}:{mapped}" if mapped is not None else match.group(0)

    return _LOOPBACK_ADDRESS.sub(replace, value)


def _map_port_flags(
    argv: list[str], own_port: int | None, mapped: int | None
) -> list[str]:
    # Servers such as vLLM take their port as `--port N`. On Cloud Run N is a port of
    # the shared localhost, so locally it becomes the mapped port.
    if own_port is None or mapped is None:
        return argv
    result = list(argv)
    for index, item in enumerate(result):
        match = _PORT_FLAG.match(item)
        if match and int(match.group(2)) == own_port:
            result[index] = f"{match.group(1)}{mapped}"
        elif (
            item == "--port"
            and index + 1 < len(result)
            and result[index + 1] == str(own_port)
        ):
            result[index + 1] = str(mapped)
    return result


def plan_container(
    *,
    name: str,
    argv: list[str],
    env: dict[str, str],
    working_dir: str,
    rootfs: Path,
    ports: Mapping[int, int],
    own_port: int | None,
    ingress: bool,
    startup_probe: StartupProbe | None,
    depends_on: Sequence[str],
) -> ContainerPlan:
    """Apply the local image convention and the port mapping to one container."""
    if not argv:
        raise StartupError(
            f"Container '{name}' has no command: the image sets neither Entrypoint nor "
            "Cmd. Set `command` in the container spec or an entrypoint in the image.",
            reason="CONTAINER_MISSING",
        )
    mapped_port = ports.get(own_port) if own_port is not None else None
    program = sys.executable if _HOST_PYTHON.match(argv[0]) else argv[0]
    rewritten = [program] + [
        map_loopback_ports(map_into_rootfs(item, rootfs), ports) for item in argv[1:]
    ]
    if program == argv[0]:
        rewritten[0] = map_into_rootfs(program, rootfs)
    rewritten = _map_port_flags(rewritten, own_port, mapped_port)

    process_env = {
        key: map_loopback_ports(map_into_rootfs(value, rootfs), ports)
        for key, value in env.items()
    }
    if mapped_port is not None:
        process_env["PORT"] = str(mapped_port)

    cwd = rootfs / working_dir.lstrip("/") if working_dir else rootfs
    return ContainerPlan(
        name=name,
        argv=rewritten,
        env=process_env,
        cwd=cwd,
        ingress=ingress,
        startup_probe=startup_probe,
        depends_on=tuple(depends_on),
    )


@dataclass
class _Process:
    plan: ContainerPlan
    popen: subprocess.Popen[bytes]
    pumps: list[threading.Thread] = field(default_factory=list)


class Instance:
    """The processes of one revision instance, started and stopped together.

    With `record_dir`, each process gets a record there from its launch until it is
    stopped, so `stop_recorded_processes` can end it after localcloud was killed.
    """

    def __init__(
        self,
        plans: Sequence[ContainerPlan],
        log_line: LogLine,
        record_dir: Path | None = None,
    ) -> None:
        self.plans = list(plans)
        self._log_line = log_line
        self._record_dir = record_dir
        self._processes: list[_Process] = []
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self._lock = threading.Lock()

    @property
    def ingress_port(self) -> int:
        for plan in self.plans:
            if plan.ingress:
                return int(plan.env["PORT"])
        raise StartupError(
            "The revision has no ingress container.", "CONTAINER_MISSING"
        )

    def recent_lines(self) -> list[str]:
        with self._lock:
            return list(self._recent)

    def start(self) -> None:
        """Start every container in dependency order and wait for its startup probe.

        Raises StartupError, after stopping what was started, when a container cannot be
        launched, exits, or does not pass its probe in time.
        """
        try:
            for wave in self._waves():
                started = [self._launch(plan) for plan in wave]
                for process in started:
                    self._wait_started(process)
        except StartupError:
            self.stop(grace=1.0)
            raise

    def running(self) -> bool:
        return bool(self._processes) and all(
            process.popen.poll() is None for process in self._processes
        )

    def exit_codes(self) -> dict[str, int | None]:
        return {process.plan.name: process.popen.poll() for process in self._processes}

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Send SIGTERM to every process group, and SIGKILL after `grace`."""
        processes, self._processes = self._processes, []
        for process in processes:
            _signal_group(process.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                _signal_group(process.popen, signal.SIGKILL)
                process.popen.wait()
            # A container's children may hold the pipes open after it exits.
            _signal_group(process.popen, signal.SIGKILL)
            for pump in process.pumps:
                pump.join(timeout=1.0)
            if self._record_dir is not None:
                (self._record_dir / f"{process.popen.pid}.json").unlink(missing_ok=True)

    def _waves(self) -> list[list[ContainerPlan]]:
        remaining = {plan.name: plan for plan in self.plans}
        done: set[str] = set()
        waves = []
        while remaining:
            wave = [
                plan
                for plan in remaining.values()
                if all(dependency in done for dependency in plan.depends_on)
            ]
            if not wave:
                raise StartupError(
                    "Containers depend on each other in a cycle: "
                    f"{', '.join(sorted(remaining))}. Remove one depends_on entry."
                )
            waves.append(wave)
            for plan in wave:
                done.add(plan.name)
                del remaining[plan.name]
        return waves

    def _launch(self, plan: ContainerPlan) -> _Process:
        plan.cwd.mkdir(parents=True, exist_ok=True)
        logger.debug("starting container %s: %s", plan.name, plan.argv)
        try:
            popen = subprocess.Popen(
                plan.argv,
                env=plan.env,
                cwd=plan.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # A process group of its own, so stop() also reaches its children.
                # A localcloud killed with SIGKILL leaves the group running until
                # the next start calls stop_recorded_processes.
                start_new_session=True,
            )
        except OSError as exc:
            raise StartupError(
                f"Container '{plan.name}' failed to start: cannot execute "
                f"{plan.argv[0]!r} ({exc.strerror}). Check the command and the image "
                "entrypoint.",
                reason="CONTAINER_MISSING",
            ) from exc
        process = _Process(plan, popen)
        if self._record_dir is not None:
            _write_process_record(self._record_dir, popen.pid, plan.name)
        assert popen.stdout is not None and popen.stderr is not None
        for stream_name, stream in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            pump = threading.Thread(
                target=self._pump,
                args=(plan.name, stream_name, stream),
                name=f"logs-{plan.name}-{stream_name}",
                daemon=True,
            )
            pump.start()
            process.pumps.append(pump)
        self._processes.append(process)
        return process

    def _pump(self, container: str, stream_name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                text = (
                    raw[:MAX_LOG_LINE_BYTES].decode("utf-8", "replace").rstrip("\r\n")
                )
                with self._lock:
                    self._recent.append(f"{container}: {text}")
                try:
                    self._log_line(container, stream_name, text)
                except Exception:
                    logger.exception(
                        "writing a log line of container %s failed", container
                    )

    def _wait_started(self, process: _Process) -> None:
        probe = process.plan.startup_probe
        if probe is None:
            # Cloud Run treats a container without a startup probe as started at once.
            return
        started = time.monotonic()
        not_before = started + probe.initial_delay_seconds
        deadline = started + probe.budget_seconds
        while True:
            code = process.popen.poll()
            if code is not None:
                self._drain(process)
                raise StartupError(
                    f"Container '{process.plan.name}' exited with code {code} before "
                    f"its startup probe passed.{self._last_lines_text()}"
                )
            now = time.monotonic()
            if now >= not_before and _probe_passes(probe):
                return
            if now >= deadline:
                raise StartupError(
                    f"Container '{process.plan.name}' did not pass its {probe.kind} "
                    f"startup probe on port {probe.declared_port} within "
                    f"{probe.budget_seconds}s. Make it listen on the port in $PORT, or "
                    "raise the probe's period_seconds or failure_threshold."
                    f"{self._last_lines_text()}"
                )
            time.sleep(PROBE_POLL_SECONDS)

    def _drain(self, process: _Process) -> None:
        # The pumps finish once the pipes close; wait briefly so the last lines count.
        for pump in process.pumps:
            pump.join(timeout=1.0)

    def _last_lines_text(self) -> str:
        lines = self.recent_lines()
        if not lines:
            return " The container wrote no log lines."
        return " Last log lines:\n" + "\n".join(lines)


def _probe_passes(probe: StartupProbe) -> bool:
    if probe.kind == "tcp":
        try:
            with socket.create_connection(
                ("127.0.0.1", probe.port), timeout=probe.timeout_seconds
            ):
                return True
        except OSError:
            return False
    connection = http.client.HTTPConnection(
        "127.0.0.1", probe.port, timeout=probe.timeout_seconds
    )
    try:
        connection.request("GET", probe.path or "/", headers=dict(probe.headers))
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
    return 200 <= status < 400


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _process_start_ticks(pid: int) -> int | None:
    """Return a process's start time (clock ticks since boot), or None when it is gone
    or a zombie. Together with the pid it identifies one process, as pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after the parenthesised command name start with field 3 (state), so
    # field 22 (starttime) is at index 19.
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _write_process_record(record_dir: Path, pid: int, container: str) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": pid,
        "start_ticks": _process_start_ticks(pid),
        "container": container,
    }
    path = record_dir / f"{pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def stop_recorded_processes(
    record_dir: Path, grace: float = STOP_GRACE_SECONDS
) -> list[int]:
    """Stop the process groups recorded in `record_dir` and delete the records.

    The records left there belong to instances of a localcloud that was killed before
    it could stop them. A record whose pid now names another process (a different
    start time) is dropped without a signal, and so is one whose leader has exited,
    even if children of the leader still run in its group. Returns the pids that were
    signalled.
    """
    if not record_dir.is_dir():
        return []
    signalled = []
    for path in sorted(record_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
            expected = record["start_ticks"]
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("ignoring unreadable instance process record %s", path)
            path.unlink(missing_ok=True)
            continue
        ticks = _process_start_ticks(pid)
        if ticks is not None and ticks == expected:
            logger.warning(
                "stopping process group %d (container %s) left by a localcloud that "
                "was killed",
                pid,
                record.get("container", "?"),
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            signalled.append(pid)
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + grace
    for pid in signalled:
        # These are not our children, so they cannot be waited for; once gone or a
        # zombie their start time reads as None.
        while _process_start_ticks(pid) is not None and time.monotonic() < deadline:
            time.sleep(PROBE_POLL_SECONDS)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for tmp in record_dir.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    return signalled
