"""localcloud converges after a crash: SIGKILL while a revision starts, then restart.

A crashed localcloud runs in a subprocess (`python -m localcloud up`). Its revision's
app writes its pid and then waits for a gate file before it listens or exits, so the
test kills localcloud at a known point: the revision and its operation are stored and
the instance is starting. The restart runs in-process on the same state folder.
Half-written store states, which a crash between two writes leaves, are made by
editing the stored documents of a cleanly stopped localcloud.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.api_core import exceptions as gexc
from google.api_core import operation as api_operation
from google.api_core import operations_v1
from google.cloud import run_v2
from google.cloud.run_v2.services.revisions.transports import RevisionsGrpcTransport
from google.cloud.run_v2.services.services.transports import ServicesGrpcTransport
from google.longrunning import operations_pb2
from prefect.logging import disable_run_logger

from localcloud.__main__ import process_running
from localcloud.registry import BASE_REPOSITORY, BASE_TAG, basic_auth
from localcloud.server import ENDPOINTS_FILE, Endpoints, LocalCloud
from localcloud.tokens import TokenAuthority
from tasks import oci
from tasks.clients import clients_for
from tasks.config import load_config
from tasks.deploy import Candidate, deploy_candidate, mcp_template
from tests.conftest import REPO_ROOT, local_target_data, write_target

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").is_file(),
    reason="needs Debian's docker-registry: apt-get install docker-registry",
)

PROJECT = "local-project"
PARENT = f"projects/{PROJECT}/locations/us-central1"
BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"
PUSHER = f"tests@{PROJECT}.iam.gserviceaccount.com"
WAIT_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 30.0

# Writes its pid, waits for $GATE_FILE, then exits with $EXIT_CODE when set or serves
# its revision name on $PORT.
GATED_APP = b"""
import http.server, json, os, pathlib, sys, time

pathlib.Path(os.environ["PID_FILE"]).write_text(str(os.getpid()))
gate = pathlib.Path(os.environ["GATE_FILE"])
while not gate.exists():
    time.sleep(0.05)
if os.environ.get("EXIT_CODE"):
    print("fatal: configuration missing", file=sys.stderr, flush=True)
    sys.exit(int(os.environ["EXIT_CODE"]))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"revision": os.environ.get("K_REVISION")}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass

address = ("127.0.0.1", int(os.environ["PORT"]))
http.server.ThreadingHTTPServer(address, Handler).serve_forever()
"""

_ids = itertools.count(1)


def wait_until(condition: Callable[[], bool], message: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(message)


class CrashingCloud:
    """A localcloud in a subprocess, to be killed with SIGKILL."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        with (self.state_dir / "crashing.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "localcloud"]
                + ["--state-dir", str(self.state_dir), "up"],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process

        def serving() -> bool:
            assert process.poll() is None, "localcloud exited while starting"
            try:
                endpoints = Endpoints.read(self.state_dir)
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            return endpoints.pid == process.pid

        wait_until(serving, "the localcloud subprocess did not start")
        self.endpoints = Endpoints.read(self.state_dir)
        return self.endpoints

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=WAIT_SECONDS)

    def push_gated_app(self) -> str:
        assert self.endpoints is not None
        authority = TokenAuthority(self.state_dir)

        def auth() -> dict[str, str]:
            return basic_auth(authority.issue_access_token(PUSHER))

        endpoint = oci.local_endpoint(self.endpoints.registry)
        with oci.RegistryClient(endpoint, auth) as registry:
            return oci.append_layers(
                BASE,
                [oci.Layer.from_files({"/app/main.py": GATED_APP})],
                f"us-central1-docker.pkg.dev/{PROJECT}/tests/gated",
                oci.ConfigChanges(entrypoint=["python3", "/app/main.py"]),
                registry=registry,
            )


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """The shared state folder. Teardown ends what a failed test may leave running."""
    state = tmp_path / "state"
    yield state
    # A clean stop removes both; a killed localcloud that was never restarted leaves
    # them, and a start stops its registry and instances.
    records = list((state / "runtime" / "_processes").glob("*.json"))
    if records or (state / "registry" / "registry.pid").exists():
        leftover = LocalCloud(state)
        with contextlib.suppress(Exception):
            leftover.start()
        leftover.stop()


@pytest.fixture
def crashing(state_dir: Path) -> Iterator[CrashingCloud]:
    cloud = CrashingCloud(state_dir)
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill()


@pytest.fixture
def restart(state_dir: Path) -> Iterator[Callable[[], LocalCloud]]:
    """Start an in-process localcloud on the crashed state folder (stopped at the
    end of the test)."""
    started: list[LocalCloud] = []

    def start() -> LocalCloud:
        cloud = LocalCloud(state_dir)
        started.append(cloud)
        cloud.start()
        return cloud

    yield start
    for cloud in started:
        cloud.stop()


def clients_on(address: str) -> tuple[run_v2.ServicesClient, run_v2.RevisionsClient]:
    channel = grpc.insecure_channel(address)
    return (
        run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel)),
        run_v2.RevisionsClient(transport=RevisionsGrpcTransport(channel=channel)),
    )


def poll_operation(address: str, name: str) -> api_operation.Operation:
    """Return a future for an operation started before the restart, as a client
    that kept its name would poll it."""
    operations = operations_v1.OperationsClient(grpc.insecure_channel(address))
    return api_operation.from_gapic(
        operations_pb2.Operation(name=name),
        operations,
        run_v2.Service,
        metadata_type=run_v2.Service,
    )


def gated_template(
    image: str, tmp_path: Path, exit_code: int | None = None
) -> run_v2.RevisionTemplate:
    env = [
        run_v2.EnvVar(name="PID_FILE", value=str(tmp_path / "instance.pid")),
        run_v2.EnvVar(name="GATE_FILE", value=str(tmp_path / "gate")),
    ]
    if exit_code is not None:
        env.append(run_v2.EnvVar(name="EXIT_CODE", value=str(exit_code)))
    return run_v2.RevisionTemplate(containers=[run_v2.Container(image=image, env=env)])


def wait_for_instance_pid(tmp_path: Path) -> int:
    pid_file = tmp_path / "instance.pid"
    wait_until(pid_file.exists, "the revision's instance never started")
    return int(pid_file.read_text())


def ready_condition(revision: run_v2.Revision) -> run_v2.Condition:
    return next(c for c in revision.conditions if c.type_ == "Ready")


def answering_revision(url: str) -> str:
    response = httpx.get(url, timeout=REQUEST_TIMEOUT_SECONDS)
    response.raise_for_status()
    revision: str = response.json()["revision"]
    return revision


def store_path(state: Path, kind: str, name: str) -> Path:
    return state / "resources" / kind / (urllib.parse.quote(name, safe="") + ".json")


# --- a crash while a revision starts --------------------------------------------------


@pytest.mark.parametrize("stored", ["operation", "no operation", "older version"])
def test_create_resumes_after_kill(
    tmp_path: Path,
    crashing: CrashingCloud,
    restart: Callable[[], LocalCloud],
    stored: str,
) -> None:
    assert crashing.endpoints is not None
    image = crashing.push_gated_app()
    services, revisions = clients_on(crashing.endpoints.grpc)
    service_id = f"gated-{next(_ids)}"
    name = f"{PARENT}/services/{service_id}"
    future = services.create_service(
        parent=PARENT,
        service_id=service_id,
        service=run_v2.Service(
            template=gated_template(image, tmp_path), invoker_iam_disabled=True
        ),
    )
    operation_name = future.operation.name
    orphan = wait_for_instance_pid(tmp_path)
    created = services.get_service(name=name).latest_created_revision
    assert revisions.get_revision(name=created).reconciling

    crashing.kill()
    # The instance outlives the killed localcloud until the next start stops it.
    assert process_running(orphan)
    operation_path = store_path(crashing.state_dir, "operations", operation_name)
    if stored == "no operation":
        # As if the crash came between storing the service and its operation.
        operation_path.unlink()
    if stored == "older version":
        # A localcloud without crash recovery stored no resume data.
        document = json.loads(operation_path.read_text())
        del document["resume"]
        operation_path.write_text(json.dumps(document))
        revision_path = store_path(crashing.state_dir, "run.revisions", created)
        record = json.loads(revision_path.read_text())
        del record["service_generation"]
        revision_path.write_text(json.dumps(record))
    (tmp_path / "gate").touch()
    cloud = restart()

    wait_until(lambda: not process_running(orphan), f"orphan {orphan} still runs")
    services, revisions = clients_on(cloud.grpc_address)
    if stored != "no operation":
        result = poll_operation(cloud.grpc_address, operation_name).result(
            timeout=WAIT_SECONDS
        )
        assert result.latest_ready_revision == created
    else:
        wait_until(
            lambda: not services.get_service(name=name).reconciling,
            "the service stayed reconciling after the restart",
        )

    revision = revisions.get_revision(name=created)
    assert not revision.reconciling
    assert ready_condition(revision).state == run_v2.Condition.State.CONDITION_SUCCEEDED
    service = services.get_service(name=name)
    assert not service.reconciling
    assert service.latest_ready_revision == created
    assert service.observed_generation == service.generation
    assert (
        service.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    )
    assert [(s.type_, s.percent) for s in service.traffic_statuses] == [
        (run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST, 100)
    ]
    assert answering_revision(service.uri) == created.rsplit("/", 1)[1]

    # A later deploy works and moves the latest ready revision.
    update = run_v2.Service(
        name=name, invoker_iam_disabled=True, template=gated_template(image, tmp_path)
    )
    update.template.containers[0].env.append(run_v2.EnvVar(name="BUILD", value="2"))
    updated = services.update_service(service=update).result(timeout=WAIT_SECONDS)
    assert updated.latest_ready_revision != created
    assert updated.latest_ready_revision == updated.latest_created_revision
    short = updated.latest_ready_revision.rsplit("/", 1)[1]
    assert answering_revision(updated.uri) == short


def test_stuck_state_of_older_version_recovers(
    tmp_path: Path, crashing: CrashingCloud, restart: Callable[[], LocalCloud]
) -> None:
    """The state an older localcloud left: a revision stuck reconciling after a
    kill, and a later update whose traffic named it and failed."""
    assert crashing.endpoints is not None
    image = crashing.push_gated_app()
    services, _ = clients_on(crashing.endpoints.grpc)
    service_id = f"gated-{next(_ids)}"
    name = f"{PARENT}/services/{service_id}"
    future = services.create_service(
        parent=PARENT,
        service_id=service_id,
        service=run_v2.Service(
            template=gated_template(image, tmp_path), invoker_iam_disabled=True
        ),
    )
    operation_name = future.operation.name
    wait_for_instance_pid(tmp_path)
    created = services.get_service(name=name).latest_created_revision
    short = created.rsplit("/", 1)[1]
    crashing.kill()

    state = crashing.state_dir
    operation_path = store_path(state, "operations", operation_name)
    document = json.loads(operation_path.read_text())
    del document["resume"]
    operation_path.write_text(json.dumps(document))
    revision_path = store_path(state, "run.revisions", created)
    record = json.loads(revision_path.read_text())
    del record["service_generation"]
    revision_path.write_text(json.dumps(record))
    service_path = store_path(state, "run.services", name)
    stored = json.loads(service_path.read_text())
    failed_update = stored["service"]
    failed_update["generation"] = "2"
    failed_update["reconciling"] = False
    failed_update["traffic"] = [
        {
            "type_": "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION",
            "revision": short,
            "percent": 100,
            "tag": "candidate",
        }
    ]
    failed_update["terminal_condition"] = {
        "type_": "Ready",
        "state": "CONDITION_FAILED",
        "message": f"Revision '{short}' is not ready and cannot serve traffic.",
    }
    service_path.write_text(json.dumps(stored))
    (tmp_path / "gate").touch()
    cloud = restart()

    result = poll_operation(cloud.grpc_address, operation_name).result(
        timeout=WAIT_SECONDS
    )
    assert result.latest_ready_revision == created
    services, _ = clients_on(cloud.grpc_address)
    service = services.get_service(name=name)
    assert service.generation == 2
    assert service.observed_generation == 2
    assert not service.reconciling
    assert service.latest_ready_revision == created
    assert (
        service.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    )
    assert {s.tag: s.revision for s in service.traffic_statuses if s.tag} == {
        "candidate": short
    }
    assert answering_revision(service.uri) == short


def test_update_after_restart_waits_for_resume(
    tmp_path: Path, crashing: CrashingCloud, restart: Callable[[], LocalCloud]
) -> None:
    assert crashing.endpoints is not None
    image = crashing.push_gated_app()
    services, _ = clients_on(crashing.endpoints.grpc)
    service_id = f"gated-{next(_ids)}"
    name = f"{PARENT}/services/{service_id}"
    future = services.create_service(
        parent=PARENT,
        service_id=service_id,
        service=run_v2.Service(
            template=gated_template(image, tmp_path), invoker_iam_disabled=True
        ),
    )
    create_operation = future.operation.name
    wait_for_instance_pid(tmp_path)
    created = services.get_service(name=name).latest_created_revision
    crashing.kill()
    # The gate stays closed, so the resumed start is still waiting for its probe
    # when the next request arrives, as a rerun right after a restart would.
    cloud = restart()

    services, _ = clients_on(cloud.grpc_address)
    short = created.rsplit("/", 1)[1]
    tagged = run_v2.Service(
        name=name,
        traffic=[
            run_v2.TrafficTarget(
                type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                revision=short,
                percent=100,
                tag="candidate",
            )
        ],
    )
    update = services.update_service(service=tagged, update_mask={"paths": ["traffic"]})
    assert not update.done()
    (tmp_path / "gate").touch()

    updated = update.result(timeout=WAIT_SECONDS)
    assert {s.tag: s.revision for s in updated.traffic_statuses if s.tag} == {
        "candidate": short
    }
    assert updated.latest_ready_revision == created
    assert not updated.reconciling
    created_service = poll_operation(cloud.grpc_address, create_operation).result(
        timeout=WAIT_SECONDS
    )
    assert created_service.latest_ready_revision == created


def test_failing_update_fails_after_kill(
    tmp_path: Path, crashing: CrashingCloud, restart: Callable[[], LocalCloud]
) -> None:
    assert crashing.endpoints is not None
    image = crashing.push_gated_app()
    services, _ = clients_on(crashing.endpoints.grpc)
    service_id = f"gated-{next(_ids)}"
    name = f"{PARENT}/services/{service_id}"
    (tmp_path / "gate").touch()
    first = services.create_service(
        parent=PARENT,
        service_id=service_id,
        service=run_v2.Service(
            template=gated_template(image, tmp_path), invoker_iam_disabled=True
        ),
    ).result(timeout=WAIT_SECONDS)
    good = first.latest_ready_revision
    (tmp_path / "gate").unlink()
    (tmp_path / "instance.pid").unlink()

    update = run_v2.Service(
        name=name,
        invoker_iam_disabled=True,
        template=gated_template(image, tmp_path, exit_code=3),
    )
    future = services.update_service(service=update)
    operation_name = future.operation.name
    wait_for_instance_pid(tmp_path)
    crashing.kill()
    (tmp_path / "gate").touch()
    cloud = restart()

    with pytest.raises(gexc.FailedPrecondition) as failure:
        poll_operation(cloud.grpc_address, operation_name).result(timeout=WAIT_SECONDS)
    assert "exited with code 3" in failure.value.message
    services, revisions = clients_on(cloud.grpc_address)
    service = services.get_service(name=name)
    broken = revisions.get_revision(name=service.latest_created_revision)
    condition = ready_condition(broken)
    assert not broken.reconciling
    assert condition.state == run_v2.Condition.State.CONDITION_FAILED
    assert condition.revision_reason == (
        run_v2.Condition.RevisionReason.HEALTH_CHECK_CONTAINER_ERROR
    )
    assert not service.reconciling
    assert service.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    # The previous revision keeps serving, as after a failure without a crash.
    assert service.latest_ready_revision == good
    assert service.observed_generation == 1
    assert answering_revision(service.uri) == good.rsplit("/", 1)[1]

    fixed = services.update_service(
        service=run_v2.Service(
            name=name,
            invoker_iam_disabled=True,
            template=gated_template(image, tmp_path),
        )
    ).result(timeout=WAIT_SECONDS)
    assert fixed.latest_ready_revision == fixed.latest_created_revision
    assert fixed.latest_ready_revision not in (good, broken.name)


def test_deploy_candidate_rerun_converges(
    tmp_path: Path,
    state_dir: Path,
    crashing: CrashingCloud,
    restart: Callable[[], LocalCloud],
) -> None:
    image = crashing.push_gated_app()
    data = local_target_data()
    data["target"]["localcloud_state_dir"] = str(state_dir)
    config = load_config(write_target(tmp_path / "target.yaml", data))
    settings = config.mcp.model_copy(update={"name": f"refresh-{next(_ids)}"})
    template = mcp_template(settings, image, "local-models/tiny-llama", "a" * 40, "")
    container = template.containers[0]
    container.command = ["python3", "/app/main.py"]
    container.env = [env for env in container.env if env.name != "HOST"]
    container.env.extend(gated_template(image, tmp_path).containers[0].env)

    # clients_for caches one Clients per target, and this test needs a fresh one
    # per localcloud process because each restart serves on another port.
    first_clients = clients_for.__wrapped__(config.target)
    outcome: list[BaseException] = []

    def first_run() -> None:
        try:
            with disable_run_logger():
                deploy_candidate.fn(first_clients, settings, template)
        except BaseException as exc:  # noqa: BLE001 - recorded for the check below
            outcome.append(exc)

    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    wait_for_instance_pid(tmp_path)
    crashing.kill()
    # The client would poll a dead port until its own timeout; closing the channel
    # ends that run the way a killed refresh ends.
    first_clients.services.transport.close()
    thread.join(timeout=WAIT_SECONDS)
    assert not thread.is_alive()
    assert outcome, "the first run finished although localcloud was killed"

    restart()
    clients = clients_for.__wrapped__(config.target)
    name = f"{clients.location}/services/{settings.name}"
    # The gate is still closed, so the resumed create is reconciling while the
    # rerun starts: the rerun must wait for it instead of reading an empty split.
    assert clients.services.get_service(name=name).reconciling
    rerun: list[Candidate | BaseException] = []

    def second_run() -> None:
        try:
            with disable_run_logger():
                rerun.append(deploy_candidate.fn(clients, settings, template))
        except BaseException as exc:  # noqa: BLE001 - recorded for the check below
            rerun.append(exc)

    thread = threading.Thread(target=second_run, daemon=True)
    thread.start()
    (tmp_path / "gate").touch()
    thread.join(timeout=WAIT_SECONDS)
    assert not thread.is_alive()
    [candidate] = rerun
    assert isinstance(candidate, Candidate), repr(candidate)
    created = clients.services.get_service(name=name).latest_created_revision
    # created is False only on the "Tagged existing" path.
    assert not candidate.created
    assert candidate.revision == created.rsplit("/", 1)[1]
    service = clients.services.get_service(name=name)
    assert service.latest_ready_revision.rsplit("/", 1)[1] == candidate.revision
    assert {s.tag: s.revision for s in service.traffic_statuses if s.tag} == {
        "candidate": candidate.revision
    }


# --- half-written state ---------------------------------------------------------------


def deploy_ready_service(
    cloud: LocalCloud, tmp_path: Path
) -> tuple[run_v2.ServicesClient, run_v2.Service]:
    authority = cloud.tokens

    def auth() -> dict[str, str]:
        return basic_auth(authority.issue_access_token(PUSHER))

    with oci.RegistryClient(oci.local_endpoint(cloud.registry.address), auth) as reg:
        image = oci.append_layers(
            BASE,
            [oci.Layer.from_files({"/app/main.py": GATED_APP})],
            f"us-central1-docker.pkg.dev/{PROJECT}/tests/gated",
            oci.ConfigChanges(entrypoint=["python3", "/app/main.py"]),
            registry=reg,
        )
    (tmp_path / "gate").touch()
    services, _ = clients_on(cloud.grpc_address)
    service = services.create_service(
        parent=PARENT,
        service_id=f"stored-{next(_ids)}",
        service=run_v2.Service(
            template=gated_template(image, tmp_path), invoker_iam_disabled=True
        ),
    ).result(timeout=WAIT_SECONDS)
    return services, service


def test_revision_without_service_is_deleted(
    tmp_path: Path, state_dir: Path, restart: Callable[[], LocalCloud]
) -> None:
    cloud = restart()
    _, service = deploy_ready_service(cloud, tmp_path)
    cloud.stop()
    # What a create leaves when the crash comes before the service is stored.
    store_path(state_dir, "run.services", service.name).unlink()

    cloud = restart()
    services, revisions = clients_on(cloud.grpc_address)
    with pytest.raises(gexc.NotFound):
        revisions.get_revision(name=service.latest_created_revision)
    with pytest.raises(gexc.NotFound):
        services.get_service(name=service.name)
    again = services.create_service(
        parent=PARENT,
        service_id=service.name.rsplit("/", 1)[1],
        service=run_v2.Service(template=service.template, invoker_iam_disabled=True),
    ).result(timeout=WAIT_SECONDS)
    assert again.latest_ready_revision


def test_revision_newer_than_service_is_deleted(
    tmp_path: Path, state_dir: Path, restart: Callable[[], LocalCloud]
) -> None:
    cloud = restart()
    _, service = deploy_ready_service(cloud, tmp_path)
    cloud.stop()
    # What an update leaves when the crash comes after its revision is stored but
    # before the service generation that names it.
    source = store_path(state_dir, "run.revisions", service.latest_created_revision)
    record = json.loads(source.read_text())
    unfinished = service.name + "/revisions/" + service.name.rsplit("/", 1)[1] + "-x"
    record["revision"]["name"] = unfinished
    record["revision"]["reconciling"] = True
    record["service_generation"] = service.generation + 1
    store_path(state_dir, "run.revisions", unfinished).write_text(json.dumps(record))

    cloud = restart()
    services, revisions = clients_on(cloud.grpc_address)
    with pytest.raises(gexc.NotFound):
        revisions.get_revision(name=unfinished)
    current = services.get_service(name=service.name)
    assert current.latest_ready_revision == service.latest_ready_revision
    assert not current.reconciling
    assert (
        answering_revision(current.uri)
        == (service.latest_ready_revision.rsplit("/", 1)[1])
    )


def test_traffic_to_missing_revision_fails_cleanly(
    tmp_path: Path, state_dir: Path, restart: Callable[[], LocalCloud]
) -> None:
    cloud = restart()
    _, service = deploy_ready_service(cloud, tmp_path)
    cloud.stop()
    path = store_path(state_dir, "run.services", service.name)
    document = json.loads(path.read_text())
    short = service.name.rsplit("/", 1)[1]
    document["service"]["traffic"].append(
        {
            "type_": "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION",
            "revision": f"{short}-gone",
            "tag": "gone",
        }
    )
    document["service"]["traffic_statuses"].append(
        {
            "type_": "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION",
            "revision": f"{short}-gone",
            "tag": "gone",
        }
    )
    path.write_text(json.dumps(document))

    cloud = restart()
    services, _ = clients_on(cloud.grpc_address)
    current = services.get_service(name=service.name)
    assert current.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    assert f"{short}-gone" in current.terminal_condition.message
    assert [s.tag for s in current.traffic_statuses if s.tag] == []
    assert (
        answering_revision(current.uri)
        == (service.latest_ready_revision.rsplit("/", 1)[1])
    )

    latest = run_v2.TrafficTarget(
        type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST,
        percent=100,
    )
    fixed = services.update_service(
        service=run_v2.Service(name=service.name, traffic=[latest]),
        update_mask={"paths": ["traffic"]},
    ).result(timeout=WAIT_SECONDS)
    assert fixed.terminal_condition.state == (
        run_v2.Condition.State.CONDITION_SUCCEEDED
    )
