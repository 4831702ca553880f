"""Run reports: a JSON file, plus Prefect markdown and table artifacts for people.

Two kinds share one layout: the refresh report of `model_refresh` and the audit report
of `security_audit`. Checks are listed failures first, then by severity, service and
id, and JSON keys are sorted, so two reports of the same deployment diff cleanly.
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

from tasks.checks import OWASP_LLM, OWASP_WEB, SEVERITY_ORDER, CheckResult

REPORT_VERSION = 2
REFRESH = "model-refresh"
AUDIT = "security-audit"
TABLE_COLUMNS = ("passed", "severity", "service", "id", "owasp", "evidence", "fix")


def sort_checks(checks: list[CheckResult]) -> list[CheckResult]:
    return sorted(
        checks,
        key=lambda c: (c.passed, SEVERITY_ORDER.index(c.severity), c.service, c.id),
    )


def owasp_mapping(checks: list[CheckResult]) -> dict[str, dict[str, Any]]:
    """Group the check ids under each OWASP item they prove, with the failure count."""
    items: dict[str, dict[str, Any]] = {}
    for check in sort_checks(checks):
        for item in filter(None, (part.strip() for part in check.owasp.split(";"))):
            entry = items.setdefault(item, {"checks": [], "failed": 0})
            label = f"{check.service}:{check.id}"
            if label not in entry["checks"]:
                entry["checks"].append(label)
            entry["failed"] += not check.passed
    return dict(sorted(items.items()))


def _checks_section(checks: list[CheckResult]) -> dict[str, Any]:
    ordered = sort_checks(checks)
    return {
        "taxonomy": {"llm": OWASP_LLM, "web": OWASP_WEB},
        "checks": [check.to_dict() for check in ordered],
        "owasp": owasp_mapping(ordered),
        "summary": {
            "total": len(ordered),
            "failed": sum(not c.passed for c in ordered),
        },
    }


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
    edge_tls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "kind": REFRESH,
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
        "alerts": alerts,
        "edge_tls": edge_tls,
        **_checks_section(checks),
    }


def build_audit_report(
    *,
    target: str,
    revisions: dict[str, str],
    urls: dict[str, str],
    checks: list[CheckResult],
) -> dict[str, Any]:
    """Build the report of a standalone audit of the revisions that serve now."""
    section = _checks_section(checks)
    failed = section["summary"]["failed"]
    return {
        "kind": AUDIT,
        "report_version": REPORT_VERSION,
        "status": "failed" if failed else "passed",
        "message": (
            f"{failed} of {len(checks)} checks failed."
            if failed
            else f"All {len(checks)} checks passed."
        ),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": target,
        "revisions": revisions,
        "urls": urls,
        **section,
    }


def render_markdown(report: dict[str, Any]) -> str:
    title = "Security audit" if report.get("kind") == AUDIT else "Model refresh"
    lines = [
        f"# {title}: {report['status']}",
        "",
        report["message"],
        "",
        f"- Target: {report['target']}",
    ]
    model = report.get("model")
    if model:
        lines.append(
            f"- Model: `{model['repo_id']}` at `{model['sha']}` "
            f"(requested `{model['requested']}`)"
        )
    for service, image in sorted(report.get("images", {}).items()):
        lines.append(f"- Image ({service}): `{image}`")
    for service, revision in sorted(report["revisions"].items()):
        lines.append(f"- Revisions ({service}): {revision}")
    for service, url in sorted(report["urls"].items()):
        lines.append(f"- URL ({service}): {url}")
    checks = report["checks"]
    if checks:
        lines += _checks_markdown(report)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _checks_markdown(report: dict[str, Any]) -> list[str]:
    checks = report["checks"]
    lines = [
        "",
        f"## Checks ({report['summary']['failed']} failed of {len(checks)})",
        "",
        f"Taxonomy: {report['taxonomy']['llm']}; {report['taxonomy']['web']}.",
        "",
        "| Result | Severity | Service | Check | OWASP | Evidence | Fix |",
        "|---|---|---|---|---|---|---|",
    ]
    for check in checks:
        result = "pass" if check["passed"] else "**FAIL**"
        fix = "" if check["passed"] else _cell(check["fix"])
        lines.append(
            f"| {result} | {check['severity']} | {check['service']} "
            f"| `{check['id']}` | {_cell(check['owasp'])} "
            f"| {_cell(check['evidence'])} | {fix} |"
        )
    lines += ["", "## OWASP mapping", "", "| Item | Checks | Failed |", "|---|---|---|"]
    for item, entry in report["owasp"].items():
        lines.append(f"| {item} | {len(entry['checks'])} | {entry['failed']} |")
    return lines


def _file_name(report: dict[str, Any], stamp: str) -> str:
    if report.get("kind") == AUDIT:
        return f"audit-{stamp}.json"
    sha = report["model"]["sha"][:12] or "unresolved"
    return f"refresh-{stamp}-{sha}.json"


@task(cache_policy=NO_CACHE)
def write_report(report: dict[str, Any], report_dir: str) -> Path:
    """Write the JSON report and the Prefect artifacts; return the file path."""
    kind = report.get("kind", REFRESH)
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = (folder / _file_name(report, stamp)).resolve()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)

    create_markdown_artifact(
        key=f"{kind}-report",
        markdown=render_markdown(report),
        description=f"{kind} {report['status']}",
    )
    if report["checks"]:
        create_table_artifact(
            key=f"{kind}-checks",
            table=[{k: check[k] for k in TABLE_COLUMNS} for check in report["checks"]],
            description="Security checks, failures first",
        )
    get_run_logger().info("Report written to %s", path)
    return path
