"""The local Hub: repository store, HTTP API and demo seeding, used by huggingface_hub.

Every client call passes the local endpoint, a temporary cache and token=False, so no
request leaves 127.0.0.1 and no local Hugging Face login is read.
"""

from __future__ import annotations

import os

# huggingface_hub reads these when it is imported.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile

from localcloud.hub import EntryNotFoundError as StoreEntryNotFoundError
from localcloud.hub import HubRepos, HubServer, InvalidNameError, RefConflictError
from localcloud.hub import RevisionNotFoundError as StoreRevisionNotFoundError
from localcloud.hub.__main__ import (
    PICKLE_ONLY,
    TINY_LLAMA,
    describe_repo,
    main,
    publish_next,
    seed_demo_repos,
)
from localcloud.hub.repos import lfs_pointer

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _online_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another test module may have imported huggingface_hub with offline mode set.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def demo_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running Hub with the demo repositories. Tests that commit use `fresh_hub`."""
    root = tmp_path_factory.mktemp("demo") / "hub"
    seed_demo_repos(root)
    with HubServer(root) as server:
        yield server


@pytest.fixture
def fresh_hub(tmp_path: Path) -> Iterator[HubServer]:
    root = tmp_path / "hub"
    seed_demo_repos(root)
    with HubServer(root) as server:
        yield server


@pytest.fixture
def api(demo_hub: HubServer) -> HfApi:
    return HfApi(endpoint=demo_hub.url, token=False)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- repository store ----------------------------------------------------------------


def test_commit_sha_matches_git(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    files = {
        "README.md": b"# model\n",
        "weights/model.safetensors": b"\x00" * 64,
        "weights/b/c.txt": b"c",
        "weights-extra.txt": b"ordering case: '-' sorts before '/'",
    }
    first = repos.commit("org/model", files, "First", timestamp=WHEN)
    second = repos.commit(
        "org/model", {"README.md": b"# v2\n"}, "Second\n\nBody", timestamp=WHEN
    )

    work = tmp_path / "git"
    work.mkdir()
    identity = "localcloud"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": identity,
        "GIT_AUTHOR_EMAIL": "localcloud@localhost",
        "GIT_COMMITTER_NAME": identity,
        "GIT_COMMITTER_EMAIL": "localcloud@localhost",
        "GIT_AUTHOR_DATE": f"@{int(WHEN.timestamp())} +0000",
        "GIT_COMMITTER_DATE": f"@{int(WHEN.timestamp())} +0000",
    }

    def git(*args: str) -> str:
        command = ["git", "-c", "core.autocrlf=false", *args]
        done = subprocess.run(
            command, cwd=work, env=env, check=True, capture_output=True
        )
        return done.stdout.decode().strip()

    git("init", "-q")
    for path, content in files.items():
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".safetensors"):
            content = lfs_pointer(hashlib.sha256(content).hexdigest(), len(content))
        target.write_bytes(content)
    git("add", "-A")
    git_first = git("commit-tree", git("write-tree"), "-m", "First")
    (work / "README.md").write_bytes(b"# v2\n")
    git("add", "-A")
    git_second = git(
        "commit-tree", git("write-tree"), "-p", git_first, "-m", "Second\n\nBody"
    )

    assert first == git_first
    assert second == git_second


def test_unchanged_commit_returns_parent(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    first = repos.commit("org/model", {"a.txt": b"a"}, "Add a")

    again = repos.commit("org/model", {"a.txt": b"a"}, "Add a again")

    assert again == first
    assert len(repos.log("org/model")) == 1


def test_delete_folder_removes_its_files(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    repos.commit(
        "org/model", {"keep.txt": b"k", "dir/a.txt": b"a", "dir/b/c.txt": b"c"}, "Add"
    )

    sha = repos.commit("org/model", {}, "Drop dir", delete=["dir"])

    assert [entry.path for entry in repos.tree("org/model", sha)] == ["keep.txt"]
    with pytest.raises(StoreEntryNotFoundError):
        repos.commit("org/model", {}, "Drop missing", delete=["missing.txt"])


def test_lfs_rules_follow_hub_defaults(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    big = tmp_path / "big.dat"
    with big.open("wb") as out:
        out.truncate(10 * 1000 * 1000 + 1)
    sha = repos.commit(
        "org/model",
        {
            "model.safetensors": b"w",
            "pytorch_model.bin": b"p",
            "config.json": b"{}",
            "big.dat": big,
        },
        "Add",
    )

    entries = {entry.path: entry for entry in repos.tree("org/model", sha)}

    assert entries["model.safetensors"].lfs is not None
    assert entries["pytorch_model.bin"].lfs is not None
    assert entries["big.dat"].lfs is not None
    assert entries["config.json"].lfs is None
    assert entries["big.dat"].sha256 == sha256_of(big)


def test_store_rejects_invalid_names(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")

    for bad_id in ("org", "org/../x", "-org/model", "org/mo--del", "a/b/c"):
        with pytest.raises(InvalidNameError):
            repos.create_repo(bad_id)
    for bad_path in ("../escape", "/abs", "a//b", ".git/config"):
        with pytest.raises(InvalidNameError):
            repos.commit("org/model", {bad_path: b"x"}, "Bad path")


def test_tag_never_moves(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    first = repos.commit("org/model", {"a.txt": b"1"}, "One")
    repos.tag("org/model", "v1", first)
    repos.commit("org/model", {"a.txt": b"2"}, "Two")

    assert repos.tag("org/model", "v1", first) == first
    with pytest.raises(RefConflictError):
        repos.tag("org/model", "v1", "main")
    with pytest.raises(StoreRevisionNotFoundError):
        repos.resolve("org/model", "v2")


def test_readers_see_only_complete_commits(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    repos.commit("org/model", {"n.txt": b"0"}, "Start")
    seen: list[str] = []
    failures: list[Exception] = []
    done = threading.Event()

    def read_until_done() -> None:
        reader = HubRepos(tmp_path / "hub")
        while not done.is_set():
            try:
                sha = reader.resolve("org/model", "main")
                seen.append(reader.tree("org/model", sha)[0].sha256)
            except Exception as exc:  # any failure of a reader fails the test
                failures.append(exc)
                return

    thread = threading.Thread(target=read_until_done)
    thread.start()
    for number in range(1, 30):
        repos.commit("org/model", {"n.txt": str(number).encode()}, f"Commit {number}")
    done.set()
    thread.join(timeout=30)

    assert failures == []
    assert len(seen) > 0


# -- HTTP API through huggingface_hub ------------------------------------------------


def test_revisions_resolve_to_commit_shas(demo_hub: HubServer, api: HfApi) -> None:
    history = demo_hub.repos.log(TINY_LLAMA)
    head, first = history[0].id, history[-1].id

    assert api.model_info(TINY_LLAMA).sha == head
    assert api.model_info(TINY_LLAMA, revision="main").sha == head
    assert api.model_info(TINY_LLAMA, revision="v1").sha == first
    assert api.model_info(TINY_LLAMA, revision=first).sha == first
    assert api.resolve_revision(TINY_LLAMA, revision="v1").resolved == first


def test_branch_with_slash_resolves(fresh_hub: HubServer) -> None:
    sha = fresh_hub.repos.create_branch(TINY_LLAMA, "release/v2", "v1")
    api = HfApi(endpoint=fresh_hub.url, token=False)

    assert api.model_info(TINY_LLAMA, revision="release/v2").sha == sha


def test_model_info_lists_files_and_metadata(api: HfApi) -> None:
    info = api.model_info(TINY_LLAMA, files_metadata=True)
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    weights = siblings["model.safetensors"]

    assert set(siblings) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert weights.lfs is not None
    assert weights.lfs.size == weights.size
    assert siblings["config.json"].lfs is None
    assert info.private is False
    assert info.card_data is not None
    assert info.card_data.license == "apache-2.0"
    assert info.safetensors is not None
    assert info.safetensors.total > 0
    assert "safetensors" in (info.tags or [])


def test_snapshot_download_honours_allow_patterns(
    demo_hub: HubServer, tmp_path: Path
) -> None:
    folder = snapshot_download(
        TINY_LLAMA,
        revision="v1",
        allow_patterns=["*.json", "*.safetensors"],
        endpoint=demo_hub.url,
        cache_dir=tmp_path,
        token=False,
    )

    names = sorted(path.name for path in Path(folder).iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert Path(folder).name == demo_hub.repos.resolve(TINY_LLAMA, "v1")


def test_paths_info_sha256_matches_download(
    demo_hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    (info,) = api.get_paths_info(TINY_LLAMA, ["model.safetensors"], revision="main")
    path = hf_hub_download(
        TINY_LLAMA,
        "model.safetensors",
        endpoint=demo_hub.url,
        cache_dir=tmp_path,
        token=False,
    )

    assert isinstance(info, RepoFile)
    assert info.lfs is not None
    assert info.lfs.sha256 == sha256_of(path)
    assert info.lfs.size == Path(path).stat().st_size


def test_paths_info_skips_unknown_paths(api: HfApi) -> None:
    infos = api.get_paths_info(TINY_LLAMA, ["config.json", "missing.bin"])

    assert [info.path for info in infos] == ["config.json"]


def test_regular_file_etag_is_git_oid(demo_hub: HubServer) -> None:
    sha = demo_hub.repos.resolve(TINY_LLAMA, "main")
    entry = demo_hub.repos.files(TINY_LLAMA, sha)["config.json"]

    response = httpx.head(f"{demo_hub.url}/{TINY_LLAMA}/resolve/main/config.json")

    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{entry.oid}"'
    assert response.headers["X-Repo-Commit"] == sha
    assert int(response.headers["Content-Length"]) == entry.size


def test_lfs_file_redirects_with_linked_headers(demo_hub: HubServer) -> None:
    sha = demo_hub.repos.resolve(TINY_LLAMA, "main")
    entry = demo_hub.repos.files(TINY_LLAMA, sha)["model.safetensors"]

    response = httpx.head(f"{demo_hub.url}/{TINY_LLAMA}/resolve/main/model.safetensors")
    content = httpx.get(response.headers["Location"])

    assert response.status_code == 302
    assert response.headers["X-Linked-Etag"] == f'"{entry.sha256}"'
    assert int(response.headers["X-Linked-Size"]) == entry.size
    assert response.headers["X-Repo-Commit"] == sha
    assert content.status_code == 200
    assert hashlib.sha256(content.content).hexdigest() == entry.sha256


def test_new_commit_moves_main(fresh_hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=fresh_hub.url, token=False)
    before = api.model_info(TINY_LLAMA).sha
    old_weights = hf_hub_download(
        TINY_LLAMA,
        "model.safetensors",
        endpoint=fresh_hub.url,
        cache_dir=tmp_path,
        token=False,
    )

    published = publish_next(fresh_hub.root, TINY_LLAMA)
    new_weights = hf_hub_download(
        TINY_LLAMA,
        "model.safetensors",
        endpoint=fresh_hub.url,
        cache_dir=tmp_path,
        token=False,
    )

    assert published != before
    assert api.model_info(TINY_LLAMA).sha == published
    assert api.list_repo_commits(TINY_LLAMA)[0].title == "Retrain with seed 2"
    assert sha256_of(new_weights) != sha256_of(old_weights)
    assert published in new_weights


def test_unknown_repo_raises_repository_not_found(
    demo_hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("local-models/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "local-models/missing",
            "config.json",
            endpoint=demo_hub.url,
            cache_dir=tmp_path,
            token=False,
        )


def test_unknown_revision_raises_revision_not_found(
    demo_hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    with pytest.raises(RevisionNotFoundError):
        api.model_info(TINY_LLAMA, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(TINY_LLAMA, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            TINY_LLAMA,
            "config.json",
            revision="no-such-branch",
            endpoint=demo_hub.url,
            cache_dir=tmp_path,
            token=False,
        )


def test_unknown_file_raises_entry_not_found(
    demo_hub: HubServer, tmp_path: Path
) -> None:
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(
            TINY_LLAMA,
            "missing.json",
            endpoint=demo_hub.url,
            cache_dir=tmp_path,
            token=False,
        )


def test_malformed_repo_id_is_bad_request(demo_hub: HubServer) -> None:
    # huggingface_hub validates ids before sending, so these go over plain HTTP.
    for bad_id in ("bad--org/model", "org/model-", ".org/model"):
        info = httpx.get(f"{demo_hub.url}/api/models/{bad_id}")
        download = httpx.head(f"{demo_hub.url}/{bad_id}/resolve/main/config.json")

        assert info.status_code == 400, bad_id
        assert "invalid repo id" in info.json()["error"], bad_id
        assert download.status_code == 400, bad_id


def test_single_name_repo_is_not_found(api: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("gpt2")


def test_connection_survives_rejected_post(demo_hub: HubServer) -> None:
    with httpx.Client(base_url=demo_hub.url) as client:
        rejected = client.post(
            "/api/models/bad--org/model/paths-info/main",
            data={"paths": ["config.json"]},
        )
        accepted = client.post(
            f"/api/models/{TINY_LLAMA}/paths-info/main", data={"paths": ["config.json"]}
        )

    assert rejected.status_code == 400
    assert accepted.status_code == 200
    assert [item["path"] for item in accepted.json()] == ["config.json"]


def test_empty_file_downloads(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/model")
    repos.commit("org/model", {"empty.txt": b"", "empty.bin": b""}, "Add empty files")

    with HubServer(tmp_path / "hub") as server:
        paths = [
            hf_hub_download(
                "org/model",
                name,
                endpoint=server.url,
                cache_dir=tmp_path / "cache",
                token=False,
            )
            for name in ("empty.txt", "empty.bin")
        ]

    assert [Path(path).stat().st_size for path in paths] == [0, 0]


def test_range_request_returns_partial_content(demo_hub: HubServer) -> None:
    url = f"{demo_hub.url}/{TINY_LLAMA}/resolve/main/tokenizer.json"
    whole = httpx.get(url).content

    middle = httpx.get(url, headers={"Range": "bytes=10-19"})
    tail = httpx.get(url, headers={"Range": "bytes=-5"})
    past_end = httpx.get(url, headers={"Range": f"bytes={len(whole)}-"})

    assert middle.status_code == 206
    assert middle.content == whole[10:20]
    assert middle.headers["Content-Range"] == f"bytes 10-19/{len(whole)}"
    assert tail.content == whole[-5:]
    assert past_end.status_code == 416


def test_resumed_download_completes_file(demo_hub: HubServer, tmp_path: Path) -> None:
    sha = demo_hub.repos.resolve(TINY_LLAMA, "main")
    entry = demo_hub.repos.files(TINY_LLAMA, sha)["model.safetensors"]
    url = f"{demo_hub.url}/api/lfs-objects/{TINY_LLAMA}/{sha}/{entry.sha256}"
    with demo_hub.repos.open_blob(TINY_LLAMA, entry.sha256) as blob:
        head = blob.read(1000)
    partial = tmp_path / "model.safetensors.incomplete"
    partial.write_bytes(head)

    with partial.open("ab") as out:
        http_get(url, out, resume_size=len(head), expected_size=entry.size)

    assert sha256_of(partial) == entry.sha256


def test_concurrent_downloads_are_complete(demo_hub: HubServer, tmp_path: Path) -> None:
    digests: list[str] = []
    errors: list[Exception] = []

    def download(index: int) -> None:
        try:
            path = hf_hub_download(
                TINY_LLAMA,
                "model.safetensors",
                endpoint=demo_hub.url,
                cache_dir=tmp_path / str(index),
                token=False,
            )
            digests.append(sha256_of(path))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=download, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    expected = demo_hub.repos.files(
        TINY_LLAMA, demo_hub.repos.resolve(TINY_LLAMA, "main")
    )
    assert errors == []
    assert digests == [expected["model.safetensors"].sha256] * 8


def test_tree_listing_paginates(tmp_path: Path) -> None:
    repos = HubRepos(tmp_path / "hub")
    repos.create_repo("org/many")
    files: dict[str, bytes | Path] = {
        f"shard-{index}.txt": b"%d" % index for index in range(7)
    }
    files["sub/inner.txt"] = b"inner"
    repos.commit("org/many", files, "Add")

    with HubServer(tmp_path / "hub", tree_page_size=3) as server:
        api = HfApi(endpoint=server.url, token=False)
        top = [entry.path for entry in api.list_repo_tree("org/many")]
        everything = [
            entry.path for entry in api.list_repo_tree("org/many", recursive=True)
        ]
        inside = [
            entry.path for entry in api.list_repo_tree("org/many", path_in_repo="sub")
        ]

    assert len(top) == 8
    assert "sub" in top
    assert "sub/inner.txt" not in top
    assert len(everything) == 9
    assert inside == ["sub/inner.txt"]


def test_refs_and_commits_listing(demo_hub: HubServer, api: HfApi) -> None:
    refs = api.list_repo_refs(TINY_LLAMA)
    commits = api.list_repo_commits(TINY_LLAMA)

    assert [branch.name for branch in refs.branches] == ["main"]
    assert [tag.name for tag in refs.tags] == ["v1"]
    assert refs.tags[0].target_commit == commits[-1].commit_id
    assert [commit.title for commit in commits] == [
        "Retrain with seed 1",
        "Add tiny-llama, seed 0",
    ]


def test_other_repo_types_are_not_found(demo_hub: HubServer) -> None:
    api = HfApi(endpoint=demo_hub.url, token=False)

    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(TINY_LLAMA)


# -- demo repositories and command line ----------------------------------------------


def test_seed_demo_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    first = seed_demo_repos(root)
    files_before = sorted(
        str(path) for path in root.rglob("*") if "tmp" not in path.parts
    )

    second = seed_demo_repos(root)
    files_after = sorted(
        str(path) for path in root.rglob("*") if "tmp" not in path.parts
    )

    assert second == first
    assert files_after == files_before
    assert set(first) == {TINY_LLAMA, PICKLE_ONLY}


def test_seed_demo_shas_are_reproducible(tmp_path: Path) -> None:
    assert seed_demo_repos(tmp_path / "a") == seed_demo_repos(tmp_path / "b")


def test_pickle_only_repo_has_no_safetensors(api: HfApi) -> None:
    info = api.model_info(PICKLE_ONLY)
    names = {sibling.rfilename for sibling in info.siblings or []}

    assert "pytorch_model.bin" in names
    assert not any(name.endswith(".safetensors") for name in names)


def test_cli_show_prints_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "hub"

    assert main(["--root", str(root), "seed-demo"]) == 0
    assert main(["--root", str(root), "show", "--repo", TINY_LLAMA]) == 0

    output = capsys.readouterr().out
    assert "Retrain with seed 1" in output
    assert "v1 " in output
    assert describe_repo(root, TINY_LLAMA) in output
