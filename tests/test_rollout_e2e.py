"""Failed rollouts and crashes of the whole refresh flow on localcloud.

The tests share one localcloud and run in order: a first deploy, a rollout whose gate
fails while a client keeps calling the service, then a rollout that is killed at each
step boundary and rerun until it converges.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from google.api_core import exceptions as gexc
from google.cloud import run_v2

import flows.model_refresh as refresh_flow
from flows.model_refresh import model_refresh
from localcloud.hub.__main__ import publish_next
from localcloud.server import LocalCloud
from tasks.checks import CheckResult
from tasks.clients import Clients, clients_for
from tasks.config import RefreshConfig, RefreshRequest, load_config
from tasks.deploy import CANDIDATE_TAG, LABEL_MODEL_SHA, ROLLBACK_TAG
from tasks.errors import GateFailed
from tests.conftest import write_target

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = "local-models/tiny-llama"
PROBE = "refresh-probe@local-project.iam.gserviceaccount.com"
REQUEST_TIMEOUT_SECONDS = 30.0
REQUEST_INTERVAL_SECONDS = 0.05
SERVICES = ("llm", "mcp")


class Crash(BaseException):
    """Stands for a kill: `except Exception` handlers in the flow do not run."""


@pytest.fixture(scope="module")
def config(target: Path) -> RefreshConfig:
    return load_config(target)


@pytest.fixture(scope="module")
def clients(config: RefreshConfig) -> Clients:
    return clients_for(config.target)


@pytest.fixture(autouse=True)
def _cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "MODEL_REFRESH_CACHE", str(tmp_path_factory.getbasetemp() / "cache")
    )


def run(target: Path) -> dict[str, Any]:
    result: dict[str, Any] = model_refresh(RefreshRequest(target_config=str(target)))
    return result


def service(clients: Clients, service_id: str) -> run_v2.Service:
    return clients.services.get_service(
        name=f"{clients.location}/services/{service_id}"
    )


def split(service: run_v2.Service) -> dict[str, int]:
    return {s.revision: s.percent for s in service.traffic_statuses if s.percent}


def tags(service: run_v2.Service) -> dict[str, str]:
    return {s.tag: s.revision for s in service.traffic_statuses if s.tag}


def revisions_of_sha(clients: Clients, service_id: str, sha: str) -> list[str]:
    parent = f"{clients.location}/services/{service_id}"
    return [
        r.name.rsplit("/", 1)[1]
        for r in clients.revisions.list_revisions(parent=parent)
        if r.labels.get(LABEL_MODEL_SHA) == sha
    ]


class Caller:
    """Calls a service URL in a loop from a thread and records every outcome."""

    def __init__(self, cloud: LocalCloud, url: str) -> None:
        self.url = url
        self.token = cloud.tokens.issue_id_token(PROBE, audience=url)
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_SECONDS + 5)

    def _loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url + "/health", headers=headers)
                    self.statuses.append(response.status_code)
                    if response.status_code != 200:
                        self.failures.append(
                            f"{time.strftime('%H:%M:%S')} {response.status_code} "
                            f"{response.text[:200]!r}"
                        )
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                self._stop.wait(REQUEST_INTERVAL_SECONDS)


def failing_gate(real_gate: Callable[..., list[CheckResult]]) -> Callable[..., Any]:
    """Return the real gate plus one failed check, as when a probe finds a leak."""

    def gate(*args: Any, **kwargs: Any) -> list[CheckResult]:
        results = list(real_gate(*args, **kwargs))
        results.append(
            CheckResult(
                id="test.forced-failure",
                service="llm",
                control="a check the candidate fails",
                owasp="LLM07",
                severity="high",
                passed=False,
                evidence="forced by the test",
                fix="none: the test fails this check on purpose",
            )
        )
        return results

    return gate


def crash_after(function: Callable[..., Any], call_number: int) -> Callable[..., Any]:
    """Return `function` that raises Crash right after its `call_number`-th call."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = function(*args, **kwargs)
        calls += 1
        if calls == call_number:
            raise Crash(f"killed after call {calls} of {function.__name__}")
        return result

    return wrapper


@pytest.mark.usefixtures("prefect_server")
class TestRollouts:
    state: dict[str, Any] = {}

    def test_first_run_deploys(self, target: Path) -> None:
        report = run(target)
        assert report["status"] == "deployed", report["message"]
        self.state["sha"] = report["model"]["sha"]

    def test_failed_gate_serves_old_revision_throughout(
        self,
        cloud: LocalCloud,
        clients: Clients,
        target: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        before = service(clients, "llm")
        old = split(before)
        publish_next(cloud.state_dir / "hub", REPO)
        monkeypatch.setattr(
            refresh_flow, "run_gate", failing_gate(refresh_flow.run_gate)
        )

        with Caller(cloud, before.uri) as caller, pytest.raises(GateFailed):
            run(target)

        after = service(clients, "llm")
        assert caller.errors == []
        assert caller.failures == []
        assert len(caller.statuses) >= 20
        assert split(after) == old
        assert after.latest_created_revision != before.latest_created_revision
        assert CANDIDATE_TAG not in tags(after)

    # Ten flow runs in a row: more than the suite's default per-test timeout.
    @pytest.mark.timeout(900)
    def test_killed_rollout_converges_on_rerun(
        self,
        cloud: LocalCloud,
        clients: Clients,
        config: RefreshConfig,
        target: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        serving_before = {name: split(service(clients, name)) for name in SERVICES}
        versions_before = key_versions(clients, config)
        new_sha = publish_next(cloud.state_dir / "hub", REPO)
        # Each rerun crashes at the next boundary, so every boundary is both a
        # crash point and a state that a rerun starts from.
        boundaries = [
            ("ensure_edge_tls_task", 1),  # SSL policy attached, nothing else done
            ("download_model", 1),  # files downloaded and verified
            ("build_llm_image", 1),  # LLM image pushed, MCP image not yet
            ("rotate_api_key", 1),  # key version added, nothing deployed
            ("ensure_anomaly_alerts", 1),  # alerts in place, nothing deployed
            ("deploy_candidate", 1),  # LLM candidate deployed
            ("set_invokers", 2),  # both candidates deployed, before the gate
            ("promote", 1),  # LLM promoted, MCP not yet
            ("promote", 2),  # both promoted, no report yet
        ]
        for function_name, call_number in boundaries:
            with monkeypatch.context() as patch:
                real = getattr(refresh_flow, function_name)
                patch.setattr(
                    refresh_flow, function_name, crash_after(real, call_number)
                )
                with pytest.raises(Crash):
                    run(target)
            for name in SERVICES:
                assert_consistent(clients, name, new_sha)

        report = run(target)

        assert report["status"] in ("deployed", "skipped"), report["message"]
        for name in SERVICES:
            current = service(clients, name)
            new = revisions_of_sha(clients, name, new_sha)
            assert len(new) == 1, f"{name}: {new}"
            assert split(current) == {new[0]: 100}
            assert tags(current)[CANDIDATE_TAG] == new[0]
            old = next(iter(serving_before[name]))
            assert tags(current)[ROLLBACK_TAG] == old
        # At most one rotation for the rollout, however many attempts it took (none
        # when the key added for the rolled-back rollout is still unused).
        assert len(key_versions(clients, config)) <= len(versions_before) + 1


def assert_consistent(clients: Clients, name: str, new_sha: str) -> None:
    """No orphan traffic, no duplicate revision, no dangling tag."""
    current = service(clients, name)
    traffic = split(current)
    assert sum(traffic.values()) == 100
    assert len(traffic) == 1, f"{name} splits traffic: {traffic}"
    assert len(revisions_of_sha(clients, name, new_sha)) <= 1
    parent = current.name
    for revision in tags(current).values():
        found = clients.revisions.get_revision(name=f"{parent}/revisions/{revision}")
        assert found.name.endswith(revision)


def key_versions(clients: Clients, config: RefreshConfig) -> list[str]:
    parent = f"projects/{config.target.project}/secrets/{config.llm.api_key_secret}"
    return [v.name for v in clients.secrets.list_secret_versions(parent=parent)]


def test_failed_first_deploy_leaves_nothing_serving(
    target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = yaml.safe_load(target.read_text())
    data["llm"]["name"] = "llm-first"
    data["mcp"]["name"] = "mcp-first"
    data["report_dir"] = str(tmp_path / "reports")
    fresh = write_target(tmp_path / "first.yaml", data)
    clients = clients_for(load_config(fresh).target)

    with monkeypatch.context() as patch:
        patch.setattr(refresh_flow, "run_gate", failing_gate(refresh_flow.run_gate))
        with pytest.raises(GateFailed) as failed:
            run(fresh)

    report_path = Path(str(failed.value).rsplit("report: ", 1)[1])
    report = json.loads(report_path.read_text())
    assert report["status"] == "rolled-back"
    for name in ("llm-first", "mcp-first"):
        with pytest.raises(gexc.NotFound):
            service(clients, name)
    for key in ("llm", "mcp"):
        assert report["revisions"][key]["serving"] is None
        assert report["revisions"][key]["rollback"].startswith("deleted ")
    # Nothing is left half-done: the next run deploys both services afresh.
    assert run(fresh)["status"] == "deployed"
