"""Post-deploy security checks: read the live configuration back, probe the endpoints.

Configuration checks are pure functions of what the APIs return, so a test can feed them
a misconfigured service. Live probes send real requests, and only to the URLs that the
service under test reports for itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients
from tasks.config import PUBLIC_PRINCIPALS, LlmSettings, McpSettings, ServiceSettings
from tasks.deploy import INVOKER_ROLE, Candidate

OWASP_LLM = "OWASP Top 10 for LLM Applications 2025"
OWASP_WEB = "OWASP Top 10 2021"
PROBE_TIMEOUT_SECONDS = 30.0

# Env names whose words say they hold a secret (API_KEY, HF_TOKEN, DB_PASSWORD), and
# values shaped like well-known credentials, whatever the name.
_SECRET_NAME = re.compile(
    r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE
)
_SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_-]{20,}|hf_[A-Za-z0-9]{30,}|AIza[0-9A-Za-z_-]{35}|ya29\.|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----|gh[pousr]_[A-Za-z0-9]{36})"
)
_DEFAULT_COMPUTE_SA = re.compile(r"^\d+-compute@developer\.gserviceaccount\.com$")
_PRIVATE_INGRESS = (
    run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
    run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER,
)


@dataclass(frozen=True)
class CheckResult:
    id: str
    service: str
    control: str
    owasp: str
    severity: str  # critical, high, medium, low
    passed: bool
    evidence: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(
    check_id: str,
    service: str,
    passed: bool,
    evidence: str,
    *,
    control: str,
    owasp: str,
    severity: str,
    fix: str,
) -> CheckResult:
    return CheckResult(
        check_id, service, control, owasp, severity, passed, evidence, fix
    )


def audit_configuration(
    settings: ServiceSettings,
    service: run_v2.Service,
    revision: run_v2.Revision,
    policy: policy_pb2.Policy,
    image_repository: str,
) -> list[CheckResult]:
    """Check the service, the candidate revision and the IAM policy as read back."""
    name = settings.name
    members = sorted(
        m for b in policy.bindings if b.role == INVOKER_ROLE for m in b.members
    )
    everyone = sorted(
        m for b in policy.bindings for m in b.members if m in PUBLIC_PRINCIPALS
    )
    results = [
        _result(
            "iam.no-public-access",
            name,
            not everyone,
            f"public members: {everyone or 'none'}",
            control="IAM-only access",
            owasp=f"{OWASP_WEB} A01; {OWASP_LLM} LLM02",
            severity="critical",
            fix="remove allUsers and allAuthenticatedUsers from the service IAM policy",
        ),
        _result(
            "iam.invokers-exact",
            name,
            members == sorted(settings.invokers),
            f"roles/run.invoker members: {members}",
            control="IAM-only access",
            owasp=f"{OWASP_WEB} A01",
            severity="high",
            fix="set roles/run.invoker to exactly the configured invokers",
        ),
        _result(
            "iam.invoker-check-enabled",
            name,
            not service.invoker_iam_disabled,
            f"invoker_iam_disabled={service.invoker_iam_disabled}",
            control="IAM-only access",
            owasp=f"{OWASP_WEB} A01",
            severity="critical",
            fix="set invoker_iam_disabled to false",
        ),
        _result(
            "identity.dedicated-service-account",
            name,
            revision.service_account == settings.service_account
            and not _DEFAULT_COMPUTE_SA.match(revision.service_account or ""),
            f"service account: {revision.service_account or '(default compute)'}",
            control="Dedicated identity",
            owasp=f"{OWASP_WEB} A05",
            severity="high",
            fix=f"run the revision as {settings.service_account}",
        ),
        _result(
            "ingress.private",
            name,
            service.ingress in _PRIVATE_INGRESS,
            f"ingress: {run_v2.IngressTraffic(service.ingress).name}",
            control="Private ingress",
            owasp=f"{OWASP_WEB} A01",
            severity="high",
            fix="set ingress to internal or internal-and-cloud-load-balancing",
        ),
        _secrets_pinned(name, revision),
        _no_plaintext_secrets(name, revision),
        _egress_contained(settings, revision),
        _result(
            "cost.max-instances",
            name,
            0 < revision.scaling.max_instance_count <= settings.max_instances,
            f"max_instance_count={revision.scaling.max_instance_count}, "
            f"configured {settings.max_instances}",
            control="Bounded cost",
            owasp=f"{OWASP_LLM} LLM10",
            severity="medium",
            fix=f"set max_instance_count to at most {settings.max_instances}",
        ),
        _images_by_digest(name, revision, image_repository),
    ]
    return results


def _secrets_pinned(name: str, revision: run_v2.Revision) -> CheckResult:
    refs = [
        (env.name, env.value_source.secret_key_ref.version)
        for container in revision.containers
        for env in container.env
        if env.value_source.secret_key_ref.secret
    ]
    unpinned = [
        f"{env}={version or '(empty)'}"
        for env, version in refs
        if not version.isdigit()
    ]
    return _result(
        "secrets.pinned-versions",
        name,
        not unpinned,
        f"secret refs: {[f'{env}@{v}' for env, v in refs]}; "
        f"unpinned: {unpinned or 'none'}",
        control="Secrets outside the image",
        owasp=f"{OWASP_WEB} A05; {OWASP_LLM} LLM02",
        severity="high",
        fix="reference each secret by a version number, never 'latest'",
    )


def _no_plaintext_secrets(name: str, revision: run_v2.Revision) -> CheckResult:
    plain = [
        env.name
        for container in revision.containers
        for env in container.env
        if env.value
        and (_SECRET_NAME.search(env.name) or _SECRET_VALUE.search(env.value))
    ]
    return _result(
        "secrets.no-plaintext-env",
        name,
        not plain,
        f"secret-looking plain env vars: {plain or 'none'}",
        control="Secrets outside the image",
        owasp=f"{OWASP_WEB} A05; {OWASP_LLM} LLM02",
        severity="high",
        fix="move these values to Secret Manager; reference them with secret_key_ref",
    )


def _egress_contained(
    settings: ServiceSettings, revision: run_v2.Revision
) -> CheckResult:
    vpc = revision.vpc_access
    wanted = (
        run_v2.VpcAccess.VpcEgress.PRIVATE_RANGES_ONLY
        if settings.allow_external_egress
        else run_v2.VpcAccess.VpcEgress.ALL_TRAFFIC
    )
    interfaces = [f"{i.network}/{i.subnetwork}" for i in vpc.network_interfaces]
    return _result(
        "egress.direct-vpc",
        settings.name,
        bool(interfaces) and vpc.egress == wanted,
        f"network interfaces: {interfaces or 'none'}, egress: "
        f"{run_v2.VpcAccess.VpcEgress(vpc.egress).name}",
        control="Contained egress",
        owasp=f"{OWASP_LLM} LLM04; {OWASP_WEB} A10",
        severity="medium",
        fix="use Direct VPC egress with egress "
        f"{run_v2.VpcAccess.VpcEgress(wanted).name}",
    )


def _images_by_digest(
    name: str, revision: run_v2.Revision, repository: str
) -> CheckResult:
    images = [container.image for container in revision.containers]
    bad = [
        image
        for image in images
        if "@sha256:" not in image or not image.startswith(repository + "/")
    ]
    return _result(
        "supply-chain.image-digest",
        name,
        not bad,
        f"images: {images}",
        control="Model supply chain",
        owasp=f"{OWASP_LLM} LLM03",
        severity="high",
        fix=f"deploy images from {repository} by sha256 digest",
    )


@dataclass(frozen=True)
class ProbeIdentity:
    invoker_token: str
    outsider_token: str
    access_token: str


def mint_probe_identity(
    clients: Clients, audience: str, invoker: str, outsider: str
) -> ProbeIdentity:
    def id_token(email: str) -> str:
        response = clients.iam_credentials.generate_id_token(
            name=f"projects/-/serviceAccounts/{email}",
            audience=audience,
            include_email=True,
        )
        return response.token

    access = clients.iam_credentials.generate_access_token(
        name=f"projects/-/serviceAccounts/{invoker}",
        scope=["https://www.googleapis.com/auth/cloud-platform"],
    )
    return ProbeIdentity(id_token(invoker), id_token(outsider), access.access_token)


def probe_access(
    name: str, url: str, path: str, identity: ProbeIdentity
) -> list[CheckResult]:
    """Send the four IAM probes to one URL of the service under test."""
    cases: list[tuple[str, dict[str, str], Callable[[int], bool], str, str]] = [
        (
            "probe.no-token-rejected",
            {},
            lambda s: s in (401, 403),
            "critical",
            "no token",
        ),
        (
            "probe.access-token-rejected",
            {"Authorization": f"Bearer {identity.access_token}"},
            lambda s: s in (401, 403),
            "high",
            "OAuth access token",
        ),
        (
            "probe.non-invoker-forbidden",
            {"Authorization": f"Bearer {identity.outsider_token}"},
            lambda s: s == 403,
            "critical",
            "ID token of a non-invoker",
        ),
        (
            "probe.invoker-accepted",
            {"Authorization": f"Bearer {identity.invoker_token}"},
            lambda s: s == 200,
            "high",
            "ID token of the invoker",
        ),
    ]
    results = []
    with httpx.Client(timeout=PROBE_TIMEOUT_SECONDS, follow_redirects=False) as http:
        for check_id, headers, ok, severity, label in cases:
            try:
                status = http.get(url + path, headers=headers).status_code
                evidence = f"GET {path} with {label} -> {status}"
                passed = ok(status)
            except httpx.HTTPError as exc:
                evidence = f"GET {path} with {label} failed: {type(exc).__name__}"
                passed = False
            results.append(
                _result(
                    check_id,
                    name,
                    passed,
                    evidence,
                    control="IAM-only access",
                    owasp=f"{OWASP_WEB} A01; {OWASP_LLM} LLM02",
                    severity=severity,
                    fix="keep invoker IAM enabled and grant roles/run.invoker only to "
                    "the configured principals",
                )
            )
    return results


def probe_llm_chat(
    settings: LlmSettings, url: str, id_token: str, api_key: str
) -> CheckResult:
    """Ask the candidate one chat question through the guard, as a real caller would."""
    body = {
        "model": settings.served_model_name,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": min(8, settings.max_tokens_cap),
        "temperature": 0,
    }
    headers = {
        "X-Serverless-Authorization": f"Bearer {id_token}",
        "Authorization": f"Bearer {api_key}",
    }
    try:
        response = httpx.post(
            url + "/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
        data = response.json() if response.status_code == 200 else {}
        choices = data.get("choices") or [{}]
        content = choices[0].get("message", {}).get("content")
        tokens = data.get("usage", {}).get("completion_tokens")
        passed = response.status_code == 200 and isinstance(content, str)
        evidence = (
            f"POST /v1/chat/completions -> {response.status_code}, {tokens} tokens"
        )
    except (httpx.HTTPError, ValueError) as exc:
        passed = False
        evidence = f"POST /v1/chat/completions failed: {type(exc).__name__}"
    return _result(
        "llm.chat-answers",
        settings.name,
        passed,
        evidence,
        control="Service health",
        owasp=f"{OWASP_LLM} LLM10",
        severity="high",
        fix="read the engine and guard logs of the candidate revision",
    )


def probe_mcp_tools(settings: McpSettings, url: str, id_token: str) -> CheckResult:
    """List the MCP tools through the front door and compare them with the allowlist."""
    try:
        tools = asyncio.run(_list_mcp_tools(url + "/mcp", id_token))
        evidence = f"tools/list: {tools}; allowlist: {sorted(settings.tool_allowlist)}"
        passed = tools == sorted(settings.tool_allowlist)
    except Exception as exc:  # an MCP failure is a failed check, not a crashed run
        tools = []
        evidence = f"tools/list failed: {type(exc).__name__}: {str(exc)[:200]}"
        passed = False
    return _result(
        "mcp.tools-allowlist",
        settings.name,
        passed,
        evidence,
        control="MCP tool allowlist",
        owasp=f"{OWASP_LLM} LLM06",
        severity="high",
        fix="register only the tools in the configured allowlist",
    )


async def _list_mcp_tools(url: str, id_token: str) -> list[str]:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {id_token}"})
    async with (
        http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await asyncio.wait_for(session.initialize(), PROBE_TIMEOUT_SECONDS)
        listed = await asyncio.wait_for(session.list_tools(), PROBE_TIMEOUT_SECONDS)
    return sorted(tool.name for tool in listed.tools)


@task(cache_policy=NO_CACHE)
def check_service(
    clients: Clients,
    settings: ServiceSettings,
    candidate: Candidate,
    identity: ProbeIdentity,
    health_path: str,
) -> list[CheckResult]:
    """Audit the candidate's configuration and probe its tag URL for IAM enforcement."""
    logger = get_run_logger()
    service = clients.services.get_service(name=candidate.service)
    revision = clients.revisions.get_revision(
        name=f"{candidate.service}/revisions/{candidate.revision}"
    )
    policy = clients.services.get_iam_policy(request={"resource": candidate.service})
    results = audit_configuration(
        settings, service, revision, policy, clients.target.image_repository
    )
    results += probe_access(settings.name, candidate.tag_url, health_path, identity)
    failed = [r.id for r in results if not r.passed]
    logger.info(
        "%s: %d checks, %d failed%s",
        settings.name,
        len(results),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
    )
    return results
