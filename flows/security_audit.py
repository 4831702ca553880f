"""Audit the services that serve now, outside a refresh, and report every check.

Steps:
1. find the revision that serves all traffic of each service;
2. read its configuration, IAM policy and secret versions back, and run the revision
   checks on every other revision that a tag or traffic entry reaches too;
3. probe the service URL: IAM, the LLM guard, the MCP tools;
4. check the anomaly log metrics and alert policies, and the load balancer's SSL
   policy when the target config has one;
5. write the report, and fail the flow run when a check failed.

The probes go only to the URLs that Cloud Run reports for the services of the target
config.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.model_refresh import LLM_HEALTH_PATH, MCP_HEALTH_PATH, resolve_config_path
from tasks.checks import (
    CheckResult,
    check_alerting,
    check_edge_tls,
    check_llm_guard,
    check_mcp,
    check_service,
    mint_probe_identity,
    read_api_key,
)
from tasks.clients import Clients, clients_for
from tasks.config import RefreshConfig, load_config
from tasks.deploy import Candidate, read_serving
from tasks.errors import AuditError, AuditFailed, RefreshError
from tasks.report import build_audit_report, write_report


class AuditRequest(BaseModel):
    """Parameters of one audit run; the Prefect UI renders them as a form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_config: str = Field(
        "deployments/targets/local.yaml", description="Path of the target config"
    )


@task(cache_policy=NO_CACHE)
def find_serving_revision(clients: Clients, service_id: str) -> Candidate:
    """Return the revision that serves 100% of the service, with the service URL."""
    serving = read_serving(clients, service_id)
    if serving is None:
        raise AuditError(
            f"service {service_id!r} not found in {clients.location}: run the "
            "model-refresh flow first, or check target.project and target.region"
        )
    if serving.revision is None:
        raise AuditError(
            f"service {serving.service} splits its traffic, so no single revision "
            "serves it: promote or roll back the candidate, then rerun the audit"
        )
    return Candidate(
        service=serving.service,
        revision=serving.revision,
        tag_url=serving.uri,
        service_url=serving.uri,
        previous=None,
        created=False,
    )


def audit_services(
    clients: Clients, config: RefreshConfig, llm: Candidate, mcp: Candidate
) -> list[CheckResult]:
    """Run the configuration audit and the live probes against both services.

    The configuration audit covers every revision that a tag URL or a traffic entry
    reaches, because each of them serves requests. The live probes go to the service
    URLs only.
    """
    checks: list[CheckResult] = []
    llm_identity = mint_probe_identity(
        clients, llm.service_url, config.probe_principal, config.outsider_principal
    )
    checks += check_service(
        clients, config.llm, llm, llm_identity, LLM_HEALTH_PATH, include_reachable=True
    )
    revision = clients.revisions.get_revision(
        name=f"{llm.service}/revisions/{llm.revision}"
    )
    checks += check_llm_guard(
        clients,
        config.llm,
        llm.service_url,
        llm.revision,
        llm_identity.invoker_token,
        read_api_key(clients, revision),
    )
    mcp_identity = mint_probe_identity(
        clients, mcp.service_url, config.probe_principal, config.outsider_principal
    )
    checks += check_service(
        clients, config.mcp, mcp, mcp_identity, MCP_HEALTH_PATH, include_reachable=True
    )
    checks += check_mcp(config.mcp, mcp.service_url, mcp_identity.invoker_token)
    return checks


@flow(name="security-audit", log_prints=False)
def security_audit(request: AuditRequest | None = None) -> dict[str, Any]:
    """Audit both services as they serve now and return the report."""
    request = request or AuditRequest()
    config = load_config(resolve_config_path(request.target_config))
    clients = clients_for(config.target)

    llm = find_serving_revision(clients, config.llm.name)
    mcp = find_serving_revision(clients, config.mcp.name)
    checks = audit_services(clients, config, llm, mcp)
    checks += check_alerting(clients, config)
    checks += check_edge_tls(clients, config)

    report = build_audit_report(
        target=f"{config.target.kind}:{config.target.project}/{config.target.region}",
        revisions={"llm": llm.revision, "mcp": mcp.revision},
        urls={"llm": llm.service_url, "mcp": mcp.service_url},
        checks=checks,
    )
    report["report_path"] = str(write_report(report, config.report_dir))
    if report["status"] != "passed":
        get_run_logger().warning("Security audit failed: %s", report["message"])
        raise AuditFailed(
            f"{report['message']} Report: {report['report_path']}", report
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.security_audit",
        description="Audit the LLM and MCP services as they serve now",
        epilog="Exit status: 0 every check passed; 1 the audit ran and a check "
        "failed; 2 invalid input or a known failure, explained on stderr; 3 an "
        "unexpected error, with its traceback on stderr.",
    )
    parser.add_argument(
        "--target",
        default=AuditRequest().target_config,
        help="target config YAML (default: the localcloud target)",
    )
    args = parser.parse_args(argv)

    try:
        # Validate the target before Prefect starts, so bad input fails in a moment.
        load_config(resolve_config_path(args.target))
        report = security_audit(AuditRequest(target_config=args.target))
    except AuditFailed as exc:
        report = exc.report
    except RefreshError as exc:
        print(f"security-audit: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(
            f"security-audit: unexpected error: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        traceback.print_exc(file=sys.stderr)
        return 3
    print(f"status: {report['status']} ({report['message']})")
    print(f"report: {report['report_path']}")
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
