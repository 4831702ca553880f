"""The security gate and the standalone audit against a finished local refresh.

One localcloud serves the module: the refresh deploys both services (its gate runs
the live probes), then the audit runs against what serves, and a setting flipped
through the Cloud Run API makes the next audit fail exactly that check. Tests run in
file order, and each one that changes a setting restores it, except the last.
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
from google.iam.v1 import policy_pb2
from google.protobuf import field_mask_pb2

from containers.mcp.server import _url_problem
from flows.model_refresh import model_refresh
from flows.security_audit import AuditRequest, security_audit
from tasks import checks
from tasks.checks import CANARY_ENV, CATALOGUE, container_env
from tasks.clients import Clients, clients_for
from tasks.config import RefreshRequest, load_config
from tasks.deploy import CANDIDATE_TAG, ROLLBACK_TAG
from tasks.errors import AuditFailed
from tasks.tls import ensure_edge_tls

OPERATION_TIMEOUT_SECONDS = 120
REVISION_TARGET = (
    run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
)


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
    """A loopback TCP server that accepts connections and never sends a response."""

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


def test_outsider_with_run_admin_fails_audit(
    refresh_report: dict[str, Any], target: Path
) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    name = f"{clients.location}/services/{config.llm.name}"
    before = clients.services.get_iam_policy(request={"resource": name})
    outsider = f"serviceAccount:{config.outsider_principal}"
    policy = policy_pb2.Policy()
    policy.CopyFrom(before)
    policy.bindings.add(role="roles/run.admin", members=[outsider])
    # run.viewer cannot invoke, so this binding must not fail anything.
    policy.bindings.add(role="roles/run.viewer", members=["user:auditor@example.com"])
    clients.services.set_iam_policy(request={"resource": name, "policy": policy})
    try:
        report = _audit(target)
    finally:
        current = clients.services.get_iam_policy(request={"resource": name})
        restored = policy_pb2.Policy(bindings=before.bindings, etag=current.etag)
        clients.services.set_iam_policy(request={"resource": name, "policy": restored})

    assert report["status"] == "failed"
    # The front door lets run.admin invoke, as Cloud Run does, so the probe with the
    # outsider's token gets through too.
    assert sorted(_failed(report)) == [
        f"{config.llm.name}:iam.invokers-exact",
        f"{config.llm.name}:probe.non-invoker-forbidden",
    ]
    invokers = next(
        c
        for c in report["checks"]
        if c["id"] == "iam.invokers-exact" and c["service"] == config.llm.name
    )
    assert f"{outsider} (roles/run.admin)" in invokers["evidence"]
    assert "auditor@example.com" not in invokers["evidence"]


TEMPLATE_AND_TRAFFIC = field_mask_pb2.FieldMask(paths=["template", "traffic"])


def _add_tagged_revision(
    clients: Clients, name: str, template: run_v2.RevisionTemplate, tag: str
) -> run_v2.Service:
    """Deploy `template` at 0% under `tag` and return the service as it was before."""
    before = clients.services.get_service(name=name)
    traffic = [
        *before.traffic,
        run_v2.TrafficTarget(
            type_=REVISION_TARGET, revision=template.revision, percent=0, tag=tag
        ),
    ]
    clients.services.update_service(
        service=run_v2.Service(name=name, template=template, traffic=traffic),
        update_mask=TEMPLATE_AND_TRAFFIC,
    ).result(timeout=OPERATION_TIMEOUT_SECONDS)
    return before


def _restore(clients: Clients, before: run_v2.Service) -> None:
    """Put the template and traffic back, so later audits see only their own change."""
    clients.services.update_service(
        service=run_v2.Service(
            name=before.name, template=before.template, traffic=before.traffic
        ),
        update_mask=TEMPLATE_AND_TRAFFIC,
    ).result(timeout=OPERATION_TIMEOUT_SECONDS)


def test_tagged_debug_revision_fails_audit(
    refresh_report: dict[str, Any], target: Path
) -> None:
    config = load_config(target)
    clients = clients_for(config.target)
    name = f"{clients.location}/services/{config.mcp.name}"
    debug = f"{config.mcp.name}-debug"
    template = run_v2.RevisionTemplate(clients.services.get_service(name=name).template)
    template.revision = debug
    # An empty service account makes Cloud Run use the default compute one.
    template.service_account = ""
    template.containers[0].env.append(
        run_v2.EnvVar(name="DEBUG_TOKEN", value="not-a-real-token")
    )
    before = _add_tagged_revision(clients, name, template, "debug")
    try:
        tagged = clients.services.get_service(name=name)
        report = _audit(target)
    finally:
        _restore(clients, before)

    assert "debug" in {status.tag for status in tagged.traffic_statuses}
    assert report["status"] == "failed"
    assert sorted(_failed(report)) == [
        f"{config.mcp.name}:identity.dedicated-service-account",
        f"{config.mcp.name}:secrets.no-plaintext-env",
    ]
    failed = [c for c in report["checks"] if not c["passed"]]
    for check in failed:
        assert f"revision {debug} (tag debug): " in check["evidence"]
    identity = next(c for c in failed if c["id"].startswith("identity."))
    assert "-compute@developer.gserviceaccount.com" in identity["evidence"]
    plaintext = next(c for c in failed if c["id"].startswith("secrets."))
    assert "DEBUG_TOKEN" in plaintext["evidence"]
    assert "not-a-real-token" not in plaintext["evidence"]
    # The serving revision keeps its candidate tag and passes the same checks.
    serving = next(s.revision for s in before.traffic_statuses if s.percent == 100)
    assert f"revision {serving} (audited): service account: " in identity["evidence"]
    assert CANDIDATE_TAG in {s.tag for s in tagged.traffic_statuses if s.percent}


def test_hardened_rollback_tag_passes_audit(
    refresh_report: dict[str, Any], target: Path
) -> None:
    # A copy of the serving spec under another name is what a second refresh would
    # keep under the rollback tag.
    config = load_config(target)
    clients = clients_for(config.target)
    name = f"{clients.location}/services/{config.mcp.name}"
    previous = f"{config.mcp.name}-previous"
    template = run_v2.RevisionTemplate(clients.services.get_service(name=name).template)
    template.revision = previous
    before = _add_tagged_revision(clients, name, template, ROLLBACK_TAG)
    try:
        report = _audit(target)
    finally:
        _restore(clients, before)

    assert report["status"] == "passed", _failed(report)
    identity = next(
        c
        for c in report["checks"]
        if c["id"] == "identity.dedicated-service-account"
        and c["service"] == config.mcp.name
    )
    assert f"revision {previous} (tag {ROLLBACK_TAG}): " in identity["evidence"]


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
