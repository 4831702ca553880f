"""Resolve a model revision on the Hub and download exactly the files serving needs.

A branch or tag is resolved to its 40-hex commit sha first, and every later request
names that sha. Each file streams from the Hub straight into the snapshot folder
`<cache>/snapshots/<repo_id>/<sha>/`, hashed while it is written, so a file is read
from disk only if an earlier run left it there. A file becomes visible under its own
name only after its size and hash match the Hub's metadata, and the snapshot counts as
complete only when `<sha>.verified.json` lists every file. A run that was killed
therefore leaves `*.incomplete` files and no marker, and the next run resumes them.

A watchdog cancels a transfer that receives fewer than `MIN_PROGRESS_BYTES` within the
stall timeout, resumes it once with a Range request, then fails with the file name.

Small files come first, one at a time, so a weights index that names a missing shard
fails the run before any large file is fetched. The safetensors files then download
in parallel, `DOWNLOAD_WORKERS` at a time, because one connection to a CDN rarely
fills the link. Inside a Prefect run, a progress artifact shows the share of bytes
received, next to the log lines with bytes and rate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextvars import copy_context
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (
    build_hf_headers,
    filter_repo_objects,
    get_session,
    hf_raise_for_status,
)
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from pydantic import SecretStr

from tasks.config import PICKLE_SUFFIXES, RefreshRequest
from tasks.errors import DownloadError, ModelSourceError

if TYPE_CHECKING:
    from tasks.clients import Clients

module_logger = logging.getLogger(__name__)

READ_CHUNK: Final = 4 * 1024 * 1024
WRITE_BUFFER: Final = 4 * 1024 * 1024
# A transfer that receives fewer than MIN_PROGRESS_BYTES within the stall timeout is
# cancelled. A silent connection is caught by the read timeout of the same length.
STALL_SECONDS: Final = 60.0
MIN_PROGRESS_BYTES: Final = 64 * 1024
CONNECT_SECONDS: Final = 30.0
# One retry after a stall or a dropped connection, resumed from the bytes on disk.
TRANSFER_ATTEMPTS: Final = 2
PROGRESS_LOG_SECONDS: Final = 10.0
# Parallel transfers of safetensors files. Each buffers up to WRITE_BUFFER bytes.
DOWNLOAD_WORKERS: Final = 4
PROGRESS_ARTIFACT_KEY: Final = "model-download"
INCOMPLETE_SUFFIX: Final = ".incomplete"
WEIGHTS_INDEX_SUFFIX: Final = ".safetensors.index.json"

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_MIB = 1024 * 1024

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit as the Hub describes it."""

    path: str
    size: int
    git_oid: str  # git blob sha1
    sha256: str | None  # LFS files only


@dataclass(frozen=True)
class ModelRevision:
    repo_id: str
    requested: str
    sha: str
    files: tuple[RemoteFile, ...]  # the files serving needs, sorted by path

    @property
    def short_sha(self) -> str:
        return self.sha[:7]


class TransferStalled(Exception):
    """A transfer received too few bytes within the stall timeout."""


class TransferCancelled(Exception):
    """A parallel transfer stopped because another file of the snapshot failed."""


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("MODEL_REFRESH_CACHE", Path.home() / ".cache/model-refresh")
    )


def _logger() -> Logger:
    try:
        return get_run_logger()
    except MissingContextError:
        return module_logger


def _is_transient(task: object, task_run: object, state: object) -> bool:
    """Retry Hub calls on network trouble only, never on a missing repo or revision."""
    try:
        state.result()  # type: ignore[attr-defined]
    except (ModelSourceError, DownloadError):
        return False
    except Exception:
        return True
    return False


def _token(token: SecretStr | None) -> str | bool:
    # False, not None: without a configured secret no local Hugging Face login or
    # HF_TOKEN variable is read, so every run sends the same credentials.
    return token.get_secret_value() if token is not None else False


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5)
def read_hub_token(clients: Clients) -> SecretStr | None:
    """Read the Hugging Face token from Secret Manager when the target names one."""
    secret_id = clients.target.hub_token_secret
    if secret_id is None:
        return None
    name = f"projects/{clients.target.project}/secrets/{secret_id}/versions/latest"
    response = clients.secrets.access_secret_version(name=name)
    _logger().info("Read the Hugging Face token from %s", response.name)
    return SecretStr(response.payload.data.decode().strip())


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_is_transient,
)
def resolve_model_revision(
    request: RefreshRequest, hub_endpoint: str, token: SecretStr | None = None
) -> ModelRevision:
    """Resolve a branch, tag or sha to a commit sha and list its serving files."""
    api = HfApi(endpoint=hub_endpoint, token=_token(token))
    try:
        info = api.model_info(request.repo_id, revision=request.revision)
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"revision {request.revision!r} does not exist in {request.repo_id}: give "
            "an existing branch, tag or full commit sha"
        ) from exc
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"repository {request.repo_id} is gated: accept its terms on the Hub and "
            "set hub_token_secret to a Secret Manager secret with a read token"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"repository {request.repo_id} not found at {hub_endpoint}: check the "
            "repo_id, or set hub_token_secret for a private repository"
        ) from exc
    if not info.sha or not _COMMIT_SHA.match(info.sha):
        raise ModelSourceError(
            f"the Hub returned {info.sha!r} as the commit of {request.repo_id}@"
            f"{request.revision}, not a 40-hex sha: check hub_endpoint"
        )
    sha = info.sha

    entries = [
        entry
        for entry in api.list_repo_tree(request.repo_id, revision=sha, recursive=True)
        if isinstance(entry, RepoFile)
    ]
    files = select_serving_files(request, entries)
    _logger().info(
        "Resolved %s@%s to %s (%d serving files)",
        request.repo_id,
        request.revision,
        sha,
        len(files),
    )
    return ModelRevision(request.repo_id, request.revision, sha, tuple(files))


def select_serving_files(
    request: RefreshRequest, entries: list[RepoFile]
) -> list[RemoteFile]:
    """Keep the files that match the patterns; reject pickle-only repositories.

    Patterns follow `huggingface_hub`'s `allow_patterns`: fnmatch globs, and a pattern
    ending in `/` matches everything under that folder. Pickle-based weights are never
    selected, so a repository with both formats yields its safetensors only.
    """
    paths = [entry.path for entry in entries]
    safetensors = [path for path in paths if path.endswith(".safetensors")]
    pickles = [path for path in paths if path.endswith(PICKLE_SUFFIXES)]
    if not safetensors and pickles:
        raise ModelSourceError(
            f"{request.repo_id} has only pickle-based weights "
            f"({', '.join(sorted(pickles))}): "
            "pickle files can run code when loaded; publish safetensors weights instead"
        )

    candidates = [
        entry for entry in entries if not entry.path.endswith(PICKLE_SUFFIXES)
    ]
    matched = filter_repo_objects(
        candidates, allow_patterns=request.allow_patterns, key=lambda e: e.path
    )
    selected = [
        RemoteFile(
            path=entry.path,
            size=entry.size,
            git_oid=entry.blob_id,
            sha256=entry.lfs.sha256 if entry.lfs else None,
        )
        for entry in sorted(matched, key=lambda item: item.path)
    ]
    if not any(item.path.endswith(".safetensors") for item in selected):
        raise ModelSourceError(
            f"no weight files matched allow_patterns {request.allow_patterns} in "
            f"{request.repo_id} (its safetensors files: "
            f"{', '.join(sorted(safetensors)) or 'none'}): add a pattern such as "
            "'*.safetensors'"
        )
    return selected


@task(
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_is_transient,
)
def download_model(
    revision: ModelRevision,
    hub_endpoint: str,
    cache_dir: Path | None = None,
    token: SecretStr | None = None,
    stall_seconds: float = STALL_SECONDS,
    workers: int = DOWNLOAD_WORKERS,
) -> dict[str, Path]:
    """Download the serving files of a commit; verify each against the Hub's metadata.

    Returns the in-repository path of each file mapped to a regular file inside the
    snapshot folder; the image build reads only these.
    """
    if workers < 1:
        raise DownloadError(
            f"invalid workers value {workers}: use 1 or more parallel transfers"
        )
    if not _COMMIT_SHA.match(revision.sha):
        raise DownloadError(
            f"revision sha {revision.sha!r} is not a 40-hex commit sha: resolve the "
            "revision with resolve_model_revision first"
        )
    _check_repo_path(revision.repo_id)
    cache_root = (cache_dir or default_cache_dir()).resolve()
    snapshot = cache_root / "snapshots" / revision.repo_id / revision.sha
    cache_root.mkdir(parents=True, exist_ok=True)
    _make_real_dirs(
        cache_root, ["snapshots", *revision.repo_id.split("/"), revision.sha]
    )
    # Two runs that fetch the same commit would write the same partial files.
    with open(snapshot.with_name(f"{revision.sha}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _download_snapshot(
            revision, hub_endpoint, snapshot, token, stall_seconds, workers
        )


def _download_snapshot(
    revision: ModelRevision,
    hub_endpoint: str,
    snapshot: Path,
    token: SecretStr | None,
    stall_seconds: float,
    workers: int,
) -> dict[str, Path]:
    logger = _logger()
    marker = snapshot.with_name(f"{revision.sha}.verified.json")
    staged = _verified_snapshot(revision, snapshot, marker)
    if staged is not None:
        logger.info(
            "Snapshot %s@%s is already complete in %s",
            revision.repo_id,
            revision.sha,
            snapshot,
        )
        return staged

    # The marker goes first, so a run killed from here on leaves no complete snapshot.
    marker.unlink(missing_ok=True)
    total = sum(item.size for item in revision.files)
    session = _Transfer(hub_endpoint, _token(token), stall_seconds, logger)
    session.progress = _SnapshotProgress(revision, total, logger)
    started = time.monotonic()
    staged = {}
    ordered = sorted(revision.files, key=lambda f: (f.size, f.path))
    weights = [item for item in ordered if item.path.endswith(".safetensors")]
    for item in ordered:
        if item in weights:
            continue
        staged[item.path] = _fetch_file(session, revision, item, snapshot)
        if item.path.endswith(WEIGHTS_INDEX_SUFFIX):
            check_weight_index(revision, item.path, staged[item.path])
    staged.update(_fetch_parallel(session, revision, weights, snapshot, workers))
    session.progress.finish()

    _write_marker(marker, revision, staged)
    elapsed = max(time.monotonic() - started, 1e-6)
    logger.info(
        "Downloaded and verified %d files (%d bytes) of %s@%s in %.1f s (%.1f MiB/s)",
        len(staged),
        total,
        revision.repo_id,
        revision.sha,
        elapsed,
        session.bytes_received / _MIB / elapsed,
    )
    return dict(sorted(staged.items()))


def check_weight_index(revision: ModelRevision, index_path: str, local: Path) -> None:
    """Fail when a safetensors index names a shard that is not among the files."""
    try:
        weight_map = json.loads(local.read_text())["weight_map"]
        shards = {str(shard) for shard in weight_map.values()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DownloadError(
            f"{index_path} of {revision.repo_id}@{revision.sha} is not a valid "
            f"safetensors index ({exc!r}): fix the repository's index file"
        ) from exc
    folder = index_path.rpartition("/")[0]
    available = {item.path for item in revision.files}
    for shard in sorted(shards):
        path = f"{folder}/{shard}" if folder else shard
        if path not in available:
            raise DownloadError(
                f"incomplete snapshot: {index_path} lists the shard {path}, which "
                f"{revision.repo_id}@{revision.sha} does not contain or allow_patterns "
                "excludes: publish the missing shard or widen allow_patterns"
            )


def _fetch_parallel(
    session: _Transfer,
    revision: ModelRevision,
    items: list[RemoteFile],
    snapshot: Path,
    workers: int,
) -> dict[str, Path]:
    """Fetch `items` on up to `workers` threads; the first failure stops the rest."""
    if not items:
        return {}
    staged: dict[str, Path] = {}
    with ThreadPoolExecutor(
        max_workers=min(workers, len(items)), thread_name_prefix="hub-download"
    ) as pool:
        # Each thread runs in a copy of this context, so Prefect's run logger works
        # there too.
        futures = {
            pool.submit(
                copy_context().run, _fetch_file, session, revision, item, snapshot
            ): item
            for item in items
        }
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            # Running transfers stop at their next chunk, and queued ones never start.
            session.cancelled.set()
            for future in futures:
                future.cancel()
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
        for future, item in futures.items():
            staged[item.path] = future.result()
    return staged


def verify_file(item: RemoteFile, local: Path) -> None:
    """Check size and hash of one local regular file against the Hub's metadata."""
    info = local.lstat() if os.path.lexists(local) else None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise DownloadError(
            f"incomplete snapshot: {item.path} is missing or not a regular file at "
            f"{local}"
        )
    if info.st_size != item.size:
        raise DownloadError(
            f"incomplete snapshot: {item.path} has {info.st_size} bytes, the Hub lists "
            f"{item.size}"
        )
    digest = _new_digest(item)
    with _open_regular(local) as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    _check_digest(item, digest)


# --- snapshot folder ----------------------------------------------------------------


def _check_repo_path(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise DownloadError(
            f"path {path!r} from the Hub is not a plain relative path: the download "
            "refuses it so nothing is written outside the snapshot folder"
        )


def _local_path(snapshot: Path, path: str) -> Path:
    """Return where `path` goes in the snapshot, replacing any symlink on the way.

    Every folder between the snapshot and the file must be a real directory: a
    symlink there could send the write, and later the image layer, outside the tree.
    """
    _check_repo_path(path)
    _make_real_dirs(snapshot, path.split("/")[:-1])
    local = snapshot / path
    if local.is_symlink():
        _logger().warning("Replacing the symlink %s with a downloaded file", local)
        local.unlink()
    return local


def _make_real_dirs(base: Path, parts: list[str]) -> None:
    """Create `base/part/...` as real directories, replacing symlinks on the way."""
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            _logger().warning("Replacing the symlink %s in the download cache", current)
            current.unlink()
        current.mkdir(exist_ok=True)


def _verified_snapshot(
    revision: ModelRevision, snapshot: Path, marker: Path
) -> dict[str, Path] | None:
    """Return the staged files, or None unless the marker matches every file on disk.

    A file matches when its size, inode, mtime and ctime equal the recorded ones."""
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    staged: dict[str, Path] = {}
    for item in revision.files:
        entry = recorded.get(item.path)
        local = snapshot / item.path
        try:
            info = local.lstat()
        except OSError:
            return None
        if (
            not isinstance(entry, dict)
            or not stat.S_ISREG(info.st_mode)
            or entry.get("identity") != _file_identity(info)
            or entry.get("remote") != asdict(item)
            or not _inside_real_tree(snapshot, local)
        ):
            return None
        staged[item.path] = local
    return dict(sorted(staged.items()))


def _write_marker(
    marker: Path, revision: ModelRevision, staged: dict[str, Path]
) -> None:
    files = {
        item.path: {
            "remote": asdict(item),
            "identity": _file_identity(staged[item.path].lstat()),
        }
        for item in revision.files
    }
    body = {"repo_id": revision.repo_id, "sha": revision.sha, "files": files}
    partial = marker.with_name(marker.name + INCOMPLETE_SUFFIX)
    partial.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(partial, marker)


def _file_identity(info: os.stat_result) -> list[int]:
    # ctime changes on every write and rename and cannot be set back by a process.
    return [info.st_size, info.st_ino, info.st_mtime_ns, info.st_ctime_ns]


def _inside_real_tree(snapshot: Path, local: Path) -> bool:
    real = Path(os.path.realpath(local))
    return real.is_relative_to(Path(os.path.realpath(snapshot))) and not any(
        (snapshot / parent).is_symlink()
        for parent in local.relative_to(snapshot).parents
    )


def _open_regular(path: Path, flags: int = os.O_RDONLY, mode: str = "rb") -> Any:
    # O_NOFOLLOW makes a symlink planted after the checks fail instead of being read
    # or written through.
    descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    return os.fdopen(descriptor, mode)


# --- transfers ----------------------------------------------------------------------


def _new_digest(item: RemoteFile) -> Any:
    if item.sha256 is not None:
        return hashlib.sha256()
    # A regular git file: the Hub's oid is the git blob hash.
    return hashlib.sha1(f"blob {item.size}\0".encode(), usedforsecurity=False)


def _check_digest(item: RemoteFile, digest: Any) -> None:
    expected = item.sha256 if item.sha256 is not None else item.git_oid
    if digest.hexdigest() != expected:
        raise DownloadError(
            f"{item.path} does not match the Hub's hash (expected {expected}, got "
            f"{digest.hexdigest()})"
        )


class _Transfer:
    """The HTTP side of a download: huggingface_hub's session, headers and URLs."""

    def __init__(
        self, endpoint: str, token: str | bool, stall_seconds: float, logger: Logger
    ) -> None:
        self.endpoint = endpoint
        self.stall_seconds = stall_seconds
        self.logger = logger
        # httpx2 drops the Authorization header when a redirect leaves the origin, as
        # the Hub's redirects to its CDN do.
        self.headers = build_hf_headers(token=token)
        self.timeout = httpx2.Timeout(
            stall_seconds, connect=min(CONNECT_SECONDS, stall_seconds)
        )
        self.bytes_received = 0
        self.cancelled = threading.Event()
        self.progress: _SnapshotProgress | None = None
        self._lock = threading.Lock()

    def received(self, count: int) -> None:
        with self._lock:
            self.bytes_received += count
        if self.progress is not None:
            self.progress.add(count)

    def url(self, revision: ModelRevision, path: str) -> str:
        return hf_hub_url(
            revision.repo_id, path, revision=revision.sha, endpoint=self.endpoint
        )

    def stream(self, url: str, offset: int) -> Any:
        headers = dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return get_session().stream(
            "GET", url, headers=headers, timeout=self.timeout, follow_redirects=True
        )


def _fetch_file(
    session: _Transfer, revision: ModelRevision, item: RemoteFile, snapshot: Path
) -> Path:
    """Make `item` a verified regular file in the snapshot and return its path."""
    local = _local_path(snapshot, item.path)
    if os.path.lexists(local):
        try:
            verify_file(item, local)
            session.logger.debug("Kept the verified file %s", local)
            if session.progress is not None:
                session.progress.add(item.size)
            return local
        except DownloadError as exc:
            session.logger.warning("Fetching %s again: %s", item.path, exc)
            local.unlink()

    partial = local.with_name(local.name + INCOMPLETE_SUFFIX)
    if partial.is_symlink():
        partial.unlink()
    url = session.url(revision, item.path)
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        try:
            digest = _stream_to_file(session, item, url, partial)
            break
        except (TransferStalled, httpx2.TransportError) as exc:
            received = partial.stat().st_size if partial.exists() else 0
            if attempt == TRANSFER_ATTEMPTS:
                raise DownloadError(
                    f"download of {item.path} from {revision.repo_id}@{revision.sha} "
                    f"failed after {attempt} attempts at {received} of {item.size} "
                    f"bytes: {exc}; check the network, or raise the stall timeout "
                    f"({session.stall_seconds:g} s) for a slow link"
                ) from exc
            session.logger.warning(
                "Download of %s interrupted at %d of %d bytes (%s); resuming",
                item.path,
                received,
                item.size,
                exc,
            )

    try:
        _check_digest(item, digest)
    except DownloadError as exc:
        partial.unlink()
        raise DownloadError(
            f"{exc}; the download was deleted from the cache, so a rerun fetches it "
            "again"
        ) from exc
    os.replace(partial, local)
    return local


def _stream_to_file(
    session: _Transfer, item: RemoteFile, url: str, partial: Path
) -> Any:
    """Append the rest of `item` to `partial`, hashing the whole file; return the
    digest once the file has exactly the listed size."""
    digest = _new_digest(item)
    offset = _hash_prefix(partial, item, digest)
    if offset == item.size:
        return digest

    with session.stream(url, offset) as response:
        if offset and response.status_code == 200:
            # The server ignored the Range header and sends the whole file again.
            session.logger.info("%s: the Hub sent the full file; restarting", item.path)
            digest, offset = _new_digest(item), 0
        elif response.status_code not in (200, 206):
            response.read()
            _raise_for_download(response, item)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if offset else os.O_TRUNC)
        with _open_regular(partial, flags, "ab" if offset else "wb") as out:
            written = offset + _copy_with_watchdog(
                response.iter_raw(), out, digest, session, item, offset
            )
    if written != item.size:
        raise DownloadError(
            f"incomplete snapshot: {item.path} has {written} bytes after the transfer "
            f"ended, the Hub lists {item.size}; rerun to fetch it again"
        )
    return digest


def _hash_prefix(partial: Path, item: RemoteFile, digest: Any) -> int:
    """Hash the bytes an earlier attempt left in `partial` and return their count."""
    if not partial.exists():
        return 0
    size = partial.stat().st_size
    if size > item.size:
        partial.unlink()
        return 0
    with _open_regular(partial) as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return size


def _copy_with_watchdog(
    chunks: Iterator[bytes],
    out: Any,
    digest: Any,
    session: _Transfer,
    item: RemoteFile,
    offset: int,
) -> int:
    """Write and hash `chunks`; raise TransferStalled when a window of the stall
    timeout passes with fewer than MIN_PROGRESS_BYTES received."""
    progress = _Progress(session.logger, item, offset)
    window_start = time.monotonic()
    window_bytes = 0
    written = 0
    buffered = _BufferedWriter(out.write, WRITE_BUFFER)
    # The bytes received before a stall stay in the file, so the retry resumes there.
    try:
        for chunk in chunks:
            if session.cancelled.is_set():
                raise TransferCancelled(
                    f"download of {item.path} stopped because another file failed"
                )
            digest.update(chunk)
            buffered.write(chunk)
            written += len(chunk)
            window_bytes += len(chunk)
            session.received(len(chunk))
            now = time.monotonic()
            if now - window_start >= session.stall_seconds:
                if window_bytes < MIN_PROGRESS_BYTES:
                    raise TransferStalled(
                        f"{window_bytes} bytes in {now - window_start:.1f} s, under "
                        f"the {MIN_PROGRESS_BYTES} byte minimum"
                    )
                window_start, window_bytes = now, 0
            progress.update(offset + written, now)
            if offset + written > item.size:
                raise DownloadError(
                    f"{item.path} is longer than the {item.size} bytes the Hub "
                    "lists: check hub_endpoint"
                )
    finally:
        buffered.flush()
    progress.finish(offset + written)
    return written


class _BufferedWriter:
    """Gathers network reads (often 64 KiB) into large writes."""

    def __init__(self, write: Callable[[bytes], object], size: int) -> None:
        self._write = write
        self._size = size
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= self._size:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._write(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0


class _Progress:
    """Logs bytes, percentage and rate of one transfer every PROGRESS_LOG_SECONDS."""

    def __init__(self, logger: Logger, item: RemoteFile, offset: int) -> None:
        self.logger = logger
        self.item = item
        self.offset = offset
        self.started = time.monotonic()
        self.next_log = self.started + PROGRESS_LOG_SECONDS

    def update(self, done: int, now: float) -> None:
        if now >= self.next_log:
            self.next_log = now + PROGRESS_LOG_SECONDS
            self._log("Downloading", done, now)

    def finish(self, done: int) -> None:
        self._log("Downloaded", done, time.monotonic())

    def _log(self, verb: str, done: int, now: float) -> None:
        rate = (done - self.offset) / _MIB / max(now - self.started, 1e-6)
        self.logger.info(
            "%s %s: %.1f of %.1f MiB (%.0f%%) at %.1f MiB/s, started at %.1f MiB",
            verb,
            self.item.path,
            done / _MIB,
            self.item.size / _MIB,
            100.0 * done / self.item.size if self.item.size else 100.0,
            rate,
            self.offset / _MIB,
        )


class _SnapshotProgress:
    """A Prefect progress artifact for the bytes of one snapshot, inside a run only.

    Updates are rate-limited to one every PROGRESS_LOG_SECONDS. A failed update is
    logged once and never fails the download.
    """

    def __init__(self, revision: ModelRevision, total: int, logger: Logger) -> None:
        self.total = total
        self.logger = logger
        self.done = 0
        self.next_update = time.monotonic() + PROGRESS_LOG_SECONDS
        self.artifact_id: Any = None
        self._lock = threading.Lock()
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        try:
            self.artifact_id = create_progress_artifact(
                0.0,
                key=PROGRESS_ARTIFACT_KEY,
                description=f"Download of {revision.repo_id}@{revision.sha} "
                f"({total / _MIB:.1f} MiB)",
            )
        except Exception as exc:  # progress display only; the download goes on
            logger.warning("Could not create the download progress artifact: %s", exc)

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if self.artifact_id is None or now < self.next_update:
                return
            self.next_update = now + PROGRESS_LOG_SECONDS
            self._update(self.done)

    def finish(self) -> None:
        with self._lock:
            if self.artifact_id is not None:
                self._update(self.total)

    def _update(self, done: int) -> None:
        percent = 100.0 * done / self.total if self.total else 100.0
        try:
            update_progress_artifact(self.artifact_id, min(percent, 100.0))
        except Exception as exc:  # progress display only; the download goes on
            self.logger.warning("Could not update the progress artifact: %s", exc)
            self.artifact_id = None


def _raise_for_download(response: Any, item: RemoteFile) -> None:
    """Raise the error for a failed file request. Statuses other than 401, 403 and
    404 raise huggingface_hub's own error, which the task retries."""
    if response.status_code in (401, 403):
        raise ModelSourceError(
            f"download of {item.path} was denied ({response.status_code}): set "
            "hub_token_secret to a secret with a read token for this repository"
        )
    if response.status_code == 404:
        raise DownloadError(
            f"download of {item.path} failed: GET {response.url} returned 404; "
            "the commit lists the file but the Hub does not serve it"
        )
    hf_raise_for_status(response)
    raise DownloadError(
        f"download of {item.path} failed: GET {response.url} returned "
        f"{response.status_code}"
    )
