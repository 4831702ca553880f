"""Model repositories kept in a local folder, with git-style commits and LFS metadata.

Each repository lives in `<root>/<namespace>/<name>/`:

    repo.json               creation time
    refs.json               branches and tags, each pointing at a commit sha
    commits/<sha>.json      one immutable record per commit: parent, message, files
    objects/<aa>/<sha256>   file contents, addressed by their sha256
    tmp/                    staging area on the same filesystem, so renames are atomic

Commit ids, blob ids and folder ids are computed exactly as git computes them, so the
same files, parent, author, time and message always give the same sha. Files that the
Hub's default `.gitattributes` routes to LFS are committed as git LFS pointers: their
git blob id is the pointer's, and the record also keeps the content's sha256 and size.

Every write goes to a temporary file that is renamed into place, and a branch moves only
after its commit record and contents exist. A reader in another thread or process gets
either the old commit or the new one, never a half-written one.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

logger = logging.getLogger(__name__)

DEFAULT_BRANCH: Final = "main"
AUTHOR: Final = "localcloud <localcloud@localhost>"

# The patterns of the `.gitattributes` that the Hub writes into every new repository,
# reduced to the weight and archive formats a model repository carries.
LFS_PATTERNS: Final = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
)
# The Hub rejects regular (non-LFS) files above 10 MB, so its clients route them to LFS.
LFS_SIZE_THRESHOLD: Final = 10 * 1000 * 1000

CHUNK_SIZE: Final = 1024 * 1024
COMMIT_CACHE_SIZE: Final = 256

_SHA1_RE: Final = re.compile(r"[0-9a-f]{40}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# Hub rules for each half of a repo id: letters, digits, "-", "_" and ".", at most 96
# characters, not starting or ending with "-" or ".", no "--" or "..".
_REPO_PART_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REF_PART_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class HubError(Exception):
    """Base class of the errors raised by the repository store."""


class InvalidNameError(HubError, ValueError):
    """A repo id, ref name or file path breaks the Hub's naming rules."""


class RepoNotFoundError(HubError, LookupError):
    """No repository with that id exists under the root."""


class RevisionNotFoundError(HubError, LookupError):
    """The revision is neither a branch, a tag nor a commit of the repository."""


class EntryNotFoundError(HubError, LookupError):
    """The path does not exist in the commit."""


class RefConflictError(HubError):
    """A tag or branch already exists and points at another commit."""


@dataclass(frozen=True)
class LfsPointer:
    """The fields of a git LFS pointer: content sha256, content size, pointer size."""

    sha256: str
    size: int
    pointer_size: int


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit."""

    path: str
    size: int
    oid: str  # git blob sha1 of what git stores: the content, or the LFS pointer
    sha256: str  # sha256 of the content, also the key of its blob in objects/
    lfs: LfsPointer | None

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "oid": self.oid,
            "sha256": self.sha256,
            "pointer_size": self.lfs.pointer_size if self.lfs else None,
        }

    @classmethod
    def from_json(cls, path: str, data: Mapping[str, Any]) -> FileEntry:
        pointer_size = data.get("pointer_size")
        lfs = (
            LfsPointer(data["sha256"], data["size"], pointer_size)
            if pointer_size is not None
            else None
        )
        return cls(path, data["size"], data["oid"], data["sha256"], lfs)


@dataclass(frozen=True)
class CommitInfo:
    """One commit: its id, parent, author, time, message and root tree id."""

    id: str
    parent: str | None
    tree: str
    author: str
    timestamp: datetime
    message: str

    @property
    def title(self) -> str:
        return self.message.split("\n", 1)[0]


@dataclass(frozen=True)
class RepoRefs:
    """Branches and tags of a repository, each mapped to a commit sha."""

    branches: dict[str, str]
    tags: dict[str, str]


@dataclass(frozen=True)
class _CommitRecord:
    info: CommitInfo
    files: dict[str, FileEntry]
    trees: dict[str, str]  # folder path ("" for the root) -> git tree sha1


def is_lfs_path(path: str, size: int) -> bool:
    """Return whether the Hub's default rules store this file in LFS."""
    name = path.rsplit("/", 1)[-1]
    if size > LFS_SIZE_THRESHOLD:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in LFS_PATTERNS)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the text git LFS commits in place of a file, per the LFS spec v1."""
    spec = "https://git-lfs.github.com/spec/v1"
    return f"version {spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def validate_repo_id(repo_id: str) -> None:
    """Raise InvalidNameError unless repo_id is `namespace/name` by the Hub's rules."""
    parts = repo_id.split("/")
    valid = len(parts) == 2 and all(
        _REPO_PART_RE.fullmatch(part) and "--" not in part and ".." not in part
        for part in parts
    )
    if not valid:
        raise InvalidNameError(
            f"invalid repo id {repo_id!r}: use 'namespace/name', each part made of"
            " letters, digits, '-', '_' and '.', at most 96 characters, not starting or"
            " ending with '-' or '.', without '--' or '..'"
        )


def validate_ref_name(name: str) -> None:
    """Raise InvalidNameError unless name is a usable branch or tag name."""
    parts = name.split("/")
    valid = (
        0 < len(name) <= 255
        and all(_REF_PART_RE.fullmatch(part) for part in parts)
        and ".." not in name
        and not name.endswith(".lock")
        and not _SHA1_RE.fullmatch(name)
    )
    if not valid:
        raise InvalidNameError(
            f"invalid ref name {name!r}: use letters, digits, '.', '_', '-' and '/'"
            " between parts, no '..', no '.lock' suffix, and not a 40-character hex"
            " string"
        )


def validate_file_path(path: str) -> None:
    """Raise InvalidNameError unless path is a relative path inside a repository."""
    parts = path.split("/")
    valid = (
        bool(path)
        and "\\" not in path
        and "\0" not in path
        and all(part not in ("", ".", "..", ".git") for part in parts)
    )
    if not valid:
        raise InvalidNameError(
            f"invalid file path {path!r}: use a relative path with '/' separators,"
            " without empty, '.', '..' or '.git' parts"
        )


class HubRepos:
    """A store of model repositories under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._commit_cache: OrderedDict[tuple[str, str], _CommitRecord] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- repositories -------------------------------------------------------------

    def create_repo(self, repo_id: str, *, exist_ok: bool = True) -> None:
        """Create an empty repository. Its `main` appears with the first commit."""
        validate_repo_id(repo_id)
        repo_dir = self._repo_dir(repo_id)
        if (repo_dir / "repo.json").is_file():
            if not exist_ok:
                raise RefConflictError(
                    f"repository {repo_id!r} already exists: pass exist_ok=True to"
                    " reuse it"
                )
            return

        for sub in ("commits", "objects", "tmp"):
            (repo_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_json(repo_dir / "refs.json", {"branches": {}, "tags": {}})
        created = datetime.now(UTC).isoformat(timespec="seconds")
        # repo.json is written last: its presence marks a complete repository.
        self._write_json(repo_dir / "repo.json", {"id": repo_id, "created_at": created})
        logger.info("Created Hub repository %s", repo_id)

    def repo_exists(self, repo_id: str) -> bool:
        validate_repo_id(repo_id)
        return (self._repo_dir(repo_id) / "repo.json").is_file()

    def list_repos(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = self.root.glob("*/*/repo.json")
        return sorted(f"{path.parent.parent.name}/{path.parent.name}" for path in found)

    def created_at(self, repo_id: str) -> datetime:
        data = json.loads((self._existing_repo_dir(repo_id) / "repo.json").read_text())
        return datetime.fromisoformat(data["created_at"])

    # -- refs -----------------------------------------------------------------------

    def refs(self, repo_id: str) -> RepoRefs:
        # Read from disk on every call: another process may have published meanwhile.
        data = json.loads((self._existing_repo_dir(repo_id) / "refs.json").read_text())
        return RepoRefs(branches=data["branches"], tags=data["tags"])

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """Return the commit sha of a branch, a tag or a full commit sha."""
        refs = self.refs(repo_id)
        if revision.startswith("refs/heads/"):
            sha = refs.branches.get(revision.removeprefix("refs/heads/"))
        elif revision.startswith("refs/tags/"):
            sha = refs.tags.get(revision.removeprefix("refs/tags/"))
        else:
            sha = refs.branches.get(revision) or refs.tags.get(revision)
            if sha is None and _SHA1_RE.fullmatch(revision):
                commit_file = self._repo_dir(repo_id) / "commits" / f"{revision}.json"
                sha = revision if commit_file.is_file() else None
        if sha is None:
            raise RevisionNotFoundError(
                f"revision {revision!r} not found in {repo_id!r}: use a branch"
                f" ({', '.join(sorted(refs.branches)) or 'none yet'}), a tag"
                f" ({', '.join(sorted(refs.tags)) or 'none'}) or a full 40-character"
                " commit sha"
            )
        return sha

    def tag(self, repo_id: str, name: str, revision: str = DEFAULT_BRANCH) -> str:
        """Point tag `name` at the commit of `revision` and return that commit's sha.

        Tagging the same commit again is a no-op. A tag never moves to another commit.
        """
        return self._create_ref(repo_id, "tags", name, revision)

    def create_branch(
        self, repo_id: str, name: str, revision: str = DEFAULT_BRANCH
    ) -> str:
        """Create branch `name` at the commit of `revision` and return that sha."""
        return self._create_ref(repo_id, "branches", name, revision)

    def _create_ref(self, repo_id: str, kind: str, name: str, revision: str) -> str:
        validate_ref_name(name)
        repo_dir = self._existing_repo_dir(repo_id)
        with self._repo_lock(repo_dir):
            sha = self.resolve(repo_id, revision)
            data = json.loads((repo_dir / "refs.json").read_text())
            current = data[kind].get(name)
            if current == sha:
                return sha
            if current is not None:
                raise RefConflictError(
                    f"{kind[:-1]} {name!r} of {repo_id!r} already points at {current},"
                    f" not {sha}: choose another name"
                )
            data[kind][name] = sha
            self._write_json(repo_dir / "refs.json", data)
        logger.info("Set %s %s of %s to %s", kind[:-1], name, repo_id, sha)
        return sha

    # -- commits --------------------------------------------------------------------

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        message: str,
        branch: str = DEFAULT_BRANCH,
        delete: list[str] | None = None,
        *,
        timestamp: datetime | None = None,
    ) -> str:
        """Commit added, replaced and deleted files on `branch` and return the sha.

        Each value of `files` is the content or a path to stream it from. Each entry of
        `delete` is a file path or a folder path (all files under it). If the result has
        the same files as the parent, nothing is written and the parent's sha is
        returned. Pass `timestamp` to make the commit sha reproducible.
        """
        validate_ref_name(branch)
        for path in [*files, *(delete or [])]:
            validate_file_path(path)
        if not message.strip():
            raise InvalidNameError(
                "invalid commit message '': write a non-empty message"
            )
        repo_dir = self._existing_repo_dir(repo_id)

        staged = {
            path: self._store_blob(repo_dir, path, src) for path, src in files.items()
        }

        with self._repo_lock(repo_dir):
            refs = json.loads((repo_dir / "refs.json").read_text())
            parent = refs["branches"].get(branch)
            if parent is None and refs["branches"]:
                raise RevisionNotFoundError(
                    f"branch {branch!r} not found in {repo_id!r}: create it first with"
                    " create_branch()"
                )
            old_files = self._record(repo_id, parent).files if parent else {}

            new_files = _apply_deletes(repo_id, old_files, delete or [])
            new_files.update(staged)
            if parent is not None and new_files == old_files:
                logger.info(
                    "Commit to %s@%s changes no file, so %s stays the head",
                    repo_id,
                    branch,
                    parent,
                )
                return parent

            when = timestamp or datetime.now(UTC)
            sha = self._write_commit(repo_dir, parent, new_files, message, when)
            refs["branches"][branch] = sha
            self._write_json(repo_dir / "refs.json", refs)

        logger.info(
            "Committed %s to %s@%s: %s", sha, repo_id, branch, message.split("\n")[0]
        )
        return sha

    def get_commit(self, repo_id: str, sha: str) -> CommitInfo:
        return self._record(repo_id, sha).info

    def log(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> list[CommitInfo]:
        """Return the history of `revision`, newest commit first."""
        history = []
        sha: str | None = self.resolve(repo_id, revision)
        while sha is not None:
            info = self._record(repo_id, sha).info
            history.append(info)
            sha = info.parent
        return history

    def tree(self, repo_id: str, sha: str) -> list[FileEntry]:
        """Return every file of commit `sha`, sorted by path."""
        files = self._record(repo_id, sha).files
        return [files[path] for path in sorted(files)]

    def files(self, repo_id: str, sha: str) -> dict[str, FileEntry]:
        return dict(self._record(repo_id, sha).files)

    def folder_oids(self, repo_id: str, sha: str) -> dict[str, str]:
        """Return the git tree sha1 of every folder of commit `sha` ("" is the root)."""
        return dict(self._record(repo_id, sha).trees)

    def last_commits(
        self, repo_id: str, sha: str, paths: list[str]
    ) -> dict[str, CommitInfo]:
        """Return, for each file or folder path, the newest commit that changed it."""
        pending = set(paths)
        found: dict[str, CommitInfo] = {}
        record = self._record(repo_id, sha)
        while pending:
            parent = (
                self._record(repo_id, record.info.parent)
                if record.info.parent
                else None
            )
            for path in list(pending):
                if parent is None or _object_id(record, path) != _object_id(
                    parent, path
                ):
                    found[path] = record.info
                    pending.discard(path)
            if parent is None:
                break
            record = parent
        return found

    # -- blobs ----------------------------------------------------------------------

    def blob_path(self, repo_id: str, sha256: str) -> Path:
        if not _SHA256_RE.fullmatch(sha256):
            raise InvalidNameError(
                f"invalid blob id {sha256!r}: use a lowercase sha256 hex digest"
            )
        path = self._existing_repo_dir(repo_id) / "objects" / sha256[:2] / sha256
        if not path.is_file():
            raise EntryNotFoundError(f"blob {sha256} not found in {repo_id!r}")
        return path

    def open_blob(self, repo_id: str, sha256: str) -> IO[bytes]:
        """Open the content with this sha256 for reading. The caller closes it."""
        return self.blob_path(repo_id, sha256).open("rb")

    # -- internals ------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def _existing_repo_dir(self, repo_id: str) -> Path:
        validate_repo_id(repo_id)
        repo_dir = self._repo_dir(repo_id)
        if not (repo_dir / "repo.json").is_file():
            raise RepoNotFoundError(
                f"repository {repo_id!r} not found under {self.root}: create it first"
                " (python -m localcloud.hub seed-demo creates the demo repositories)"
            )
        return repo_dir

    @contextmanager
    def _repo_lock(self, repo_dir: Path) -> Iterator[None]:
        # flock on a fresh descriptor serializes writers across threads and processes.
        with (repo_dir / "tmp" / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _record(self, repo_id: str, sha: str) -> _CommitRecord:
        key = (repo_id, sha)
        with self._cache_lock:
            record = self._commit_cache.get(key)
        if record is not None:
            return record

        path = self._existing_repo_dir(repo_id) / "commits" / f"{sha}.json"
        if not _SHA1_RE.fullmatch(sha) or not path.is_file():
            raise RevisionNotFoundError(f"commit {sha!r} not found in {repo_id!r}")
        data = json.loads(path.read_text())
        info = CommitInfo(
            id=data["id"],
            parent=data["parent"],
            tree=data["tree"],
            author=data["author"],
            timestamp=datetime.fromtimestamp(data["timestamp"], UTC),
            message=data["message"],
        )
        files = {
            name: FileEntry.from_json(name, entry)
            for name, entry in data["files"].items()
        }
        record = _CommitRecord(info, files, data["trees"])

        # Commit records never change, so they can be cached without invalidation.
        with self._cache_lock:
            self._commit_cache[key] = record
            while len(self._commit_cache) > COMMIT_CACHE_SIZE:
                self._commit_cache.popitem(last=False)
        return record

    def _store_blob(self, repo_dir: Path, path: str, source: bytes | Path) -> FileEntry:
        """Copy one file into objects/ while hashing it, and describe it."""
        if isinstance(source, bytes):
            size = len(source)
            chunks: Iterator[bytes] = iter([source])
        else:
            size = source.stat().st_size
            chunks = _read_chunks(source)
        is_lfs = is_lfs_path(path, size)
        sha256 = hashlib.sha256()
        # git hashes an LFS file's pointer, never its content, so skip that pass.
        git_sha1 = None if is_lfs else hashlib.sha1(b"blob %d\0" % size)

        fd, tmp_name = tempfile.mkstemp(dir=repo_dir / "tmp", prefix="blob-")
        try:
            written = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    sha256.update(chunk)
                    if git_sha1 is not None:
                        git_sha1.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != size:
                raise HubError(
                    f"file {path!r} changed size while being committed ({size} ->"
                    f" {written} bytes): commit it again once nothing writes to it"
                )
            digest = sha256.hexdigest()
            target = repo_dir / "objects" / digest[:2] / digest
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp_name, target)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp_name)

        if git_sha1 is not None:
            return FileEntry(path, size, git_sha1.hexdigest(), digest, None)
        pointer = lfs_pointer(digest, size)
        lfs = LfsPointer(digest, size, len(pointer))
        return FileEntry(path, size, git_blob_sha1(pointer), digest, lfs)

    def _write_commit(
        self,
        repo_dir: Path,
        parent: str | None,
        files: dict[str, FileEntry],
        message: str,
        when: datetime,
    ) -> str:
        trees = _git_trees({path: entry.oid for path, entry in files.items()})
        seconds = int(when.timestamp())
        if not message.endswith("\n"):
            message += "\n"

        lines = [f"tree {trees['']}"]
        if parent is not None:
            lines.append(f"parent {parent}")
        lines.append(f"author {AUTHOR} {seconds} +0000")
        lines.append(f"committer {AUTHOR} {seconds} +0000")
        body = ("\n".join(lines) + "\n\n" + message).encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()

        record = {
            "id": sha,
            "parent": parent,
            "tree": trees[""],
            "author": AUTHOR,
            "timestamp": seconds,
            "message": message.removesuffix("\n"),
            "files": {path: files[path].to_json() for path in sorted(files)},
            "trees": trees,
        }
        self._write_json(repo_dir / "commits" / f"{sha}.json", record)
        return sha

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp_name)


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            yield chunk


def _apply_deletes(
    repo_id: str, files: Mapping[str, FileEntry], delete: list[str]
) -> dict[str, FileEntry]:
    remaining = dict(files)
    for target in delete:
        matches = [
            path
            for path in remaining
            if path == target or path.startswith(target + "/")
        ]
        if not matches:
            raise EntryNotFoundError(
                f"cannot delete {target!r}: no such file or folder in {repo_id!r}"
            )
        for path in matches:
            del remaining[path]
    return remaining


def _object_id(record: _CommitRecord, path: str) -> str | None:
    entry = record.files.get(path)
    return entry.oid if entry is not None else record.trees.get(path)


def _git_trees(oids: Mapping[str, str]) -> dict[str, str]:
    """Return the git tree sha1 of every folder of a file table ("" is the root)."""
    root: dict[str, Any] = {}
    for path, oid in oids.items():
        node = root
        *folders, name = path.split("/")
        for depth, folder in enumerate(folders):
            node = node.setdefault(folder, {})
            if not isinstance(node, dict):
                clash = "/".join(folders[: depth + 1])
                raise InvalidNameError(
                    f"invalid file path {path!r}: {clash!r} is a file in the same"
                    " commit, so delete that file or rename one of them"
                )
        if name in node:
            raise InvalidNameError(
                f"invalid file path {path!r}: it is also a folder in the same commit,"
                " so delete the folder or rename the file"
            )
        node[name] = oid

    trees: dict[str, str] = {}

    def hash_folder(node: dict[str, Any], folder: str) -> str:
        entries: list[tuple[bytes, bytes]] = []
        for name, child in node.items():
            raw = name.encode()
            if isinstance(child, dict):
                sub_sha = hash_folder(child, f"{folder}/{name}" if folder else name)
                # git orders a folder as if its name ended with "/".
                entries.append(
                    (raw + b"/", b"40000 " + raw + b"\0" + bytes.fromhex(sub_sha))
                )
            else:
                entries.append((raw, b"100644 " + raw + b"\0" + bytes.fromhex(child)))
        body = b"".join(entry for _, entry in sorted(entries))
        sha = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        trees[folder] = sha
        return sha

    hash_folder(root, "")
    return trees
