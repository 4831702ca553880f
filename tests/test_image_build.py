"""Weights layers and pushes through localcloud's Artifact Registry front.

A real docker-registry runs behind RegistryFront, which requires an access token from a
TokenAuthority and rejects a second PATCH to the same upload, as Artifact Registry does.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from localcloud.registry import (
    BASE_REPOSITORY,
    BASE_TAG,
    RegistryFront,
    RegistryProcess,
)
from localcloud.tokens import TokenAuthority
from tasks import oci
from tasks.image import weights_layer
from tasks.oci import Layer, LayerError, RegistryClient, RegistryError, append_layers

BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").is_file(),
    reason="needs Debian's docker-registry: apt-get install docker-registry",
)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_REFRESH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = RegistryProcess(tmp_path_factory.mktemp("registry"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> TokenAuthority:
    return TokenAuthority(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def token(authority: TokenAuthority) -> str:
    return authority.issue_access_token("builder@p.iam.gserviceaccount.com")


@pytest.fixture
def front(
    registry: RegistryProcess, authority: TokenAuthority
) -> Iterator[RegistryFront]:
    with RegistryFront(registry.address, authority) as server:
        yield server


@pytest.fixture
def bearer(token: str) -> Callable[[], dict[str, str]]:
    return lambda: {"Authorization": f"Bearer {token}"}


@pytest.fixture
def basic(token: str) -> Callable[[], dict[str, str]]:
    credentials = base64.b64encode(f"oauth2accesstoken:{token}".encode()).decode()
    return lambda: {"Authorization": f"Basic {credentials}"}


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    files = {}
    for name, size in (("config.json", 100), ("model.safetensors", 3 * 2**20 + 5)):
        path = folder / name
        path.write_bytes(os.urandom(size))
        files[name] = path
    return files


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    original = oci._read_exactly

    def counting(path: Path, size: int) -> Iterator[bytes]:
        reads.append(path)
        return original(path, size)

    monkeypatch.setattr(oci, "_read_exactly", counting)
    return reads


# --- front --------------------------------------------------------------------------


def test_front_rejects_missing_credentials(front: RegistryFront) -> None:
    with (
        RegistryClient(oci.local_endpoint(front.address)) as client,
        pytest.raises(RegistryError) as caught,
    ):
        oci.resolve_digest(BASE, registry=client)

    assert caught.value.status == 401
    assert "credentials" in str(caught.value)


def test_front_rejects_wrong_token(front: RegistryFront) -> None:
    wrong = {"Authorization": "Bearer ya29.someone-else"}
    with (
        RegistryClient(oci.local_endpoint(front.address), lambda: wrong) as client,
        pytest.raises(RegistryError) as caught,
    ):
        oci.resolve_digest(BASE, registry=client)

    assert caught.value.status == 401


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_push_through_front_with_credentials(
    scheme: str,
    request: pytest.FixtureRequest,
    front: RegistryFront,
    registry: RegistryProcess,
    weights: dict[str, Path],
    tmp_path: Path,
) -> None:
    layer = weights_layer(weights)
    layer.digest_cache = tmp_path / "digests.json"
    endpoint = oci.local_endpoint(front.address)
    headers = request.getfixturevalue(scheme)
    with RegistryClient(endpoint, headers, single_patch_uploads=True) as client:
        image = append_layers(
            BASE, [layer], "us-central1-docker.pkg.dev/p/front/llm", registry=client
        )

    root = registry.extract_image(image, tmp_path / "root")

    assert root["Entrypoint"] == ["python3"]
    content = (tmp_path / "root/models/model/model.safetensors").read_bytes()
    assert content == weights["model.safetensors"].read_bytes()
    assert list(front.rejected) == []


def test_front_rejects_second_patch(
    front: RegistryFront, bearer: Callable[[], dict[str, str]]
) -> None:
    with httpx.Client(base_url=f"http://{front.address}", headers=bearer()) as http:
        started = http.post("/v2/p/chunked/app/blobs/uploads/")
        first = http.patch(started.headers["Location"], content=b"a" * 1024)
        second = http.patch(first.headers["Location"], content=b"b" * 1024)

    assert started.status_code == 202
    assert first.status_code == 202
    assert second.status_code == 400
    assert second.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"


# --- one pass -----------------------------------------------------------------------


def test_new_layer_read_once_in_one_patch(
    front: RegistryFront,
    bearer: Callable[[], dict[str, str]],
    weights: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = _counting_reads(monkeypatch)
    layer = Layer.from_files(
        {f"/models/{name}": path for name, path in weights.items()},
        compression="zstd",
    )
    layer.digest_cache = tmp_path / "digests.json"
    target = "us-central1-docker.pkg.dev/p/onepass/llm"

    with RegistryClient(
        oci.local_endpoint(front.address), bearer, single_patch_uploads=True
    ) as client:
        image = append_layers(BASE, [layer], target, registry=client)

    assert sorted(reads) == sorted(weights.values())
    assert list(front.rejected) == []
    measured = Layer(layer.entries, compression="zstd").digests()
    assert layer.digests() == measured
    assert image.startswith(target + "@sha256:")


def test_default_client_sends_no_patch(
    front: RegistryFront,
    bearer: Callable[[], dict[str, str]],
    weights: dict[str, Path],
    tmp_path: Path,
) -> None:
    layer = weights_layer(weights)
    target = "us-central1-docker.pkg.dev/p/monolithic/llm"

    with RegistryClient(oci.local_endpoint(front.address), bearer) as client:
        append_layers(BASE, [layer], target, registry=client)
        uploaded = client.stats.bytes_uploaded

    assert uploaded >= layer.digests().size
    assert len(front.patched_uploads) == 0


def test_cached_digest_skips_read_and_upload(
    front: RegistryFront,
    bearer: Callable[[], dict[str, str]],
    weights: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "digests.json"
    files = {f"/models/{name}": path for name, path in weights.items()}
    target = "us-central1-docker.pkg.dev/p/cached/llm"
    first = Layer.from_files(files, compression="zstd")
    first.digest_cache = cache
    with RegistryClient(
        oci.local_endpoint(front.address), bearer, single_patch_uploads=True
    ) as client:
        pushed = append_layers(BASE, [first], target, registry=client)
    reads = _counting_reads(monkeypatch)
    again = Layer.from_files(files, compression="zstd")
    again.digest_cache = cache

    with RegistryClient(
        oci.local_endpoint(front.address), bearer, single_patch_uploads=True
    ) as client:
        repushed = append_layers(BASE, [again], target, registry=client)
        uploaded = client.stats.bytes_uploaded

    assert repushed == pushed
    assert reads == []
    assert uploaded == 0


def test_changed_file_misses_digest_cache(
    weights: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "digests.json"
    layer = Layer.from_files({"/m/w": weights["model.safetensors"]})
    layer.digest_cache = cache
    layer.record_digests(layer.digests())
    weights["model.safetensors"].write_bytes(b"new weights")

    changed = Layer.from_files({"/m/w": weights["model.safetensors"]})
    changed.digest_cache = cache

    assert changed.known_digests() is None


# --- staged files -------------------------------------------------------------------


def test_weights_layer_rejects_symlink(
    weights: dict[str, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not from the Hub")
    link = weights["model.safetensors"].with_name("linked.safetensors")
    link.symlink_to(outside)

    with pytest.raises(LayerError, match="not a regular file"):
        weights_layer({**weights, "linked.safetensors": link})


def test_weights_layer_is_deterministic(weights: dict[str, Path]) -> None:
    first = weights_layer(weights)
    first.digest_cache = None
    second = weights_layer(dict(reversed(list(weights.items()))))
    second.digest_cache = None

    assert first.digests() == second.digests()
