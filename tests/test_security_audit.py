"""The security gate and the standalone audit against a finished local refresh.

One localcloud serves the module: the refresh deploys both services (its gate runs
the live probes), then the audit runs against what serves, and a setting flipped
through the Cloud Run API makes the next audit fail exactly that check.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud import compute_v1, run_v2
from google.protobuf import field_mask_pb2

from containers.mcp.server import _url_problem
from flows.model_refresh import model_refresh
from flows.security_audit import AuditRequest, security_audit
from tasks import checks
from tasks.checks import CANARY_ENV, CATALOGUE, container_env
from tasks.clients import clients_for
from tasks.config import RefreshRequest, load_config
from tasks.errors import AuditFailed
from tasks.tls import ensure_edge_tls

OPERATION_TIMEOUT_SECONDS = 120


def customize_target(data: dict[str, Any]) -> None:
    # cite_source takes URLs, so the probes also send it internal addresses.
    data["mcp"]["tool_allowlist"] = ["model_card", "lookup_doc", "cite_source"]


@pytest.fixture(scope="module")
def refresh_report(
    target: Path, prefect_server: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "MODEL_REFRESH_CACHE", str(tmp_path_factory.getbasetemp() / "cache")
        )
        report: dict[str, Any] = model_refresh(
            RefreshRequest(target_config=str(target))
        )
    return report


@pytest.fixture
def sent_urls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the URL of each HTTP request httpx sends from the test's thread.

    localcloud runs in this process too, but its front doors proxy from their own
    threads, so only the flow's own requests are recorded.
    """
    urls: list[str] = []
    main = threading.get_ident()
    sync_send = httpx.HTTPTransport.handle_request
    async_send = httpx.AsyncHTTPTransport.handle_async_request

    def record(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        if threading.get_ident() == main:
            urls.append(str(request.url))
        return sync_send(self, request)

    async def record_async(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        if threading.get_ident() == main:
            urls.append(str(request.url))
        return await async_send(self, request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", record)
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", record_async)
    return urls


def _audit(target: Path) -> dict[str, Any]:
    """Run the audit flow; return its report whether or not every check passed."""
    try:
        report: dict[str, Any] = security_audit(AuditRequest(target_config=str(target)))
    except AuditFailed as exc:
        assert exc.report["status"] == "failed"
        return exc.report
    assert report["status"] == "passed"
    return report


def _failed(report: dict[str, Any]) -> list[str]:
    return [f"{c['service']}:{c['id']}" for c in report["checks"] if not c["passed"]]


def test_refresh_gate_runs_live_probes(refresh_report: dict[str, Any]) -> None:
    ids = {c["id"] for c in refresh_report["checks"]}

    assert refresh_report["status"] == "deployed", _failed(refresh_report)
    assert {
        "llm.canary-not-leaked",
        "llm.body-cap",
        "llm.max-tokens-cap",
        "llm.rejections-logged",
        "mcp.unlisted-tool-rejected",
        "mcp.path-traversal-rejected",
        "mcp.private-url-rejected",
        "mcp.stateless-sessions",
        "alerting.log-metrics",
        "alerting.policies-enabled",
        "edge.tls-policy",
    } <= ids


AUDITS: list[dict[str, Any]] = []


def test_audit_passes_after_refresh(
    refresh_report: dict[str, Any], target: Path, sent_urls: list[str]
) -> None:
    from prefect.settings import PREFECT_API_URL

    report = _audit(target)
    AUDITS.append(report)

    assert report["status"] == "passed", _failed(report)
    assert {c["id"] for c in report["checks"]} == set(CATALOGUE)
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["taxonomy"]["llm"] == "OWASP Top 10 for LLM Applications 2025"
    assert "OWASP Top 10 for LLM Applications 2025 LLM07" in saved["owasp"]
    # Every probe went to a service URL of the target; the rest is Prefect's API.
    api = str(PREFECT_API_URL.value() or "")
    probed = [url for url in sent_urls if not (api and url.startswith(api))]
    allowed = tuple(url + "/" for url in report["urls"].values())
    assert probed
    assert [url for url in probed if not url.startswith(allowed)] == []


def test_audit_checks_are_stable_between_runs(
    refresh_report: dict[str, Any], target: Path
) -> None:
    first = AUDITS[0] if AUDITS else _audit(target)
    second = _audit(target)

    assert second["checks"] == first["checks"]


def test_canary_never_reaches_logs(
    refresh_report: dict[str, Any], target: Path
) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    service = clients.services.get_service(
        name=f"{clients.location}/services/{config.llm.name}"
    )
    revision = clients.revisions.get_revision(name=service.latest_ready_revision)
    canary = container_env(revision, CANARY_ENV)
    entries = clients.logging.list_log_entries(
        request={
            "resource_names": [f"projects/{config.target.project}"],
            "filter": 'jsonPayload.event="request_rejected"',
        }
    )
    logged = [type(entry).to_json(entry) for entry in entries]

    assert len(canary) >= 16
    assert logged
    assert [line for line in logged if canary in line] == []


class HungServer:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.accepted: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.listener.getsockname()
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(connection)

    def __enter__(self) -> HungServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        for connection in self.accepted:
            connection.close()
        self.listener.close()


def test_guard_battery_skipped_on_hung_candidate(
    refresh_report: dict[str, Any], target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    service = clients.services.get_service(
        name=f"{clients.location}/services/{config.llm.name}"
    )
    revision = service.latest_ready_revision.rsplit("/", 1)[-1]
    monkeypatch.setattr(checks, "PROBE_TIMEOUT_SECONDS", 1.0)

    with HungServer() as hung:
        results = checks.check_llm_guard(
            clients, config.llm, hung.url, revision, "id-token", "api-key"
        )
        connections = len(hung.accepted)

    assert [r.id for r in results] == [
        "llm.chat-answers",
        *checks.GUARD_BATTERY_CHECKS,
    ]
    assert [r.passed for r in results] == [False] * len(results)
    assert "ReadTimeout" in results[0].evidence
    assert results[1].evidence.startswith("not run")
    assert connections == 1


def test_weak_ssl_policy_fails_audit(
    refresh_report: dict[str, Any], target: Path
) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    assert config.load_balancer is not None
    project = config.target.project
    name = config.load_balancer.ssl_policy
    current = clients.ssl_policies.get(project=project, ssl_policy=name)
    clients.ssl_policies.patch(
        project=project,
        ssl_policy=name,
        ssl_policy_resource=compute_v1.SslPolicy(
            profile="COMPATIBLE",
            min_tls_version="TLS_1_0",
            fingerprint=current.fingerprint,
        ),
    ).result(timeout=OPERATION_TIMEOUT_SECONDS)
    try:
        report = _audit(target)
    finally:
        # Later tests audit again and expect only their own change to fail.
        ensure_edge_tls(clients, config.load_balancer)

    assert report["status"] == "failed"
    assert _failed(report) == ["load-balancer:edge.tls-policy"]
    tls = next(c for c in report["checks"] if c["id"] == "edge.tls-policy")
    assert "profile COMPATIBLE" in tls["evidence"]
    assert "min TLS TLS_1_0" in tls["evidence"]


def test_ingress_all_fails_audit(refresh_report: dict[str, Any], target: Path) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    name = f"{clients.location}/services/{config.mcp.name}"
    clients.services.update_service(
        service=run_v2.Service(
            name=name, ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["ingress"]),
    ).result(timeout=OPERATION_TIMEOUT_SECONDS)

    report = _audit(target)

    assert report["status"] == "failed"
    assert _failed(report) == [f"{config.mcp.name}:ingress.private"]
    assert report["checks"][0]["id"] == "ingress.private"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/computeMetadata/v1/", "metadata_address"),
        ("https://metadata.google.internal/", "metadata_address"),
        ("https://[fd00:ec2::254]/", "metadata_address"),
        ("https://10.1.2.3/docs", "private_address"),
        ("https://192.168.0.1/", "private_address"),
        ("https://127.0.0.1:8080/", "private_address"),
        ("https://[::1]/", "private_address"),
        ("https://localhost/", "private_address"),
        ("https://huggingface.co.example.com/", "host_not_allowed"),
        ("https://user:pass@huggingface.co/", "invalid_url"),
        ("ftp://huggingface.co/", "invalid_url"),
        ("https://huggingface.co/" + "a" * 2048, "url_too_long"),
    ],
)
def test_cite_source_rejects_url(url: str, reason: str) -> None:
    problem = _url_problem(url, ("huggingface.co",))

    assert problem is not None
    assert problem[0] == reason


def test_cite_source_accepts_allowed_host() -> None:
    assert _url_problem("https://huggingface.co/docs/hub", ("huggingface.co",)) is None
