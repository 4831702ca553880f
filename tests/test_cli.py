"""The model-refresh and security-audit CLIs: exit codes, and bad input rejected before
Prefect starts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flows import model_refresh, security_audit
from tasks.errors import AuditFailed, GateFailed
from tests.conftest import REPO_ROOT, local_target_data, write_target

# Importing the flow modules (Prefect and the Google clients) took about 10 s on
# 2 busy cores. Bad input must never start the ephemeral Prefect server, which the
# tests check by the missing prefect.db in a fresh PREFECT_HOME.
CLI_TIMEOUT_SECONDS = 90
LOCAL_TARGET = str(REPO_ROOT / "deployments" / "targets" / "local.yaml")


def _run_cli(module: str, target: Path, tmp_path: Path) -> tuple[int, str]:
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    result = subprocess.run(
        [sys.executable, "-m", module, "--target", str(target)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )
    return result.returncode, result.stderr


def _public_target(tmp_path: Path) -> Path:
    data = copy.deepcopy(local_target_data())
    data["llm"]["invokers"].append("allUsers")
    return write_target(tmp_path / "public.yaml", data)


def _bad_target(tmp_path: Path, case: str) -> tuple[Path, str]:
    """Write one kind of bad target config and return its path and expected text."""
    path = tmp_path / "target.yaml"
    if case == "missing":
        return tmp_path / "absent.yaml", "not found"
    if case == "empty":
        path.write_text("")
        return path, "is empty"
    if case == "public":
        return _public_target(tmp_path), "makes the service public"
    path.write_bytes(b"target:\n  project: caf\xe9\n")
    return path, "not UTF-8"


@pytest.mark.parametrize("case", ["missing", "empty", "public", "non-utf8"])
def test_audit_bad_target_exits_2(tmp_path: Path, case: str) -> None:
    target, expected = _bad_target(tmp_path, case)
    code, stderr = _run_cli("flows.security_audit", target, tmp_path)
    assert code == 2, stderr
    assert stderr.startswith("security-audit: target config"), stderr
    assert expected in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()


@pytest.mark.parametrize("case", ["public", "non-utf8"])
def test_refresh_bad_target_exits_2(tmp_path: Path, case: str) -> None:
    target, expected = _bad_target(tmp_path, case)
    code, stderr = _run_cli("flows.model_refresh", target, tmp_path)
    assert code == 2, stderr
    assert stderr.startswith("model-refresh: "), stderr
    assert expected in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()


@pytest.mark.parametrize("main", [model_refresh.main, security_audit.main])
def test_help_lists_exit_codes(main: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    output = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0" in output
    assert "1 the" in output
    assert "2 invalid input" in output
    assert "3 an unexpected error" in output


def test_refresh_directory_target_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = model_refresh.main(["--target", str(tmp_path)])
    assert code == 2
    assert "is a directory" in capsys.readouterr().err


def test_refresh_unexpected_error_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def overflow(request: Any) -> dict[str, Any]:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(model_refresh, "model_refresh", overflow)
    code = model_refresh.main(["--target", LOCAL_TARGET])
    stderr = capsys.readouterr().err
    assert code == 3
    first_line = stderr.splitlines()[0]
    expected = "model-refresh: unexpected error: OverflowError: date value out of range"
    assert first_line == expected
    assert "Traceback (most recent call last)" in stderr


def test_refresh_gate_failure_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def gate_fails(request: Any) -> dict[str, Any]:
        raise GateFailed("llm.iam failed; the previous revision keeps serving")

    monkeypatch.setattr(model_refresh, "model_refresh", gate_fails)
    code = model_refresh.main(["--target", LOCAL_TARGET])
    assert code == 1
    assert "model-refresh: llm.iam failed" in capsys.readouterr().err


def test_audit_unexpected_error_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(request: Any) -> dict[str, Any]:
        raise RuntimeError("channel closed")

    monkeypatch.setattr(security_audit, "security_audit", broken)
    code = security_audit.main(["--target", LOCAL_TARGET])
    stderr = capsys.readouterr().err
    assert code == 3
    first_line = stderr.splitlines()[0]
    assert (
        first_line == "security-audit: unexpected error: RuntimeError: channel closed"
    )
    assert "Traceback (most recent call last)" in stderr


def test_audit_failed_check_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = {
        "status": "failed",
        "message": "1 of 20 checks failed: mcp.ingress.",
        "report_path": "reports/audit.json",
    }

    def audit_fails(request: Any) -> dict[str, Any]:
        raise AuditFailed(report["message"], report)

    monkeypatch.setattr(security_audit, "security_audit", audit_fails)
    code = security_audit.main(["--target", LOCAL_TARGET])
    assert code == 1
    assert "status: failed (1 of 20 checks failed" in capsys.readouterr().out
