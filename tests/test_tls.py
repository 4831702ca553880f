"""The edge TLS step against a real localcloud: create, converge, fix drift, crash.

The `target` fixture creates the local target's proxy without an SSL policy, as the
demo does. Tests that need a clean start use their own proxy and policy names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from localcloud.edge_demo import create_demo_proxy
from localcloud.server import Endpoints, LocalCloud
from tasks.checks import audit_tls_policy
from tasks.clients import Clients, clients_for
from tasks.config import LoadBalancerSettings, RefreshConfig, load_config
from tasks.errors import LoadBalancerError
from tasks.tls import ensure_edge_tls, read_edge_tls, resource_path

TIMEOUT_SECONDS = 30


@pytest.fixture(scope="module")
def config(target: Path) -> RefreshConfig:
    return load_config(target)


@pytest.fixture(scope="module")
def clients(config: RefreshConfig) -> Clients:
    return clients_for(config.target)


@pytest.fixture(scope="module")
def settings(config: RefreshConfig) -> LoadBalancerSettings:
    assert config.load_balancer is not None
    return config.load_balancer


def _fresh(cloud: LocalCloud, clients: Clients, name: str, **fields: Any) -> Any:
    """Create a proxy named `name` without a policy; return settings for it."""
    compute_url = Endpoints.read(cloud.state_dir).compute
    assert create_demo_proxy(compute_url, clients.target.project, f"{name}-proxy")
    return LoadBalancerSettings(
        target_https_proxy=f"{name}-proxy", ssl_policy=f"{name}-tls", **fields
    )


def _policy(clients: Clients, name: str) -> compute_v1.SslPolicy:
    return clients.ssl_policies.get(project=clients.target.project, ssl_policy=name)


def _weaken(clients: Clients, name: str, **fields: str) -> None:
    current = _policy(clients, name)
    clients.ssl_policies.patch(
        project=clients.target.project,
        ssl_policy=name,
        ssl_policy_resource=compute_v1.SslPolicy(
            fingerprint=current.fingerprint, **fields
        ),
    ).result(timeout=TIMEOUT_SECONDS)


def _detach(clients: Clients, proxy: str) -> None:
    clients.target_https_proxies.set_ssl_policy(
        project=clients.target.project,
        target_https_proxy=proxy,
        ssl_policy_reference_resource=compute_v1.SslPolicyReference(),
    ).result(timeout=TIMEOUT_SECONDS)


class TestDemoProxy:
    """The local target's proxy: weak at first, then fixed once and left alone."""

    def test_demo_proxy_starts_without_policy(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        proxy, policy = read_edge_tls(clients, settings)

        assert proxy == settings.target_https_proxy
        assert policy is None
        assert not audit_tls_policy(proxy, policy).passed

    def test_first_run_creates_and_attaches(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        result = ensure_edge_tls(clients, settings)
        proxy, policy = read_edge_tls(clients, settings)

        assert len(result.changes) == 2
        assert result.changes[0].startswith(f"created SSL policy {settings.ssl_policy}")
        assert result.changes[1].startswith(
            f"attached SSL policy {settings.ssl_policy}"
        )
        assert policy is not None
        assert policy.profile == "MODERN"
        assert policy.min_tls_version == "TLS_1_2"
        assert result.ssl_policy == policy.self_link
        assert result.proxy.endswith(f"/targetHttpsProxies/{proxy}")
        assert audit_tls_policy(proxy, policy).passed

    def test_rerun_changes_nothing(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        before = _policy(clients, settings.ssl_policy)

        result = ensure_edge_tls(clients, settings)

        assert result.changes == ()
        assert _policy(clients, settings.ssl_policy).fingerprint == before.fingerprint

    def test_weakened_profile_is_fixed(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        _weaken(clients, settings.ssl_policy, profile="COMPATIBLE")

        result = ensure_edge_tls(clients, settings)

        assert len(result.changes) == 1
        assert "profile COMPATIBLE -> MODERN" in result.changes[0]
        assert _policy(clients, settings.ssl_policy).profile == "MODERN"

    def test_lowered_min_tls_is_fixed(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        _weaken(clients, settings.ssl_policy, min_tls_version="TLS_1_0")

        result = ensure_edge_tls(clients, settings)

        assert len(result.changes) == 1
        assert "min TLS TLS_1_0 -> TLS_1_2" in result.changes[0]
        assert _policy(clients, settings.ssl_policy).min_tls_version == "TLS_1_2"

    def test_detached_policy_is_reattached(
        self, clients: Clients, settings: LoadBalancerSettings
    ) -> None:
        _detach(clients, settings.target_https_proxy)

        result = ensure_edge_tls(clients, settings)
        _, policy = read_edge_tls(clients, settings)

        assert len(result.changes) == 1
        assert result.changes[0].startswith("attached SSL policy")
        assert "TLS 1.0 was allowed" in result.changes[0]
        assert policy is not None
        assert policy.name == settings.ssl_policy


def test_other_policy_on_proxy_is_replaced(cloud: LocalCloud, clients: Clients) -> None:
    settings = _fresh(cloud, clients, "swap")
    project = clients.target.project
    clients.ssl_policies.insert(
        project=project,
        ssl_policy_resource=compute_v1.SslPolicy(name="swap-old", profile="MODERN"),
    ).result(timeout=TIMEOUT_SECONDS)
    clients.target_https_proxies.set_ssl_policy(
        project=project,
        target_https_proxy=settings.target_https_proxy,
        ssl_policy_reference_resource=compute_v1.SslPolicyReference(
            ssl_policy="global/sslPolicies/swap-old"
        ),
    ).result(timeout=TIMEOUT_SECONDS)

    result = ensure_edge_tls(clients, settings)
    _, policy = read_edge_tls(clients, settings)

    assert policy is not None
    assert policy.name == "swap-tls"
    assert (
        f"it had projects/{project}/global/sslPolicies/swap-old" in result.changes[-1]
    )


def test_restricted_tls_1_3_patches_both(cloud: LocalCloud, clients: Clients) -> None:
    modern = _fresh(cloud, clients, "strict")
    ensure_edge_tls(clients, modern)
    restricted = modern.model_copy(
        update={"profile": "RESTRICTED", "min_tls_version": "TLS_1_3"}
    )

    result = ensure_edge_tls(clients, restricted)
    policy = _policy(clients, restricted.ssl_policy)

    assert len(result.changes) == 1
    assert "profile MODERN -> RESTRICTED" in result.changes[0]
    assert "min TLS TLS_1_2 -> TLS_1_3" in result.changes[0]
    assert policy.profile == "RESTRICTED"
    assert policy.min_tls_version == "TLS_1_3"


def test_missing_proxy_is_clear_error(clients: Clients) -> None:
    settings = LoadBalancerSettings(
        target_https_proxy="absent-proxy", ssl_policy="absent-tls"
    )

    with pytest.raises(LoadBalancerError) as caught:
        ensure_edge_tls(clients, settings)

    message = str(caught.value)
    assert "'absent-proxy' not found" in message
    assert "does not create one" in message
    assert "remove load_balancer from the target config" in message
    # The proxy is read before any write, so no policy was created.
    with pytest.raises(gexc.NotFound):
        _policy(clients, "absent-tls")


class Crash(Exception):
    pass


def test_crash_between_create_and_attach_converges(
    cloud: LocalCloud, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _fresh(cloud, clients, "crash")

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Crash("killed before set_ssl_policy")

    with monkeypatch.context() as patch:
        patch.setattr(clients.target_https_proxies, "set_ssl_policy", killed)
        with pytest.raises(Crash):
            ensure_edge_tls(clients, settings)
    created = _policy(clients, settings.ssl_policy)
    proxy_name, attached = read_edge_tls(clients, settings)

    result = ensure_edge_tls(clients, settings)
    _, policy = read_edge_tls(clients, settings)

    assert attached is None
    assert created.profile == "MODERN"
    assert len(result.changes) == 1
    assert result.changes[0].startswith("attached SSL policy crash-tls")
    assert policy is not None
    assert resource_path(policy.self_link) == resource_path(created.self_link)
    assert audit_tls_policy(proxy_name, policy).passed


def test_crash_after_patch_converges(
    cloud: LocalCloud, clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _fresh(cloud, clients, "repatch")
    ensure_edge_tls(clients, settings)
    _weaken(
        clients, settings.ssl_policy, profile="COMPATIBLE", min_tls_version="TLS_1_0"
    )
    real_patch = clients.ssl_policies.patch

    def patch_then_crash(*args: Any, **kwargs: Any) -> None:
        real_patch(*args, **kwargs).result(timeout=TIMEOUT_SECONDS)
        raise Crash("killed after the patch")

    with monkeypatch.context() as patch:
        patch.setattr(clients.ssl_policies, "patch", patch_then_crash)
        with pytest.raises(Crash):
            ensure_edge_tls(clients, settings)

    result = ensure_edge_tls(clients, settings)

    assert result.changes == ()
    assert result.profile == "MODERN"
    assert result.min_tls_version == "TLS_1_2"
