"""Shared fixtures: a real localcloud per test module group, a Prefect test server, and
target configs that point the pipeline at them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_TARGET = REPO_ROOT / "deployments" / "targets" / "local.yaml"

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def local_target_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(LOCAL_TARGET.read_text())
    return data


def write_target(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
