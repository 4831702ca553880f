"""The main job end to end on localcloud: deploy, skip, redeploy, reject bad input.

The tests in this module share one localcloud and run in order, like a user would run
the job: first deploy, an unchanged rerun, a new commit, then bad requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.model_refresh import model_refresh
from localcloud.hub.__main__ import publish_next
from localcloud.server import LocalCloud
from tasks.clients import clients_for
from tasks.config import RefreshRequest, load_config
from tasks.errors import ModelSourceError

REPO = "local-models/tiny-llama"
PROBE = "refresh-probe@local-project.iam.gserviceaccount.com"


@pytest.fixture(autouse=True)
def _cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "MODEL_REFRESH_CACHE", str(tmp_path_factory.getbasetemp() / "cache")
    )


def _run(target: Path, **fields: Any) -> dict[str, Any]:
    request = RefreshRequest(target_config=str(target), **fields)
    result: dict[str, Any] = model_refresh(request)
    return result


def _services(target: Path) -> dict[str, Any]:
    config = load_config(target)
    clients = clients_for(config.target)
    return {
        name: clients.services.get_service(name=f"{clients.location}/services/{name}")
        for name in ("llm", "mcp")
    }


def _secret_versions(target: Path) -> list[str]:
    config = load_config(target)
    clients = clients_for(config.target)
    parent = f"projects/{config.target.project}/secrets/{config.llm.api_key_secret}"
    return sorted(v.name for v in clients.secrets.list_secret_versions(parent=parent))


@pytest.mark.usefixtures("prefect_server")
class TestRefresh:
    state: dict[str, Any] = {}

    def test_first_run_deploys(self, target: Path, cloud: LocalCloud) -> None:
        report = _run(target)
        self.state["first"] = report
        assert report["status"] == "deployed", report["message"]
        saved = json.loads(Path(report["report_path"]).read_text())
        assert saved["model"]["sha"] == cloud.hub.repos.resolve(REPO, "main")
        assert set(saved["images"]) == {"llm", "mcp"}
        for image in saved["images"].values():
            assert "@sha256:" in image
        failed = [c["id"] for c in saved["checks"] if not c["passed"]]
        assert failed == []
        assert (
            saved["revisions"]["llm"]["serving"]
            == saved["revisions"]["llm"]["candidate"]
        )
        assert saved["urls"]["llm"].startswith("http://127.0.0.1:")
        assert saved["taxonomy"]["llm"] == "OWASP Top 10 for LLM Applications 2025"
        # The demo proxy starts with no SSL policy, so the first run attaches one.
        edge = saved["edge_tls"]
        assert edge["profile"] == "MODERN"
        assert edge["min_tls_version"] == "TLS_1_2"
        assert edge["changes"]
        assert "edge.tls-policy" in {c["id"] for c in saved["checks"]}

    def test_unchanged_rerun_skips(self, target: Path) -> None:
        before = _services(target)
        versions = _secret_versions(target)
        report = _run(target)
        assert report["status"] == "skipped"
        assert report["images"] == {}
        assert list(report["edge_tls"]["changes"]) == []
        after = _services(target)
        for name in ("llm", "mcp"):
            assert after[name].generation == before[name].generation
            assert (
                after[name].latest_created_revision
                == before[name].latest_created_revision
            )
        assert _secret_versions(target) == versions

    def test_service_url_requires_invoker_token(
        self, target: Path, cloud: LocalCloud
    ) -> None:
        url = self.state["first"]["urls"]["llm"]
        assert httpx.get(url + "/health", timeout=30).status_code in (401, 403)
        token = cloud.tokens.issue_id_token(PROBE, audience=url)
        response = httpx.get(
            url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert response.status_code == 200

    def test_new_commit_deploys_and_keeps_previous(
        self, target: Path, cloud: LocalCloud
    ) -> None:
        first = self.state["first"]
        new_sha = publish_next(cloud.state_dir / "hub", REPO)
        assert new_sha != first["model"]["sha"]
        report = _run(target)
        assert report["status"] == "deployed", report["message"]
        assert report["model"]["sha"] == new_sha
        llm = report["revisions"]["llm"]
        assert llm["previous"] == first["revisions"]["llm"]["serving"]
        assert llm["serving"] != llm["previous"]
        service = _services(target)["llm"]
        tags = {s.tag: s.revision for s in service.traffic_statuses if s.tag}
        assert tags.get("rollback") == llm["previous"]
        serving = [s.revision for s in service.traffic_statuses if s.percent == 100]
        assert serving == [llm["serving"]]


@pytest.mark.usefixtures("prefect_server")
class TestBadInput:
    def test_pickle_only_repository_rejected(self, target: Path) -> None:
        versions = _secret_versions(target) if _has_services(target) else []
        with pytest.raises(ModelSourceError, match="only pickle-based weights"):
            _run(target, repo_id="local-models/pickle-only")
        if versions:
            assert _secret_versions(target) == versions

    def test_unknown_revision_rejected(self, target: Path) -> None:
        with pytest.raises(ModelSourceError, match="does not exist"):
            _run(target, revision="no-such-branch")

    def test_unknown_repository_rejected(self, target: Path) -> None:
        with pytest.raises(ModelSourceError, match="not found"):
            _run(target, repo_id="local-models/absent")

    def test_rejected_input_creates_nothing(self, target: Path) -> None:
        config = load_config(target)
        clients = clients_for(config.target)
        before = sorted(
            s.name for s in clients.services.list_services(parent=clients.location)
        )
        with pytest.raises(ModelSourceError):
            _run(target, repo_id="local-models/pickle-only")
        after = sorted(
            s.name for s in clients.services.list_services(parent=clients.location)
        )
        assert after == before


def _has_services(target: Path) -> bool:
    config = load_config(target)
    clients = clients_for(config.target)
    return bool(list(clients.services.list_services(parent=clients.location)))
