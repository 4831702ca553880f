"""Command line for the local Hub: seed the demo repositories, publish, show, serve.

    python -m localcloud.hub [--root DIR] seed-demo
    python -m localcloud.hub [--root DIR] publish-next --repo local-models/tiny-llama
    python -m localcloud.hub [--root DIR] show --repo local-models/tiny-llama
    python -m localcloud.hub [--root DIR] serve [--port PORT]

The root defaults to `$LOCALCLOUD_STATE_DIR/hub` (`./.localcloud/hub` when the variable
is unset), the folder a running localcloud serves.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from localcloud.hub.repos import LFS_PATTERNS, HubRepos

logger = logging.getLogger(__name__)

TINY_LLAMA: Final = "local-models/tiny-llama"
PICKLE_ONLY: Final = "local-models/pickle-only"
DEMO_TAG: Final = "v1"
# Fixed commit times make the demo commit shas the same on every machine.
FIRST_COMMIT_TIME: Final = datetime(2026, 1, 1, tzinfo=UTC)
SECOND_COMMIT_TIME: Final = datetime(2026, 1, 8, tzinfo=UTC)

GITATTRIBUTES: Final = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS
).encode()

TINY_LLAMA_CARD: Final = b"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- localcloud-demo
---

# tiny-llama

A Llama-style causal language model with random weights (hidden size 64, 2 layers)
and a byte-level BPE tokenizer. Every commit is generated from a seed, so its files are
the same on every machine. It produces text-shaped noise: use it to test download,
packaging and serving, never to judge output quality.
"""

PICKLE_ONLY_CARD: Final = b"""---
license: apache-2.0
tags:
- localcloud-demo
---

# pickle-only

A repository whose weights exist only as a pickled `pytorch_model.bin`. Loading a pickle
can run arbitrary code, so a safe pipeline must refuse this repository.
"""


def default_root() -> Path:
    return Path(os.environ.get("LOCALCLOUD_STATE_DIR", ".localcloud")) / "hub"


def seed_demo_repos(root: Path) -> dict[str, str]:
    """Create the demo repositories where missing and return each `main` commit sha.

    Running it again changes nothing. After an interrupted run it adds only the missing
    commits and tag.
    """
    repos = HubRepos(root)
    return {
        TINY_LLAMA: _seed_tiny_llama(repos),
        PICKLE_ONLY: _seed_pickle_only(repos),
    }


def publish_next(root: Path, repo_id: str) -> str:
    """Commit the demo model generated with the next seed (the commit count so far)."""
    repos = HubRepos(root)
    seed = len(repos.log(repo_id))
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as folder:
        files = _generate_model(seed, Path(folder))
        sha = repos.commit(repo_id, files, f"Retrain with seed {seed}")
    logger.info("Published seed %d to %s as %s", seed, repo_id, sha)
    return sha


def describe_repo(root: Path, repo_id: str) -> str:
    """Return branches, tags and the commit log of a repository as text."""
    repos = HubRepos(root)
    refs = repos.refs(repo_id)
    lines = [f"repository {repo_id}", "branches:"]
    lines += [f"  {name} {sha}" for name, sha in sorted(refs.branches.items())]
    lines.append("tags:")
    lines += [f"  {name} {sha}" for name, sha in sorted(refs.tags.items())]
    lines.append("commits (newest first):")
    if refs.branches:
        for info in repos.log(repo_id):
            lines.append(
                f"  {info.id} {info.timestamp:%Y-%m-%dT%H:%M:%SZ} {info.title}"
            )
    return "\n".join(lines)


def _seed_tiny_llama(repos: HubRepos) -> str:
    repos.create_repo(TINY_LLAMA)
    history = repos.log(TINY_LLAMA) if repos.refs(TINY_LLAMA).branches else []

    if not history:
        with tempfile.TemporaryDirectory(prefix="tiny-llama-") as folder:
            files: dict[str, bytes | Path] = dict(_generate_model(0, Path(folder)))
            files["README.md"] = TINY_LLAMA_CARD
            files[".gitattributes"] = GITATTRIBUTES
            repos.commit(
                TINY_LLAMA, files, "Add tiny-llama, seed 0", timestamp=FIRST_COMMIT_TIME
            )
        history = repos.log(TINY_LLAMA)
    first = history[-1].id

    if len(history) == 1:
        with tempfile.TemporaryDirectory(prefix="tiny-llama-") as folder:
            model = _generate_model(1, Path(folder))
            repos.commit(
                TINY_LLAMA, model, "Retrain with seed 1", timestamp=SECOND_COMMIT_TIME
            )

    if DEMO_TAG not in repos.refs(TINY_LLAMA).tags:
        repos.tag(TINY_LLAMA, DEMO_TAG, first)
    return repos.resolve(TINY_LLAMA, "main")


def _seed_pickle_only(repos: HubRepos) -> str:
    repos.create_repo(PICKLE_ONLY)
    if repos.refs(PICKLE_ONLY).branches:
        return repos.resolve(PICKLE_ONLY, "main")

    state = {
        "embed.weight": [[0.01 * (row + col) for col in range(8)] for row in range(16)],
        "lm_head.weight": [
            [0.02 * (row - col) for col in range(8)] for row in range(16)
        ],
    }
    config = b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}\n'
    files: dict[str, bytes | Path] = {
        # A fixed protocol keeps the bytes, and so the commit sha, the same everywhere.
        "pytorch_model.bin": pickle.dumps(state, protocol=4),
        "config.json": config,
        "README.md": PICKLE_ONLY_CARD,
        ".gitattributes": GITATTRIBUTES,
    }
    return repos.commit(
        PICKLE_ONLY, files, "Add pickle-only weights", timestamp=FIRST_COMMIT_TIME
    )


def _generate_model(seed: int, folder: Path) -> dict[str, bytes | Path]:
    # Imported here: numpy, safetensors and tokenizers are only needed to seed.
    from localcloud.hub.demo_model import generate_model

    generate_model(seed=seed, out_dir=folder)
    return {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m localcloud.hub",
        description="Manage localcloud's Hub repositories.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="repository folder (default: $LOCALCLOUD_STATE_DIR/hub, else"
        " ./.localcloud/hub)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("seed-demo", help="create the demo repositories if missing")
    publish = commands.add_parser(
        "publish-next", help="commit the demo model's next seed"
    )
    publish.add_argument("--repo", default=TINY_LLAMA, help="repo id (namespace/name)")
    show = commands.add_parser("show", help="print branches, tags and commit log")
    show.add_argument("--repo", required=True, help="repo id (namespace/name)")
    serve = commands.add_parser("serve", help="serve the Hub API until interrupted")
    serve.add_argument(
        "--port", type=int, default=0, help="TCP port (default: a free one)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    root: Path = args.root or default_root()

    if args.command == "seed-demo":
        for repo_id, sha in seed_demo_repos(root).items():
            print(f"{repo_id} main={sha}")
    elif args.command == "publish-next":
        print(publish_next(root, args.repo))
    elif args.command == "show":
        print(describe_repo(root, args.repo))
    elif args.command == "serve":
        _serve(root, args.port)
    return 0


def _serve(root: Path, port: int) -> None:
    from localcloud.hub.server import HubServer

    server = HubServer(root, port=port)
    server.start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
