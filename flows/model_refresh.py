"""The main job: refresh the LLM and MCP services to a model revision, safely.

Steps, in order:
1. resolve the revision to a commit sha, and stop when that sha already serves;
2. download and verify the serving files;
3. build and push both images, rotate the API key, and put the anomaly alerts in
   place, so the gate can check them and they watch the candidates from the start;
4. deploy both services as tagged candidates and check them;
5. promote, or roll back on a failed check;
6. write the report.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from tasks.alerts import ensure_anomaly_alerts
from tasks.checks import (
    CheckResult,
    check_alerting,
    check_edge_tls,
    check_llm_guard,
    check_mcp,
    check_service,
    mint_probe_identity,
)
from tasks.clients import Clients, clients_for
from tasks.config import RefreshConfig, RefreshRequest, load_config, parse_request
from tasks.deploy import (
    Candidate,
    Serving,
    deploy_candidate,
    in_use_versions,
    llm_template,
    mcp_template,
    promote,
    read_serving,
    refresh_is_current,
    roll_back,
    set_invokers,
)
from tasks.errors import GateFailed, RefreshError
from tasks.image import build_llm_image, build_mcp_image, ensure_repository
from tasks.model import (
    ModelRevision,
    download_model,
    read_hub_token,
    resolve_model_revision,
)
from tasks.report import build_report, write_report
from tasks.secrets import (
    access_secret,
    retire_old_keys,
    rollout_canary,
    rotate_api_key,
)
from tasks.tls import ensure_edge_tls_task

REPO_ROOT = Path(__file__).resolve().parents[1]
LLM_HEALTH_PATH = "/health"
MCP_HEALTH_PATH = "/healthz"


def resolve_config_path(path: str) -> Path:
    """Resolve a relative config path against the working folder, then the repo."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


# Frozen, so sharing one instance as the default is safe.
DEFAULT_REQUEST = RefreshRequest()


@flow(name="model-refresh", log_prints=False)
def model_refresh(request: RefreshRequest = DEFAULT_REQUEST) -> dict[str, Any]:
    """Refresh both services to the requested model revision and return the report."""
    request = parse_request(request)
    config = load_config(resolve_config_path(request.target_config))
    clients = clients_for(config.target)

    hub_token = read_hub_token(clients)
    revision = resolve_model_revision(request, clients.hub_endpoint, hub_token)
    llm_serving = read_serving(clients, config.llm.name)
    mcp_serving = read_serving(clients, config.mcp.name)
    edge_tls = None
    if config.load_balancer is not None:
        # Before the skip check, so a skipped run also fixes a weakened policy, and
        # before the gate, which checks the policy.
        edge_tls = ensure_edge_tls_task(clients, config.load_balancer).to_dict()
    if not request.force and all(
        refresh_is_current(serving, revision.sha)
        for serving in (llm_serving, mcp_serving)
    ):
        # A run that crashed after promoting may not have retired the old keys or
        # created the alerts yet, and someone may have changed the invokers since.
        # These steps converge and cost only a few API reads.
        retire_old_keys(clients, config)
        alerts = ensure_anomaly_alerts(clients, config)
        set_invokers(clients, config.llm)
        set_invokers(clients, config.mcp)
        return _finish(
            config,
            revision,
            status="skipped",
            message=f"{revision.sha} already serves on both services; nothing to do.",
            servings={"llm": llm_serving, "mcp": mcp_serving},
            alerts={"metrics": list(alerts.metrics), "policies": list(alerts.policies)},
            edge_tls=edge_tls,
        )

    files = download_model(revision, clients.hub_endpoint, token=hub_token)
    ensure_repository(clients)
    llm_image = build_llm_image(clients, config, revision, files)
    mcp_image = build_mcp_image(clients, config)
    key = rotate_api_key(
        clients,
        config.llm.api_key_secret,
        in_use_versions(llm_serving, mcp_serving, model_sha=revision.sha),
    )
    alerts = ensure_anomaly_alerts(clients, config)

    candidates: list[Candidate] = []
    try:
        llm = deploy_candidate(
            clients,
            config.llm,
            llm_template(
                config.llm,
                llm_image,
                key,
                revision.sha,
                config.target.listen_host,
                model_bytes=sum(path.stat().st_size for path in files.values()),
                canary=rollout_canary(access_secret(clients, key), revision.sha),
            ),
        )
        candidates.append(llm)
        set_invokers(clients, config.llm)
        mcp = deploy_candidate(
            clients,
            config.mcp,
            mcp_template(
                config.mcp,
                mcp_image,
                revision.repo_id,
                revision.sha,
                config.target.listen_host,
            ),
        )
        candidates.append(mcp)
        set_invokers(clients, config.mcp)
        checks = run_gate(clients, config, llm, mcp, access_secret(clients, key))
    except Exception:
        get_run_logger().exception("Deploy failed; rolling back the candidates")
        for candidate in candidates:
            roll_back(clients, candidate)
        raise

    passed = all(check.passed for check in checks)
    rollbacks: dict[str, str] = {}
    for key_name, candidate in (("llm", llm), ("mcp", mcp)):
        if passed:
            promote(clients, candidate)
        else:
            rollbacks[key_name] = roll_back(clients, candidate)
    if passed:
        retire_old_keys(clients, config)

    report = _finish(
        config,
        revision,
        status="deployed" if passed else "rolled-back",
        message=(
            f"{revision.sha} deployed and promoted on both services."
            if passed
            else f"{sum(not c.passed for c in checks)} checks failed; "
            + "; ".join(f"{name}: {done}" for name, done in rollbacks.items())
            + "."
        ),
        servings={"llm": llm_serving, "mcp": mcp_serving},
        images={"llm": llm_image, "mcp": mcp_image},
        candidates={"llm": llm, "mcp": mcp},
        checks=checks,
        secret_version=key.name,
        alerts={"metrics": list(alerts.metrics), "policies": list(alerts.policies)},
        edge_tls=edge_tls,
        rollbacks=rollbacks,
    )
    if not passed:
        raise GateFailed(f"post-deploy checks failed; report: {report['report_path']}")
    return report


def run_gate(
    clients: Clients,
    config: RefreshConfig,
    llm: Candidate,
    mcp: Candidate,
    api_key: str,
) -> list[CheckResult]:
    """Run every check against both candidates; the results decide promotion."""
    checks: list[CheckResult] = []
    llm_identity = mint_probe_identity(
        clients, llm.service_url, config.probe_principal, config.outsider_principal
    )
    checks += check_service(clients, config.llm, llm, llm_identity, LLM_HEALTH_PATH)
    checks += check_llm_guard(
        clients,
        config.llm,
        llm.tag_url,
        llm.revision,
        llm_identity.invoker_token,
        api_key,
    )
    mcp_identity = mint_probe_identity(
        clients, mcp.service_url, config.probe_principal, config.outsider_principal
    )
    checks += check_service(clients, config.mcp, mcp, mcp_identity, MCP_HEALTH_PATH)
    checks += check_mcp(config.mcp, mcp.tag_url, mcp_identity.invoker_token)
    checks += check_alerting(clients, config)
    checks += check_edge_tls(clients, config)
    return checks


def _finish(
    config: RefreshConfig,
    revision: ModelRevision,
    *,
    status: str,
    message: str,
    servings: dict[str, Serving | None],
    images: dict[str, str] | None = None,
    candidates: dict[str, Candidate] | None = None,
    checks: list[CheckResult] | None = None,
    secret_version: str | None = None,
    alerts: dict[str, Any] | None = None,
    edge_tls: dict[str, Any] | None = None,
    rollbacks: dict[str, str] | None = None,
) -> dict[str, Any]:
    revisions: dict[str, dict[str, Any]] = {}
    urls: dict[str, str] = {}
    for key, serving in servings.items():
        candidate = (candidates or {}).get(key)
        entry: dict[str, Any] = {"previous": serving.revision if serving else None}
        if candidate is not None:
            entry["candidate"] = candidate.revision
            entry["serving"] = (
                candidate.revision if status == "deployed" else entry["previous"]
            )
            rollback = (rollbacks or {}).get(key)
            if rollback is not None:
                entry["rollback"] = rollback
                if rollback.startswith("deleted"):
                    entry["serving"] = None
            urls[key] = candidate.service_url
            urls[f"{key}-candidate"] = candidate.tag_url
        else:
            # Nothing was deployed: the revision before the serving one is the one
            # kept for rollback.
            entry["serving"] = entry["previous"]
            entry["previous"] = serving.rollback if serving else None
            if serving is not None:
                urls[key] = serving.uri
        revisions[key] = entry
    report = build_report(
        status=status,
        repo_id=revision.repo_id,
        requested_revision=revision.requested,
        model_sha=revision.sha,
        target=f"{config.target.kind}:{config.target.project}/{config.target.region}",
        images=images or {},
        revisions=revisions,
        urls=urls,
        checks=checks or [],
        secret_version=secret_version,
        alerts=alerts,
        message=message,
        edge_tls=edge_tls,
    )
    report["report_path"] = str(write_report(report, config.report_dir))
    return report


def main(argv: list[str] | None = None) -> int:
    defaults = RefreshRequest()
    parser = argparse.ArgumentParser(
        prog="python -m flows.model_refresh",
        description="Refresh the LLM and MCP services to a model revision.",
        epilog="Exit status: 0 the run deployed or skipped; 1 the post-deploy gate "
        "failed and the previous revisions keep serving; 2 invalid input or a known "
        "failure, explained on stderr; 3 an unexpected error, with its traceback on "
        "stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repo-id", default=defaults.repo_id, help="Hugging Face model repository"
    )
    parser.add_argument(
        "--revision", default=defaults.revision, help="branch, tag or commit sha"
    )
    parser.add_argument(
        "--target", default=defaults.target_config, help="target config YAML"
    )
    parser.add_argument(
        "--force", action="store_true", help="redeploy even if the sha already serves"
    )
    args = parser.parse_args(argv)

    try:
        request = parse_request(
            {
                "repo_id": args.repo_id,
                "revision": args.revision,
                "target_config": args.target,
                "force": args.force,
            }
        )
        # Validate the target before Prefect starts, so bad input fails in a moment.
        load_config(resolve_config_path(request.target_config))
        report = model_refresh(request)
    except GateFailed as exc:
        print(f"model-refresh: {exc}", file=sys.stderr)
        return 1
    except RefreshError as exc:
        print(f"model-refresh: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(
            f"model-refresh: unexpected error: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        traceback.print_exc(file=sys.stderr)
        return 3
    print(f"status: {report['status']}")
    print(f"report: {report['report_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
