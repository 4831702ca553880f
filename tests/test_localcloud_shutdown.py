"""Stopping localcloud while a revision is still starting leaves no instance behind."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.cloud.run_v2.services.services.transports import ServicesGrpcTransport

from localcloud.registry import BASE_REPOSITORY, BASE_TAG
from localcloud.server import LocalCloud
from tasks.oci import (
    ConfigChanges,
    Layer,
    RegistryClient,
    append_layers,
    local_endpoint,
)

PARENT = "projects/proj/locations/us-central1"
WAIT_SECONDS = 60.0

# Writes its pid, waits, then serves: the instance is mid-start for a while.
SLOW_APP = b"""
import http.server, os, pathlib, time
pathlib.Path(os.environ["PID_FILE"]).write_text(str(os.getpid()))
time.sleep(3)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])),
                       http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _wait_until(condition: object, message: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(message)


def test_stop_during_start_leaves_no_instance(tmp_path: Path) -> None:
    cloud = LocalCloud(tmp_path / "state")
    cloud.start()
    pid_file = tmp_path / "instance.pid"
    try:
        registry = RegistryClient(
            local_endpoint(cloud.registry.address),
            lambda: cloud.registry.auth_headers("tests@proj.iam.gserviceaccount.com"),
        )
        with registry:
            image = append_layers(
                f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}",
                [Layer.from_files({"/app/main.py": SLOW_APP})],
                "us-central1-docker.pkg.dev/proj/apps/slow",
                ConfigChanges(
                    entrypoint=["python3", "/app/main.py"], working_dir="/app"
                ),
                registry=registry,
            )
        channel = grpc.insecure_channel(cloud.grpc_address)
        services = run_v2.ServicesClient(
            transport=ServicesGrpcTransport(channel=channel)
        )
        service = run_v2.Service(
            template=run_v2.RevisionTemplate(
                containers=[
                    run_v2.Container(
                        image=image,
                        env=[run_v2.EnvVar(name="PID_FILE", value=str(pid_file))],
                    )
                ]
            )
        )

        def deploy() -> None:
            # The deploy is cut short by the shutdown; its outcome does not matter.
            with contextlib.suppress(gexc.GoogleAPICallError, grpc.RpcError):
                services.create_service(
                    parent=PARENT, service=service, service_id="slow"
                ).result(timeout=WAIT_SECONDS)

        thread = threading.Thread(target=deploy, daemon=True)
        thread.start()
        _wait_until(pid_file.exists, "the instance never started")
        pid = int(pid_file.read_text())
    finally:
        cloud.stop()

    _wait_until(lambda: not _alive(pid), f"instance process {pid} outlived localcloud")
    thread.join(timeout=WAIT_SECONDS)
    assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _needs_registry() -> None:
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.skip("needs Debian's docker-registry: apt-get install docker-registry")
