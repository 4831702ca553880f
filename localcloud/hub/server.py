"""The Hugging Face Hub HTTP API over the local repositories of `HubRepos`.

It serves the routes that `huggingface_hub` (2.4) calls for model repositories when
its endpoint points here: repo info, tree listing, paths info, refs, commits, and file
downloads through `/{repo_id}/resolve/{revision}/{path}`. Responses carry the headers
the client reads (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`,
`X-Error-Code`), so downloads, the cache layout and error classes behave as they do
against huggingface.co.

A request for an LFS file gets a 302 to a content URL on this server, as the Hub
redirects to its CDN. Because that URL has the same origin, the client follows it for
the metadata request too, so the content response repeats `X-Repo-Commit` and sends
the sha256 as its ETag.

Branches and tags are read from disk on every request, so a commit published by another
process is visible to the next request.
"""

from __future__ import annotations

import html
import json
import logging
import mimetypes
import struct
import threading
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import prod
from pathlib import Path
from typing import Any, Final

import yaml

from localcloud.hub.repos import (
    DEFAULT_BRANCH,
    CommitInfo,
    EntryNotFoundError,
    FileEntry,
    HubError,
    HubRepos,
    InvalidNameError,
    RepoNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
# Page sizes of the Hub's tree listing: 1000 entries, or 50 with per-file commit info.
TREE_PAGE_SIZE: Final = 1000
TREE_EXPAND_PAGE_SIZE: Final = 50
COMMITS_PAGE_SIZE: Final = 50
MAX_REQUEST_BODY: Final = 1024 * 1024
# Metadata files (README front matter, config.json) larger than this are not parsed.
MAX_METADATA_FILE: Final = 1024 * 1024
# The same header bound huggingface_hub applies when it reads safetensors metadata.
MAX_SAFETENSORS_HEADER: Final = 25_000_000

_TRUE_VALUES: Final = {"1", "true", "True", "yes"}


class _HttpError(Exception):
    """An error response: status, Hub error code and message."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class HubServer:
    """The Hub API on 127.0.0.1, served from a background thread."""

    def __init__(
        self,
        root: Path,
        *,
        port: int = 0,
        tree_page_size: int = TREE_PAGE_SIZE,
    ) -> None:
        self.root = Path(root)
        self.repos = HubRepos(self.root)
        self.port = port
        self.tree_page_size = tree_page_size
        self.url = ""
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._safetensors_cache: dict[str, dict[str, int]] = {}

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError(
                f"Hub server already running at {self.url}: stop it first"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        httpd = _HubHTTPServer((LOOPBACK, self.port), _HubRequestHandler)
        httpd.hub = self
        self._httpd = httpd
        self.url = f"http://{LOOPBACK}:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="localcloud-hub", daemon=True
        )
        self._thread.start()
        logger.info(
            "Hub API listening on %s for repositories in %s", self.url, self.root
        )

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None
        logger.info("Hub API on %s stopped", self.url)

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- payloads -------------------------------------------------------------------

    def model_info(
        self, repo_id: str, revision: str | None, query: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """Build the JSON of GET /api/models/{repo_id}[/revision/{revision}]."""
        repos = self.repos
        created = _hub_time(repos.created_at(repo_id))
        info: dict[str, Any] = {
            "_id": repo_id,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "createdAt": created,
        }
        if revision is None and DEFAULT_BRANCH not in repos.refs(repo_id).branches:
            # An empty repository: the Hub returns no sha and no files.
            info.update(sha=None, lastModified=created, siblings=[], tags=[])
            return _select_fields(info, query)

        sha = repos.resolve(repo_id, revision or DEFAULT_BRANCH)
        files = repos.files(repo_id, sha)
        with_blobs = _flag(query, "blobs")
        card = self._card_data(repo_id, files)
        config = self._config(repo_id, files)
        info.update(
            sha=sha,
            lastModified=_hub_time(repos.get_commit(repo_id, sha).timestamp),
            siblings=[_sibling(files[path], with_blobs) for path in sorted(files)],
            tags=_tags(files, card, config),
            usedStorage=sum(entry.size for entry in files.values()),
        )
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        if config is not None:
            info["config"] = config
        safetensors = self._safetensors_info(repo_id, files)
        if safetensors is not None:
            info["safetensors"] = safetensors
        return _select_fields(info, query)

    def tree_page(
        self,
        repo_id: str,
        revision: str,
        folder: str,
        query: Mapping[str, list[str]],
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Return one page of the tree listing and the cursor of the next page."""
        sha = self.repos.resolve(repo_id, revision)
        files = self.repos.files(repo_id, sha)
        folders = self.repos.folder_oids(repo_id, sha)
        folder = folder.strip("/")
        if folder and folder not in folders:
            kind = "a file, not a folder" if folder in files else "not found"
            raise _entry_not_found(
                f"folder {folder!r} is {kind} in {repo_id}@{sha}", sha
            )

        recursive = _flag(query, "recursive")
        prefix = f"{folder}/" if folder else ""
        paths = [
            path
            for path in [*folders, *files]
            if path
            and path.startswith(prefix)
            and (recursive or "/" not in path[len(prefix) :])
        ]
        paths.sort()

        expand = _flag(query, "expand")
        size = (
            min(self.tree_page_size, TREE_EXPAND_PAGE_SIZE)
            if expand
            else self.tree_page_size
        )
        start = _cursor(query)
        page = paths[start : start + size]
        entries = self._path_entries(repo_id, sha, page, expand)
        next_cursor = start + size if start + size < len(paths) else None
        return entries, next_cursor

    def paths_info(
        self, repo_id: str, revision: str, paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        """Return the entries of the paths that exist and leave out unknown ones."""
        sha = self.repos.resolve(repo_id, revision)
        files = self.repos.files(repo_id, sha)
        folders = self.repos.folder_oids(repo_id, sha)
        known: dict[str, None] = {}
        for path in paths:
            path = path.strip("/")
            if path and (path in files or path in folders):
                known[path] = None
        return self._path_entries(repo_id, sha, list(known), expand)

    def refs(self, repo_id: str, include_prs: bool) -> dict[str, Any]:
        refs = self.repos.refs(repo_id)
        data: dict[str, Any] = {
            "branches": [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in sorted(refs.branches.items())
            ],
            "converts": [],
            "tags": [
                {"name": name, "ref": f"refs/tags/{name}", "targetCommit": sha}
                for name, sha in sorted(refs.tags.items())
            ],
        }
        if include_prs:
            data["pullRequests"] = []
        return data

    def commits_page(
        self, repo_id: str, revision: str, query: Mapping[str, list[str]]
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Return one page of the history of `revision` and the next page number."""
        history = self.repos.log(repo_id, revision)
        page_number = _cursor(query, name="p")
        start = page_number * COMMITS_PAGE_SIZE
        formatted = "formatted" in query.get("expand[]", [])
        page = [
            _commit_json(info, formatted)
            for info in history[start : start + COMMITS_PAGE_SIZE]
        ]
        more = start + COMMITS_PAGE_SIZE < len(history)
        return page, page_number + 1 if more else None

    def _path_entries(
        self, repo_id: str, sha: str, paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        files = self.repos.files(repo_id, sha)
        folders = self.repos.folder_oids(repo_id, sha)
        last = self.repos.last_commits(repo_id, sha, paths) if expand else {}
        entries = []
        for path in paths:
            entry = files.get(path)
            if entry is not None:
                item = _file_json(entry)
            else:
                item = {
                    "type": "directory",
                    "oid": folders[path],
                    "size": 0,
                    "path": path,
                }
            if path in last:
                commit = last[path]
                item["lastCommit"] = {
                    "id": commit.id,
                    "title": commit.title,
                    "date": _hub_time(commit.timestamp),
                }
            entries.append(item)
        return entries

    def _card_data(
        self, repo_id: str, files: Mapping[str, FileEntry]
    ) -> dict[str, Any] | None:
        text = self._small_text(repo_id, files.get("README.md"))
        if text is None or not text.startswith("---"):
            return None
        front, separator, _ = text[3:].partition("\n---")
        if not separator:
            return None
        try:
            data = yaml.safe_load(front)
        except yaml.YAMLError as exc:
            logger.warning(
                "Ignored invalid model card metadata in %s: %s", repo_id, exc
            )
            return None
        return data if isinstance(data, dict) else None

    def _config(
        self, repo_id: str, files: Mapping[str, FileEntry]
    ) -> dict[str, Any] | None:
        text = self._small_text(repo_id, files.get("config.json"))
        if text is None:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("Ignored invalid config.json in %s", repo_id)
            return None
        if not isinstance(data, dict):
            return None
        return {
            key: data[key] for key in ("architectures", "model_type") if key in data
        }

    def _small_text(self, repo_id: str, entry: FileEntry | None) -> str | None:
        if entry is None or entry.size > MAX_METADATA_FILE:
            return None
        with self.repos.open_blob(repo_id, entry.sha256) as blob:
            return blob.read().decode("utf-8", errors="replace")

    def _safetensors_info(
        self, repo_id: str, files: Mapping[str, FileEntry]
    ) -> dict[str, Any] | None:
        """Count parameters per dtype from the headers of every safetensors file."""
        weights = [
            entry for path, entry in files.items() if path.endswith(".safetensors")
        ]
        if not weights:
            return None
        parameters: dict[str, int] = {}
        for entry in weights:
            counts = self._safetensors_cache.get(entry.sha256)
            if counts is None:
                counts = _safetensors_parameters(
                    self.repos.blob_path(repo_id, entry.sha256)
                )
                self._safetensors_cache[entry.sha256] = counts
            for dtype, count in counts.items():
                parameters[dtype] = parameters.get(dtype, 0) + count
        return {"parameters": parameters, "total": sum(parameters.values())}


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer
    _body_read = False

    # -- entry points ----------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_POST(self) -> None:
        self._handle(send_body=True)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _handle(self, send_body: bool) -> None:
        self._body_read = False
        try:
            self._route(send_body)
        except _HttpError as exc:
            self._send_error(exc, send_body)
        except InvalidNameError as exc:
            self._send_error(_HttpError(HTTPStatus.BAD_REQUEST, str(exc)), send_body)
        except RepoNotFoundError as exc:
            error = _HttpError(HTTPStatus.NOT_FOUND, str(exc), "RepoNotFound")
            self._send_error(error, send_body)
        except RevisionNotFoundError as exc:
            error = _HttpError(HTTPStatus.NOT_FOUND, str(exc), "RevisionNotFound")
            self._send_error(error, send_body)
        except EntryNotFoundError as exc:
            error = _HttpError(HTTPStatus.NOT_FOUND, str(exc), "EntryNotFound")
            self._send_error(error, send_body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("Client %s closed the connection", self.address_string())
            self.close_connection = True
        except (HubError, OSError, ValueError) as exc:
            logger.exception("Hub request %s %s failed", self.command, self.path)
            message = f"internal error: {exc}"
            self._send_error(
                _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, message), send_body
            )

    # -- routing ----------------------------------------------------------------------

    def _route(self, send_body: bool) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        # Split before unquoting: a revision such as "refs%2Fpr%2F1" is one segment.
        segments = [urllib.parse.unquote(part) for part in split.path.split("/")[1:]]

        if segments[:2] == ["api", "lfs-objects"] and len(segments) == 6:
            repo_id = f"{segments[2]}/{segments[3]}"
            self._send_lfs_object(repo_id, segments[4], segments[5], send_body)
        elif segments[:1] == ["api"] and len(segments) >= 4:
            self._route_api(segments[1], segments[2:], query, split.path)
        elif len(segments) >= 5 and segments[2] == "resolve":
            repo_id = f"{segments[0]}/{segments[1]}"
            self._send_resolved_file(
                repo_id, segments[3], "/".join(segments[4:]), send_body
            )
        elif segments[:1] in (["datasets"], ["spaces"]):
            raise _only_models(segments[0])
        elif _is_single_name_repo(segments):
            raise _HttpError(
                HTTPStatus.NOT_FOUND,
                f"repository not found at {split.path}: repo ids here are"
                " 'namespace/name'",
                "RepoNotFound",
            )
        else:
            message = f"no Hub route for {self.command} {split.path}"
            raise _HttpError(HTTPStatus.NOT_FOUND, message)

    def _route_api(
        self,
        repo_type: str,
        segments: list[str],
        query: Mapping[str, list[str]],
        raw_path: str,
    ) -> None:
        if repo_type != "models":
            raise _only_models(repo_type)
        repo_id = f"{segments[0]}/{segments[1]}"
        validate_repo_id(repo_id)
        hub = self.server.hub
        action, args = (segments[2], segments[3:]) if len(segments) > 2 else ("", [])
        method = "POST" if action == "paths-info" else "GET"
        if self.command not in (method, "HEAD" if method == "GET" else method):
            raise _HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{self.command} is not allowed on {raw_path}: use {method}",
            )

        if action == "":
            self._send_json(hub.model_info(repo_id, None, query))
        elif action == "revision" and args:
            self._send_json(hub.model_info(repo_id, "/".join(args), query))
        elif action == "tree" and args:
            revision, folder = args[0], "/".join(args[1:])
            entries, cursor = hub.tree_page(repo_id, revision, folder, query)
            self._send_json(entries, self._next_link(raw_path, query, "cursor", cursor))
        elif action == "paths-info" and args:
            paths, expand = self._read_paths_request()
            self._send_json(hub.paths_info(repo_id, "/".join(args), paths, expand))
        elif action == "refs" and not args:
            self._send_json(hub.refs(repo_id, _flag(query, "include_prs")))
        elif action == "commits":
            revision = "/".join(args) or DEFAULT_BRANCH
            commits, page = hub.commits_page(repo_id, revision, query)
            self._send_json(commits, self._next_link(raw_path, query, "p", page))
        else:
            message = f"no Hub route for {self.command} {raw_path}"
            raise _HttpError(HTTPStatus.NOT_FOUND, message)

    # -- file downloads ---------------------------------------------------------------

    def _send_resolved_file(
        self, repo_id: str, revision: str, path: str, send_body: bool
    ) -> None:
        if self.command not in ("GET", "HEAD"):
            raise _HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed"
            )
        repos = self.server.hub.repos
        sha = repos.resolve(repo_id, revision)
        entry = repos.files(repo_id, sha).get(path)
        if entry is None:
            raise _entry_not_found(f"file {path!r} not found in {repo_id}@{sha}", sha)

        if entry.lfs is None:
            headers = {"ETag": f'"{entry.oid}"', "X-Repo-Commit": sha}
            self._send_blob(repo_id, entry, headers, "inline", send_body)
            return

        # Like the Hub, redirect LFS files to the content URL and describe the content
        # in X-Linked-* headers, because the redirect itself has no body.
        location = (
            f"{self.server.hub.url}/api/lfs-objects/{urllib.parse.quote(repo_id)}"
            f"/{sha}/{entry.sha256}"
        )
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", location)
        self.send_header("ETag", f'"{entry.oid}"')
        self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
        self.send_header("X-Linked-Size", str(entry.size))
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_lfs_object(
        self, repo_id: str, sha: str, sha256: str, send_body: bool
    ) -> None:
        if self.command not in ("GET", "HEAD"):
            raise _HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed"
            )
        files = self.server.hub.repos.files(repo_id, sha)
        entry = next(
            (entry for entry in files.values() if entry.lfs and entry.sha256 == sha256),
            None,
        )
        if entry is None:
            raise _entry_not_found(
                f"LFS object {sha256} not found in {repo_id}@{sha}", sha
            )
        headers = {"ETag": f'"{sha256}"', "X-Repo-Commit": sha}
        self._send_blob(repo_id, entry, headers, "attachment", send_body)

    def _send_blob(
        self,
        repo_id: str,
        entry: FileEntry,
        headers: Mapping[str, str],
        disposition: str,
        send_body: bool,
    ) -> None:
        """Send a file with Range support, streamed from disk."""
        byte_range = _parse_range(self.headers.get("Range"), entry.size)
        start, end = byte_range if byte_range is not None else (0, entry.size - 1)
        length = end - start + 1

        self.send_response(HTTPStatus.PARTIAL_CONTENT if byte_range else HTTPStatus.OK)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if byte_range is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        media_type = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
        self.send_header("Content-Type", media_type)
        self.send_header(
            "Content-Disposition", _content_disposition(disposition, entry.path)
        )
        self.end_headers()
        if not send_body or length <= 0:
            return

        with self.server.hub.repos.open_blob(repo_id, entry.sha256) as blob:
            self.connection.sendfile(blob, offset=start, count=length)

    # -- request and response helpers ------------------------------------------------

    def _read_paths_request(self) -> tuple[list[str], bool]:
        """Parse the paths-info body: a form (what huggingface_hub sends) or JSON."""
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                "paths-info request has no Content-Length: send the body with a length",
            )
        if not length_header.isdigit():
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                f"invalid Content-Length {length_header!r}: send a byte count",
            )
        length = int(length_header)
        if length > MAX_REQUEST_BODY:
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"paths-info body of {length} bytes exceeds {MAX_REQUEST_BODY}: ask for"
                " fewer paths per request",
            )
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        self._body_read = True

        if self.headers.get_content_type() == "application/json":
            try:
                data = json.loads(body or "{}")
            except json.JSONDecodeError as exc:
                raise _HttpError(
                    HTTPStatus.BAD_REQUEST,
                    f"invalid JSON body for paths-info: {exc}; send"
                    ' {"paths": [...], "expand": false}',
                ) from exc
            if not isinstance(data, dict):
                data = {"paths": None}
            paths = data.get("paths", [])
            expand = bool(data.get("expand", False))
        else:
            form = urllib.parse.parse_qs(body, keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _flag(form, "expand")
        if not isinstance(paths, list) or not all(
            isinstance(path, str) for path in paths
        ):
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                f"invalid paths {paths!r}: send a list of file or folder paths",
            )
        return paths, expand

    def _next_link(
        self,
        raw_path: str,
        query: Mapping[str, list[str]],
        name: str,
        value: int | None,
    ) -> dict[str, str]:
        if value is None:
            return {}
        params = {key: values for key, values in query.items() if key != name}
        params[name] = [str(value)]
        encoded = urllib.parse.urlencode(params, doseq=True)
        return {"Link": f'<{self.server.hub.url}{raw_path}?{encoded}>; rel="next"'}

    def _send_json(self, data: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: _HttpError, send_body: bool) -> None:
        # An unread request body would be parsed as the next request on this
        # connection, so close it instead.
        unread_body = (
            self.headers.get("Content-Length", "0") != "0" and not self._body_read
        )
        logger.debug(
            "Hub %s %s -> %d %s", self.command, self.path, error.status, error.message
        )
        body = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if unread_body:
            self.send_header("Connection", "close")
        # Header values must be latin-1, so only the JSON body keeps the full message.
        header_message = error.message.encode("latin-1", "replace").decode("latin-1")
        self.send_header("X-Error-Message", header_message.replace("\n", " "))
        if error.code is not None:
            self.send_header("X-Error-Code", error.code)
        for name, value in error.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


# -- JSON shapes ----------------------------------------------------------------------


def _file_json(entry: FileEntry) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "file",
        "oid": entry.oid,
        "size": entry.size,
        "path": entry.path,
    }
    if entry.lfs is not None:
        item["lfs"] = {
            "oid": entry.lfs.sha256,
            "size": entry.lfs.size,
            "pointerSize": entry.lfs.pointer_size,
        }
    return item


def _sibling(entry: FileEntry, with_blobs: bool) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": entry.path}
    if with_blobs:
        sibling["size"] = entry.size
        sibling["blobId"] = entry.oid
        if entry.lfs is not None:
            sibling["lfs"] = {
                "sha256": entry.lfs.sha256,
                "size": entry.lfs.size,
                "pointerSize": entry.lfs.pointer_size,
            }
    return sibling


def _commit_json(info: CommitInfo, formatted: bool) -> dict[str, Any]:
    title, _, body = info.message.partition("\n")
    item: dict[str, Any] = {
        "id": info.id,
        "title": title,
        "message": body.strip("\n"),
        "date": _hub_time(info.timestamp),
        "authors": [{"user": info.author.split(" <", 1)[0]}],
    }
    if formatted:
        item["formatted"] = {
            "title": html.escape(title),
            "message": html.escape(body.strip("\n")),
        }
    return item


def _tags(
    files: Mapping[str, FileEntry],
    card: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> list[str]:
    tags: list[str] = []
    card = card or {}
    for key in ("library_name", "pipeline_tag"):
        if isinstance(card.get(key), str):
            tags.append(card[key])
    card_tags = card.get("tags")
    if isinstance(card_tags, list):
        tags.extend(str(tag) for tag in card_tags)
    if any(path.endswith(".safetensors") for path in files):
        tags.append("safetensors")
    if any(path.endswith((".bin", ".pt", ".pth")) for path in files):
        tags.append("pytorch")
    if config and isinstance(config.get("model_type"), str):
        tags.append(config["model_type"])
    if isinstance(card.get("license"), str):
        tags.append(f"license:{card['license']}")
    return list(dict.fromkeys(tags))


def _select_fields(
    info: dict[str, Any], query: Mapping[str, list[str]]
) -> dict[str, Any]:
    """Keep only the fields named by `expand`, as the Hub does when it is given."""
    requested = query.get("expand", []) + query.get("expand[]", [])
    if not requested:
        return info
    keep = {"_id", "id", *requested}
    return {key: value for key, value in info.items() if key in keep}


# -- parsing helpers ------------------------------------------------------------------


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    values = query.get(name, [])
    return bool(values) and values[-1] in _TRUE_VALUES


def _cursor(query: Mapping[str, list[str]], name: str = "cursor") -> int:
    raw = query.get(name, ["0"])[-1]
    if not raw.isdigit():
        raise _HttpError(
            HTTPStatus.BAD_REQUEST,
            f"invalid {name} {raw!r}: use the next-page URL from the Link header",
        )
    return int(raw)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the inclusive byte range of a single-range header, or None for the whole.

    Multiple ranges and malformed headers are ignored, which RFC 9110 allows, so the
    client gets the whole file with 200. A range that starts past the end raises 416.
    """
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header.removeprefix("bytes=").strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last.isdigit() else size - 1
    if start >= size:
        raise _unsatisfiable(header, size)
    if end < start:
        return None
    return start, min(end, size - 1)


def _safetensors_parameters(path: Path) -> dict[str, int]:
    """Count parameters per dtype from a safetensors header, leaving tensors unread."""
    with path.open("rb") as weights:
        prefix = weights.read(8)
        if len(prefix) < 8:
            return {}
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_SAFETENSORS_HEADER:
            logger.warning(
                "Ignored safetensors header of %d bytes in %s", header_size, path
            )
            return {}
        try:
            header = json.loads(weights.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("Ignored unreadable safetensors header in %s", path)
            return {}
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        dtype = str(tensor.get("dtype"))
        counts[dtype] = counts.get(dtype, 0) + prod(tensor.get("shape", []))
    return counts


def _hub_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _content_disposition(kind: str, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    quoted = urllib.parse.quote(name)
    return f"{kind}; filename*=UTF-8''{quoted}; filename=\"{ascii_name}\";"


def _is_single_name_repo(segments: list[str]) -> bool:
    """Return whether the path names a legacy repo id without a namespace."""
    if segments[:2] == ["api", "models"]:
        return len(segments) == 3
    return len(segments) >= 4 and segments[1] == "resolve"


def _entry_not_found(message: str, sha: str) -> _HttpError:
    # X-Repo-Commit lets huggingface_hub cache the absence of the file for that commit.
    return _HttpError(
        HTTPStatus.NOT_FOUND, message, "EntryNotFound", {"X-Repo-Commit": sha}
    )


def _unsatisfiable(header: str, size: int) -> _HttpError:
    return _HttpError(
        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
        f"invalid Range {header!r} for a file of {size} bytes: request bytes below"
        f" {size}",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _only_models(repo_type: str) -> _HttpError:
    return _HttpError(
        HTTPStatus.NOT_FOUND,
        f"repository type {repo_type!r} is not served: localcloud's Hub serves model"
        " repositories only",
        "RepoNotFound",
    )
