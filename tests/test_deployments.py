"""The served deployments on a real Prefect server, and the watcher's event end to end.

The module starts one `prefect server start`, one `python -m deployments.serve` and one
localcloud with the demo Hub repositories. The first tests read the deployments back
through the API, which is where the Prefect UI reads them. The later tests run in
order: the watcher announces the unserved `main` sha, the trigger starts a refresh for
exactly that sha, an unchanged Hub stays quiet, and a new commit starts a new refresh.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from uuid import UUID, uuid4

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)

from deployments.serve import AUDIT_CRON, NIGHTLY_CRON, WATCH_INTERVAL_SECONDS
from flows.watch_models import NEW_REVISION_EVENT, model_resource_id, watch_models
from localcloud.hub.__main__ import publish_next
from localcloud.server import LocalCloud
from tasks.clients import clients_for
from tasks.config import RefreshRequest, load_config
from tasks.deploy import read_serving
from tests.conftest import REPO_ROOT

REPO = "local-models/tiny-llama"
REFRESH = "model-refresh/nightly"
WATCHER = "watch-models/hub-poll"
AUDIT = "security-audit/daily"
SHA = re.compile(r"[0-9a-f]{40}")
# Event used only by these tests to flush the event pipeline. Events from one client
# arrive in order, so once the server stores the marker, it has received every event
# this process emitted before it.
MARKER_EVENT = "model-refresh.test.marker"

# Measured on 2 cores: a new server (database migrations) is healthy after about 30 s
# when the machine is idle and 100 s at load average 8. One refresh takes 45-65 s.
SERVER_START_TIMEOUT = 180.0
SERVE_START_TIMEOUT = 90.0
RUN_CREATED_TIMEOUT = 60.0
RUN_FINISHED_TIMEOUT = 240.0
STOP_GRACE_SECONDS = 20.0

# The module's fixtures start three components, and their time counts against the
# first test.
pytestmark = pytest.mark.timeout(480)

T = TypeVar("T")


@dataclass(frozen=True)
class PrefectServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class Served:
    refresh: DeploymentResponse
    watcher: DeploymentResponse
    audit: DeploymentResponse
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_for(
    probe: Callable[[], T | None], timeout: float, what: str, log: Path | None = None
) -> T:
    """Call `probe` every half second until it returns a value other than None."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            detail = f"\nlast lines of {log}:\n{_log_tail(log)}" if log else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(0.5)


def _subprocess_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    """Return this process's environment with every Prefect setting replaced by ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with start_new_session=True, and its children.

    SIGTERM first, so `serve` cancels its flow runs through the API and the server
    shuts down its services. SIGKILL then ends whatever is left of the group.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _drain_workers() -> None:
    """Deliver queued events and logs, and drop the workers bound to an earlier API URL.

    The workers are process-wide and keep the API URL they started with, so a worker
    left by another test module would otherwise send this module's events there.
    """
    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """Launch `prefect server start` and return without waiting for it.

    `prefect_api` waits, so the server's database migrations overlap localcloud's start.
    """
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "prefect", "server", "start"),
                *("--host", "127.0.0.1", "--port", str(port), "--no-ui"),
            ],
            env=_subprocess_env(home, url),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield PrefectServer(url, log, process)
    finally:
        _stop_process_group(process)


@pytest.fixture(scope="module")
def prefect_api(prefect_server: PrefectServer, target: Path) -> Iterator[str]:
    """Wait until the server is healthy and point this process's Prefect client at it.

    `target` is requested only to start localcloud while the server migrates.
    """
    url = prefect_server.url
    log = prefect_server.log

    def healthy() -> bool | None:
        code = prefect_server.process.poll()
        if code is not None:
            pytest.fail(f"prefect server exited with {code}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        return None

    _wait_for(healthy, SERVER_START_TIMEOUT, f"{url}/health", log)
    _drain_workers()
    with temporary_settings(
        updates={PREFECT_API_URL: url, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    ):
        try:
            yield url
        finally:
            _drain_workers()


@pytest.fixture(scope="module")
def served(
    prefect_api: str, target: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("serve")
    env = _subprocess_env(folder / "prefect-home", prefect_api)
    env.update(
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        MODEL_REFRESH_CACHE=str(folder / "cache"),
    )
    log = folder / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve", "--target", str(target)],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with get_client(sync_client=True) as client:

            def ready() -> Served | None:
                if process.poll() is not None:
                    pytest.fail(
                        f"deployments.serve exited with {process.returncode}:\n"
                        + _log_tail(log)
                    )
                try:
                    refresh = client.read_deployment_by_name(REFRESH)
                    watcher = client.read_deployment_by_name(WATCHER)
                    audit = client.read_deployment_by_name(AUDIT)
                except ObjectNotFound:
                    return None
                # serve creates the trigger's automation after the deployment.
                if not _automations(client, refresh.id):
                    return None
                return Served(refresh, watcher, audit, log)

            deployments = _wait_for(
                ready, SERVE_START_TIMEOUT, "both deployments and the trigger", log
            )
        yield deployments
    finally:
        _stop_process_group(process)


def _automations(client: SyncPrefectClient, deployment_id: UUID) -> list[Any]:
    related = client.read_resource_related_automations(
        f"prefect.deployment.{deployment_id}"
    )
    return list(related)


def _runs(client: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def _triggered_runs(client: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    return [
        run
        for run in _runs(client, deployment_id)
        if run.created_by is not None and run.created_by.type == "AUTOMATION"
    ]


def _run_watcher(target: Path) -> str | None:
    """Run the watcher flow in this process, then deliver the events it emitted."""
    sha = watch_models(RefreshRequest(target_config=str(target)))
    _drain_workers()
    return sha


def _flush_events(client: SyncPrefectClient, log: Path) -> None:
    """Emit a marker event and wait until the server stores it."""
    resource_id = f"model-refresh.test.{uuid4().hex}"
    emit_event(event=MARKER_EVENT, resource={"prefect.resource.id": resource_id})
    _drain_workers()
    marker_filter = EventFilter(
        event=EventNameFilter(name=[MARKER_EVENT]),
        resource=EventResourceFilter(id=[resource_id]),
    )

    def stored() -> bool | None:
        # Prefect 3.9's client requests 100 events by default, but the server's
        # maximum is 50.
        return True if client.read_events(marker_filter, limit=50).events else None

    _wait_for(stored, RUN_CREATED_TIMEOUT, f"marker event {resource_id}", log)


def _revision_events(client: SyncPrefectClient) -> list[Any]:
    page = client.read_events(
        EventFilter(event=EventNameFilter(name=[NEW_REVISION_EVENT])), limit=50
    )
    return list(page.events)


def _wait_for_triggered_run(
    client: SyncPrefectClient, served: Served, sha: str
) -> FlowRun:
    def created() -> FlowRun | None:
        for run in _triggered_runs(client, served.refresh.id):
            if run.parameters.get("request", {}).get("revision") == sha:
                return run
        return None

    return _wait_for(
        created, RUN_CREATED_TIMEOUT, f"a triggered run for {sha}", served.log
    )


def _wait_for_final_state(
    client: SyncPrefectClient, served: Served, run_id: UUID
) -> FlowRun:
    def finished() -> FlowRun | None:
        run = client.read_flow_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    return _wait_for(
        finished, RUN_FINISHED_TIMEOUT, f"flow run {run_id} to finish", served.log
    )


def _serving_sha(target: Path) -> str | None:
    config = load_config(target)
    serving = read_serving.fn(clients_for(config.target), config.llm.name)
    return None if serving is None else serving.model_sha


class TestDeploymentsOnServer:
    def test_nightly_cron_runs_at_two_utc(self, served: Served) -> None:
        schedules = served.refresh.schedules
        assert len(schedules) == 1
        schedule = schedules[0]
        assert getattr(schedule.schedule, "cron", None) == NIGHTLY_CRON
        assert getattr(schedule.schedule, "timezone", None) == "UTC"
        assert schedule.active

        # The scheduler's runs show which time zone the server applies to the cron.
        with get_client(sync_client=True) as client:
            scheduled = _wait_for(
                lambda: (
                    [r for r in _runs(client, served.refresh.id) if r.auto_scheduled]
                    or None
                ),
                RUN_CREATED_TIMEOUT,
                "the scheduler to create nightly runs",
                served.log,
            )
        start_times = [r.expected_start_time for r in scheduled]
        assert None not in start_times
        utc_times = {
            (t.astimezone(UTC).hour, t.astimezone(UTC).minute) for t in start_times if t
        }
        assert utc_times == {(2, 0)}
        revisions = {r.parameters["request"]["revision"] for r in scheduled}
        assert revisions == {"main"}

    def test_watcher_polls_every_ten_minutes(self, served: Served) -> None:
        schedules = served.watcher.schedules
        assert len(schedules) == 1
        interval = getattr(schedules[0].schedule, "interval", None)
        assert interval == timedelta(seconds=WATCH_INTERVAL_SECONDS)

    def test_audit_runs_daily_at_three_utc(self, served: Served, target: Path) -> None:
        schedules = served.audit.schedules
        assert len(schedules) == 1
        assert getattr(schedules[0].schedule, "cron", None) == AUDIT_CRON
        assert getattr(schedules[0].schedule, "timezone", None) == "UTC"
        assert AUDIT_CRON == "0 3 * * *"
        request = served.audit.parameters["request"]
        assert request == {"target_config": str(target)}
        options = served.audit.concurrency_options
        assert options is not None
        assert options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW

    def test_form_is_refresh_request_model(self, served: Served) -> None:
        schema = served.refresh.parameter_openapi_schema
        assert schema is not None
        request = schema["properties"]["request"]
        assert request.get("$ref") == "#/definitions/RefreshRequest"
        model = schema["definitions"]["RefreshRequest"]
        assert set(model["properties"]) == set(RefreshRequest.model_fields)
        for name, field in RefreshRequest.model_fields.items():
            described = model["properties"][name].get("description")
            assert described == field.description, name
        assert model["properties"]["force"]["type"] == "boolean"
        assert model["properties"]["allow_patterns"]["type"] == "array"
        assert model.get("additionalProperties") is False
        assert served.refresh.parameters["request"]["revision"] == "main"

    def test_server_rejects_unknown_request_field(self, served: Served) -> None:
        with (
            get_client(sync_client=True) as client,
            pytest.raises(PrefectHTTPStatusError) as raised,
        ):
            client.create_flow_run_from_deployment(
                served.refresh.id, parameters={"request": {"branch": "main"}}
            )
        assert raised.value.response.status_code == 409

    def test_refresh_runs_one_at_a_time(self, served: Served) -> None:
        limit = served.refresh.global_concurrency_limit
        assert limit is not None
        assert limit.limit == 1
        options = served.refresh.concurrency_options
        assert options is not None
        assert options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE

    def test_trigger_passes_event_sha_as_revision(self, served: Served) -> None:
        with get_client(sync_client=True) as client:
            automations = _automations(client, served.refresh.id)
        assert len(automations) == 1
        automation = automations[0]
        assert automation.enabled
        assert set(automation.trigger.expect) == {NEW_REVISION_EVENT}
        assert automation.trigger.match.model_dump() == {
            "prefect.resource.id": model_resource_id(REPO)
        }
        assert len(automation.actions) == 1
        action = automation.actions[0]
        assert action.type == "run-deployment"
        assert action.deployment_id == served.refresh.id
        request = action.parameters["request"]
        assert request["revision"] == "{{ event.payload.sha }}"
        assert request["repo_id"] == REPO
        assert "event" not in request["target_config"]


class TestWatcherTriggersRefresh:
    """Watcher, event, trigger and served refresh, in the order operators see them."""

    state: ClassVar[dict[str, Any]] = {}

    def _state(self, key: str) -> Any:
        if key not in self.state:
            pytest.fail(f"an earlier test in this class did not record {key!r}")
        return self.state[key]

    def test_watcher_emits_unserved_main_sha(
        self, served: Served, target: Path, cloud: LocalCloud
    ) -> None:
        assert _serving_sha(target) is None
        sha = _run_watcher(target)
        assert sha == cloud.hub.repos.resolve(REPO, "main")
        self.state["first_sha"] = sha

    def test_event_starts_run_for_exact_sha(self, served: Served, target: Path) -> None:
        sha = self._state("first_sha")
        with get_client(sync_client=True) as client:
            run = _wait_for_triggered_run(client, served, sha)
            triggered = _triggered_runs(client, served.refresh.id)
        self.state["first_run"] = run.id
        request = run.parameters["request"]
        assert SHA.fullmatch(request["revision"])
        assert request["revision"] == sha
        assert request["repo_id"] == REPO
        assert request["target_config"] == str(target)
        assert [r.id for r in triggered] == [run.id]

    def test_triggered_run_deploys_that_sha(self, served: Served, target: Path) -> None:
        run_id = self._state("first_run")
        with get_client(sync_client=True) as client:
            run = _wait_for_final_state(client, served, run_id)
        assert run.state is not None
        assert run.state.is_completed(), run.state.message
        assert _serving_sha(target) == self._state("first_sha")

    def test_watcher_silent_when_sha_serves(self, served: Served, target: Path) -> None:
        assert _run_watcher(target) is None
        with get_client(sync_client=True) as client:
            _flush_events(client, served.log)
            events = _revision_events(client)
            triggered = _triggered_runs(client, served.refresh.id)
        shas = [event.payload["sha"] for event in events]
        assert shas == [self._state("first_sha")]
        assert events[0].resource.id == model_resource_id(REPO)
        assert [r.id for r in triggered] == [self._state("first_run")]

    def test_new_commit_starts_run_for_new_sha(
        self, served: Served, target: Path, cloud: LocalCloud
    ) -> None:
        new_sha = publish_next(cloud.state_dir / "hub", REPO)
        assert new_sha != self._state("first_sha")
        assert _run_watcher(target) == new_sha
        with get_client(sync_client=True) as client:
            run = _wait_for_triggered_run(client, served, new_sha)
            triggered = _triggered_runs(client, served.refresh.id)
        request = run.parameters["request"]
        assert SHA.fullmatch(request["revision"])
        assert request["revision"] == new_sha
        assert {r.id for r in triggered} == {self._state("first_run"), run.id}
        # NOTE: this run is not awaited because a refresh takes 45 s or more, and the
        # first triggered run already proves completion. Stopping `serve` cancels it.
