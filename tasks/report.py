"""The run report: a JSON file for machines and a Prefect markdown artifact for people.

Checks are listed failures first, then by service and id, so two reports of the same
deployment diff cleanly.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.checks import OWASP_LLM, OWASP_WEB, CheckResult

REPORT_VERSION = 1


def sort_checks(checks: list[CheckResult]) -> list[CheckResult]:
    return sorted(checks, key=lambda c: (c.passed, c.service, c.id))


def build_report(
    *,
    status: str,
    repo_id: str,
    requested_revision: str,
    model_sha: str,
    target: str,
    images: dict[str, str],
    revisions: dict[str, dict[str, Any]],
    urls: dict[str, str],
    checks: list[CheckResult],
    secret_version: str | None,
    alerts: dict[str, Any] | None,
    message: str,
) -> dict[str, Any]:
    ordered = sort_checks(checks)
    return {
        "report_version": REPORT_VERSION,
        "status": status,
        "message": message,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": target,
        "model": {
            "repo_id": repo_id,
            "requested": requested_revision,
            "sha": model_sha,
        },
        "images": images,
        "revisions": revisions,
        "urls": urls,
        "secret_version": secret_version,
        "taxonomy": {"llm": OWASP_LLM, "web": OWASP_WEB},
        "checks": [check.to_dict() for check in ordered],
        "summary": {
            "total": len(ordered),
            "failed": sum(not c.passed for c in ordered),
        },
        "alerts": alerts,
    }


def render_markdown(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [
        f"# Model refresh: {report['status']}",
        "",
        report["message"],
        "",
        f"- Model: `{model['repo_id']}` at `{model['sha']}` "
        f"(requested `{model['requested']}`)",
        f"- Target: {report['target']}",
    ]
    for service, image in sorted(report["images"].items()):
        lines.append(f"- Image ({service}): `{image}`")
    for service, revision in sorted(report["revisions"].items()):
        lines.append(f"- Revisions ({service}): {revision}")
    for service, url in sorted(report["urls"].items()):
        lines.append(f"- URL ({service}): {url}")
    checks = report["checks"]
    if checks:
        lines += [
            "",
            f"## Checks ({report['summary']['failed']} failed of {len(checks)})",
            f"Taxonomy: {report['taxonomy']['llm']}; {report['taxonomy']['web']}.",
            "",
            "| Result | Service | Check | Severity | Evidence | Fix |",
            "|---|---|---|---|---|---|",
        ]
        for check in checks:
            result = "pass" if check["passed"] else "**FAIL**"
            evidence = check["evidence"].replace("|", "\\|")
            lines.append(
                f"| {result} | {check['service']} | `{check['id']}` "
                f"| {check['severity']} "
                f"| {evidence} | {check['fix'] if not check['passed'] else ''} |"
            )
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE)
def write_report(report: dict[str, Any], report_dir: str) -> Path:
    """Write the JSON report and the Prefect artifacts; return the file path."""
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    sha = report["model"]["sha"][:12] or "unresolved"
    path = (folder / f"refresh-{stamp}-{sha}.json").resolve()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)

    create_markdown_artifact(
        key="model-refresh-report",
        markdown=render_markdown(report),
        description=f"Model refresh {report['status']}",
    )
    if report["checks"]:
        create_table_artifact(
            key="model-refresh-checks",
            table=[
                {
                    k: check[k]
                    for k in ("passed", "service", "id", "severity", "evidence")
                }
                for check in report["checks"]
            ],
            description="Post-deploy checks",
        )
    get_run_logger().info("Report written to %s", path)
    return path
