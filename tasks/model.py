"""Resolve a model revision on the Hub and download exactly the files serving needs."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.config import PICKLE_SUFFIXES, RefreshRequest
from tasks.errors import DownloadError, ModelSourceError

_READ_CHUNK = 4 * 1024 * 1024


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


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("MODEL_REFRESH_CACHE", Path.home() / ".cache/model-refresh")
    )


def _is_transient(task: object, task_run: object, state: object) -> bool:
    """Retry Hub calls on network trouble only, never on a missing repo or revision."""
    try:
        state.result()  # type: ignore[attr-defined]
    except (ModelSourceError, DownloadError):
        return False
    except Exception:
        return True
    return False


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_is_transient,
)
def resolve_model_revision(request: RefreshRequest, hub_endpoint: str) -> ModelRevision:
    """Resolve a branch, tag or sha to a commit sha and list its serving files."""
    logger = get_run_logger()
    api = HfApi(endpoint=hub_endpoint)
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
            "store a read token in Secret Manager"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"repository {request.repo_id} not found at {hub_endpoint}: check the "
            "repo_id, or the token for a private repository"
        ) from exc
    if not info.sha:
        raise ModelSourceError(f"the Hub returned no commit sha for {request.repo_id}")
    sha = info.sha

    entries = [
        entry
        for entry in api.list_repo_tree(request.repo_id, revision=sha, recursive=True)
        if isinstance(entry, RepoFile)
    ]
    files = select_serving_files(request, entries)
    logger.info(
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
    """Keep the files that match the patterns; reject pickle-only repositories."""
    paths = [entry.path for entry in entries]
    safetensors = [path for path in paths if path.endswith(".safetensors")]
    pickles = [path for path in paths if path.endswith(PICKLE_SUFFIXES)]
    if not safetensors and pickles:
        raise ModelSourceError(
            f"{request.repo_id} has only pickle-based weights "
            f"({', '.join(sorted(pickles))}): "
            "pickle files can run code when loaded; publish safetensors weights instead"
        )

    selected = []
    for entry in sorted(entries, key=lambda item: item.path):
        if entry.path.endswith(PICKLE_SUFFIXES):
            continue
        if not any(
            fnmatch.fnmatch(entry.path, pattern) for pattern in request.allow_patterns
        ):
            continue
        selected.append(
            RemoteFile(
                path=entry.path,
                size=entry.size,
                git_oid=entry.blob_id,
                sha256=entry.lfs.sha256 if entry.lfs else None,
            )
        )
    if not any(item.path.endswith(".safetensors") for item in selected):
        raise ModelSourceError(
            f"no weight files matched allow_patterns {request.allow_patterns} in "
            f"{request.repo_id}: add a pattern such as '*.safetensors'"
        )
    return selected


@task(
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_is_transient,
)
def download_model(
    revision: ModelRevision, hub_endpoint: str, cache_dir: Path | None = None
) -> dict[str, Path]:
    """Download the serving files of a commit; verify each against the Hub's metadata.

    Returns the in-repository path of each file mapped to a regular file inside the
    cache; the image build reads only these.
    """
    logger = get_run_logger()
    cache = (cache_dir or default_cache_dir()) / "hub"
    try:
        snapshot = Path(
            snapshot_download(
                revision.repo_id,
                revision=revision.sha,
                allow_patterns=[item.path for item in revision.files],
                cache_dir=cache,
                endpoint=hub_endpoint,
            )
        )
    except (EntryNotFoundError, RevisionNotFoundError) as exc:
        raise DownloadError(
            f"download of {revision.repo_id}@{revision.sha} failed: {exc}"
        ) from exc

    staged: dict[str, Path] = {}
    cache_root = cache.resolve()
    for item in revision.files:
        local = (snapshot / item.path).resolve()
        if not local.is_relative_to(cache_root):
            raise DownloadError(
                f"{item.path} resolves outside the download cache ({local}): "
                "remove the"
                f"cache folder {cache} and retry"
            )
        verify_file(item, local)
        staged[item.path] = local
    total = sum(item.size for item in revision.files)
    logger.info(
        "Downloaded and verified %d files (%d bytes) of %s@%s",
        len(staged),
        total,
        revision.repo_id,
        revision.sha,
    )
    return staged


def verify_file(item: RemoteFile, local: Path) -> None:
    """Check size and hash of one downloaded file against the Hub's metadata."""
    if not local.is_file():
        raise DownloadError(f"incomplete snapshot: {item.path} is missing at {local}")
    size = local.stat().st_size
    if size != item.size:
        raise DownloadError(
            f"incomplete snapshot: {item.path} has {size} bytes, the Hub lists "
            f"{item.size}; delete it and rerun"
        )
    if item.sha256 is not None:
        digest = hashlib.sha256()
        expected = item.sha256
    else:
        # A regular git file: the Hub's oid is the git blob hash.
        digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        expected = item.git_oid
    with local.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DownloadError(
            f"{item.path} does not match the Hub's hash (expected {expected}, got "
            f"{digest.hexdigest()}); delete it from the cache and rerun"
        )
