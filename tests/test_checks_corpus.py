"""The misconfiguration corpus: one hardened baseline and one variant per known mistake.

The baseline is what the pipeline itself deploys for the GCP example target (the
revision templates of tasks.deploy, the alert policies of tasks.alerts), plus what
healthy live probes observe. Each variant changes one thing, and the whole catalogue
must flag exactly that check on the variant and nothing on the baseline. A harmless
variant changes something that must not be flagged at all.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.cloud import compute_v1, monitoring_v3, run_v2
from google.cloud.logging_v2.types import LogMetric
from google.iam.v1 import policy_pb2

from localcloud.runtime import frontdoor
from tasks.alerts import _log_match_policy, _threshold_policy, anomaly_rules
from tasks.checks import (
    CATALOGUE,
    INVOKE_ROLES,
    CheckResult,
    McpObservations,
    ReachableRevision,
    Reply,
    audit_alerting,
    audit_configuration,
    audit_tls_policy,
    evaluate_access,
    evaluate_body_cap,
    evaluate_canary,
    evaluate_max_tokens,
    evaluate_mcp,
    evaluate_rejections_logged,
    leaks_canary,
    reachable_routes,
)
from tasks.config import (
    LoadBalancerSettings,
    RefreshConfig,
    ServiceSettings,
    load_config,
)
from tasks.deploy import INVOKER_ROLE, llm_template, mcp_template
from tasks.secrets import SecretVersionRef

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = load_config(REPO_ROOT / "deployments" / "targets" / "gcp.example.yaml")
MODEL_SHA = "0123456789abcdef0123456789abcdef01234567"
CANARY = "canary-5f1d0c9e7a2b4c6d8e0f1a2b"
KEY = SecretVersionRef(
    secret="llm-api-key",
    version="3",
    name=f"projects/{CONFIG.target.project}/secrets/llm-api-key/versions/3",
)
ENGINE = 1  # index of the engine sidecar in the LLM revision
# Probes that always run and are judged outside the pure functions below.
NOT_IN_CORPUS = {"llm.chat-answers"}


@dataclass
class ServiceCase:
    settings: ServiceSettings
    service: run_v2.Service
    revision: run_v2.Revision
    policy: policy_pb2.Policy
    secret_states: dict[str, str]
    statuses: dict[str, int]
    # Other revisions that a tag or traffic entry reaches, such as the rollback tag.
    reachable: list[ReachableRevision] = field(default_factory=list)


@dataclass
class Case:
    """Everything the catalogue reads for one deployment, as the APIs return it."""

    llm: ServiceCase
    mcp: ServiceCase
    metrics: list[LogMetric]
    policies: list[monitoring_v3.AlertPolicy]
    ssl_policy: compute_v1.SslPolicy | None
    canary: str
    completions: dict[str, tuple[Reply, str]]
    body_reply: Reply
    tokens_reply: Reply
    logged: set[str]
    tools: McpObservations
    extra: dict[str, str] = field(default_factory=dict)


def _image(name: str) -> str:
    return f"{CONFIG.target.image_repository}/{name}@sha256:{'ab' * 32}"


def _revision(template: run_v2.RevisionTemplate) -> run_v2.Revision:
    return run_v2.Revision(
        name=template.revision,
        containers=template.containers,
        scaling=template.scaling,
        vpc_access=template.vpc_access,
        service_account=template.service_account,
        node_selector=template.node_selector,
    )


def _service_case(
    settings: ServiceSettings, template: run_v2.RevisionTemplate
) -> ServiceCase:
    return ServiceCase(
        settings=settings,
        service=run_v2.Service(
            ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
            invoker_iam_disabled=False,
        ),
        revision=_revision(template),
        policy=policy_pb2.Policy(
            bindings=[
                policy_pb2.Binding(role=INVOKER_ROLE, members=settings.invokers),
                # run.viewer has no run.routes.invoke, so this group cannot invoke.
                policy_pb2.Binding(
                    role="roles/run.viewer", members=["group:ml-platform@x.com"]
                ),
            ]
        ),
        secret_states={KEY.name: "ENABLED"},
        statuses={
            "probe.no-token-rejected": 401,
            "probe.access-token-rejected": 401,
            "probe.non-invoker-forbidden": 403,
            "probe.invoker-accepted": 200,
        },
    )


def baseline() -> Case:
    config = CONFIG
    llm = llm_template(config.llm, _image("llm"), KEY, MODEL_SHA, "0.0.0.0")
    llm.containers[0].env.append(
        run_v2.EnvVar(name="SYSTEM_PROMPT_CANARY", value=CANARY)
    )
    mcp = mcp_template(
        config.mcp, _image("mcp"), "org/model", MODEL_SHA, config.target.listen_host
    )
    mcp_case = _service_case(config.mcp, mcp)
    mcp_case.secret_states = {}
    channel = "projects/my-ml-project/notificationChannels/1"
    rules = anomaly_rules(config)
    ok = "the model answers politely"
    completions = {
        label: (Reply(label, 200, completion_tokens=12), ok)
        for label in ("direct", "role-play", "encoded", "spelled-out", "multi-turn")
    }
    completions["override"] = (Reply("override", 400, "prompt_injection"), "")
    return Case(
        llm=_service_case(config.llm, llm),
        mcp=mcp_case,
        metrics=[LogMetric(name=r.metric, filter=r.filter) for r in rules],
        policies=[_threshold_policy(r, channel, 300) for r in rules]
        + [_log_match_policy(config, channel)],
        ssl_policy=compute_v1.SslPolicy(
            name="modern-tls", profile="MODERN", min_tls_version="TLS_1_2"
        ),
        canary=CANARY,
        completions=completions,
        body_reply=Reply("oversized body", 413, "body_too_large"),
        tokens_reply=Reply("max_tokens over cap", 400, "max_tokens_over_cap"),
        logged={"prompt_injection", "body_too_large", "max_tokens_over_cap"},
        tools=McpObservations(
            listed=sorted(config.mcp.tool_allowlist),
            unlisted_tool="run_shell_command",
            unlisted_rejected=True,
            traversal={"../../etc/passwd": True, "/etc/passwd": True},
            urls={"https://10.0.0.5/": True, "http://169.254.169.254/": True},
            oversized_rejected=True,
            sessions_ok=4,
            sessions=4,
        ),
    )


def run_catalogue(case: Case, config: RefreshConfig = CONFIG) -> list[CheckResult]:
    results: list[CheckResult] = []
    for one in (case.llm, case.mcp):
        results += audit_configuration(
            one.settings,
            one.service,
            one.revision,
            one.policy,
            config.target.image_repository,
            one.secret_states,
            one.reachable,
        )
        results += evaluate_access(one.settings.name, "/health", one.statuses)
    results += audit_alerting(config, case.metrics, case.policies)
    results.append(audit_tls_policy("llm-https-proxy", case.ssl_policy))

    replies = [reply for reply, _ in case.completions.values()]
    leaked = [
        reply.label
        for reply, text in case.completions.values()
        if leaks_canary(text, case.canary)
    ]
    name = config.llm.name
    results.append(evaluate_canary(name, case.canary, replies, leaked))
    results.append(
        evaluate_body_cap(name, config.llm.max_request_bytes, case.body_reply)
    )
    results.append(
        evaluate_max_tokens(name, config.llm.max_tokens_cap, case.tokens_reply)
    )
    provoked = {
        r.error_code
        for r in (*replies, case.body_reply, case.tokens_reply)
        if r.status in (400, 413) and r.error_code
    }
    results.append(evaluate_rejections_logged(name, provoked, case.logged))
    results += evaluate_mcp(config.mcp, case.tools)
    return results


# Mutations, one per known mistake


def _add_invoker(member: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.policy.bindings.append(
            policy_pb2.Binding(role=INVOKER_ROLE, members=[member])
        )

    return mutate


def _grant(role: str, member: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.policy.bindings.append(policy_pb2.Binding(role=role, members=[member]))

    return mutate


def _platform_group_role(role: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.policy.bindings[1].role = role

    return mutate


def _tagged_revision(
    tag: str, change: Callable[[run_v2.Revision], None] | None = None
) -> Callable[[Case], None]:
    """Reach a copy of the LLM revision under `tag`, after applying `change` to it."""

    def mutate(case: Case) -> None:
        revision = run_v2.Revision(case.llm.revision)
        revision.name = f"{case.llm.settings.name}-{tag}"
        if change is not None:
            change(revision)
        case.llm.reachable.append(
            ReachableRevision(revision, (f"tag {tag}",), dict(case.llm.secret_states))
        )

    return mutate


def _default_identity(revision: run_v2.Revision) -> None:
    revision.service_account = "123456789012-compute@developer.gserviceaccount.com"


def _debug_token(revision: run_v2.Revision) -> None:
    revision.containers[0].env.append(
        run_v2.EnvVar(name="DEBUG_TOKEN", value="not-a-real-token")
    )


def _drop_invoker(case: Case) -> None:
    binding = case.llm.policy.bindings[0]
    binding.members.remove(sorted(binding.members)[0])


def _plain_env(name: str, value: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.revision.containers[0].env.append(
            run_v2.EnvVar(name=name, value=value)
        )

    return mutate


def _latest_secret(case: Case) -> None:
    for env in case.llm.revision.containers[ENGINE].env:
        if env.value_source.secret_key_ref.secret:
            env.value_source.secret_key_ref.version = "latest"


def _secret_state(state: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.secret_states[KEY.name] = state

    return mutate


def _egress(egress: run_v2.VpcAccess.VpcEgress) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.mcp.revision.vpc_access.egress = egress

    return mutate


def _no_vpc(case: Case) -> None:
    case.mcp.revision.vpc_access = run_v2.VpcAccess()


def _max_instances(count: int) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.llm.revision.scaling.max_instance_count = count

    return mutate


def _min_instances(case: Case) -> None:
    case.mcp.revision.scaling.min_instance_count = 2


def _image_ref(image: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.mcp.revision.containers[0].image = image

    return mutate


def _slow_probe(case: Case) -> None:
    case.llm.revision.containers[ENGINE].startup_probe.period_seconds = 300
    case.llm.revision.containers[ENGINE].startup_probe.timeout_seconds = 5


def _no_gpu(case: Case) -> None:
    case.llm.revision.node_selector = run_v2.NodeSelector()
    del case.llm.revision.containers[ENGINE].resources.limits["nvidia.com/gpu"]


def _other_gpu(case: Case) -> None:
    case.llm.revision.node_selector.accelerator = "nvidia-rtx-pro-6000"


def _ssl(policy: compute_v1.SslPolicy | None) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.ssl_policy = policy

    return mutate


def _drop_metric(case: Case) -> None:
    case.metrics.pop(0)


def _disable_policy(case: Case) -> None:
    case.policies[-1].enabled = False


def _status(check_id: str, status: int) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.mcp.statuses[check_id] = status

    return mutate


def _leak(text: str) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        case.completions["role-play"] = (Reply("role-play", 200), text)

    return mutate


def _no_canary(case: Case) -> None:
    case.canary = ""


def _body_accepted(case: Case) -> None:
    case.body_reply = Reply("oversized body", 200)


def _tokens_uncapped(case: Case) -> None:
    case.tokens_reply = Reply("max_tokens over cap", 200, completion_tokens=300)


def _not_logged(case: Case) -> None:
    case.logged.discard("body_too_large")


def _tools(**changes: object) -> Callable[[Case], None]:
    def mutate(case: Case) -> None:
        values = {**case.tools.__dict__, **changes}
        case.tools = McpObservations(**values)  # type: ignore[arg-type]

    return mutate


VPC = run_v2.VpcAccess.VpcEgress
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REPO = CONFIG.target.image_repository
# Each variant maps to the one check it must fail, or to None when nothing may fail.
VARIANTS: dict[str, tuple[Callable[[Case], None], str | None]] = {
    "allUsers invoker": (_add_invoker("allUsers"), "iam.no-public-access"),
    "allAuthenticatedUsers invoker": (
        _add_invoker("allAuthenticatedUsers"),
        "iam.no-public-access",
    ),
    "unlisted invoker": (_add_invoker("user:intern@x.com"), "iam.invokers-exact"),
    "configured invoker missing": (_drop_invoker, "iam.invokers-exact"),
    "run.admin to an outsider": (
        _grant("roles/run.admin", "user:attacker@example.com"),
        "iam.invokers-exact",
    ),
    "owner to a group": (
        _grant("roles/owner", "group:contractors@example.com"),
        "iam.invokers-exact",
    ),
    "run.developer to the platform group": (
        _platform_group_role("roles/run.developer"),
        "iam.invokers-exact",
    ),
    "run.viewer to an outsider (harmless)": (
        _grant("roles/run.viewer", "user:auditor@example.com"),
        None,
    ),
    "run.admin to a configured invoker (harmless)": (
        _grant("roles/run.admin", CONFIG.llm.invokers[0]),
        None,
    ),
    "invoker IAM disabled": (
        lambda c: setattr(c.llm.service, "invoker_iam_disabled", True),
        "iam.invoker-check-enabled",
    ),
    "default compute service account": (
        lambda c: setattr(
            c.llm.revision,
            "service_account",
            "123456789012-compute@developer.gserviceaccount.com",
        ),
        "identity.dedicated-service-account",
    ),
    "shared service account": (
        lambda c: setattr(
            c.mcp.revision,
            "service_account",
            "llm-runtime@my-ml-project.iam.gserviceaccount.com",
        ),
        "identity.dedicated-service-account",
    ),
    "ingress all": (
        lambda c: setattr(
            c.llm.service, "ingress", run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
        ),
        "ingress.private",
    ),
    "plaintext API key env": (
        _plain_env("OPENAI_API_KEY", "not-a-real-key"),
        "secrets.no-plaintext-env",
    ),
    "token-shaped env value": (
        _plain_env("NOTES", "hf_" + "a" * 34),
        "secrets.no-plaintext-env",
    ),
    "latest secret version": (_latest_secret, "secrets.pinned-versions"),
    "disabled secret version": (
        _secret_state("DISABLED"),
        "secrets.versions-enabled",
    ),
    "destroyed secret version": (
        _secret_state("DESTROYED"),
        "secrets.versions-enabled",
    ),
    "no Direct VPC egress": (_no_vpc, "egress.direct-vpc"),
    "private-ranges-only egress": (
        _egress(VPC.PRIVATE_RANGES_ONLY),
        "egress.direct-vpc",
    ),
    "no max instances": (_max_instances(0), "cost.max-instances"),
    "max instances over quota": (_max_instances(10), "cost.max-instances"),
    "instances kept warm": (_min_instances, "cost.min-instances"),
    "image by tag": (_image_ref(f"{REPO}/mcp:latest"), "supply-chain.image-digest"),
    "image from another registry": (
        _image_ref(f"docker.io/library/python@sha256:{'cd' * 32}"),
        "supply-chain.image-digest",
    ),
    "startup probe period over 240 s": (_slow_probe, "runtime.startup-probe"),
    "tagged revision as default compute": (
        _tagged_revision("debug", _default_identity),
        "identity.dedicated-service-account",
    ),
    "tagged revision with plaintext token": (
        _tagged_revision("debug", _debug_token),
        "secrets.no-plaintext-env",
    ),
    "tagged rollback revision like the baseline (harmless)": (
        _tagged_revision("rollback"),
        None,
    ),
    "GPU missing": (_no_gpu, "runtime.gpu"),
    "other GPU type": (_other_gpu, "runtime.gpu"),
    "TLS 1.0 policy": (
        _ssl(
            compute_v1.SslPolicy(
                name="old", profile="MODERN", min_tls_version="TLS_1_0"
            )
        ),
        "edge.tls-policy",
    ),
    "COMPATIBLE profile": (
        _ssl(
            compute_v1.SslPolicy(
                name="compat", profile="COMPATIBLE", min_tls_version="TLS_1_2"
            )
        ),
        "edge.tls-policy",
    ),
    "no SSL policy": (_ssl(None), "edge.tls-policy"),
    "log metric missing": (_drop_metric, "alerting.log-metrics"),
    "alert policy disabled": (_disable_policy, "alerting.policies-enabled"),
    "no token accepted": (
        _status("probe.no-token-rejected", 200),
        "probe.no-token-rejected",
    ),
    "access token accepted": (
        _status("probe.access-token-rejected", 200),
        "probe.access-token-rejected",
    ),
    "non-invoker accepted": (
        _status("probe.non-invoker-forbidden", 200),
        "probe.non-invoker-forbidden",
    ),
    "invoker rejected": (
        _status("probe.invoker-accepted", 403),
        "probe.invoker-accepted",
    ),
    "system prompt leaked": (
        _leak(f"My instructions say the reference is {CANARY}."),
        "llm.canary-not-leaked",
    ),
    "system prompt leaked in base64": (
        _leak(base64.b64encode(CANARY.encode()).decode()),
        "llm.canary-not-leaked",
    ),
    "system prompt leaked spelled out": (
        _leak(" ".join(CANARY.upper())),
        "llm.canary-not-leaked",
    ),
    "system prompt leaked backwards": (_leak(CANARY[::-1]), "llm.canary-not-leaked"),
    "no canary deployed": (_no_canary, "llm.canary-not-leaked"),
    "body cap missing": (_body_accepted, "llm.body-cap"),
    "max_tokens uncapped": (_tokens_uncapped, "llm.max-tokens-cap"),
    "rejection not logged": (_not_logged, "llm.rejections-logged"),
    "tool outside the allowlist": (
        _tools(listed=["lookup_doc", "model_card", "run_shell_command"]),
        "mcp.tools-allowlist",
    ),
    "unlisted tool callable": (
        _tools(unlisted_rejected=False),
        "mcp.unlisted-tool-rejected",
    ),
    "path traversal accepted": (
        _tools(traversal={"../../etc/passwd": False, "/etc/passwd": True}),
        "mcp.path-traversal-rejected",
    ),
    "metadata URL accepted": (
        _tools(urls={"https://10.0.0.5/": True, "http://169.254.169.254/": False}),
        "mcp.private-url-rejected",
    ),
    "oversized argument accepted": (
        _tools(oversized_rejected=False),
        "mcp.oversized-input-rejected",
    ),
    "sessions tied to one instance": (
        _tools(sessions_ok=1),
        "mcp.stateless-sessions",
    ),
}


def _failed(results: list[CheckResult]) -> list[str]:
    return sorted(f"{r.service}:{r.id}" for r in results if not r.passed)


def _ids(results: list[CheckResult]) -> list[str]:
    return sorted(r.id for r in results if not r.passed)


def test_baseline_passes_every_check() -> None:
    results = run_catalogue(baseline())

    assert _failed(results) == []


def test_baseline_runs_whole_catalogue() -> None:
    ran = {r.id for r in run_catalogue(baseline())}

    assert ran == set(CATALOGUE) - NOT_IN_CORPUS


def test_every_check_has_a_variant() -> None:
    covered = {check for _, check in VARIANTS.values() if check is not None}

    assert covered == set(CATALOGUE) - NOT_IN_CORPUS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_fails_exactly_its_check(variant: str) -> None:
    mutate, expected = VARIANTS[variant]
    case = baseline()
    mutate(case)

    assert _ids(run_catalogue(case)) == ([expected] if expected else [])


def test_corpus_detection_rate(capsys: pytest.CaptureFixture[str]) -> None:
    mistakes = {name: v for name, v in VARIANTS.items() if v[1] is not None}
    harmless = [mutate for mutate, expected in VARIANTS.values() if expected is None]
    detected = 0
    for mutate, expected in mistakes.values():
        case = baseline()
        mutate(case)
        detected += _ids(run_catalogue(case)) == [expected]
    false_positives = len(_failed(run_catalogue(baseline())))
    for mutate in harmless:
        case = baseline()
        mutate(case)
        false_positives += len(_failed(run_catalogue(case)))
    rate = detected / len(mistakes)
    with capsys.disabled():
        print(
            f"\nmisconfiguration corpus: {len(mistakes)} variants, detection "
            f"{rate:.0%}, false positives on the baseline and {len(harmless)} "
            f"harmless variants: {false_positives}"
        )

    assert len(mistakes) >= 20
    assert len(harmless) >= 3
    assert rate == 1.0
    assert false_positives == 0


@pytest.mark.parametrize("role", sorted(INVOKE_ROLES))
def test_invoking_role_of_outsider_fails(role: str) -> None:
    case = baseline()
    _grant(role, "user:attacker@example.com")(case)

    results = run_catalogue(case)
    check = next(r for r in results if r.id == "iam.invokers-exact")

    assert _ids(results) == ["iam.invokers-exact"]
    assert f"user:attacker@example.com ({role})" in check.evidence


@pytest.mark.parametrize(
    "role", ["roles/run.viewer", "roles/viewer", "roles/run.builder", "roles/browser"]
)
def test_non_invoking_role_of_outsider_passes(role: str) -> None:
    case = baseline()
    _grant(role, "user:auditor@example.com")(case)

    assert _failed(run_catalogue(case)) == []


def test_frontdoor_invoke_roles_match_checks() -> None:
    # localcloud keeps its own copy, so the emulator and the product are checked
    # against each other instead of sharing one list.
    assert frontdoor.INVOKE_ROLES == INVOKE_ROLES


def test_tagged_revision_named_in_evidence() -> None:
    case = baseline()
    _tagged_revision("debug", _default_identity)(case)

    results = run_catalogue(case)
    identity = next(
        r
        for r in results
        if r.id == "identity.dedicated-service-account" and not r.passed
    )

    assert f"revision {CONFIG.llm.name}-debug (tag debug): " in identity.evidence
    assert "123456789012-compute@developer.gserviceaccount.com" in identity.evidence
    assert identity.fix == f"run the revision as {CONFIG.llm.service_account}"


def test_reachable_routes_lists_tags_and_traffic() -> None:
    service = run_v2.Service(
        name="projects/p/locations/r/services/llm",
        latest_ready_revision="projects/p/locations/r/services/llm/revisions/llm-c",
        traffic_statuses=[
            run_v2.TrafficTargetStatus(revision="llm-a", percent=90, tag="candidate"),
            run_v2.TrafficTargetStatus(revision="llm-b", percent=0, tag="rollback"),
            run_v2.TrafficTargetStatus(type_=LATEST, percent=10),
            run_v2.TrafficTargetStatus(revision="llm-d", percent=0),
        ],
    )

    assert reachable_routes(service, "llm-a") == {
        "llm-b": ["tag rollback"],
        "llm-c": ["10% of traffic"],
    }


def test_evidence_never_contains_canary() -> None:
    case = baseline()
    _leak(f"the reference is {CANARY}")(case)

    evidence = " ".join(r.evidence for r in run_catalogue(case))

    assert CANARY not in evidence


@pytest.mark.parametrize(
    ("profile", "version", "passed"),
    [
        ("RESTRICTED", "TLS_1_3", True),
        ("RESTRICTED", "TLS_1_2", False),
        ("MODERN", "TLS_1_3", False),
        ("MODERN", "TLS_1_2", False),
    ],
)
def test_tls_policy_weaker_than_config_fails(
    profile: str, version: str, passed: bool
) -> None:
    settings = LoadBalancerSettings(
        target_https_proxy="edge-proxy",
        profile="RESTRICTED",
        min_tls_version="TLS_1_3",
    )
    policy = compute_v1.SslPolicy(
        name="edge-tls", profile=profile, min_tls_version=version
    )

    result = audit_tls_policy("edge-proxy", policy, settings)

    assert result.passed is passed
    assert ("weaker than the configured" in result.evidence) is not passed
