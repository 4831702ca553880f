"""Model pull against localcloud's Hub: resolve to a sha, select, download, verify.

Repositories are committed with HubRepos and served by a real HubServer, so
huggingface_hub and the downloader talk HTTP to it. Stalled transfers use a small
server written here that stops sending in the middle of a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import constants
from pydantic import SecretStr
from safetensors.numpy import save

from localcloud.hub import HubServer
from tasks import model
from tasks.config import RefreshRequest, parse_request
from tasks.errors import ConfigError, DownloadError, ModelSourceError
from tasks.model import (
    INCOMPLETE_SUFFIX,
    ModelRevision,
    RemoteFile,
    download_model,
    resolve_model_revision,
)

SHARDED = "test-models/sharded"
MISSING_SHARD = "test-models/missing-shard"
PICKLE_ONLY = "test-models/pickle-only"
WHEN = datetime(2026, 2, 1, tzinfo=UTC)
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(autouse=True)
def _online_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another test module may have imported huggingface_hub with offline mode set.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _weights(seed: int, rows: int) -> bytes:
    generator = np.random.default_rng(seed)
    tensor = generator.standard_normal((rows, 64)).astype(np.float32)
    return save({f"layer{seed}.weight": tensor})


def _index(shards: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": shards}).encode()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("pull") / "hub")
    repos = server.repos
    config = b'{"model_type": "llama"}\n'
    repos.create_repo(SHARDED)
    repos.commit(
        SHARDED,
        {
            "config.json": config,
            INDEX: _index({"a.weight": SHARD_1, "b.weight": SHARD_2}),
            SHARD_1: _weights(1, 4096),
            SHARD_2: _weights(2, 2048),
            "pytorch_model.bin": b"pickle bytes",
            "README.md": b"# sharded\n",
        },
        "both formats",
        timestamp=WHEN,
    )
    repos.tag(SHARDED, "v1")
    repos.create_repo(MISSING_SHARD)
    repos.commit(
        MISSING_SHARD,
        {
            "config.json": config,
            INDEX: _index({"a.weight": SHARD_1, "b.weight": SHARD_2}),
            SHARD_1: _weights(1, 64),
        },
        "second shard never uploaded",
        timestamp=WHEN,
    )
    repos.create_repo(PICKLE_ONLY)
    repos.commit(
        PICKLE_ONLY,
        {"config.json": config, "pytorch_model.bin": b"x", "optimizer.pt": b"y"},
        "pickles",
        timestamp=WHEN,
    )
    with server:
        yield server


def _resolve(hub: HubServer, repo_id: str = SHARDED, **fields: Any) -> ModelRevision:
    request = RefreshRequest(repo_id=repo_id, **fields)
    revision: ModelRevision = resolve_model_revision.fn(request, hub.url)
    return revision


def _download(revision: ModelRevision, endpoint: str, cache: Path, **kw: Any) -> Any:
    return download_model.fn(revision, endpoint, cache_dir=cache, **kw)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- resolve and select -------------------------------------------------------------


def test_branch_resolves_to_commit_sha(hub: HubServer) -> None:
    revision = _resolve(hub, revision="main")

    assert revision.sha == hub.repos.resolve(SHARDED, "main")
    assert len(revision.sha) == 40
    assert revision.requested == "main"


def test_tag_resolves_to_same_sha(hub: HubServer) -> None:
    assert _resolve(hub, revision="v1").sha == _resolve(hub, revision="main").sha


def test_download_uses_resolved_sha(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub, revision="v1")

    staged = _download(revision, hub.url, tmp_path)

    for local in staged.values():
        assert revision.sha in local.parts


def test_both_formats_take_safetensors_only(hub: HubServer) -> None:
    paths = [item.path for item in _resolve(hub).files]

    assert paths == ["config.json", SHARD_1, SHARD_2, INDEX]
    assert "pytorch_model.bin" not in paths


def test_pickle_only_repo_rejected(hub: HubServer) -> None:
    with pytest.raises(ModelSourceError) as caught:
        _resolve(hub, PICKLE_ONLY)

    assert "optimizer.pt" in str(caught.value)
    assert "pytorch_model.bin" in str(caught.value)


def test_unmatched_patterns_fail(hub: HubServer) -> None:
    with pytest.raises(ModelSourceError, match="no weight files matched"):
        _resolve(hub, allow_patterns=["config.json", "weights/*.safetensors"])


def test_folder_pattern_selects_its_files(hub: HubServer) -> None:
    revision = _resolve(hub, allow_patterns=["model-*", "config.json"])

    assert [item.path for item in revision.files] == ["config.json", SHARD_1, SHARD_2]


@pytest.mark.parametrize(
    "pattern", ["/model.safetensors", "../*.safetensors", "*.bin", " *.safetensors", ""]
)
def test_never_matching_pattern_is_config_error(pattern: str) -> None:
    with pytest.raises(ConfigError, match="allow_patterns"):
        parse_request({"allow_patterns": ["*.safetensors", pattern]})


def test_unknown_revision_rejected(hub: HubServer) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        _resolve(hub, revision="no-such-branch")


# --- download and verify ------------------------------------------------------------


def test_download_stages_verified_regular_files(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)

    staged = _download(revision, hub.url, tmp_path)

    assert sorted(staged) == sorted(item.path for item in revision.files)
    for item in revision.files:
        local = staged[item.path]
        assert not local.is_symlink()
        assert local.is_file()
        assert local.stat().st_size == item.size
        if item.sha256 is not None:
            assert _sha256(local) == item.sha256
    marker = tmp_path / "snapshots" / SHARDED / f"{revision.sha}.verified.json"
    assert json.loads(marker.read_text())["sha"] == revision.sha


def test_complete_snapshot_not_fetched_again(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    revision = _resolve(hub)
    first = _download(revision, hub.url, tmp_path)

    with caplog.at_level(logging.INFO, logger="tasks.model"):
        second = _download(revision, "http://127.0.0.1:9", tmp_path)

    assert second == first
    assert "already complete" in caplog.text


def test_killed_download_resumes_partial_file(
    hub: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    revision = _resolve(hub)
    staged = _download(revision, hub.url, tmp_path)
    shard = staged[SHARD_1]
    content = shard.read_bytes()
    # What a killed run leaves: half a file under its temporary name, no marker.
    shard.unlink()
    partial = shard.with_name(shard.name + INCOMPLETE_SUFFIX)
    partial.write_bytes(content[: len(content) // 2])
    (shard.parent.parent / f"{revision.sha}.verified.json").unlink()

    with caplog.at_level(logging.INFO, logger="tasks.model"):
        again = _download(revision, hub.url, tmp_path)

    assert again[SHARD_1].read_bytes() == content
    assert not partial.exists()
    line = next(r.getMessage() for r in caplog.records if SHARD_1 in r.getMessage())
    assert f"started at {len(content) // 2 / 2**20:.1f} MiB" in line


def test_truncated_file_fetched_again(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)
    staged = _download(revision, hub.url, tmp_path)
    shard = staged[SHARD_2]
    content = shard.read_bytes()
    with open(shard, "r+b") as handle:
        handle.truncate(len(content) - 100)

    again = _download(revision, hub.url, tmp_path)

    assert again[SHARD_2].read_bytes() == content


def test_corrupted_file_fetched_again(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)
    staged = _download(revision, hub.url, tmp_path)
    shard = staged[SHARD_2]
    content = shard.read_bytes()
    shard.write_bytes(b"\0" * len(content))

    again = _download(revision, hub.url, tmp_path)

    assert _sha256(again[SHARD_2]) == hashlib.sha256(content).hexdigest()


def test_missing_shard_fails_before_weights(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub, MISSING_SHARD)

    with pytest.raises(DownloadError, match="incomplete snapshot") as caught:
        _download(revision, hub.url, tmp_path)

    assert SHARD_2 in str(caught.value)
    snapshot = tmp_path / "snapshots" / MISSING_SHARD
    assert not (snapshot / f"{revision.sha}.verified.json").exists()
    assert not (snapshot / revision.sha / SHARD_1).exists()


def test_symlinked_cache_file_replaced(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)
    reference = _download(revision, hub.url, tmp_path / "reference")
    cache = tmp_path / "cache"
    snapshot = cache / "snapshots" / SHARDED / revision.sha
    snapshot.mkdir(parents=True)
    # The same bytes outside the tree: hashing through the link would pass.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(reference[SHARD_1].read_bytes())
    (snapshot / SHARD_1).symlink_to(outside)

    staged = _download(revision, hub.url, cache)

    assert not staged[SHARD_1].is_symlink()
    assert staged[SHARD_1].read_bytes() == outside.read_bytes()
    assert outside.read_bytes() == reference[SHARD_1].read_bytes()


def test_symlinked_cache_folder_replaced(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    repo_folder = tmp_path / "cache" / "snapshots" / SHARDED
    repo_folder.mkdir(parents=True)
    (repo_folder / revision.sha).symlink_to(outside)

    staged = _download(revision, hub.url, tmp_path / "cache")

    for local in staged.values():
        assert os.path.realpath(local).startswith(str(repo_folder.resolve()))
    assert list(outside.iterdir()) == []


# --- parallel transfers -------------------------------------------------------------


def test_shards_download_in_parallel(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revision = _resolve(hub)
    real = model._stream_to_file
    # Both shards must be in flight at once, or the barrier breaks after 10 s.
    both_started = threading.Barrier(2, timeout=10)

    def meet_then_stream(session: Any, item: RemoteFile, *args: Any) -> Any:
        if item.path.endswith(".safetensors"):
            both_started.wait()
        return real(session, item, *args)

    monkeypatch.setattr(model, "_stream_to_file", meet_then_stream)

    staged = _download(revision, hub.url, tmp_path / "cache", workers=2)

    assert sorted(staged) == sorted(["config.json", INDEX, SHARD_1, SHARD_2])
    assert not both_started.broken


def test_one_worker_downloads_in_order(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revision = _resolve(hub)
    real = model._stream_to_file
    started: list[str] = []

    def record(session: Any, item: RemoteFile, *args: Any) -> Any:
        started.append(item.path)
        return real(session, item, *args)

    monkeypatch.setattr(model, "_stream_to_file", record)

    _download(revision, hub.url, tmp_path / "cache", workers=1)

    # Small files first, the index before any shard, then shards by size.
    assert started == ["config.json", INDEX, SHARD_2, SHARD_1]


def test_failed_shard_cancels_other_transfers(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    revision = _resolve(hub)
    real = model._stream_to_file
    cancelled_seen: list[bool] = []

    def fail_one(session: Any, item: RemoteFile, *args: Any) -> Any:
        if item.path == SHARD_1:
            raise DownloadError(f"download of {item.path} failed: injected")
        if item.path == SHARD_2:
            cancelled_seen.append(session.cancelled.wait(timeout=10))
        return real(session, item, *args)

    monkeypatch.setattr(model, "_stream_to_file", fail_one)

    with pytest.raises(DownloadError, match="injected"):
        _download(revision, hub.url, tmp_path / "cache", workers=2)

    assert cancelled_seen == [True]
    snapshot = tmp_path / "cache" / "snapshots" / SHARDED / revision.sha
    assert not (snapshot.parent / f"{revision.sha}.verified.json").exists()
    assert not (snapshot / SHARD_2).exists()


def test_zero_workers_rejected(hub: HubServer, tmp_path: Path) -> None:
    revision = _resolve(hub)

    with pytest.raises(DownloadError, match="invalid workers value 0"):
        _download(revision, hub.url, tmp_path / "cache", workers=0)


def test_progress_artifact_reaches_full(
    hub: HubServer, tmp_path: Path, prefect_server: None
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    revision = _resolve(hub)

    @flow
    def pull() -> str:
        from prefect.runtime import flow_run

        download_model(revision, hub.url, cache_dir=tmp_path / "cache")
        return str(flow_run.id)

    run_id = pull()

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 1
    assert progress[0].key == model.PROGRESS_ARTIFACT_KEY
    assert progress[0].data == 100.0
    assert revision.sha in (progress[0].description or "")


# --- stalled transfers --------------------------------------------------------------


class _StallingHandler(BaseHTTPRequestHandler):
    """Serves one file; the requests listed in `stalls` stop after half the body."""

    server: _StallingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append({k.lower(): v for k, v in self.headers.items()})
        attempt = len(server.requests)
        start = 0
        if "range" in server.requests[-1]:
            start = int(server.requests[-1]["range"].removeprefix("bytes=").rstrip("-"))
        body = server.content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if attempt in server.stalls:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            # Holds the connection open without sending, until the test ends.
            server.release.wait(timeout=30)
            return
        self.wfile.write(body)


class _StallingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, content: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.content = content
        self.stalls: set[int] = set()
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def stalling() -> Iterator[_StallingServer]:
    server = _StallingServer(_weights(3, 1024))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _single_file(content: bytes) -> ModelRevision:
    item = RemoteFile(
        path="model.safetensors",
        size=len(content),
        git_oid="0" * 40,
        sha256=hashlib.sha256(content).hexdigest(),
    )
    return ModelRevision("test-models/stalling", "main", "a" * 40, (item,))


def test_stalled_transfer_resumed_once(
    stalling: _StallingServer, tmp_path: Path
) -> None:
    stalling.stalls = {1}
    revision = _single_file(stalling.content)

    staged = _download(revision, stalling.url, tmp_path, stall_seconds=0.5)

    assert staged["model.safetensors"].read_bytes() == stalling.content
    assert len(stalling.requests) == 2
    assert stalling.requests[1]["range"] == f"bytes={len(stalling.content) // 2}-"


def test_stalled_retry_fails_with_file_name(
    stalling: _StallingServer, tmp_path: Path
) -> None:
    stalling.stalls = {1, 2}
    revision = _single_file(stalling.content)

    with pytest.raises(DownloadError, match="model.safetensors") as caught:
        _download(revision, stalling.url, tmp_path, stall_seconds=0.5)

    assert "after 2 attempts" in str(caught.value)
    assert len(stalling.requests) == 2


def test_hub_token_sent_but_never_logged(
    stalling: _StallingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = "hf_" + "s3cret" * 6
    revision = _single_file(stalling.content)

    with caplog.at_level(logging.DEBUG):
        _download(revision, stalling.url, tmp_path, token=SecretStr(token))

    assert stalling.requests[0]["authorization"] == f"Bearer {token}"
    assert token not in caplog.text


# --- token from Secret Manager ------------------------------------------------------


def test_hub_token_read_from_secret_manager(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from google.cloud import secretmanager_v1

    from localcloud.server import LocalCloud
    from tasks.clients import clients_for
    from tasks.config import Target
    from tasks.model import read_hub_token
    from tests.conftest import local_target_data

    token = "hf_" + "gated" * 8
    cloud = LocalCloud(tmp_path / "localcloud")
    cloud.start()
    try:
        fields = local_target_data()["target"]
        fields.update(
            localcloud_state_dir=str(cloud.state_dir), hub_token_secret="hf-token"
        )
        clients = clients_for(Target(**fields))
        project = f"projects/{clients.target.project}"
        clients.secrets.create_secret(
            parent=project,
            secret_id="hf-token",
            secret=secretmanager_v1.Secret(
                replication=secretmanager_v1.Replication(
                    automatic=secretmanager_v1.Replication.Automatic()
                )
            ),
        )
        clients.secrets.add_secret_version(
            parent=f"{project}/secrets/hf-token",
            payload=secretmanager_v1.SecretPayload(data=token.encode()),
        )

        with caplog.at_level(logging.DEBUG):
            secret = read_hub_token.fn(clients)
    finally:
        cloud.stop()

    assert secret is not None
    assert secret.get_secret_value() == token
    assert token not in repr(secret)
    assert token not in caplog.text
