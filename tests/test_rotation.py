"""Staged retirement of API key versions, against localcloud's Secret Manager and
Cloud Run. A version is disabled only when no revision with traffic or a tag pins it
and the rollback window has passed. It is destroyed only after the grace period.

Time is passed in explicitly (`now`), so the windows are tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.cloud import run_v2, secretmanager_v1

from localcloud.server import LocalCloud
from tasks.clients import Clients, clients_for
from tasks.config import RefreshConfig, load_config
from tasks.deploy import ROLLBACK_TAG, deploy_candidate, promote, set_invokers
from tasks.secrets import (
    referenced_secret_versions,
    retire_secret_versions,
    rotate_api_key,
)
from tests.conftest import local_target_data, write_target
from tests.test_deploy import (  # noqa: F401 (quiet_run_logger is a fixture)
    REVISION_APP,
    app_template,
    make_secret,
    push_app,
    quiet_run_logger,
    secret_env,
    service,
    split,
    tags,
)

pytestmark = [
    pytest.mark.usefixtures("quiet_run_logger"),
    pytest.mark.skipif(
        not Path("/usr/bin/docker-registry").is_file(),
        reason="needs Debian's docker-registry: apt-get install docker-registry",
    ),
]

SECRET = "rotated-key"
WINDOW = timedelta(hours=24)
GRACE = timedelta(hours=72)
T0 = datetime(2026, 12, 1, tzinfo=UTC)
ENABLED = secretmanager_v1.SecretVersion.State.ENABLED
DISABLED = secretmanager_v1.SecretVersion.State.DISABLED
DESTROYED = secretmanager_v1.SecretVersion.State.DESTROYED


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    instance = LocalCloud(tmp_path_factory.mktemp("localcloud"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def config(
    cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory
) -> RefreshConfig:
    data = local_target_data()
    data["target"]["localcloud_state_dir"] = str(cloud.state_dir)
    folder = tmp_path_factory.mktemp("target")
    return load_config(write_target(folder / "target.yaml", data))


@pytest.fixture(scope="module")
def clients(config: RefreshConfig) -> Clients:
    return clients_for(config.target)


def state(clients: Clients, number: int) -> int:
    name = f"projects/{clients.target.project}/secrets/{SECRET}/versions/{number}"
    return int(clients.secrets.get_secret_version(name=name).state)


def retire(clients: Clients, service_id: str, now: datetime) -> None:
    retire_secret_versions.fn(
        clients,
        SECRET,
        referenced_secret_versions(clients, service_id),
        rollback_window=WINDOW,
        destroy_grace=GRACE,
        now=now,
    )


def test_old_version_outlives_rollback_window(
    cloud: LocalCloud, clients: Clients, config: RefreshConfig
) -> None:
    image = push_app(cloud, "rotation", REVISION_APP)
    settings = config.mcp.model_copy(update={"name": "rotation"})
    # Versions 1-6 are long gone; 7 is the key the serving revision pins.
    make_secret(clients, SECRET, {n: "destroyed" for n in range(1, 7)} | {7: "enabled"})

    def deploy(version: str, marker: str) -> str:
        template = app_template(settings, image, marker * 40)
        template.containers[0].env.append(secret_env(SECRET, version))
        candidate = deploy_candidate.fn(clients, settings, template)
        set_invokers.fn(clients, settings)
        promote.fn(clients, candidate)
        return candidate.revision

    on_7 = deploy("7", "a")
    in_use = referenced_secret_versions(clients, settings.name)
    key = rotate_api_key.fn(clients, SECRET, in_use)
    assert key.version == "8"

    # 8 exists but serves nothing yet: 7 stays, however much time passes.
    retire(clients, settings.name, T0)
    retire(clients, settings.name, T0 + 10 * WINDOW)
    assert state(clients, 7) == ENABLED

    on_8 = deploy("8", "b")
    current = service(clients, settings)
    assert split(current) == {on_8: 100}
    assert tags(current)[ROLLBACK_TAG] == on_7

    # 8 serves all traffic, but 7 is kept for rollback while the tag points at it.
    retire(clients, settings.name, T0 + 20 * WINDOW)
    assert state(clients, 7) == ENABLED

    drop_rollback_tag(clients, current.name, on_8)
    released = T0 + 30 * WINDOW
    retire(clients, settings.name, released)
    assert state(clients, 7) == ENABLED
    retire(clients, settings.name, released + WINDOW - timedelta(seconds=1))
    assert state(clients, 7) == ENABLED
    retire(clients, settings.name, released + WINDOW)
    assert state(clients, 7) == DISABLED
    assert state(clients, 8) == ENABLED

    disabled_at = released + WINDOW
    retire(clients, settings.name, disabled_at + GRACE - timedelta(seconds=1))
    assert state(clients, 7) == DISABLED
    retire(clients, settings.name, disabled_at + GRACE)
    assert state(clients, 7) == DESTROYED
    assert state(clients, 8) == ENABLED


def drop_rollback_tag(clients: Clients, name: str, serving: str) -> None:
    revision = (
        run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    )
    clients.services.update_service(
        service=run_v2.Service(
            name=name,
            traffic=[
                run_v2.TrafficTarget(type_=revision, revision=serving, percent=100)
            ],
        ),
        update_mask={"paths": ["traffic"]},
    ).result(timeout=60)


def test_retirement_rerun_changes_nothing(clients: Clients) -> None:
    make_secret(clients, "rerun-key", {1: "enabled", 2: "enabled"})
    name = f"projects/{clients.target.project}/secrets/rerun-key"

    first = retire_secret_versions.fn(
        clients, "rerun-key", set(), WINDOW, GRACE, now=T0
    )
    again = retire_secret_versions.fn(
        clients, "rerun-key", set(), WINDOW, GRACE, now=T0
    )

    assert first.marked == [f"{name}/versions/1"]
    assert again.marked == []
    assert again.disabled == []
    # The newest enabled version is what the next deploy pins: never retired.
    later = retire_secret_versions.fn(
        clients, "rerun-key", set(), WINDOW, GRACE, now=T0 + 2 * WINDOW
    )
    assert later.disabled == [f"{name}/versions/1"]


def test_referenced_again_restarts_window(clients: Clients) -> None:
    make_secret(clients, "back-key", {1: "enabled", 2: "enabled"})
    version_1 = f"projects/{clients.target.project}/secrets/back-key/versions/1"
    retire_secret_versions.fn(clients, "back-key", set(), WINDOW, GRACE, now=T0)
    # A rollback pins version 1 again before its window ends.
    retire_secret_versions.fn(
        clients, "back-key", {version_1}, WINDOW, GRACE, now=T0 + WINDOW / 2
    )
    result = retire_secret_versions.fn(
        clients, "back-key", set(), WINDOW, GRACE, now=T0 + WINDOW
    )
    assert result.disabled == []
    assert result.marked == [version_1]
