"""Watch the Hub for a new commit of the served model and announce it as an event.

The event carries the exact commit sha, and the refresh deployment's trigger passes that
sha on as the revision to deploy, so the run deploys what the watcher saw even if the
branch moves again in between.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.logging import get_run_logger

from tasks.clients import clients_for
from tasks.config import RefreshRequest, load_config, parse_request
from tasks.deploy import read_serving, refresh_is_current

NEW_REVISION_EVENT = "model-refresh.model.revision-published"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Frozen, so sharing one instance as the default is safe.
DEFAULT_REQUEST = RefreshRequest()


def model_resource_id(repo_id: str) -> str:
    return f"huggingface.model.{repo_id}"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def resolve_head(repo_id: str, revision: str, hub_endpoint: str) -> str:
    sha = HfApi(endpoint=hub_endpoint).model_info(repo_id, revision=revision).sha
    if not sha:
        raise ValueError(f"the Hub returned no commit sha for {repo_id}@{revision}")
    return sha


@flow(name="watch-models")
def watch_models(request: RefreshRequest = DEFAULT_REQUEST) -> str | None:
    """Emit an event when the branch or tag points at a sha that does not serve yet."""
    logger = get_run_logger()
    request = parse_request(request)
    path = Path(request.target_config)
    config = load_config(path if path.exists() else REPO_ROOT / path)
    clients = clients_for(config.target)

    sha = resolve_head(request.repo_id, request.revision, clients.hub_endpoint)
    # Both services must serve the sha: after a half-finished rollout only one does,
    # and the refresh that the event starts completes it.
    servings = [
        read_serving(clients, name) for name in (config.llm.name, config.mcp.name)
    ]
    if all(refresh_is_current(serving, sha) for serving in servings):
        logger.info(
            "%s@%s is %s, which already serves", request.repo_id, request.revision, sha
        )
        return None
    serving = servings[0]

    emit_event(
        event=NEW_REVISION_EVENT,
        resource={
            "prefect.resource.id": model_resource_id(request.repo_id),
            "prefect.resource.name": request.repo_id,
        },
        payload={
            "repo_id": request.repo_id,
            "revision": request.revision,
            "sha": sha,
            "target_config": request.target_config,
        },
    )
    logger.info(
        "New revision of %s: %s (was %s)",
        request.repo_id,
        sha,
        serving and serving.model_sha,
    )
    return sha
