"""Serve the refresh and watcher deployments from this machine (Prefect OSS).

- `model-refresh/nightly`: runs at 02:00 UTC every night, and can be started by hand
  from the Prefect UI with a form for its typed parameters. It also runs whenever the
  watcher announces a new commit, for exactly that commit sha.
- `watch-models/hub-poll`: checks the Hub every 10 minutes.
- `security-audit/daily`: audits the services as they serve at 03:00 UTC every day,
  an hour after the nightly refresh, so a setting changed by hand since the last
  refresh fails a flow run instead of waiting for the next deploy.

Run with `python -m deployments.serve` while a Prefect server is up
(`prefect server start --host 127.0.0.1`) and PREFECT_API_URL points at it.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.model_refresh import model_refresh
from flows.security_audit import security_audit
from flows.watch_models import NEW_REVISION_EVENT, model_resource_id, watch_models

NIGHTLY_CRON = "0 2 * * *"
AUDIT_CRON = "0 3 * * *"
WATCH_INTERVAL_SECONDS = 600


def refresh_trigger(target_config: str, repo_id: str) -> DeploymentEventTrigger:
    """Run the refresh for the sha in the watcher's event, never for a moving branch.

    The trigger matches only the configured repository and takes only the sha from the
    event: the open-source Prefect server accepts events without authentication, so an
    event must not be able to choose another repository or target config.
    """
    return DeploymentEventTrigger(
        name="new-model-revision",
        expect={NEW_REVISION_EVENT},
        match={"prefect.resource.id": model_resource_id(repo_id)},
        parameters={
            "request": {
                "repo_id": repo_id,
                "revision": "{{ event.payload.sha }}",
                "target_config": target_config,
            }
        },
    )


def build_deployments(target_config: str, repo_id: str) -> list:
    request = {"repo_id": repo_id, "revision": "main", "target_config": target_config}
    refresh = model_refresh.to_deployment(
        name="nightly",
        schedule=Cron(NIGHTLY_CRON, timezone="UTC"),
        parameters={"request": request},
        triggers=[refresh_trigger(target_config, repo_id)],
        # One refresh at a time per target: a second one waits instead of racing.
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        tags=["model-refresh"],
        description="Refresh the LLM and MCP services to a model revision",
    )
    watcher = watch_models.to_deployment(
        name="hub-poll",
        interval=WATCH_INTERVAL_SECONDS,
        parameters={"request": request},
        tags=["model-refresh"],
        description="Announce new commits of the served model",
    )
    audit = security_audit.to_deployment(
        name="daily",
        schedule=Cron(AUDIT_CRON, timezone="UTC"),
        parameters={"request": {"target_config": target_config}},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        tags=["model-refresh"],
        description="Audit the LLM and MCP services as they serve now",
    )
    return [refresh, watcher, audit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="deployments/targets/local.yaml")
    parser.add_argument("--repo-id", default="local-models/tiny-llama")
    args = parser.parse_args()
    serve(*build_deployments(args.target, args.repo_id))


if __name__ == "__main__":
    main()
