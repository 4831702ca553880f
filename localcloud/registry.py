"""localcloud's OCI registry: Debian's `docker-registry` (distribution 2.8) on loopback.

Every Artifact Registry host (`REGION-docker.pkg.dev`) and the registry's own
`127.0.0.1:PORT` address map to this one registry. The repository path of an image
reference is used unchanged, so `us-central1-docker.pkg.dev/p/r/app@sha256:...` is
stored as repository `p/r/app`.

`LocalRegistry` is what localcloud runs: docker-registry behind `RegistryFront`, an HTTP
front that requires an OAuth access token from localcloud's `TokenAuthority` on every
request and rejects a second PATCH to one upload, as Artifact Registry does. Every
client, the seeding below and the runtime's pulls included, goes through the front.

The registry also contains the base image `localcloud/base/host-python:3.11`, which is
the interpreter and installed packages of this machine. Images built for the local
target append their layers to it, and the runtime starts their entrypoint with the
host's `python3`.

`extract_image` is the runtime's pull. It verifies the manifest and every layer against
their digests while it unpacks them, rejects entries that could write outside the
target folder, and renames the folder into place only when every layer is complete.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import logging
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, cast

import httpx

from localcloud.tokens import AccessTokenClaims, InvalidToken, TokenAuthority

logger = logging.getLogger(__name__)

REGISTRY_BINARY: Final = Path("/usr/bin/docker-registry")
LOOPBACK: Final = "127.0.0.1"
START_TIMEOUT_SECONDS: Final = 15.0
STOP_TIMEOUT_SECONDS: Final = 5.0
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
CHUNK_SIZE: Final = 1024 * 1024

BASE_REPOSITORY: Final = "localcloud/base/host-python"
BASE_TAG: Final = "3.11"
# A fixed time keeps the seeded base image byte-identical on every machine and start.
EPOCH: Final = "1970-01-01T00:00:00Z"

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = (
    "application/vnd.docker.distribution.manifest.list.v2+json"
)
MANIFEST_ACCEPT: Final = ", ".join(
    (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
)
# Layer media type -> compression of the tar stream.
LAYER_COMPRESSION: Final = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPOSITORY = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# The Basic user name that Artifact Registry takes with an access token as password.
OAUTH2_USER: Final = "oauth2accesstoken"
# Principals of the access tokens that localcloud mints for its own registry requests.
SEED_PRINCIPAL: Final = "localcloud-registry@localcloud.iam.gserviceaccount.com"
RUNTIME_PRINCIPAL: Final = (
    "localcloud-runtime@serverless-robot-prod.iam.gserviceaccount.com"
)
FRONT_PORT_FILE: Final = "front-port"
# Upload sessions the front tracks to reject a second PATCH. The oldest are dropped.
MAX_TRACKED_UPLOADS: Final = 10_000
MAX_RECORDED_REJECTIONS: Final = 1_000

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_WHITEOUT: Final = ".wh..wh..opq"


class RegistryStartError(RuntimeError):
    """The registry binary is missing or the registry did not become ready."""


class ImagePullError(Exception):
    """An image pull failed: invalid reference, missing content or bad digest."""


@dataclass(frozen=True)
class ImageReference:
    """`HOST/PATH:TAG` or `HOST/PATH@sha256:HEX`, with exactly one of tag and digest."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or ""

    @classmethod
    def parse(cls, image: str) -> ImageReference:
        host, _, rest = image.partition("/")
        if not rest or not ("." in host or ":" in host or host == "localhost"):
            raise ImagePullError(
                f"image reference {image!r} is invalid: it must start with a registry "
                "host such as us-central1-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE"
            )
        tag: str | None = None
        digest: str | None = None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            if not _DIGEST.match(digest):
                raise ImagePullError(
                    f"digest {digest!r} in image reference {image!r} is invalid: "
                    "use sha256: followed by 64 lowercase hex digits"
                )
        else:
            name, sep, maybe_tag = rest.rpartition(":")
            if sep and "/" not in maybe_tag:
                rest, tag = name, maybe_tag
            else:
                tag = "latest"
            if not _TAG.match(tag):
                raise ImagePullError(
                    f"tag {tag!r} in image reference {image!r} is invalid: use "
                    "letters, digits, '_', '.' and '-' (at most 128 characters)"
                )
        if not _REPOSITORY.match(rest):
            raise ImagePullError(
                f"repository path {rest!r} in image reference {image!r} is invalid: "
                "use lowercase path components separated by '/'"
            )
        return cls(host=host, repository=rest, tag=tag, digest=digest)


class RegistryProcess:
    """Run `docker-registry serve` as a child process with its storage under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.port = 0
        self.base_image = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, *, seed: bool = True) -> None:
        """Start the registry and wait until `GET /v2/` returns 200. With `seed`, push
        the base image straight to it; `LocalRegistry` seeds through its front."""
        if not REGISTRY_BINARY.is_file():
            raise RegistryStartError(
                f"the registry binary {REGISTRY_BINARY} is missing: install it with "
                "`apt-get install docker-registry`"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        port_file = self.root / "port"
        saved = int(port_file.read_text()) if port_file.is_file() else 0
        candidates = [saved] if saved and _wait_port_free(saved) else []
        # A free port found by binding can be taken again before the registry binds it,
        # so a failed start gets one more attempt on a fresh port.
        candidates += [_free_port(), _free_port()]

        for port in candidates[:2]:
            self.port = port
            if self._start_on_port(port):
                port_file.write_text(str(port))
                break
        else:
            raise RegistryStartError(
                f"docker-registry did not return 200 on {self.url}/v2/ within "
                f"{START_TIMEOUT_SECONDS:.0f} s: see {self.root / 'registry.log'}"
            )
        logger.info("registry listening on %s, storage in %s", self.url, self.root)
        if seed:
            self.base_image = self.seed_host_python()

    def _start_on_port(self, port: int) -> bool:
        config = self.root / "config.yml"
        config.write_text(_config_yaml(self.root / "data", port))
        self._log = open(self.root / "registry.log", "ab")  # noqa: SIM115
        # A process group of its own lets stop() signal the registry without touching
        # localcloud, and keeps a Ctrl-C in a terminal from killing it early.
        self._process = subprocess.Popen(
            [str(REGISTRY_BINARY), "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (self.root / "registry.pid").write_text(str(self._process.pid))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    logger.warning(
                        "docker-registry exited with code %s on port %d",
                        self._process.returncode,
                        port,
                    )
                    self._close_log()
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/v2/").status_code == 200:
                        return True
                time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the registry, and kill it if it has not exited by a deadline."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("docker-registry ignored SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if process is not None:
            (self.root / "registry.pid").unlink(missing_ok=True)
        self._close_log()

    def _stop_orphan(self) -> None:
        """Stop a registry left running on this root by a localcloud that crashed, so
        its saved port can be reused and only one process writes the storage."""
        pid_file = self.root / "registry.pid"
        if not pid_file.is_file():
            return
        pid = int(pid_file.read_text())
        expected = [str(REGISTRY_BINARY), "serve", str(self.root / "config.yml")]
        # The pid may have been reused by an unrelated process, which must be left
        # alone, so only an exact command line match is stopped.
        if _cmdline(pid) == expected:
            logger.warning("stopping docker-registry %d left from a previous run", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            # Wait until it is gone or a zombie: its command line empties earlier in
            # exit, before its sockets are closed.
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        pid_file.unlink(missing_ok=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def seed_host_python(self) -> str:
        """Push the base image `localcloud/base/host-python:3.11` straight to this
        registry and return its digest reference."""
        return seed_host_python(self.url, self.address, {})

    def extract_image(self, image: str, dest: Path) -> dict[str, Any]:
        """Pull `image` straight from this registry into `dest`: see `extract_image`."""
        return extract_image(self.url, {}, image, dest)


def _config_yaml(data_dir: Path, port: int) -> str:
    # JSON is valid YAML, so the configuration is written without a YAML library.
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(data_dir)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"{LOOPBACK}:{port}"},
    }
    return json.dumps(config, indent=2) + "\n"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _alive(pid: int) -> bool:
    """Return whether `pid` exists and has not exited (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _wait_port_free(port: int, timeout: float = 2.0) -> bool:
    """Return whether `port` becomes free within `timeout`: a registry stopped a
    moment ago may still hold it while the kernel finishes closing its socket."""
    deadline = time.monotonic() + timeout
    while not _port_is_free(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # docker-registry (Go) binds with SO_REUSEADDR, so connections of a stopped
        # registry still in TIME_WAIT do not keep it off its port; test the same way.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- the host-python base image ----------------------------------------------------


def seed_host_python(url: str, address: str, headers: Mapping[str, str]) -> str:
    """Push the base image `localcloud/base/host-python:3.11` to the registry at `url`
    with `headers`, and return its digest reference under `address` (`HOST:PORT`). The
    image is byte-identical on every call, so pushing it again is a no-op."""
    layer_tar = _base_layer_tar()
    layer = _gzip(layer_tar)
    config = _canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": EPOCH,
            "config": {
                "Entrypoint": ["python3"],
                "Env": [
                    "PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin",
                    "PYTHONUNBUFFERED=1",
                ],
                "WorkingDir": "/",
                "Labels": {
                    "localcloud.base": "host-python",
                    "python.version": "3.11",
                },
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": [_sha256(layer_tar)],
            },
            "history": [
                {
                    "created": EPOCH,
                    "created_by": "localcloud: host interpreter and packages",
                }
            ],
        }
    )
    manifest = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [
                _descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)
            ],
        }
    )

    with httpx.Client(base_url=url, headers=dict(headers), timeout=30.0) as client:
        for blob in (layer, config):
            _push_small_blob(client, BASE_REPOSITORY, blob)
        response = client.put(
            f"/v2/{BASE_REPOSITORY}/manifests/{BASE_TAG}",
            content=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        _raise_for_status(response, "pushing the host-python base manifest")
    digest = _sha256(manifest)
    stored = response.headers.get("Docker-Content-Digest")
    if stored != digest:
        raise RegistryStartError(
            f"the registry stored the host-python base manifest as {stored}, "
            f"expected {digest}: check the docker-registry log (registry.log)"
        )
    reference = f"{address}/{BASE_REPOSITORY}@{digest}"
    logger.info("base image %s:%s is %s", BASE_REPOSITORY, BASE_TAG, reference)
    return reference


def _base_layer_tar() -> bytes:
    text = (
        b"localcloud host-python base image\n"
        b"This image is the interpreter and packages of the machine that runs\n"
        b"localcloud. The runtime starts the entrypoint with that machine's python3\n"
        b"and maps the absolute paths of the image under the revision's folder.\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("etc", None), ("etc/localcloud-base", text)):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _sha256(data), "size": len(data)}


def _push_small_blob(client: httpx.Client, repository: str, blob: bytes) -> None:
    digest = _sha256(blob)
    if client.head(f"/v2/{repository}/blobs/{digest}").status_code == 200:
        return
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    _raise_for_status(started, f"starting the upload of {digest}")
    location = started.headers["Location"]
    separator = "&" if "?" in location else "?"
    finished = client.put(
        f"{location}{separator}digest={digest}",
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    _raise_for_status(finished, f"uploading {digest}")


def _raise_for_status(response: httpx.Response, action: str) -> None:
    if response.is_success:
        return
    raise RegistryStartError(
        f"{action} failed: {response.request.method} {response.request.url} returned "
        f"{response.status_code}: {response.text[:300]}"
    )


# --- pulling -----------------------------------------------------------------------


def extract_image(
    url: str, headers: Mapping[str, str], image: str, dest: Path
) -> dict[str, Any]:
    """Pull `image` from the registry at `url` with `headers`, unpack its layers into
    `dest` and return the `config` object of its image config (Entrypoint, Cmd, Env,
    WorkingDir, User, Labels). The host of `image` is not used.

    Raises ImagePullError on an invalid reference, missing content, a digest
    mismatch or an unsafe tar entry; `dest` is then left as it was.
    """
    ref = ImageReference.parse(image)
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)

    with httpx.Client(base_url=url, headers=dict(headers), timeout=60.0) as client:
        manifest = _fetch_manifest(client, ref)
        config_descriptor = manifest["config"]
        config_bytes = _fetch_small_blob(client, ref, config_descriptor)
        image_config = json.loads(config_bytes)

        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for layer in manifest.get("layers", []):
                _extract_layer(client, ref, layer, partial)
            _check_symlinks(partial)
            _replace_dir(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    logger.info("extracted %s into %s", image, dest)
    config = image_config.get("config") or {}
    if not isinstance(config, dict):
        raise ImagePullError(f"image config of {image} has an invalid 'config' field")
    return config


def _fetch_manifest(client: httpx.Client, ref: ImageReference) -> dict[str, Any]:
    body, media_type = _get_manifest(client, ref.repository, ref.reference, ref.digest)
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        digest = _pick_linux_amd64(json.loads(body), ref)
        body, media_type = _get_manifest(client, ref.repository, digest, digest)
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ImagePullError(
            f"manifest of {ref.repository}:{ref.reference} has media type "
            f"{media_type!r}: only OCI and Docker v2 image manifests can be pulled"
        )
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def _get_manifest(
    client: httpx.Client, repository: str, reference: str, expected_digest: str | None
) -> tuple[bytes, str]:
    response = client.get(
        f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}
    )
    if response.status_code == 404:
        raise ImagePullError(
            f"manifest {repository}:{reference} not found in the local registry: push "
            "the image first"
        )
    if not response.is_success:
        raise ImagePullError(
            f"GET {response.request.url} returned {response.status_code}: "
            f"{response.text[:300]}"
        )
    body = response.content
    if len(body) > MAX_MANIFEST_BYTES:
        raise ImagePullError(
            f"manifest {repository}:{reference} is {len(body)} bytes, over the "
            f"{MAX_MANIFEST_BYTES} byte limit"
        )
    actual = _sha256(body)
    if expected_digest is not None and actual != expected_digest:
        raise ImagePullError(
            f"manifest {repository}@{expected_digest} failed verification: its content "
            f"hashes to {actual}"
        )
    media_type = json.loads(body).get("mediaType") or response.headers.get(
        "Content-Type", ""
    )
    return body, str(media_type).split(";")[0].strip()


def _pick_linux_amd64(index: dict[str, Any], ref: ImageReference) -> str:
    for entry in index.get("manifests", []):
        platform = entry.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(entry["digest"])
    raise ImagePullError(
        f"image index {ref.repository}:{ref.reference} has no linux/amd64 manifest: "
        "Cloud Run runs linux/amd64 images only"
    )


def _fetch_small_blob(
    client: httpx.Client, ref: ImageReference, descriptor: dict[str, Any]
) -> bytes:
    digest = str(descriptor["digest"])
    response = client.get(f"/v2/{ref.repository}/blobs/{digest}")
    if not response.is_success:
        raise ImagePullError(
            f"GET {response.request.url} returned {response.status_code}: blob "
            f"{digest} of {ref.repository} is missing"
        )
    if _sha256(response.content) != digest:
        raise ImagePullError(
            f"blob {digest} of {ref.repository} failed verification: its content "
            f"hashes to {_sha256(response.content)}"
        )
    return response.content


class _HashingReader(io.RawIOBase):
    """A read-only stream over an HTTP response body that hashes what passes through."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next(self._chunks, b"")
            self.hash.update(self._pending)
            self.size += len(self._pending)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass


def _decompressed(compression: str, raw: IO[bytes]) -> IO[bytes]:
    if compression == "gzip":
        try:
            from isal import igzip

            return cast(IO[bytes], igzip.IGzipFile(fileobj=raw, mode="rb"))
        except ImportError:
            return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression == "zstd":
        import zstandard

        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _extract_layer(
    client: httpx.Client, ref: ImageReference, layer: dict[str, Any], root: Path
) -> None:
    digest = str(layer["digest"])
    media_type = str(layer["mediaType"])
    compression = LAYER_COMPRESSION.get(media_type)
    if compression is None:
        raise ImagePullError(
            f"layer {digest} of {ref.repository} has media type {media_type!r}: "
            f"supported layer media types are {sorted(LAYER_COMPRESSION)}"
        )

    with client.stream("GET", f"/v2/{ref.repository}/blobs/{digest}") as response:
        if not response.is_success:
            raise ImagePullError(
                f"GET {response.request.url} returned {response.status_code}: layer "
                f"{digest} of {ref.repository} is missing"
            )
        raw = _HashingReader(response.iter_raw(CHUNK_SIZE))
        buffered = io.BufferedReader(raw, CHUNK_SIZE)
        try:
            with tarfile.open(
                fileobj=_decompressed(compression, buffered), mode="r|"
            ) as tar:
                _apply_layer(tar, root)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if isinstance(exc, ImagePullError):
                raise
            raise ImagePullError(
                f"layer {digest} of {ref.repository} could not be unpacked as a "
                f"{compression} tar stream: {exc}"
            ) from exc
        # The tar end marker can come before the end of the blob, so the rest still
        # has to be read and hashed.
        while buffered.read(CHUNK_SIZE):
            pass

    actual = "sha256:" + raw.hash.hexdigest()
    if actual != digest:
        raise ImagePullError(
            f"layer {digest} of {ref.repository} failed verification: its content "
            f"hashes to {actual}"
        )
    if raw.size != layer.get("size", raw.size):
        raise ImagePullError(
            f"layer {digest} of {ref.repository} is {raw.size} bytes, but its "
            f"manifest gives the size {layer.get('size')}"
        )


class UnsafeEntryError(ImagePullError):
    """A tar entry that would write outside the target folder or create a device."""


def _apply_layer(tar: tarfile.TarFile, root: Path) -> None:
    # Paths created by this layer survive an opaque whiteout of their directory, which
    # hides lower layers only.
    created: set[str] = set()
    for member in tar:
        name = _safe_name(member.name)
        if not name:
            continue
        parent, base = posixpath.split(name)
        parent_dir = _safe_parent(root, parent)

        if base == OPAQUE_WHITEOUT:
            _clear_lower(parent_dir, parent, created)
            continue
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise UnsafeEntryError(
                    f"whiteout {member.name!r} names {hidden!r}: a whiteout must name "
                    "one entry of its directory"
                )
            _remove(parent_dir / hidden)
            continue

        target = parent_dir / base
        if member.isdir():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                _remove(target)
            target.mkdir(exist_ok=True)
            target.chmod(_safe_mode(member.mode))
        elif member.isreg():
            _remove(target)
            _write_file(tar, member, target)
        elif member.issym():
            _remove(target)
            os.symlink(_safe_link_target(member, name), target)
        elif member.islnk():
            source = root / _safe_name(member.linkname)
            _safe_parent(root, posixpath.dirname(_safe_name(member.linkname)))
            if source.is_symlink() or not source.is_file():
                raise UnsafeEntryError(
                    f"hard link {member.name!r} points to {member.linkname!r}, which "
                    "is not a regular file extracted earlier"
                )
            _remove(target)
            os.link(source, target)
        else:
            raise UnsafeEntryError(
                f"tar entry {member.name!r} is a device, FIFO or other special file: "
                "images may contain only files, directories and links"
            )
        created.add(name)


def _safe_name(name: str) -> str:
    if name.startswith("/"):
        raise UnsafeEntryError(
            f"tar entry {name!r} has an absolute path: layer entries must be relative"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntryError(
            f"tar entry {name!r} contains '..': entries must stay inside the image"
        )
    return "/".join(parts)


def _safe_parent(root: Path, parent: str) -> Path:
    # Symlinks from earlier entries could redirect a path outside the root, so the
    # parent is resolved on disk rather than checked as text only.
    directory = root / parent if parent else root
    resolved = Path(os.path.realpath(directory))
    if resolved != root and root not in resolved.parents:
        raise UnsafeEntryError(
            f"tar entry directory {parent!r} resolves to {resolved}, outside the image"
        )
    if parent and not resolved.is_dir():
        resolved.mkdir(parents=True, exist_ok=True)
    return resolved


def _safe_link_target(member: tarfile.TarInfo, name: str) -> str:
    target = member.linkname
    depth = name.count("/")
    if target.startswith("/"):
        # Inside the image an absolute target means the image root, so it is rewritten
        # relative to the link instead of pointing into the host's file system.
        inside = _safe_name(target.lstrip("/"))
        return posixpath.join(*([".."] * depth), inside) if depth else inside or "."
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if joined == ".." or joined.startswith("../"):
        raise UnsafeEntryError(
            f"symlink {member.name!r} points to {target!r}, outside the image"
        )
    return target


def _safe_mode(mode: int) -> int:
    # Clearing setuid, setgid and sticky bits keeps an image from planting a setuid
    # program on the host, where the runtime cannot isolate it.
    return mode & 0o777


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    assert source is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    descriptor = os.open(target, flags, _safe_mode(member.mode) | 0o200)
    with os.fdopen(descriptor, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK_SIZE)
    os.chmod(target, _safe_mode(member.mode))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _clear_lower(directory: Path, name: str, created: set[str]) -> None:
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        child_name = posixpath.join(name, child.name) if name else child.name
        if child_name not in created:
            _remove(child)


def _check_symlinks(root: Path) -> None:
    # Each link target is checked as text when it is created. This pass catches chains
    # of links that only leave the root once they are resolved together.
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = Path(directory, entry)
            if not path.is_symlink():
                continue
            resolved = Path(os.path.realpath(path))
            if resolved != root and root not in resolved.parents:
                raise UnsafeEntryError(
                    f"symlink {path.relative_to(root)} resolves to {resolved}, outside "
                    "the image"
                )


def _replace_dir(partial: Path, dest: Path) -> None:
    # Rename is atomic, so `dest` is absent, the previous complete tree or the new
    # complete tree. It never contains a partial extraction.
    if not os.path.lexists(dest):
        partial.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    dest.rename(old)
    partial.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# --- the Artifact Registry front ---------------------------------------------------


def basic_auth(access_token: str) -> dict[str, str]:
    """Return the Authorization header Artifact Registry takes with an access token:
    Basic `oauth2accesstoken:TOKEN`."""
    credentials = base64.b64encode(f"{OAUTH2_USER}:{access_token}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


class Unauthorized(Exception):
    """A request to the front has no credentials, or invalid ones."""


def credential_token(header: str) -> str:
    """Return the token of an Authorization header value, `Bearer TOKEN` or Basic
    `oauth2accesstoken:TOKEN`, without checking it. Raises Unauthorized."""
    if not header.strip():
        raise Unauthorized(
            "authentication required: send Authorization: Bearer ACCESS_TOKEN or "
            f"Basic base64({OAUTH2_USER}:ACCESS_TOKEN)"
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() != "basic":
        raise Unauthorized(
            f"authorization scheme {scheme!r} is not supported: use Bearer or Basic"
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("the Basic credentials are not valid base64") from None
    user, _, token = decoded.partition(":")
    if user != OAUTH2_USER:
        raise Unauthorized(
            f"Basic credentials must use the user name {OAUTH2_USER} with an access "
            "token as the password"
        )
    return token


class RegistryFront:
    """An HTTP front for the registry that enforces two Artifact Registry rules that
    docker-registry does not: every request needs an access token, and an upload may
    use at most one PATCH.

    Credentials are `Authorization: Bearer TOKEN` or Basic `oauth2accesstoken:TOKEN`,
    the two forms Artifact Registry takes, where TOKEN is an access token that
    `authority` issued and that has not expired. `GET /v2/token` trades either form
    for a bearer token, as docker clients expect after a `Bearer realm=` challenge.
    The front forwards each request to the registry with the client's Host header, so
    the Location headers that docker-registry returns point at the front again. Bodies
    stream through in 1 MiB pieces both ways.
    """

    def __init__(
        self,
        upstream: str,
        authority: TokenAuthority,
        *,
        reject_chunked_uploads: bool = True,
    ) -> None:
        self.upstream = upstream
        self.authority = authority
        self.reject_chunked_uploads = reject_chunked_uploads
        # Upload path -> None, oldest first, capped at MAX_TRACKED_UPLOADS.
        self.patched_uploads: collections.OrderedDict[str, None] = (
            collections.OrderedDict()
        )
        # (method, path without query, status) of the latest rejected requests.
        self.rejected: collections.deque[tuple[str, str, int]] = collections.deque(
            maxlen=MAX_RECORDED_REJECTIONS
        )
        self.lock = threading.Lock()
        self._httpd: _FrontServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the registry front is not running: call start() first")
        return f"{LOOPBACK}:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, port: int = 0) -> None:
        """Listen on `port` of 127.0.0.1, or on a free port if `port` is 0 or taken."""
        try:
            httpd = _FrontServer((LOOPBACK, port), _FrontHandler)
        except OSError as exc:
            if port == 0:
                raise
            logger.warning(
                "registry front port %d is taken (%s), so a free port is used",
                port,
                exc,
            )
            httpd = _FrontServer((LOOPBACK, 0), _FrontHandler)
        httpd.front = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="registry-front", daemon=True
        )
        self._thread.start()
        logger.info("registry front on %s for %s", self.address, self.upstream)

    def stop(self) -> None:
        """Stop accepting requests. Requests in flight run on daemon threads and fail
        once the registry behind the front stops."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
        self._httpd = None

    def __enter__(self) -> RegistryFront:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authenticate(self, header: str) -> AccessTokenClaims:
        """Return the claims of the access token in an Authorization header value.

        Raises Unauthorized with the reason, which never contains the token.
        """
        token = credential_token(header)
        try:
            return self.authority.verify_access_token(token)
        except InvalidToken as exc:
            raise Unauthorized(
                f"invalid credentials: {exc}. Send a fresh OAuth access token"
            ) from None

    def second_patch(self, path: str) -> bool:
        """Record a PATCH to the upload at `path`; return whether one came before."""
        upload = path.split("?", 1)[0]
        with self.lock:
            if upload in self.patched_uploads:
                return True
            self.patched_uploads[upload] = None
            if len(self.patched_uploads) > MAX_TRACKED_UPLOADS:
                self.patched_uploads.popitem(last=False)
            return False


class _FrontServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    front: RegistryFront


_REPOSITORY_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    server: _FrontServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("registry front: " + format, *args)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        front = self.server.front
        path = urllib.parse.urlsplit(self.path).path
        try:
            claims = front.authenticate(self.headers.get("Authorization", ""))
        except Unauthorized as exc:
            self._drain_body()
            self._reject(401, "UNAUTHORIZED", str(exc), self._challenge(path))
            return
        if path == "/v2/token":
            self._drain_body()
            self._send_token(claims)
            return
        if (
            self.command == "PATCH"
            and front.reject_chunked_uploads
            and front.second_patch(self.path)
        ):
            self._drain_body()
            # NOTE: Artifact Registry documents that it does not support chunked
            # uploads, but not the status it returns for a second PATCH. 400 is a guess.
            self._reject(
                400,
                "BLOB_UPLOAD_INVALID",
                "chunked uploads are not supported: send the blob in one PATCH or "
                "one PUT",
            )
            return
        try:
            self._forward()
        except (OSError, http.client.HTTPException) as exc:
            # The request may be half sent, so the connection cannot be reused.
            logger.warning(
                "registry front: %s %s failed upstream: %r", self.command, path, exc
            )
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._reject(
                    502, "UNAVAILABLE", f"the registry behind the front failed: {exc}"
                )

    def _challenge(self, path: str) -> dict[str, str]:
        # Artifact Registry names only the realm on /v2/, and adds service and scope
        # on repository paths.
        front = self.server.front
        challenge = f'Bearer realm="{front.url}/v2/token"'
        match = _REPOSITORY_PATH.match(path)
        if match:
            actions = "pull" if self.command in ("GET", "HEAD") else "push,pull"
            challenge += (
                f',service="{front.address}",'
                f'scope="repository:{match.group(1)}:{actions}"'
            )
        return {"WWW-Authenticate": challenge}

    def _send_token(self, claims: AccessTokenClaims) -> None:
        # The docker token response: `token`, and `access_token` for OAuth clients.
        # The bearer token handed out is the access token that was presented.
        token = credential_token(self.headers.get("Authorization", ""))
        issued = datetime.fromtimestamp(claims.issued_at, UTC)
        body = json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": max(claims.expires_at - int(time.time()), 0),
                "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reject(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        path = urllib.parse.urlsplit(self.path).path
        with self.server.front.lock:
            self.server.front.rejected.append((self.command, path, status))
        logger.info(
            "registry front rejected %s %s with %d %s: %s",
            self.command,
            path,
            status,
            code,
            message,
        )
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        headers = {
            key: value
            for key, value in self.headers.items()
            if key.lower() not in ("authorization", "connection", "transfer-encoding")
        }
        upstream = http.client.HTTPConnection(self.server.front.upstream, timeout=600)
        try:
            upstream.putrequest(
                self.command, self.path, skip_host=True, skip_accept_encoding=True
            )
            for key, value in headers.items():
                upstream.putheader(key, value)
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            for chunk in self._body():
                upstream.send(
                    b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                )
            if chunked:
                upstream.send(b"0\r\n\r\n")
            response = upstream.getresponse()
            self._relay(response)
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "date", "server"):
                self.send_header(key, value)
        length = response.getheader("Content-Length")
        if length is None and self.command != "HEAD":
            # Without a length the client reads to the end of the connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        while chunk := response.read(CHUNK_SIZE):
            self.wfile.write(chunk)

    def _body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._chunked_body()
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise ConnectionError("the client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _chunked_body(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers end with an empty line.
                while self.rfile.readline().strip():
                    pass
                return
            remaining = size
            while remaining:
                chunk = self.rfile.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    raise ConnectionError("the client closed the connection mid-chunk")
                remaining -= len(chunk)
                yield chunk
            self.rfile.readline()

    def _drain_body(self) -> None:
        for _ in self._body():
            pass


# --- docker-registry behind the front, as localcloud runs it ------------------------


class LocalRegistry:
    """docker-registry behind a `RegistryFront` that checks `authority`'s access
    tokens: the registry of a running localcloud.

    `address` and `url` are the front's, and the front's port is saved in
    `<root>/front-port`, so image references that name it stay valid after a restart.
    The base image is seeded through the front, and `extract_image` pulls through it
    with a token of the runtime's own principal.
    """

    def __init__(self, root: Path, authority: TokenAuthority) -> None:
        self.process = RegistryProcess(root)
        self.authority = authority
        self.front: RegistryFront | None = None
        self.base_image = ""

    @property
    def root(self) -> Path:
        return self.process.root

    @property
    def address(self) -> str:
        if self.front is None:
            raise RuntimeError("the local registry is not running: call start() first")
        return self.front.address

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def auth_headers(self, principal: str) -> dict[str, str]:
        """Return Basic `oauth2accesstoken` headers with a fresh access token for
        `principal`."""
        return basic_auth(self.authority.issue_access_token(principal))

    def start(self) -> None:
        """Start docker-registry, then the front, then seed the base image through
        the front. A failure stops whatever already started."""
        self.process.start(seed=False)
        try:
            self.front = RegistryFront(self.process.address, self.authority)
            port_file = self.root / FRONT_PORT_FILE
            saved = port_file.read_text().strip() if port_file.is_file() else ""
            self.front.start(int(saved) if saved.isdigit() else 0)
            port_file.write_text(self.address.rsplit(":", 1)[1])
            self.base_image = seed_host_python(
                self.url, self.address, self.auth_headers(SEED_PRINCIPAL)
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the front, then docker-registry, each within a deadline."""
        front, self.front = self.front, None
        if front is not None:
            front.stop()
        self.process.stop()

    def extract_image(self, image: str, dest: Path) -> dict[str, Any]:
        """Pull `image` through the front into `dest`: see `extract_image`."""
        return extract_image(
            self.url, self.auth_headers(RUNTIME_PRINCIPAL), image, dest
        )
