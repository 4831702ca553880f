"""Build container images without a Docker daemon: source -> append layers -> sink.

The source is a base image pinned in a registry, the layers are deterministic tar
streams built from local files, and the sink is an OCI registry (Artifact Registry, or
localcloud's registry). `append_layers` returns the pushed image as
`HOST/PATH@sha256:HEX`.

Same inputs give byte-identical layers, config and manifest in any process, so a rebuild
of unchanged content has the same digest. It also uploads nothing, because every blob
whose digest is known is checked with HEAD first and mounted from another repository of
the same registry when possible.

A missing blob goes up as one monolithic `PUT ?digest=` after a `POST`, as Artifact
Registry requires. That PUT needs the digest before the body, so a new layer is read
twice, once to measure it and once to upload it, unless its digest cache contains the
digest. A client with `single_patch_uploads` reads such a layer only once. Tar,
compression, the two hashes and the upload run together as one streamed `PATCH`, and
the closing `PUT ?digest=` carries the digest measured on the way. A second `PATCH`
for the same upload is never sent, because Artifact Registry rejects chunked uploads.
Memory stays flat either way, whatever the file sizes.

This module has no Prefect imports: the Prefect tasks wrap it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import httpx

logger = logging.getLogger(__name__)

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = (
    "application/vnd.docker.distribution.manifest.list.v2+json"
)
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
MANIFEST_ACCEPT: Final = ", ".join(
    (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
)

Compression = Literal["gzip", "zstd", "none"]
LAYER_MEDIA_TYPES: Final[dict[str, str]] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
# Docker v2 layers are the same bytes as their OCI counterparts, so a Docker base image
# is rewritten into an OCI manifest by renaming media types only.
DOCKER_TO_OCI_LAYER: Final[dict[str, str]] = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": LAYER_MEDIA_TYPES["gzip"],
    "application/vnd.docker.image.rootfs.diff.tar": LAYER_MEDIA_TYPES["none"],
}

# Application layers are small and compress well: gzip is what every runtime reads.
APP_COMPRESSION: Final[Compression] = "gzip"
# Safetensors weights are dense floats that gzip shrinks by a few percent at best, and
# gzip is the slowest choice. One pass of read, tar, compress and hash over 256 MiB of
# random data on a 2-core VM ran at 464 MiB/s uncompressed, 271 MiB/s with zstd level 1
# and 164 MiB/s with isal gzip level 1. Cloud Run accepts zstd layers, so weights
# default to zstd level 1. Use "none" when only localcloud pulls the image, or "gzip"
# for runtimes without zstd support.
WEIGHTS_COMPRESSION: Final[Compression] = "zstd"

# Fixed values keep images byte-identical across builds and machines.
EPOCH: Final = "1970-01-01T00:00:00Z"
CHUNK_SIZE: Final = 1024 * 1024
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
MAX_CONFIG_BYTES: Final = 8 * 1024 * 1024
DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644
EXECUTABLE_MODE: Final = 0o755
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
MAX_DIGEST_CACHE_ENTRIES: Final = 256

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

EndpointForHost = Callable[[str], str]
AuthHeaders = Callable[[], Mapping[str, str]]


class RegistryError(Exception):
    """A registry request failed, or registry content failed digest verification."""

    def __init__(
        self, message: str, *, url: str = "", status: int = 0, code: str = ""
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.code = code


class LayerError(ValueError):
    """A layer cannot be built from the given files."""


# --- references ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReference:
    """An image reference `HOST/PATH:TAG` or `HOST/PATH@sha256:HEX`."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, image: str) -> ImageReference:
        host, _, rest = image.partition("/")
        if not rest or not ("." in host or ":" in host or host == "localhost"):
            raise ValueError(
                f"image reference {image!r} is invalid: it must start with a registry "
                "host, for example us-central1-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE"
            )
        tag: str | None = None
        digest: str | None = None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            if not _DIGEST.match(digest):
                raise ValueError(
                    f"digest {digest!r} in image reference {image!r} is invalid: use "
                    "sha256: followed by 64 lowercase hex digits"
                )
        name, sep, maybe_tag = rest.rpartition(":")
        if sep and "/" not in maybe_tag:
            rest, tag = name, maybe_tag
            if not _TAG.match(tag):
                raise ValueError(
                    f"tag {tag!r} in image reference {image!r} is invalid: use "
                    "letters, digits, '_', '.' and '-' (at most 128 characters)"
                )
        if not _REPOSITORY.match(rest):
            raise ValueError(
                f"repository path {rest!r} in image reference {image!r} is invalid: "
                "use lowercase path components separated by '/'"
            )
        return cls(host=host, repository=rest, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """The manifest reference: the digest if set, else the tag, else `latest`."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> ImageReference:
        return ImageReference(self.host, self.repository, None, digest)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.host}/{self.repository}@{self.digest}"
        return f"{self.host}/{self.repository}:{self.tag or 'latest'}"


def gcp_endpoint(host: str) -> str:
    """Map an Artifact Registry host to its public HTTPS endpoint."""
    return f"https://{host}"


def local_endpoint(registry_address: str) -> EndpointForHost:
    """Map every Artifact Registry host, and the registry's own address, to localcloud's
    registry at `registry_address` (`127.0.0.1:PORT`)."""
    base_url = f"http://{registry_address}"

    def endpoint_for_host(host: str) -> str:
        if host == registry_address or host.endswith("-docker.pkg.dev"):
            return base_url
        raise ValueError(
            f"image host {host!r} is not served by the local registry: use "
            f"REGION-docker.pkg.dev or {registry_address}"
        )

    return endpoint_for_host


# --- layers -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: Literal["dir", "file", "symlink"]
    mode: int
    source: Path | bytes | None = None
    linkname: str = ""


@dataclass(frozen=True)
class LayerDigests:
    """The identity of a built layer: the digest of its uncompressed tar (`diff_id`)
    and the digest and size of the blob that is pushed."""

    diff_id: str
    digest: str
    size: int


class Layer:
    """A deterministic tar layer: entries sorted, mtime 0, owner root, fixed modes.

    Build one with `from_files` or `from_directory`. Its content is read from disk each
    time it is streamed, and `digests()` caches the first measurement, so a layer
    describes files that must not change until it is pushed.
    """

    def __init__(
        self,
        entries: Iterable[_Entry],
        *,
        compression: Compression = APP_COMPRESSION,
        level: int | None = None,
        created_by: str = "model-refresh: append layer",
    ) -> None:
        if compression not in LAYER_MEDIA_TYPES:
            raise LayerError(
                f"compression {compression!r} is invalid: use one of "
                f"{sorted(LAYER_MEDIA_TYPES)}"
            )
        self.entries = _with_parents(entries)
        self.compression: Compression = compression
        self.level = level
        self.created_by = created_by
        self._digests: LayerDigests | None = None
        self.digest_cache: Path | None = None

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, Path | bytes],
        *,
        compression: Compression = APP_COMPRESSION,
        level: int | None = None,
        created_by: str = "model-refresh: append layer",
        follow_symlinks: bool = True,
    ) -> Layer:
        """Build a layer from in-image paths mapped to local files or to bytes.

        A local file keeps its executable bit (mode 0755) or gets mode 0644; bytes get
        mode 0644. Symlinks among the local files are followed, or rejected with
        `follow_symlinks=False`.
        """
        entries = []
        for image_path, source in files.items():
            name = _image_path(image_path)
            if isinstance(source, bytes):
                entries.append(_Entry(name, "file", FILE_MODE, source))
                continue
            info = source.stat() if follow_symlinks else source.lstat()
            if not stat.S_ISREG(info.st_mode):
                raise LayerError(
                    f"source {str(source)!r} for {image_path!r} is not a regular file: "
                    "map each in-image path to a file, or use Layer.from_directory"
                )
            entries.append(_Entry(name, "file", _file_mode(info.st_mode), source))
        return cls(entries, compression=compression, level=level, created_by=created_by)

    @classmethod
    def from_directory(
        cls,
        directory: Path,
        target: str = "/",
        *,
        compression: Compression = APP_COMPRESSION,
        level: int | None = None,
        created_by: str = "model-refresh: append layer",
    ) -> Layer:
        """Build a layer from everything under `directory`, placed at `target` in the
        image. Symlinks are stored as symlinks; sockets, FIFOs and devices are
        rejected."""
        root = directory.resolve()
        if not root.is_dir():
            raise LayerError(
                f"layer source {str(directory)!r} is not a directory: pass the folder "
                "whose content goes into the image"
            )
        prefix = _image_path(target) if target.strip("/") else ""
        entries: list[_Entry] = []
        if prefix:
            entries.append(_Entry(prefix, "dir", DIR_MODE))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for base in sorted(dirnames + filenames):
                path = Path(dirpath, base)
                name = posixpath.join(prefix, path.relative_to(root).as_posix())
                entries.append(_directory_entry(path, name.lstrip("/")))
        return cls(entries, compression=compression, level=level, created_by=created_by)

    @property
    def media_type(self) -> str:
        return LAYER_MEDIA_TYPES[self.compression]

    def digests(self) -> LayerDigests:
        """Stream the layer once to compute its diff_id, digest and size (cached)."""
        if self._digests is None:
            diff_hash = hashlib.sha256()
            blob_hash = hashlib.sha256()
            size = 0
            for chunk in self._blob_chunks(diff_hash):
                blob_hash.update(chunk)
                size += len(chunk)
            self._digests = LayerDigests(
                diff_id="sha256:" + diff_hash.hexdigest(),
                digest="sha256:" + blob_hash.hexdigest(),
                size=size,
            )
            logger.debug(
                "layer %s: %d bytes, diff_id %s",
                self._digests.digest,
                size,
                self._digests.diff_id,
            )
        return self._digests

    def known_digests(self) -> LayerDigests | None:
        """Return the digests if this process measured them, or if `digest_cache`
        contains them for source files of the same size, inode, mtime and ctime."""
        if self._digests is None and self.digest_cache is not None:
            self._digests = _read_digest_cache(self.digest_cache, self._cache_key())
        return self._digests

    def record_digests(self, digests: LayerDigests) -> None:
        """Keep digests measured while the layer was uploaded in one pass."""
        self._digests = digests
        if self.digest_cache is not None:
            _write_digest_cache(self.digest_cache, self._cache_key(), digests)

    def stream_once(self, diff_hash: Any) -> Iterator[bytes]:
        """Stream the blob for an upload that measures it on the way; `diff_hash`
        receives the uncompressed tar."""
        return self._blob_chunks(diff_hash)

    def _cache_key(self) -> str:
        key = hashlib.sha256()
        key.update(f"{self.compression}:{self.level}:{_compressor_id()}".encode())
        for entry in self.entries:
            key.update(f"\0{entry.name}\0{entry.kind}\0{entry.mode:o}".encode())
            if isinstance(entry.source, bytes):
                key.update(hashlib.sha256(entry.source).digest())
            elif entry.source is not None:
                info = entry.source.stat()
                identity = (
                    info.st_size,
                    info.st_ino,
                    info.st_mtime_ns,
                    info.st_ctime_ns,
                )
                key.update(f"{entry.source}:{identity}".encode())
            key.update(entry.linkname.encode())
        return key.hexdigest()

    def chunks(self) -> Iterator[bytes]:
        """Stream the blob again, and raise LayerError at the end if it no longer
        matches `digests()` because a source file changed in between."""
        expected = self.digests()
        blob_hash = hashlib.sha256()
        size = 0
        for chunk in self._blob_chunks(None):
            blob_hash.update(chunk)
            size += len(chunk)
            yield chunk
        actual = "sha256:" + blob_hash.hexdigest()
        if actual != expected.digest or size != expected.size:
            raise LayerError(
                f"layer {expected.digest} changed while it was pushed (now {actual}): "
                "keep its source files unchanged until the push finishes"
            )

    def _blob_chunks(self, diff_hash: Any | None) -> Iterator[bytes]:
        compressor = _compressor(self.compression, self.level)
        for chunk in _coalesce(_tar_stream(self.entries)):
            if diff_hash is not None:
                diff_hash.update(chunk)
            out = compressor.compress(chunk)
            if out:
                yield out
        tail = compressor.flush()
        if tail:
            yield tail


def _compressor_id() -> str:
    # The compressed bytes depend on the library that made them, so cached digests
    # are valid only for the same one.
    try:
        import isal
        import zstandard

        return f"isal-{isal.__version__}:zstd-{zstandard.__version__}"
    except ImportError:
        return f"zlib-{zlib.ZLIB_RUNTIME_VERSION}"


def _read_digest_cache(path: Path, key: str) -> LayerDigests | None:
    try:
        entry = json.loads(path.read_text())[key]
        return LayerDigests(str(entry[0]), str(entry[1]), int(entry[2]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _write_digest_cache(path: Path, key: str, digests: LayerDigests) -> None:
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = [digests.diff_id, digests.digest, digests.size]
    # Old keys name files that changed or were deleted; a few hundred is plenty.
    entries = dict(list(entries.items())[-MAX_DIGEST_CACHE_ENTRIES:])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(entries))
    os.replace(partial, path)


def _image_path(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise LayerError(
            f"in-image path {path!r} is invalid: use a path such as /app/main.py, "
            "without '..'"
        )
    return "/".join(parts)


def _file_mode(st_mode: int) -> int:
    return EXECUTABLE_MODE if st_mode & 0o111 else FILE_MODE


def _directory_entry(path: Path, name: str) -> _Entry:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return _Entry(name, "symlink", 0o777, linkname=os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return _Entry(name, "dir", DIR_MODE)
    if stat.S_ISREG(info.st_mode):
        return _Entry(name, "file", _file_mode(info.st_mode), path)
    raise LayerError(
        f"{str(path)!r} is a socket, FIFO or device: a layer can contain only files, "
        "directories and symlinks"
    )


def _with_parents(entries: Iterable[_Entry]) -> tuple[_Entry, ...]:
    by_name: dict[str, _Entry] = {}
    for entry in entries:
        if entry.name in by_name and by_name[entry.name] != entry:
            raise LayerError(
                f"in-image path /{entry.name} is given twice with different content: "
                "keep one source per path"
            )
        by_name[entry.name] = entry
    for name in list(by_name):
        parent = posixpath.dirname(name)
        while parent:
            existing = by_name.setdefault(parent, _Entry(parent, "dir", DIR_MODE))
            if existing.kind != "dir":
                raise LayerError(
                    f"in-image path /{parent} is a file but also the parent of "
                    f"/{name}: rename one of them"
                )
            parent = posixpath.dirname(parent)
    # Sorting by components puts each directory right before its own content.
    return tuple(sorted(by_name.values(), key=lambda entry: entry.name.split("/")))


def _tar_stream(entries: Sequence[_Entry]) -> Iterator[bytes]:
    for entry in entries:
        info = tarfile.TarInfo(entry.name + ("/" if entry.kind == "dir" else ""))
        info.mode = entry.mode
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if entry.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif entry.kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = entry.linkname
        elif isinstance(entry.source, bytes):
            info.size = len(entry.source)
        else:
            assert entry.source is not None
            info.size = entry.source.stat().st_size
        # GNU format stores long names and files over 8 GiB without PAX headers, whose
        # records could carry per-build values such as atime.
        yield info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

        if entry.kind != "file":
            continue
        if isinstance(entry.source, bytes):
            yield entry.source
        else:
            assert entry.source is not None
            yield from _read_exactly(entry.source, info.size)
        padding = -info.size % tarfile.BLOCKSIZE
        if padding:
            yield bytes(padding)
    yield bytes(2 * tarfile.BLOCKSIZE)


def _read_exactly(path: Path, size: int) -> Iterator[bytes]:
    remaining = size
    with open(path, "rb") as source:
        while remaining:
            chunk = source.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
        if remaining or source.read(1):
            raise LayerError(
                f"file {str(path)!r} changed size while its layer was built: keep "
                "layer sources unchanged during a build"
            )


def _coalesce(chunks: Iterable[bytes]) -> Iterator[bytes]:
    # Tar headers are 512-byte pieces; joining them keeps compressor and socket calls
    # few without ever holding more than one chunk of file data.
    pending: list[bytes] = []
    pending_size = 0
    for chunk in chunks:
        if len(chunk) >= CHUNK_SIZE:
            if pending:
                yield b"".join(pending)
                pending, pending_size = [], 0
            yield chunk
            continue
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= CHUNK_SIZE:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Gzip:
    """A gzip member with mtime 0, no file name and OS 255 (unknown), so the bytes
    depend only on the input and the deflate implementation."""

    HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

    def __init__(self, level: int | None) -> None:
        try:
            from isal import isal_zlib

            # isal levels run 0-3; level 1 is its fast setting (about 240 MB/s on one
            # core against about 48 MB/s for zlib at any level, measured on 1 GiB).
            self._deflate: Any = isal_zlib.compressobj(
                1 if level is None else level, isal_zlib.DEFLATED, -15
            )
            self._crc32: Callable[[bytes, int], int] = isal_zlib.crc32
        except ImportError:
            # NOTE: zlib produces different bytes than isal, so layer digests differ
            # between machines with and without isal.
            logger.warning("isal is not installed; gzip layers use the slower zlib")
            self._deflate = zlib.compressobj(
                1 if level is None else level, zlib.DEFLATED, -15
            )
            self._crc32 = zlib.crc32
        self._crc = 0
        self._size = 0
        self._started = False

    def compress(self, data: bytes) -> bytes:
        self._crc = self._crc32(data, self._crc)
        self._size += len(data)
        out: bytes = self._deflate.compress(data)
        if not self._started:
            self._started = True
            return self.HEADER + out
        return out

    def flush(self) -> bytes:
        head = b"" if self._started else self.HEADER
        trailer = (self._crc & 0xFFFFFFFF).to_bytes(4, "little") + (
            self._size & 0xFFFFFFFF
        ).to_bytes(4, "little")
        return head + self._deflate.flush() + trailer


def _compressor(compression: Compression, level: int | None) -> _Compressor:
    if compression == "gzip":
        return _Gzip(level)
    if compression == "zstd":
        import zstandard

        # Single-threaded compression keeps the output, and so the digest, independent
        # of the number of cores of the machine that builds the layer.
        params = zstandard.ZstdCompressionParameters.from_level(
            1 if level is None else level,
            write_checksum=False,
            write_content_size=False,
        )
        zstd: _Compressor = zstandard.ZstdCompressor(
            compression_params=params
        ).compressobj()
        return zstd
    return _Identity()


# --- registry client ----------------------------------------------------------------


@dataclass
class PushStats:
    """Counts of what pushes did, for logs and benchmarks."""

    blobs_skipped: int = 0
    blobs_mounted: int = 0
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0


@dataclass(frozen=True)
class Manifest:
    """A manifest as stored in the registry: its exact bytes, media type and digest."""

    body: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class RegistryClient:
    """A client for the Docker Registry HTTP API v2 (OCI distribution spec).

    `endpoint_for_host` maps an image host to the base URL that serves it, and `auth`
    returns the headers for each request, for example an OAuth2 bearer token.
    """

    def __init__(
        self,
        endpoint_for_host: EndpointForHost,
        auth: AuthHeaders | None = None,
        *,
        timeout: httpx.Timeout | None = None,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        single_patch_uploads: bool = False,
    ) -> None:
        self.endpoint_for_host = endpoint_for_host
        self.auth = auth
        # Artifact Registry's Docker API documentation says pushes must use monolithic
        # uploads (quoted in dotnet/sdk-container-builds#287), so the single streamed
        # PATCH is opt-in.
        # NOTE: not tried against Artifact Registry; docker and podman push that way.
        self.single_patch_uploads = single_patch_uploads
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.stats = PushStats()
        self._known: dict[str, set[ImageReference]] = {}
        # Large blobs stream for minutes, so reads and writes get a long timeout while
        # connecting stays short.
        self._http = httpx.Client(
            timeout=timeout or httpx.Timeout(60.0, connect=10.0),
            follow_redirects=True,
        )

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # requests

    def _url(self, ref: ImageReference, path: str) -> str:
        return (
            f"{self.endpoint_for_host(ref.host).rstrip('/')}/v2/{ref.repository}{path}"
        )

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(self.auth()) if self.auth else {}
        headers.update(extra or {})
        return headers

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request; retry 408, 429, 5xx and connection errors when `retry`
        is set, which callers do for idempotent requests only."""
        attempts = self.max_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(
                    method, url, headers=self._headers(headers), content=content
                )
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise RegistryError(
                        f"{method} {url} failed: {exc!r}; check that the registry is "
                        "reachable",
                        url=url,
                    ) from exc
                delay = self._backoff(attempt, None)
                logger.warning(
                    "%s %s failed (%r); retrying in %.1f s", method, url, exc, delay
                )
            else:
                if response.status_code not in RETRY_STATUSES or attempt == attempts:
                    return response
                delay = self._backoff(attempt, response)
                logger.warning(
                    "%s %s returned %d; retrying in %.1f s",
                    method,
                    url,
                    response.status_code,
                    delay,
                )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, response: httpx.Response | None) -> float:
        delay = self.backoff_seconds * 2 ** (attempt - 1)
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = max(delay, min(float(retry_after), 60.0))
        return min(delay, 30.0)

    # blobs

    def blob_exists(self, ref: ImageReference, digest: str) -> bool:
        url = self._url(ref, f"/blobs/{digest}")
        response = self._send("HEAD", url)
        if response.status_code == 200:
            self._remember(ref, digest)
            return True
        if response.status_code == 404:
            return False
        raise _error(response, f"checking blob {digest}")

    def push_blob(
        self,
        ref: ImageReference,
        digest: str,
        size: int,
        chunks: Callable[[], Iterable[bytes]],
    ) -> None:
        """Make blob `digest` exist in `ref`'s repository: skip it if present, mount it
        from a repository of the same registry that has it, or upload `chunks()`."""
        if self.blob_exists(ref, digest):
            self.stats.blobs_skipped += 1
            logger.debug("blob %s already in %s", digest, ref.repository)
            return
        mounted, location = self._try_mount(ref, digest)
        if not mounted:
            self._upload(ref, digest, size, chunks, location)

    def _try_mount(self, ref: ImageReference, digest: str) -> tuple[bool, str | None]:
        """Mount `digest` from a repository known to have it. Return whether it was
        mounted, and the upload URL if the registry opened an upload session instead.
        """
        endpoint = self.endpoint_for_host(ref.host)
        for source in sorted(self._known.get(digest, ()), key=str):
            if source.repository == ref.repository:
                continue
            if self.endpoint_for_host(source.host) != endpoint:
                continue
            url = self._url(ref, "/blobs/uploads/")
            response = self._send(
                "POST",
                f"{url}?mount={digest}&from={source.repository}",
                content=b"",
                retry=False,
            )
            if response.status_code == 201:
                self.stats.blobs_mounted += 1
                self._remember(ref, digest)
                logger.info(
                    "mounted %s from %s into %s",
                    digest,
                    source.repository,
                    ref.repository,
                )
                return True, None
            if response.status_code == 202:
                # The registry declined the mount and started a regular upload.
                return False, _location(response)
            raise _error(response, f"mounting blob {digest} from {source.repository}")
        return False, None

    def _upload(
        self,
        ref: ImageReference,
        digest: str,
        size: int,
        chunks: Callable[[], Iterable[bytes]],
        location: str | None,
    ) -> None:
        # A failed upload restarts from a new session: the blob is content-addressed,
        # so sending it again is safe, while a half-used session is not.
        for attempt in range(1, self.max_attempts + 1):
            if location is None:
                started = self._send(
                    "POST", self._url(ref, "/blobs/uploads/"), content=b"", retry=False
                )
                if started.status_code != 202:
                    raise _error(started, f"starting the upload of {digest}")
                location = _location(started)
            # The registry keeps its session state in the Location query string, so
            # the digest is appended to it instead of replacing it.
            separator = "&" if "?" in location else "?"
            url = f"{location}{separator}digest={digest}"
            try:
                response = self._send(
                    "PUT",
                    url,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                    content=chunks(),
                    retry=False,
                )
            except RegistryError:
                if attempt == self.max_attempts:
                    raise
                response = None
            if response is not None and response.status_code == 201:
                self.stats.blobs_uploaded += 1
                self.stats.bytes_uploaded += size
                self._remember(ref, digest)
                logger.info(
                    "uploaded %s (%d bytes) to %s", digest, size, ref.repository
                )
                return
            if (
                response is not None
                and response.status_code not in RETRY_STATUSES
                or attempt == self.max_attempts
            ):
                assert response is not None
                raise _error(response, f"uploading blob {digest}")
            location = None
            time.sleep(self._backoff(attempt, response))

    def push_layer(self, ref: ImageReference, layer: Layer) -> LayerDigests:
        """Make `layer` exist in `ref`'s repository and return its digests.

        A layer is measured first, then pushed with `push_blob`: HEAD, mount, or a
        monolithic upload. A layer whose digest is in the cache skips the measuring
        pass. With `single_patch_uploads` and a cache miss, the layer is read once
        instead: tar, compression, both hashes and the upload run together in one
        streamed PATCH, and the digest goes in the closing PUT.
        """
        known = layer.known_digests()
        if known is None and not (self.single_patch_uploads and layer.digest_cache):
            known = layer.digests()
            if layer.digest_cache is not None:
                layer.record_digests(known)
        if known is not None:
            self.push_blob(ref, known.digest, known.size, layer.chunks)
            return known
        # NOTE: on a machine without the cache entry, a layer that the registry
        # already has is uploaded again, because its digest is known only afterwards.
        for attempt in range(1, self.max_attempts + 1):
            diff_hash = hashlib.sha256()
            try:
                digest, size = self._upload_streamed(ref, layer.stream_once(diff_hash))
            except RegistryError as exc:
                # Status 0 is a connection error, which is as transient as a 503.
                retryable = exc.status == 0 or exc.status in RETRY_STATUSES
                if attempt == self.max_attempts or not retryable:
                    raise
                logger.warning("streamed upload failed (%s); starting again", exc)
                time.sleep(self._backoff(attempt, None))
                continue
            digests = LayerDigests("sha256:" + diff_hash.hexdigest(), digest, size)
            layer.record_digests(digests)
            return digests
        raise AssertionError("unreachable")

    def _upload_streamed(
        self, ref: ImageReference, chunks: Iterable[bytes]
    ) -> tuple[str, int]:
        # One PATCH with the whole body, never a second one: Artifact Registry
        # rejects chunked uploads that split a blob over several PATCH requests.
        blob_hash = hashlib.sha256()
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                blob_hash.update(chunk)
                size += len(chunk)
                yield chunk

        started = self._send(
            "POST", self._url(ref, "/blobs/uploads/"), content=b"", retry=False
        )
        if started.status_code != 202:
            raise _error(started, "starting a streamed upload")
        patched = self._send(
            "PATCH",
            _location(started),
            headers={"Content-Type": "application/octet-stream"},
            content=body(),
            retry=False,
        )
        if patched.status_code != 202:
            raise _error(patched, "streaming a layer")
        digest = "sha256:" + blob_hash.hexdigest()
        location = _location(patched)
        separator = "&" if "?" in location else "?"
        finished = self._send(
            "PUT",
            f"{location}{separator}digest={digest}",
            headers={"Content-Length": "0"},
            content=b"",
            retry=False,
        )
        if finished.status_code != 201:
            raise _error(finished, f"closing the upload of {digest}")
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size
        self._remember(ref, digest)
        logger.info("uploaded %s (%d bytes) to %s", digest, size, ref.repository)
        return digest, size

    def copy_blob(
        self, source: ImageReference, target: ImageReference, digest: str, size: int
    ) -> None:
        """Make blob `digest` exist in `target`, mounting or streaming it from
        `source` without holding it in memory."""
        self._remember(source, digest)

        def stream() -> Iterator[bytes]:
            url = self._url(source, f"/blobs/{digest}")
            with self._http.stream("GET", url, headers=self._headers()) as response:
                if response.status_code != 200:
                    response.read()
                    raise _error(response, f"reading blob {digest}")
                yield from response.iter_raw(CHUNK_SIZE)

        self.push_blob(target, digest, size, stream)

    def read_blob(self, ref: ImageReference, digest: str, max_size: int) -> bytes:
        """Read a small blob such as an image config and verify its digest."""
        url = self._url(ref, f"/blobs/{digest}")
        response = self._send("GET", url)
        if response.status_code != 200:
            raise _error(response, f"reading blob {digest}")
        body = response.content
        if len(body) > max_size:
            raise RegistryError(
                f"blob {digest} at {url} is {len(body)} bytes, over the {max_size} "
                "byte limit for this kind of blob",
                url=url,
            )
        actual = _sha256(body)
        if actual != digest:
            raise RegistryError(
                f"blob at {url} failed verification: expected {digest}, got {actual}",
                url=url,
                code="DIGEST_INVALID",
            )
        self._remember(ref, digest)
        return body

    def _remember(self, ref: ImageReference, digest: str) -> None:
        repository = ImageReference(ref.host, ref.repository)
        self._known.setdefault(digest, set()).add(repository)

    # manifests

    def get_manifest(self, ref: ImageReference) -> Manifest:
        """Fetch a manifest or index by tag or digest, verifying a digest reference."""
        url = self._url(ref, f"/manifests/{ref.reference}")
        response = self._send("GET", url, headers={"Accept": MANIFEST_ACCEPT})
        if response.status_code != 200:
            raise _error(response, f"reading manifest {ref}")
        body = response.content
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(
                f"manifest at {url} is {len(body)} bytes, over the "
                f"{MAX_MANIFEST_BYTES} byte limit",
                url=url,
            )
        digest = _sha256(body)
        if ref.digest and digest != ref.digest:
            raise RegistryError(
                f"manifest at {url} failed verification: expected {ref.digest}, got "
                f"{digest}",
                url=url,
                code="DIGEST_INVALID",
            )
        media_type = json.loads(body).get("mediaType") or response.headers.get(
            "Content-Type", ""
        )
        return Manifest(body, str(media_type).split(";")[0].strip(), digest)

    def put_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        """Store `body` under `ref`'s tag, or under its digest when there is no tag,
        and check that the registry stored exactly these bytes."""
        digest = _sha256(body)
        url = self._url(ref, f"/manifests/{ref.tag or digest}")
        response = self._send(
            "PUT", url, headers={"Content-Type": media_type}, content=body
        )
        if response.status_code not in (200, 201):
            raise _error(response, f"pushing manifest {digest}")
        stored = response.headers.get("Docker-Content-Digest")
        if stored is not None and stored != digest:
            raise RegistryError(
                f"PUT {url} stored the manifest as {stored}, but its bytes hash to "
                f"{digest}: the registry rewrote the manifest",
                url=url,
                status=response.status_code,
                code="DIGEST_INVALID",
            )
        return digest

    def resolve_digest(self, image: str) -> str:
        """Return `HOST/PATH@sha256:HEX` for a tag or digest reference."""
        ref = ImageReference.parse(image)
        url = self._url(ref, f"/manifests/{ref.reference}")
        response = self._send("HEAD", url, headers={"Accept": MANIFEST_ACCEPT})
        if response.status_code == 404:
            raise RegistryError(
                f"image {image} not found: HEAD {url} returned 404; push it first or "
                "check the tag",
                url=url,
                status=404,
                code="MANIFEST_UNKNOWN",
            )
        if response.status_code != 200:
            raise _error(response, f"resolving {image}")
        digest = response.headers.get("Docker-Content-Digest")
        if digest is None or not _DIGEST.match(digest):
            digest = self.get_manifest(ref).digest
        if ref.digest and digest != ref.digest:
            raise RegistryError(
                f"image {image} resolves to {digest}, not to its own digest",
                url=url,
                code="DIGEST_INVALID",
            )
        return str(ref.with_digest(digest))

    def image_manifest(self, ref: ImageReference) -> tuple[ImageReference, Manifest]:
        """Fetch the image manifest for `ref`, choosing linux/amd64 from an index, and
        return it with the reference pinned to its digest."""
        manifest = self.get_manifest(ref)
        if manifest.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
            platform_digest = _linux_amd64(manifest.json(), ref)
            ref = ref.with_digest(platform_digest)
            manifest = self.get_manifest(ref)
        if manifest.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise RegistryError(
                f"{ref} has media type {manifest.media_type!r}: only OCI and Docker v2 "
                "image manifests can be used as a base"
            )
        return ref.with_digest(manifest.digest), manifest


def _location(response: httpx.Response) -> str:
    location = response.headers.get("Location")
    if not location:
        raise RegistryError(
            f"{response.request.method} {response.request.url} returned "
            f"{response.status_code} without a Location header",
            url=str(response.request.url),
            status=response.status_code,
        )
    return str(response.request.url.join(location))


def _error(response: httpx.Response, action: str) -> RegistryError:
    code = ""
    detail = ""
    try:
        errors = response.json().get("errors") or []
    except (ValueError, AttributeError):
        errors = []
    if errors and isinstance(errors[0], dict):
        code = str(errors[0].get("code", ""))
        detail = str(errors[0].get("message", ""))
    url = str(response.request.url)
    hint = {
        401: "check the registry credentials",
        403: "check that the caller may write to this repository",
        404: "check the repository name and that the content was pushed",
    }.get(response.status_code, "see the registry's error code")
    return RegistryError(
        f"{action} failed: {response.request.method} {url} returned "
        f"{response.status_code} {code or 'without an error code'}"
        f"{': ' + detail if detail else ''}; {hint}",
        url=url,
        status=response.status_code,
        code=code,
    )


def _linux_amd64(index: Mapping[str, Any], ref: ImageReference) -> str:
    for entry in index.get("manifests", []):
        platform = entry.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(entry["digest"])
    raise RegistryError(
        f"image index {ref} has no linux/amd64 manifest: Cloud Run runs linux/amd64 "
        "images only"
    )


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Serialize with sorted keys and no spaces, so equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --- append -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChanges:
    """Changes to the base image's config, applied like the Dockerfile instructions of
    the same name. Setting `entrypoint` without `cmd` clears the base's Cmd, as
    ENTRYPOINT does in a Dockerfile."""

    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: Sequence[str] | None = None
    cmd: Sequence[str] | None = None
    working_dir: str | None = None
    user: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def append_layers(
    base: str,
    layers: Sequence[Layer],
    target: str,
    config_changes: ConfigChanges | None = None,
    *,
    registry: RegistryClient,
) -> str:
    """Append `layers` to the `base` image, push the result to `target` and return it
    as `HOST/PATH@sha256:HEX`.

    `target` is `HOST/PATH` or `HOST/PATH:TAG`; with a tag the manifest is also tagged.
    """
    base_ref = ImageReference.parse(base)
    target_ref = ImageReference.parse(target)
    if target_ref.digest:
        raise ValueError(
            f"target {target!r} contains a digest: pass HOST/PATH or HOST/PATH:TAG, "
            "because the digest is computed from what is pushed"
        )

    base_ref, base_manifest = registry.image_manifest(base_ref)
    manifest_json = base_manifest.json()
    base_config = json.loads(
        registry.read_blob(
            base_ref, manifest_json["config"]["digest"], MAX_CONFIG_BYTES
        )
    )
    logger.info("base %s resolved to %s", base, base_ref)

    base_layers = [_oci_descriptor(d, base_ref) for d in manifest_json["layers"]]
    for descriptor in base_layers:
        registry.copy_blob(
            base_ref, target_ref, descriptor["digest"], int(descriptor["size"])
        )

    new_layers = []
    for layer in layers:
        digests = registry.push_layer(target_ref, layer)
        new_layers.append(
            {
                "mediaType": layer.media_type,
                "digest": digests.digest,
                "size": digests.size,
            }
        )

    config = canonical_json(
        _updated_config(base_config, layers, config_changes or ConfigChanges())
    )
    config_digest = _sha256(config)
    registry.push_blob(target_ref, config_digest, len(config), lambda: [config])

    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": base_layers + new_layers,
        }
    )
    digest = registry.put_manifest(target_ref, manifest, OCI_MANIFEST)
    pushed = str(target_ref.with_digest(digest))
    logger.info("pushed %s", pushed)
    return pushed


def resolve_digest(image: str, *, registry: RegistryClient) -> str:
    """Return `image` pinned to the digest its tag points to now."""
    return registry.resolve_digest(image)


def _oci_descriptor(
    descriptor: Mapping[str, Any], ref: ImageReference
) -> dict[str, Any]:
    media_type = str(descriptor["mediaType"])
    media_type = DOCKER_TO_OCI_LAYER.get(media_type, media_type)
    if media_type not in LAYER_MEDIA_TYPES.values():
        raise RegistryError(
            f"base {ref} has a layer of media type {media_type!r}: only tar, tar+gzip "
            "and tar+zstd layers can be appended to"
        )
    return {
        "mediaType": media_type,
        "digest": str(descriptor["digest"]),
        "size": int(descriptor["size"]),
    }


def _updated_config(
    base: Mapping[str, Any], layers: Sequence[Layer], changes: ConfigChanges
) -> dict[str, Any]:
    config = json.loads(json.dumps(base))
    container = config.setdefault("config", {}) or {}
    config["config"] = container

    env = list(container.get("Env") or [])
    for key, value in changes.env.items():
        if not key or "=" in key:
            raise ValueError(
                f"environment variable name {key!r} is invalid: use a non-empty name "
                "without '='"
            )
        env = [item for item in env if item.split("=", 1)[0] != key]
        env.append(f"{key}={value}")
    if env:
        container["Env"] = env

    if changes.entrypoint is not None:
        container["Entrypoint"] = list(changes.entrypoint)
        container.pop("Cmd", None)
    if changes.cmd is not None:
        container["Cmd"] = list(changes.cmd)
    if changes.working_dir is not None:
        container["WorkingDir"] = changes.working_dir
    if changes.user is not None:
        container["User"] = changes.user
    if changes.labels:
        container["Labels"] = {**(container.get("Labels") or {}), **changes.labels}

    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [
        layer.digests().diff_id for layer in layers
    ]
    history = list(config.get("history") or [])
    history += [{"created": EPOCH, "created_by": layer.created_by} for layer in layers]
    config["history"] = history
    config["created"] = EPOCH
    config.setdefault("architecture", "amd64")
    config.setdefault("os", "linux")
    return dict(config)
