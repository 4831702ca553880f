"""The daemonless image builder and localcloud's registry, on a real docker-registry.

The registry tests start Debian's `docker-registry` through RegistryProcess in a
temporary folder. One test uses a small registry written here that rejects a second
PATCH, to prove that blobs are sent as one monolithic PUT.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from localcloud.registry import (
    BASE_REPOSITORY,
    BASE_TAG,
    ImagePullError,
    RegistryProcess,
    UnsafeEntryError,
)
from tasks.oci import (
    OCI_MANIFEST,
    ConfigChanges,
    ImageReference,
    Layer,
    RegistryClient,
    RegistryError,
    append_layers,
    canonical_json,
    local_endpoint,
    resolve_digest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}:{BASE_TAG}"

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").is_file(),
    reason="needs Debian's docker-registry: apt-get install docker-registry",
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = RegistryProcess(tmp_path_factory.mktemp("registry"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(registry: RegistryProcess) -> Iterator[RegistryClient]:
    with RegistryClient(local_endpoint(registry.address)) as registry_client:
        yield registry_client


@pytest.fixture
def app_files(tmp_path: Path) -> dict[str, Path | bytes]:
    script = tmp_path / "serve.sh"
    script.write_text("#!/bin/sh\nexec python3 /app/main.py\n")
    script.chmod(0o755)
    module = tmp_path / "main.py"
    module.write_text("print('hello from the image')\n")
    return {
        "/app/main.py": module,
        "/app/bin/serve.sh": script,
        "/app/config.json": b'{"port": 8080}\n',
    }


def _tar_members(layer: Layer) -> list[tarfile.TarInfo]:
    data = b"".join(Layer(layer.entries, compression="none").chunks())
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


# --- layers -------------------------------------------------------------------------


def test_layer_tar_is_normalized(app_files: dict[str, Path | bytes]) -> None:
    members = _tar_members(Layer.from_files(app_files))

    assert [m.name for m in members] == [
        "app",
        "app/bin",
        "app/bin/serve.sh",
        "app/config.json",
        "app/main.py",
    ]
    assert {m.mtime for m in members} == {0}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["app"] == 0o755
    assert modes["app/bin/serve.sh"] == 0o755
    assert modes["app/main.py"] == 0o644
    assert not any(m.pax_headers for m in members)


def test_layer_from_directory_keeps_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("x = 1\n")
    (source / "link.py").symlink_to("pkg/mod.py")

    members = {m.name: m for m in _tar_members(Layer.from_directory(source, "/srv"))}

    assert sorted(members) == ["srv", "srv/link.py", "srv/pkg", "srv/pkg/mod.py"]
    assert members["srv/link.py"].issym()
    assert members["srv/link.py"].linkname == "pkg/mod.py"


def test_layer_rejects_parent_paths() -> None:
    with pytest.raises(ValueError, match="'..'"):
        Layer.from_files({"/app/../etc/passwd": b"x"})


def test_layer_digest_same_in_two_processes(
    app_files: dict[str, Path | bytes],
    registry: RegistryProcess,
    client: RegistryClient,
) -> None:
    target = "us-central1-docker.pkg.dev/p/determinism/app"
    changes = ConfigChanges(env={"MODE": "test"}, cmd=["/app/main.py"])
    here = append_layers(
        BASE, [Layer.from_files(app_files)], target, changes, registry=client
    )
    files = {
        name: str(value) for name, value in app_files.items() if isinstance(value, Path)
    }
    program = f"""
import json, sys
from pathlib import Path
from tasks.oci import ConfigChanges, Layer, RegistryClient, append_layers
from tasks.oci import local_endpoint
files = {{name: Path(path) for name, path in json.loads(sys.argv[1]).items()}}
files["/app/config.json"] = {app_files["/app/config.json"]!r}
layer = Layer.from_files(files)
with RegistryClient(local_endpoint({registry.address!r})) as client:
    print(layer.digests().digest)
    print(append_layers({BASE!r}, [layer], {target!r},
        ConfigChanges(env={{"MODE": "test"}}, cmd=["/app/main.py"]), registry=client))
"""

    result = subprocess.run(
        [sys.executable, "-c", program, json.dumps(files)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "random"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    layer_digest, there = result.stdout.split()

    assert layer_digest == Layer.from_files(app_files).digests().digest
    assert there == here


def test_gzip_layer_has_fixed_header(app_files: dict[str, Path | bytes]) -> None:
    blob = b"".join(Layer.from_files(app_files, compression="gzip").chunks())

    assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


# --- pushing ------------------------------------------------------------------------


def test_second_push_uploads_no_layer_bytes(
    app_files: dict[str, Path | bytes], registry: RegistryProcess
) -> None:
    target = "us-central1-docker.pkg.dev/p/skip/app:v1"
    with RegistryClient(local_endpoint(registry.address)) as first:
        pushed = append_layers(
            BASE, [Layer.from_files(app_files)], target, registry=first
        )
    with RegistryClient(local_endpoint(registry.address)) as second:
        again = append_layers(
            BASE, [Layer.from_files(app_files)], target, registry=second
        )

    assert again == pushed
    assert first.stats.bytes_uploaded > 0
    assert second.stats.bytes_uploaded == 0
    assert second.stats.blobs_uploaded == 0


def test_cross_repository_mount(
    app_files: dict[str, Path | bytes], client: RegistryClient
) -> None:
    layer = Layer.from_files(app_files)
    first = append_layers(
        BASE, [layer], "europe-west4-docker.pkg.dev/p/a/app", registry=client
    )
    uploaded = client.stats.bytes_uploaded

    second = append_layers(
        BASE, [layer], "europe-west4-docker.pkg.dev/p/b/app", registry=client
    )

    assert second.split("@")[1] == first.split("@")[1]
    assert client.stats.bytes_uploaded == uploaded
    assert client.stats.blobs_mounted >= 3
    target = ImageReference.parse("europe-west4-docker.pkg.dev/p/b/app")
    assert client.blob_exists(target, layer.digests().digest)


def test_config_changes_applied(
    app_files: dict[str, Path | bytes],
    registry: RegistryProcess,
    client: RegistryClient,
) -> None:
    changes = ConfigChanges(
        env={"PATH": "/app/bin:/usr/bin", "MODEL": "tiny"},
        entrypoint=["python3", "/app/main.py"],
        working_dir="/app",
        user="65532",
        labels={"model.sha": "abc"},
    )
    image = append_layers(
        BASE,
        [Layer.from_files(app_files)],
        "us-central1-docker.pkg.dev/p/config/app",
        changes,
        registry=client,
    )

    config = registry.extract_image(image, registry.root.parent / "config-root")

    assert config["Env"] == [
        "PYTHONUNBUFFERED=1",
        "PATH=/app/bin:/usr/bin",
        "MODEL=tiny",
    ]
    assert config["Entrypoint"] == ["python3", "/app/main.py"]
    assert "Cmd" not in config
    assert config["WorkingDir"] == "/app"
    assert config["User"] == "65532"
    assert config["Labels"]["model.sha"] == "abc"
    assert config["Labels"]["localcloud.base"] == "host-python"


def test_resolve_digest_pins_tag(
    client: RegistryClient, registry: RegistryProcess
) -> None:
    pinned = resolve_digest(BASE, registry=client)

    assert pinned.split("@")[1] == registry.base_image.split("@")[1]
    assert pinned.startswith(f"us-central1-docker.pkg.dev/{BASE_REPOSITORY}@sha256:")


def test_missing_image_error_names_url(client: RegistryClient) -> None:
    with pytest.raises(RegistryError) as caught:
        resolve_digest("us-central1-docker.pkg.dev/p/none/app:v9", registry=client)

    assert caught.value.status == 404
    assert "/v2/p/none/app/manifests/v9" in str(caught.value)


# --- extract_image ------------------------------------------------------------------


def test_extract_round_trip(
    app_files: dict[str, Path | bytes],
    registry: RegistryProcess,
    client: RegistryClient,
) -> None:
    image = append_layers(
        BASE,
        [Layer.from_files(app_files, compression="zstd")],
        "us-central1-docker.pkg.dev/p/roundtrip/app",
        ConfigChanges(cmd=["/app/main.py"]),
        registry=client,
    )
    dest = registry.root.parent / "roundtrip-root"

    config = registry.extract_image(image, dest)

    assert config["Cmd"] == ["/app/main.py"]
    assert config["Entrypoint"] == ["python3"]
    module = app_files["/app/main.py"]
    assert isinstance(module, Path)
    assert (dest / "app/main.py").read_bytes() == module.read_bytes()
    assert (dest / "app/config.json").read_bytes() == app_files["/app/config.json"]
    assert os.access(dest / "app/bin/serve.sh", os.X_OK)
    assert (dest / "etc/localcloud-base").is_file()


def test_extract_replaces_previous_tree(
    registry: RegistryProcess, client: RegistryClient
) -> None:
    dest = registry.root.parent / "replaced-root"
    first = append_layers(
        BASE,
        [Layer.from_files({"/app/old.txt": b"old"})],
        "us-central1-docker.pkg.dev/p/replace/app",
        registry=client,
    )
    second = append_layers(
        BASE,
        [Layer.from_files({"/app/new.txt": b"new"})],
        "us-central1-docker.pkg.dev/p/replace/app",
        registry=client,
    )
    registry.extract_image(first, dest)

    registry.extract_image(second, dest)

    assert (dest / "app/new.txt").read_bytes() == b"new"
    assert not (dest / "app/old.txt").exists()
    assert [
        p.name for p in dest.parent.iterdir() if p.name.startswith(".replaced")
    ] == []


def _blob_path(registry: RegistryProcess, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return (
        registry.root
        / "data/docker/registry/v2/blobs/sha256"
        / hex_digest[:2]
        / hex_digest
        / "data"
    )


def test_tampered_layer_rejected(
    registry: RegistryProcess, client: RegistryClient
) -> None:
    layer = Layer.from_files(
        {"/app/data.txt": b"original content\n"}, compression="none"
    )
    image = append_layers(
        BASE, [layer], "us-central1-docker.pkg.dev/p/tamper/app", registry=client
    )
    blob = _blob_path(registry, layer.digests().digest)
    content = blob.read_bytes()
    blob.write_bytes(content.replace(b"original", b"tampered"))
    dest = registry.root.parent / "tampered-root"

    with pytest.raises(ImagePullError, match="failed verification"):
        registry.extract_image(image, dest)

    assert not dest.exists()
    assert [p for p in dest.parent.iterdir() if p.name.startswith(".tampered")] == []


def _raw_layer(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _push_raw_image(
    client: RegistryClient, repository: str, layers: list[bytes]
) -> str:
    target = ImageReference("us-central1-docker.pkg.dev", repository)
    descriptors = []
    for blob in layers:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        client.push_blob(target, digest, len(blob), functools.partial(list, [blob]))
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": len(blob),
            }
        )
    config = canonical_json(
        {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]}}
    )
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.push_blob(target, config_digest, len(config), lambda: [config])
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": descriptors,
        }
    )
    digest = client.put_manifest(target, manifest, OCI_MANIFEST)
    return str(target.with_digest(digest))


UNSAFE_LAYERS: dict[str, list[list[tuple[tarfile.TarInfo, bytes | None]]]] = {
    "absolute path": [[(_info("/etc/evil", size=1), b"x")]],
    "parent path": [[(_info("app/../../evil", size=1), b"x")]],
    "symlink outside": [
        [(_info("app/link", tarfile.SYMTYPE, linkname="../../etc"), None)]
    ],
    "device file": [
        [(_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)]
    ],
    "fifo": [[(_info("app/pipe", tarfile.FIFOTYPE), None)]],
    "hard link outside": [
        [(_info("app/hard", tarfile.LNKTYPE, linkname="../etc/passwd"), None)]
    ],
    "chained symlinks": [
        [
            (_info("d", tarfile.DIRTYPE, mode=0o755), None),
            (_info("d/up", tarfile.SYMTYPE, linkname=".."), None),
            (_info("d/escape", tarfile.SYMTYPE, linkname="up/.."), None),
        ]
    ],
    "write through symlink": [
        [
            (_info("a/b", tarfile.DIRTYPE, mode=0o755), None),
            (_info("a/b/up", tarfile.SYMTYPE, linkname="../.."), None),
            (_info("a/esc", tarfile.SYMTYPE, linkname="b/up/.."), None),
        ],
        [(_info("a/esc/evil", size=1), b"x")],
    ],
}


@pytest.mark.parametrize("case", sorted(UNSAFE_LAYERS))
def test_unsafe_entry_rejected(
    case: str, registry: RegistryProcess, client: RegistryClient
) -> None:
    layers = [_raw_layer(members) for members in UNSAFE_LAYERS[case]]
    image = _push_raw_image(client, "p/unsafe/" + case.replace(" ", "-"), layers)
    dest = registry.root.parent / ("unsafe-" + case.replace(" ", "-"))

    with pytest.raises(UnsafeEntryError):
        registry.extract_image(image, dest)

    assert not dest.exists()


def test_absolute_symlink_stays_inside(
    registry: RegistryProcess, client: RegistryClient
) -> None:
    layer = _raw_layer(
        [
            (_info("usr/bin/real", size=2, mode=0o755), b"ok"),
            (_info("usr/bin/alias", tarfile.SYMTYPE, linkname="/usr/bin/real"), None),
        ]
    )
    image = _push_raw_image(client, "p/abslink/app", [layer])
    dest = registry.root.parent / "abslink-root"

    registry.extract_image(image, dest)

    assert os.readlink(dest / "usr/bin/alias") == "../../usr/bin/real"
    assert (dest / "usr/bin/alias").read_bytes() == b"ok"


def test_whiteouts_hide_lower_layers(
    registry: RegistryProcess, client: RegistryClient
) -> None:
    lower = _raw_layer(
        [
            (_info("a/keep", size=1), b"k"),
            (_info("a/gone", size=1), b"g"),
            (_info("b/old", size=1), b"o"),
        ]
    )
    upper = _raw_layer(
        [
            (_info("a/.wh.gone", size=0), b""),
            (_info("b/new", size=1), b"n"),
            (_info("b/.wh..wh..opq", size=0), b""),
        ]
    )
    image = _push_raw_image(client, "p/whiteout/app", [lower, upper])
    dest = registry.root.parent / "whiteout-root"

    registry.extract_image(image, dest)

    assert sorted(p.name for p in (dest / "a").iterdir()) == ["keep"]
    assert sorted(p.name for p in (dest / "b").iterdir()) == ["new"]


# --- registry process ---------------------------------------------------------------


def test_registry_restart_keeps_port_and_content(tmp_path: Path) -> None:
    first = RegistryProcess(tmp_path / "registry")
    first.start()
    first.stop()
    second = RegistryProcess(tmp_path / "registry")
    second.start()
    try:
        assert second.port == first.port
        assert second.base_image == first.base_image
    finally:
        second.stop()


def test_registry_restart_after_crash(tmp_path: Path) -> None:
    crashed = RegistryProcess(tmp_path / "registry")
    crashed.start()
    orphan = crashed._process
    assert orphan is not None
    restarted = RegistryProcess(tmp_path / "registry")
    try:
        restarted.start()

        assert restarted.port == crashed.port
        assert orphan.wait(timeout=10) is not None
    finally:
        restarted.stop()
        crashed.stop()


# --- monolithic uploads -------------------------------------------------------------


class _StrictRegistry(BaseHTTPRequestHandler):
    """A registry that accepts one PATCH per upload and records every request."""

    server: _StrictServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.log.append(("HEAD", self.path, dict(self.headers)))
        self._reply(404)

    def do_POST(self) -> None:
        self.server.log.append(("POST", self.path, dict(self.headers)))
        self._reply(202, {"Location": "/v2/p/strict/app/blobs/uploads/u1?_state=token"})

    def do_GET(self) -> None:
        self.server.log.append(("GET", self.path, dict(self.headers)))
        body = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST})
        self.send_response(200)
        self.send_header("Content-Type", OCI_MANIFEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PATCH(self) -> None:
        self.server.log.append(("PATCH", self.path, dict(self.headers)))
        self.server.patches += 1
        self._reply(202 if self.server.patches == 1 else 416)

    def do_PUT(self) -> None:
        self.server.log.append(("PUT", self.path, dict(self.headers)))
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self._reply(400)
            return
        remaining = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while remaining:
            data = self.rfile.read(min(remaining, 1 << 20))
            digest.update(data)
            remaining -= len(data)
        if "/manifests/" in self.path:
            stored = self.server.manifest_digest or "sha256:" + digest.hexdigest()
            self._reply(201, {"Docker-Content-Digest": stored})
            return
        expected = "digest=sha256:" + digest.hexdigest()
        status = 201 if "_state=token" in self.path and expected in self.path else 400
        self._reply(status)


class _StrictServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StrictRegistry)
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.patches = 0
        self.manifest_digest = ""


@pytest.fixture
def strict_registry() -> Iterator[_StrictServer]:
    server = _StrictServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_blob_upload_is_one_monolithic_put(
    strict_registry: _StrictServer, tmp_path: Path
) -> None:
    payload = tmp_path / "weights.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    layer = Layer.from_files({"/models/w.bin": payload}, compression="none")
    address = f"127.0.0.1:{strict_registry.server_address[1]}"
    target = ImageReference("us-central1-docker.pkg.dev", "p/strict/app")

    with RegistryClient(local_endpoint(address)) as client:
        digests = layer.digests()
        client.push_blob(target, digests.digest, digests.size, layer.chunks)

    methods = [method for method, _, _ in strict_registry.log]
    assert "PATCH" not in methods
    assert methods == ["HEAD", "POST", "PUT"]
    _, put_path, put_headers = strict_registry.log[-1]
    assert "_state=token" in put_path
    assert f"digest={digests.digest}" in put_path
    assert put_headers["Content-Length"] == str(digests.size)
    assert "Transfer-Encoding" not in put_headers


def test_rewritten_manifest_digest_rejected(strict_registry: _StrictServer) -> None:
    strict_registry.manifest_digest = "sha256:" + "0" * 64
    address = f"127.0.0.1:{strict_registry.server_address[1]}"
    target = ImageReference("us-central1-docker.pkg.dev", "p/strict/app", tag="v1")

    with (
        RegistryClient(local_endpoint(address)) as client,
        pytest.raises(RegistryError, match="rewrote the manifest"),
    ):
        client.put_manifest(target, b'{"schemaVersion":2}', OCI_MANIFEST)


def test_manifest_with_wrong_digest_rejected(strict_registry: _StrictServer) -> None:
    address = f"127.0.0.1:{strict_registry.server_address[1]}"
    target = ImageReference(
        "us-central1-docker.pkg.dev", "p/strict/app", digest="sha256:" + "1" * 64
    )

    with (
        RegistryClient(local_endpoint(address)) as client,
        pytest.raises(RegistryError) as caught,
    ):
        client.get_manifest(target)

    assert caught.value.code == "DIGEST_INVALID"
    assert "failed verification" in str(caught.value)


# --- memory -------------------------------------------------------------------------


def test_large_layer_pushed_with_flat_memory(
    tmp_path: Path, client: RegistryClient
) -> None:
    weights = tmp_path / "model.safetensors"
    with open(weights, "wb") as out:
        for _ in range(64):
            out.write(os.urandom(1024 * 1024))
    layer = Layer.from_files({"/models/model.safetensors": weights}, compression="zstd")
    target = ImageReference("us-central1-docker.pkg.dev", "p/large/model")

    tracemalloc.start()
    try:
        digests = layer.digests()
        client.push_blob(target, digests.digest, digests.size, layer.chunks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert client.stats.bytes_uploaded == digests.size
    assert peak < 16 * 1024 * 1024
