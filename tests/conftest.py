"""Shared fixtures: a real localcloud per test module group, a Prefect test server, and
target configs that point the pipeline at them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from localcloud.server import LocalCloud

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_TARGET = REPO_ROOT / "deployments" / "targets" / "local.yaml"

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Some tests call a task outside any flow; its log lines then stay local.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


def local_target_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(LOCAL_TARGET.read_text())
    return data


def write_target(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    """A real localcloud for one test module, with the demo Hub repositories."""
    from localcloud.hub.__main__ import seed_demo_repos
    from localcloud.server import LocalCloud

    state = tmp_path_factory.mktemp("localcloud")
    instance = LocalCloud(state)
    instance.start()
    try:
        seed_demo_repos(state / "hub")
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def target(
    cloud: LocalCloud,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Path:
    """The local target config pointed at this module's localcloud.

    A module may define `customize_target(data)` to change the config before it is
    written.
    """
    from localcloud.edge_demo import create_demo_proxy_for_target
    from localcloud.server import Endpoints

    folder = tmp_path_factory.mktemp("target")
    data = local_target_data()
    data["target"]["localcloud_state_dir"] = str(cloud.state_dir)
    data["report_dir"] = str(folder / "reports")
    customize = getattr(request.module, "customize_target", None)
    if customize is not None:
        customize(data)
    # The load balancer's proxy exists before a refresh, as it would on GCP.
    create_demo_proxy_for_target(Endpoints.read(cloud.state_dir).compute, data)
    return write_target(folder / "target.yaml", data)
