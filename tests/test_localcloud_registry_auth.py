"""localcloud's registry behind its Artifact Registry front, in a started LocalCloud.

Every request needs an OAuth access token that localcloud's TokenAuthority issued, in
the two forms Artifact Registry takes: Basic `oauth2accesstoken:TOKEN` and
`Bearer TOKEN`. The pipeline's clients, the base image seeding and the runtime's pulls
all go through the front, which also rejects a second PATCH to one upload. The tests
use a real docker-registry and a real localcloud, on loopback only.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from google.cloud import run_v2
from google.cloud.run_v2.services.services.transports import ServicesGrpcTransport

from localcloud.registry import (
    BASE_REPOSITORY,
    BASE_TAG,
    ImagePullError,
    basic_auth,
    extract_image,
)
from localcloud.server import Endpoints, LocalCloud
from localcloud.tokens import InvalidToken, TokenAuthority
from tasks.clients import clients_for
from tasks.config import load_config
from tasks.image import registry_client
from tasks.oci import (
    ConfigChanges,
    Layer,
    RegistryClient,
    RegistryError,
    append_layers,
    local_endpoint,
)

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").is_file(),
    reason="needs Debian's docker-registry: apt-get install docker-registry",
)

BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"
PRINCIPAL = "builder@local-project.iam.gserviceaccount.com"
OPERATION_TIMEOUT = 60
HTTP_TIMEOUT = 30.0

HELLO_APP = b"""
import http.server, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("pulled through the front: " + os.environ["K_REVISION"]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

address = ("127.0.0.1", int(os.environ["PORT"]))
http.server.ThreadingHTTPServer(address, Handler).serve_forever()
"""

Headers = Callable[[], dict[str, str]]


def push(cloud: LocalCloud, auth: Headers | None, name: str) -> str:
    layer = Layer.from_files({"/app/main.py": HELLO_APP + f"# {name}\n".encode()})
    with RegistryClient(local_endpoint(cloud.registry.address), auth) as client:
        return append_layers(
            BASE,
            [layer],
            f"us-central1-docker.pkg.dev/local-project/auth/{name}",
            ConfigChanges(entrypoint=["python3", "/app/main.py"], working_dir="/app"),
            registry=client,
        )


def push_error(cloud: LocalCloud, headers: dict[str, str], name: str) -> RegistryError:
    with pytest.raises(RegistryError) as caught:
        push(cloud, lambda: headers, name)
    return caught.value


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the front is what localcloud serves ---------------------------------------------


def test_endpoints_name_the_front(cloud: LocalCloud) -> None:
    endpoints = Endpoints.read(cloud.state_dir)

    assert endpoints.registry == cloud.registry.address
    assert endpoints.registry != cloud.registry.process.address
    assert cloud.registry.base_image.startswith(f"{endpoints.registry}/")


def test_base_image_seeded_through_front(cloud: LocalCloud) -> None:
    auth = basic_auth(cloud.tokens.issue_access_token(PRINCIPAL))
    with RegistryClient(local_endpoint(cloud.registry.address), lambda: auth) as client:
        pinned = client.resolve_digest(BASE)

    assert pinned.endswith(cloud.registry.base_image.split("@")[1])


# --- requests without valid credentials ----------------------------------------------


def test_push_without_credentials_fails(cloud: LocalCloud) -> None:
    with pytest.raises(RegistryError) as caught:
        push(cloud, None, "anonymous")

    assert caught.value.status == 401
    assert caught.value.code == "UNAUTHORIZED"
    assert "authentication required" in str(caught.value)
    assert "check the registry credentials" in str(caught.value)


def test_push_with_unknown_token_fails(cloud: LocalCloud) -> None:
    other = TokenAuthority(cloud.state_dir / "another-authority")
    forged = other.issue_access_token(PRINCIPAL)

    error = push_error(cloud, bearer(forged), "forged")

    assert error.status == 401
    assert "not issued here" in str(error)


def test_push_with_expired_token_fails(cloud: LocalCloud) -> None:
    an_hour_ago = int(time.time()) - 3600
    expired = cloud.tokens.issue_access_token(
        PRINCIPAL, lifetime_seconds=60, issued_at=an_hour_ago
    )

    error = push_error(cloud, basic_auth(expired), "expired")

    assert error.status == 401
    assert "expired" in str(error)


def test_push_with_id_token_fails(cloud: LocalCloud) -> None:
    id_token = cloud.tokens.issue_id_token(PRINCIPAL, cloud.registry.url)

    error = push_error(cloud, bearer(id_token), "id-token")

    assert error.status == 401
    assert "ID token is not an access token" in str(error)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ya29.local-garbage",
        "Bearer",
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Token ya29.local-x",
    ],
    ids=["malformed-bearer", "empty-bearer", "bad-base64", "no-password", "scheme"],
)
def test_malformed_credentials_fail(cloud: LocalCloud, header: str) -> None:
    error = push_error(cloud, {"Authorization": header}, "malformed")

    assert error.status == 401
    assert error.code == "UNAUTHORIZED"


def test_basic_with_other_user_fails(cloud: LocalCloud) -> None:
    token = cloud.tokens.issue_access_token(PRINCIPAL)
    encoded = base64.b64encode(f"_json_key:{token}".encode()).decode()

    error = push_error(cloud, {"Authorization": f"Basic {encoded}"}, "other-user")

    assert error.status == 401
    assert "oauth2accesstoken" in str(error)


# --- requests with valid credentials -------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_push_with_access_token_works(cloud: LocalCloud, scheme: str) -> None:
    def auth() -> dict[str, str]:
        token = cloud.tokens.issue_access_token(PRINCIPAL)
        return basic_auth(token) if scheme == "basic" else bearer(token)

    assert cloud.registry.front is not None
    rejected_before = len(cloud.registry.front.rejected)

    image = push(cloud, auth, f"with-{scheme}")
    with RegistryClient(local_endpoint(cloud.registry.address), auth) as client:
        pinned = client.resolve_digest(image)

    assert pinned == image
    assert len(cloud.registry.front.rejected) == rejected_before


def test_pipeline_pushes_with_minted_token(cloud: LocalCloud, target: Path) -> None:
    clients = clients_for(load_config(target).target)

    headers = clients.registry_headers()
    scheme, _, token = headers["Authorization"].partition(" ")
    with registry_client(clients) as client:
        image = append_layers(
            BASE,
            [Layer.from_files({"/app/main.py": HELLO_APP})],
            f"{clients.target.image_repository}/pipeline",
            registry=client,
        )

    assert scheme == "Bearer"
    claims = cloud.tokens.verify_access_token(token)
    assert claims.principal == "model-refresh@local-project.iam.gserviceaccount.com"
    assert claims.expires_at - claims.issued_at == 3600
    assert image.startswith(f"{clients.target.image_repository}/pipeline@sha256:")
    # The credentials refresh only when the token nears its expiry.
    assert clients.registry_headers() == headers


@pytest.mark.parametrize(
    ("mode", "patches"), [("monolithic", 0), ("streamed", 1), (None, 1)]
)
def test_blob_upload_mode_of_target(
    cloud: LocalCloud, target: Path, tmp_path: Path, mode: str | None, patches: int
) -> None:
    configured = load_config(target).target
    clients = clients_for(configured.model_copy(update={"blob_uploads": mode}))
    front = cloud.registry.front
    before = len(front.patched_uploads)
    layer = Layer.from_files({"/app/mode.txt": f"mode {mode}".encode()})
    # Only a layer with a digest cache, as the weights layer has, is streamed.
    layer.digest_cache = tmp_path / "layer-digests.json"

    with registry_client(clients) as client:
        image = append_layers(
            BASE,
            [layer],
            f"{clients.target.image_repository}/upload-{mode or 'default'}",
            registry=client,
        )
        uploaded = client.stats.blobs_uploaded

    # One new layer plus the config; only a streamed layer is sent with PATCH.
    assert uploaded == 2
    assert len(front.patched_uploads) - before == patches
    assert "@sha256:" in image


# --- what docker-compatible clients rely on -------------------------------------------


def test_challenge_on_v2_names_realm(cloud: LocalCloud) -> None:
    response = httpx.get(f"{cloud.registry.url}/v2/", timeout=HTTP_TIMEOUT)

    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge == f'Bearer realm="{cloud.registry.url}/v2/token"'
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    ("method", "actions"), [("GET", "pull"), ("POST", "push,pull")]
)
def test_challenge_on_repository_names_scope(
    cloud: LocalCloud, method: str, actions: str
) -> None:
    path = "/v2/local-project/auth/app/manifests/v1"
    if method == "POST":
        path = "/v2/local-project/auth/app/blobs/uploads/"

    response = httpx.request(method, cloud.registry.url + path, timeout=HTTP_TIMEOUT)

    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge == (
        f'Bearer realm="{cloud.registry.url}/v2/token",'
        f'service="{cloud.registry.address}",'
        f'scope="repository:local-project/auth/app:{actions}"'
    )


def test_token_endpoint_trades_basic_for_bearer(cloud: LocalCloud) -> None:
    access = cloud.tokens.issue_access_token(PRINCIPAL)
    url = f"{cloud.registry.url}/v2/token"
    params = {
        "service": cloud.registry.address,
        "scope": "repository:local-project/auth/app:pull",
    }

    traded = httpx.get(
        url, params=params, headers=basic_auth(access), timeout=HTTP_TIMEOUT
    )
    body = traded.json()
    ping = httpx.get(
        f"{cloud.registry.url}/v2/", headers=bearer(body["token"]), timeout=HTTP_TIMEOUT
    )

    assert traded.status_code == 200
    assert body["access_token"] == body["token"]
    assert 3500 < body["expires_in"] <= 3600
    assert body["issued_at"].endswith("Z")
    assert ping.status_code == 200


def test_token_endpoint_needs_credentials(cloud: LocalCloud) -> None:
    response = httpx.get(f"{cloud.registry.url}/v2/token", timeout=HTTP_TIMEOUT)

    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_second_patch_rejected_through_front(cloud: LocalCloud) -> None:
    token = cloud.tokens.issue_access_token(PRINCIPAL)
    with httpx.Client(
        base_url=cloud.registry.url, headers=bearer(token), timeout=HTTP_TIMEOUT
    ) as http:
        started = http.post("/v2/local-project/auth/chunked/blobs/uploads/")
        first = http.patch(started.headers["Location"], content=b"a" * 1024)
        second = http.patch(first.headers["Location"], content=b"b" * 1024)

    assert started.status_code == 202
    assert first.status_code == 202
    assert second.status_code == 400
    error = second.json()["errors"][0]
    assert error["code"] == "BLOB_UPLOAD_INVALID"
    assert "chunked uploads are not supported" in error["message"]


# --- the runtime pulls with its own token --------------------------------------------


def test_pull_without_token_fails(cloud: LocalCloud, tmp_path: Path) -> None:
    image = push(cloud, lambda: bearer(cloud.tokens.issue_access_token()), "pull")

    with pytest.raises(ImagePullError, match="401"):
        extract_image(cloud.registry.url, {}, image, tmp_path / "anonymous")
    config = cloud.registry.extract_image(image, tmp_path / "runtime")

    assert not (tmp_path / "anonymous").exists()
    assert config["Entrypoint"] == ["python3", "/app/main.py"]
    assert (tmp_path / "runtime/app/main.py").read_bytes().startswith(HELLO_APP)


def test_runtime_pulls_and_runs_revision(cloud: LocalCloud) -> None:
    image = push(cloud, lambda: bearer(cloud.tokens.issue_access_token()), "served")
    channel = grpc.insecure_channel(cloud.grpc_address)
    services = run_v2.ServicesClient(transport=ServicesGrpcTransport(channel=channel))

    service = services.create_service(
        parent="projects/local-project/locations/us-central1",
        service_id="pulled",
        service=run_v2.Service(
            invoker_iam_disabled=True,
            template=run_v2.RevisionTemplate(
                containers=[run_v2.Container(image=image)]
            ),
        ),
    ).result(timeout=OPERATION_TIMEOUT)
    response = httpx.get(service.uri, timeout=HTTP_TIMEOUT)

    revision = service.latest_ready_revision.rsplit("/", 1)[-1]
    assert response.status_code == 200
    assert response.text == f"pulled through the front: {revision}"


# --- start and stop ------------------------------------------------------------------


def test_restart_keeps_front_address(tmp_path: Path) -> None:
    first = LocalCloud(tmp_path / "state")
    first.start()
    try:
        address = first.registry.address
        base_image = first.registry.base_image
    finally:
        first.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}/v2/", timeout=5.0)

    second = LocalCloud(tmp_path / "state")
    second.start()
    try:
        assert second.registry.address == address
        assert second.registry.base_image == base_image
        token = second.tokens.issue_access_token(PRINCIPAL)
        ping = httpx.get(f"http://{address}/v2/", headers=bearer(token), timeout=5.0)
        assert ping.status_code == 200
    finally:
        second.stop()


def run_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localcloud", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_cli_prints_working_token(tmp_path: Path) -> None:
    state_dir = tmp_path / "cloud"
    not_running = run_cli(state_dir, "print-access-token")
    started = run_cli(state_dir, "start")
    try:
        assert started.returncode == 0, started.stderr
        printed = run_cli(state_dir, "print-access-token")
        token = printed.stdout.strip()
        registry = json.loads(started.stdout)["registry"]
        anonymous = httpx.get(f"http://{registry}/v2/", timeout=HTTP_TIMEOUT)
        with_token = httpx.get(
            f"http://{registry}/v2/", headers=basic_auth(token), timeout=HTTP_TIMEOUT
        )
    finally:
        run_cli(state_dir, "stop")

    assert not_running.returncode == 1
    assert "not running" in not_running.stderr
    assert printed.returncode == 0
    assert anonymous.status_code == 401
    assert with_token.status_code == 200


# --- access tokens -------------------------------------------------------------------


def test_access_token_survives_restart(tmp_path: Path) -> None:
    token = TokenAuthority(tmp_path).issue_access_token(PRINCIPAL, 600)

    claims = TokenAuthority(tmp_path).verify_access_token(token)

    assert claims.principal == PRINCIPAL
    assert claims.expires_at - claims.issued_at == 600


def test_tampered_access_token_rejected(tmp_path: Path) -> None:
    authority = TokenAuthority(tmp_path)
    token = authority.issue_access_token(PRINCIPAL)
    payload, _, signature = token.removeprefix("ya29.local-").partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin@local-project.iam.gserviceaccount.com"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")

    with pytest.raises(InvalidToken, match="not issued here"):
        authority.verify_access_token(f"ya29.local-{forged.decode()}.{signature}")


def test_grpc_access_token_verifies(cloud: LocalCloud, target: Path) -> None:
    clients = clients_for(load_config(target).target)

    response = clients.iam_credentials.generate_access_token(
        name=f"projects/-/serviceAccounts/{PRINCIPAL}",
        scope=["https://www.googleapis.com/auth/cloud-platform"],
        lifetime={"seconds": 120},
    )
    claims = cloud.tokens.verify_access_token(response.access_token)

    assert claims.principal == PRINCIPAL
    assert claims.expires_at == int(response.expire_time.timestamp())
    assert claims.expires_at - claims.issued_at == 120
