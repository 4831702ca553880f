"""Modern TLS at the edge: the SSL policy of the external load balancer's HTTPS proxy.

The pipeline does not create load balancers. It keeps one global SSL policy at the
configured profile and minimum TLS version, and attaches it to the configured target
HTTPS proxy. Each step reads first and writes only what differs, so a rerun after a
crash between any two calls converges.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.clients import Clients
from tasks.config import LoadBalancerSettings
from tasks.errors import LoadBalancerError

logger = logging.getLogger(__name__)

OPERATION_TIMEOUT_SECONDS = 120.0
# Each attempt reads the policy and makes at most one write. Two attempts suffice
# without interference; the rest absorb writes by a concurrent run.
POLICY_ATTEMPTS = 4
POLICY_DESCRIPTION = "Managed by model-refresh: modern TLS at the load balancer"
# Compute returns links on www.googleapis.com and accepts them on compute.googleapis.com
# too, so links are compared without the host.
_LINK_PREFIX = re.compile(r"^https://[^/]+/compute/v1/")
_POLICY_PATH = re.compile(
    r"^projects/(?P<project>[^/]+)/global/sslPolicies/(?P<name>[^/]+)$"
)


@dataclass(frozen=True)
class EdgeTls:
    """The SSL policy attached to the proxy after a run, and what the run changed."""

    proxy: str  # self link of the target HTTPS proxy
    ssl_policy: str  # self link of the attached SSL policy
    profile: str
    min_tls_version: str
    changes: tuple[str, ...]  # empty when everything was already in place

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resource_path(link: str) -> str:
    """Return `projects/...` for a Compute link in any of its accepted forms."""
    return _LINK_PREFIX.sub("", link)


def read_proxy(
    clients: Clients, settings: LoadBalancerSettings
) -> compute_v1.TargetHttpsProxy:
    """Read the configured target HTTPS proxy; raise LoadBalancerError when missing."""
    project = clients.target.project
    try:
        return clients.target_https_proxies.get(
            project=project, target_https_proxy=settings.target_https_proxy
        )
    except gexc.NotFound:
        raise LoadBalancerError(
            f"target HTTPS proxy {settings.target_https_proxy!r} not found in project "
            f"{project}: the pipeline secures an existing load balancer but does not "
            "create one. Create the load balancer with this proxy, or remove "
            "load_balancer from the target config."
        ) from None


def read_edge_tls(
    clients: Clients, settings: LoadBalancerSettings
) -> tuple[str, compute_v1.SslPolicy | None]:
    """Return the proxy's name and its attached SSL policy, or None when it has none.

    Raises LoadBalancerError when the proxy does not exist.
    """
    proxy = read_proxy(clients, settings)
    match = _POLICY_PATH.match(resource_path(proxy.ssl_policy))
    if match is None:
        return proxy.name, None
    try:
        policy = clients.ssl_policies.get(
            project=match["project"], ssl_policy=match["name"]
        )
    except gexc.NotFound:
        # Compute rejects deleting a policy that a proxy uses, so this only happens
        # when the policy is deleted between the two reads.
        return proxy.name, None
    return proxy.name, policy


def _matches(policy: compute_v1.SslPolicy, settings: LoadBalancerSettings) -> bool:
    return (
        policy.profile == settings.profile
        and policy.min_tls_version == settings.min_tls_version
    )


def _ensure_policy(
    clients: Clients, settings: LoadBalancerSettings, changes: list[str]
) -> compute_v1.SslPolicy:
    """Create the SSL policy or patch it until it has the configured settings."""
    project = clients.target.project
    name = settings.ssl_policy
    for _ in range(POLICY_ATTEMPTS):
        try:
            current = clients.ssl_policies.get(project=project, ssl_policy=name)
        except gexc.NotFound:
            new_policy = compute_v1.SslPolicy(
                name=name,
                description=POLICY_DESCRIPTION,
                profile=settings.profile,
                min_tls_version=settings.min_tls_version,
            )
            try:
                clients.ssl_policies.insert(
                    project=project, ssl_policy_resource=new_policy
                ).result(timeout=OPERATION_TIMEOUT_SECONDS)
            except gexc.Conflict:
                # A concurrent run created it after our read; read it back.
                continue
            changes.append(
                f"created SSL policy {name} (profile {settings.profile}, min TLS "
                f"{settings.min_tls_version})"
            )
            continue
        if _matches(current, settings):
            return current
        patch = compute_v1.SslPolicy(
            profile=settings.profile,
            min_tls_version=settings.min_tls_version,
            fingerprint=current.fingerprint,
        )
        try:
            clients.ssl_policies.patch(
                project=project, ssl_policy=name, ssl_policy_resource=patch
            ).result(timeout=OPERATION_TIMEOUT_SECONDS)
        except gexc.PreconditionFailed:
            # The policy changed after our read, so the fingerprint is stale.
            continue
        changes.append(
            f"patched SSL policy {name}: profile {current.profile or 'COMPATIBLE'} -> "
            f"{settings.profile}, min TLS {current.min_tls_version or 'TLS_1_0'} -> "
            f"{settings.min_tls_version}"
        )
    raise LoadBalancerError(
        f"SSL policy {name!r} in project {project} did not reach profile "
        f"{settings.profile} and min TLS {settings.min_tls_version} after "
        f"{POLICY_ATTEMPTS} attempts, because something else keeps changing it: stop "
        "the other writer (another run, or Terraform managing the same policy) and "
        "rerun."
    )


def ensure_edge_tls(clients: Clients, settings: LoadBalancerSettings) -> EdgeTls:
    """Create or fix the SSL policy and attach it to the target HTTPS proxy.

    The proxy is read first, so a missing proxy raises LoadBalancerError before any
    write.
    """
    proxy = read_proxy(clients, settings)
    changes: list[str] = []
    policy = _ensure_policy(clients, settings, changes)
    if resource_path(proxy.ssl_policy) != resource_path(policy.self_link):
        clients.target_https_proxies.set_ssl_policy(
            project=clients.target.project,
            target_https_proxy=proxy.name,
            ssl_policy_reference_resource=compute_v1.SslPolicyReference(
                ssl_policy=policy.self_link
            ),
        ).result(timeout=OPERATION_TIMEOUT_SECONDS)
        changes.append(
            f"attached SSL policy {policy.name} to {proxy.name} (it had "
            f"{resource_path(proxy.ssl_policy) or 'no policy, so TLS 1.0 was allowed'})"
        )
    for change in changes:
        logger.info("edge TLS: %s", change)
    return EdgeTls(
        proxy=proxy.self_link,
        ssl_policy=policy.self_link,
        profile=policy.profile,
        min_tls_version=policy.min_tls_version,
        changes=tuple(changes),
    )


@task(cache_policy=NO_CACHE)
def ensure_edge_tls_task(clients: Clients, settings: LoadBalancerSettings) -> EdgeTls:
    """Run ensure_edge_tls as a Prefect task and log what it changed."""
    result = ensure_edge_tls(clients, settings)
    run_logger = get_run_logger()
    if result.changes:
        run_logger.info(
            "Edge TLS fixed on %s: %s", result.proxy, "; ".join(result.changes)
        )
    else:
        run_logger.info(
            "Edge TLS already in place: %s uses %s (%s, min %s)",
            result.proxy,
            result.ssl_policy,
            result.profile,
            result.min_tls_version,
        )
    return result
