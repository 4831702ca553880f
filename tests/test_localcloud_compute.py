"""localcloud's Compute REST API, driven by the unmodified google-cloud-compute clients.

The clients are built by the pipeline's own factory helper, so these tests also prove
that they send plain HTTP to loopback, operations included.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from google.cloud.compute_v1.services.ssl_policies.transports import (
    SslPoliciesRestTransport,
)
from google.cloud.compute_v1.services.target_https_proxies.transports import (
    TargetHttpsProxiesRestTransport,
)

from localcloud.api.compute import ComputeServer
from localcloud.server import LOOPBACK, LocalCloud
from tasks.clients import _local_compute_transport

PROJECT = "compute-project"
SELF_LINK_BASE = "https://www.googleapis.com/compute/v1"
TIMEOUT_SECONDS = 30


@dataclass
class Compute:
    url: str
    policies: compute_v1.SslPoliciesClient
    proxies: compute_v1.TargetHttpsProxiesClient
    operations: compute_v1.GlobalOperationsClient


def _start(state_dir: Path) -> tuple[ComputeServer, Compute]:
    server = ComputeServer(LocalCloud(state_dir), LOOPBACK)
    server.start()
    endpoints = SimpleNamespace(compute=server.url)
    policies = compute_v1.SslPoliciesClient(
        transport=_local_compute_transport(SslPoliciesRestTransport, endpoints)
    )
    return server, Compute(
        url=server.url,
        policies=policies,
        proxies=compute_v1.TargetHttpsProxiesClient(
            transport=_local_compute_transport(
                TargetHttpsProxiesRestTransport, endpoints
            )
        ),
        # The client that the policies client polls its operations with.
        operations=policies.transport._extended_operations_services[
            "global_operations"
        ],
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def compute(state_dir: Path) -> Iterator[Compute]:
    server, clients = _start(state_dir)
    try:
        yield clients
    finally:
        server.stop()


def _insert_policy(compute: Compute, **fields: Any) -> compute_v1.SslPolicy:
    compute.policies.insert(
        project=PROJECT, ssl_policy_resource=compute_v1.SslPolicy(**fields)
    ).result(timeout=TIMEOUT_SECONDS)
    return compute.policies.get(project=PROJECT, ssl_policy=fields["name"])


def _insert_proxy(compute: Compute, name: str, **fields: Any) -> None:
    proxy = compute_v1.TargetHttpsProxy(
        name=name,
        url_map="global/urlMaps/web",
        ssl_certificates=["global/sslCertificates/web"],
        **fields,
    )
    compute.proxies.insert(project=PROJECT, target_https_proxy_resource=proxy).result(
        timeout=TIMEOUT_SECONDS
    )


def _attach(compute: Compute, proxy: str, policy: str) -> None:
    compute.proxies.set_ssl_policy(
        project=PROJECT,
        target_https_proxy=proxy,
        ssl_policy_reference_resource=compute_v1.SslPolicyReference(ssl_policy=policy),
    ).result(timeout=TIMEOUT_SECONDS)


def _reason(error: gexc.GoogleAPICallError) -> str:
    reason: str = error.errors[0]["reason"]
    return reason


def test_clients_send_plain_http_to_loopback(compute: Compute) -> None:
    proxy_operations = compute.proxies.transport._extended_operations_services

    assert compute.url.startswith("http://127.0.0.1:")
    assert compute.policies.transport._host == compute.url
    assert compute.proxies.transport._host == compute.url
    assert compute.operations.transport._host == compute.url
    assert proxy_operations["global_operations"].transport._host == compute.url


def test_policy_insert_fills_output_fields(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge")

    assert (
        policy.self_link
        == f"{SELF_LINK_BASE}/projects/{PROJECT}/global/sslPolicies/edge"
    )
    assert policy.kind == "compute#sslPolicy"
    assert policy.id > 0
    assert policy.fingerprint
    assert policy.creation_timestamp.endswith("+00:00")
    # Compute's defaults: the COMPATIBLE profile, which allows TLS 1.0.
    assert policy.profile == "COMPATIBLE"
    assert policy.min_tls_version == "TLS_1_0"


def test_insert_returns_done_operation(compute: Compute) -> None:
    operation = compute.policies.insert(
        project=PROJECT,
        ssl_policy_resource=compute_v1.SslPolicy(name="edge", profile="MODERN"),
    )
    operation.result(timeout=TIMEOUT_SECONDS)
    stored = compute.operations.get(project=PROJECT, operation=operation.name)
    waited = compute.operations.wait(project=PROJECT, operation=operation.name)

    assert operation.done()
    assert stored.status == compute_v1.Operation.Status.DONE
    assert stored.operation_type == "insert"
    assert stored.target_link.endswith("/global/sslPolicies/edge")
    assert waited.name == operation.name


@pytest.mark.parametrize("name", ["Edge", "1edge", "edge-", "edge_tls", "e" * 64, ""])
def test_invalid_policy_name_rejected(compute: Compute, name: str) -> None:
    with pytest.raises(gexc.BadRequest) as caught:
        _insert_policy(compute, name=name)

    assert "resource.name" in caught.value.message
    assert _reason(caught.value) == "invalid"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"profile": "WEAK"}, "resource.profile"),
        ({"min_tls_version": "TLS_0_9"}, "resource.minTlsVersion"),
        ({"custom_features": ["TLS_RSA_WITH_AES_128_GCM_SHA256"]}, "customFeatures"),
        ({"profile": "MODERN", "custom_features": ["X"]}, "customFeatures"),
        ({"profile": "CUSTOM"}, "customFeatures"),
        ({"profile": "MODERN", "min_tls_version": "TLS_1_3"}, "minTlsVersion"),
        ({"profile": "FIPS_202205", "min_tls_version": "TLS_1_0"}, "minTlsVersion"),
    ],
)
def test_invalid_policy_fields_rejected(
    compute: Compute, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(gexc.BadRequest) as caught:
        _insert_policy(compute, name="edge", **fields)

    assert field in caught.value.message
    with pytest.raises(gexc.NotFound):
        compute.policies.get(project=PROJECT, ssl_policy="edge")


def test_valid_profiles_accepted(compute: Compute) -> None:
    custom = _insert_policy(
        compute,
        name="custom",
        profile="CUSTOM",
        custom_features=["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
    )
    restricted = _insert_policy(
        compute, name="restricted", profile="RESTRICTED", min_tls_version="TLS_1_3"
    )

    assert list(custom.custom_features) == ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]
    assert restricted.min_tls_version == "TLS_1_3"


def test_unknown_json_field_rejected(compute: Compute) -> None:
    request = urllib.request.Request(
        f"{compute.url}/compute/v1/projects/{PROJECT}/global/sslPolicies",
        data=json.dumps({"name": "edge", "minTls": "TLS_1_2"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    body = json.loads(caught.value.read())

    assert caught.value.code == 400
    assert body["error"]["code"] == 400
    assert "minTls" in body["error"]["message"]


def test_duplicate_policy_conflicts(compute: Compute) -> None:
    _insert_policy(compute, name="edge")

    with pytest.raises(gexc.Conflict) as caught:
        _insert_policy(compute, name="edge", profile="MODERN")

    assert caught.value.code == 409
    assert _reason(caught.value) == "alreadyExists"
    assert compute.policies.get(project=PROJECT, ssl_policy="edge").profile == (
        "COMPATIBLE"
    )


def test_request_id_makes_insert_idempotent(compute: Compute) -> None:
    request = compute_v1.InsertSslPolicyRequest(
        project=PROJECT,
        ssl_policy_resource=compute_v1.SslPolicy(name="edge"),
        request_id="5b0a1f4e-2c7d-4e8a-9f1b-3d6c8e2a7b40",
    )
    first = compute.policies.insert(request=request)
    second = compute.policies.insert(request=request)

    assert second.name == first.name


def test_patch_needs_current_fingerprint(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge")
    stale = compute_v1.SslPolicy(profile="MODERN", fingerprint="c3RhbGUtZnA=")
    missing = compute_v1.SslPolicy(profile="MODERN")

    with pytest.raises(gexc.PreconditionFailed) as stale_error:
        compute.policies.patch(
            project=PROJECT, ssl_policy="edge", ssl_policy_resource=stale
        )
    with pytest.raises(gexc.PreconditionFailed):
        compute.policies.patch(
            project=PROJECT, ssl_policy="edge", ssl_policy_resource=missing
        )
    compute.policies.patch(
        project=PROJECT,
        ssl_policy="edge",
        ssl_policy_resource=compute_v1.SslPolicy(
            profile="MODERN", min_tls_version="TLS_1_2", fingerprint=policy.fingerprint
        ),
    ).result(timeout=TIMEOUT_SECONDS)
    patched = compute.policies.get(project=PROJECT, ssl_policy="edge")

    assert stale_error.value.code == 412
    assert _reason(stale_error.value) == "conditionNotMet"
    assert patched.profile == "MODERN"
    assert patched.min_tls_version == "TLS_1_2"
    assert patched.fingerprint != policy.fingerprint
    assert patched.id == policy.id
    # The fingerprint read before the patch is stale now.
    with pytest.raises(gexc.PreconditionFailed):
        compute.policies.patch(
            project=PROJECT,
            ssl_policy="edge",
            ssl_policy_resource=compute_v1.SslPolicy(
                profile="COMPATIBLE", fingerprint=policy.fingerprint
            ),
        )


def test_patch_keeps_the_rules(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")

    with pytest.raises(gexc.BadRequest):
        compute.policies.patch(
            project=PROJECT,
            ssl_policy="edge",
            ssl_policy_resource=compute_v1.SslPolicy(
                min_tls_version="TLS_1_3", fingerprint=policy.fingerprint
            ),
        )

    assert compute.policies.get(project=PROJECT, ssl_policy="edge").min_tls_version == (
        "TLS_1_0"
    )


def test_proxy_stores_full_links(compute: Compute) -> None:
    _insert_policy(compute, name="edge", profile="MODERN")
    _insert_proxy(
        compute, "web", ssl_policy=f"projects/{PROJECT}/global/sslPolicies/edge"
    )
    proxy = compute.proxies.get(project=PROJECT, target_https_proxy="web")
    base = f"{SELF_LINK_BASE}/projects/{PROJECT}/global"

    assert proxy.self_link == f"{base}/targetHttpsProxies/web"
    assert proxy.ssl_policy == f"{base}/sslPolicies/edge"
    assert proxy.url_map == f"{base}/urlMaps/web"
    assert list(proxy.ssl_certificates) == [f"{base}/sslCertificates/web"]
    assert proxy.quic_override == "NONE"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url_map": ""}, "resource.urlMap"),
        ({"ssl_certificates": []}, "resource.sslCertificates"),
        ({"quic_override": "MAYBE"}, "resource.quicOverride"),
    ],
)
def test_invalid_proxy_rejected(
    compute: Compute, fields: dict[str, Any], field: str
) -> None:
    proxy = compute_v1.TargetHttpsProxy(
        name="web",
        url_map="global/urlMaps/web",
        ssl_certificates=["global/sslCertificates/web"],
    )
    for key, value in fields.items():
        setattr(proxy, key, value)

    with pytest.raises(gexc.BadRequest) as caught:
        compute.proxies.insert(project=PROJECT, target_https_proxy_resource=proxy)

    assert field in caught.value.message


def test_duplicate_proxy_conflicts(compute: Compute) -> None:
    _insert_proxy(compute, "web")

    with pytest.raises(gexc.Conflict):
        _insert_proxy(compute, "web")


def test_proxy_with_unknown_policy_not_found(compute: Compute) -> None:
    with pytest.raises(gexc.NotFound):
        _insert_proxy(compute, "web", ssl_policy="global/sslPolicies/absent")

    with pytest.raises(gexc.NotFound):
        compute.proxies.get(project=PROJECT, target_https_proxy="web")


def test_set_ssl_policy_attaches_and_detaches(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")
    _insert_proxy(compute, "web")
    before = compute.proxies.get(project=PROJECT, target_https_proxy="web")

    _attach(compute, "web", policy.self_link)
    attached = compute.proxies.get(project=PROJECT, target_https_proxy="web")
    _attach(compute, "web", "")
    detached = compute.proxies.get(project=PROJECT, target_https_proxy="web")

    assert before.ssl_policy == ""
    assert attached.ssl_policy == policy.self_link
    assert attached.fingerprint != before.fingerprint
    assert detached.ssl_policy == ""


def test_set_unknown_ssl_policy_not_found(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")
    _insert_proxy(compute, "web", ssl_policy=policy.self_link)

    with pytest.raises(gexc.NotFound) as caught:
        _attach(compute, "web", "global/sslPolicies/absent")

    assert "sslPolicies/absent" in caught.value.message
    proxy = compute.proxies.get(project=PROJECT, target_https_proxy="web")
    assert proxy.ssl_policy == policy.self_link


def test_set_ssl_policy_on_unknown_proxy_not_found(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")

    with pytest.raises(gexc.NotFound):
        _attach(compute, "absent", policy.self_link)


def test_delete_policy_in_use_rejected(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")
    _insert_proxy(compute, "web", ssl_policy=policy.self_link)

    with pytest.raises(gexc.BadRequest) as caught:
        compute.policies.delete(project=PROJECT, ssl_policy="edge")

    assert _reason(caught.value) == "resourceInUseByAnotherResource"
    assert "targetHttpsProxies/web" in caught.value.message
    assert compute.policies.get(project=PROJECT, ssl_policy="edge").name == "edge"


def test_delete_policy_after_detach(compute: Compute) -> None:
    policy = _insert_policy(compute, name="edge", profile="MODERN")
    _insert_proxy(compute, "web", ssl_policy=policy.self_link)
    _attach(compute, "web", "")

    compute.policies.delete(project=PROJECT, ssl_policy="edge").result(
        timeout=TIMEOUT_SECONDS
    )

    with pytest.raises(gexc.NotFound):
        compute.policies.get(project=PROJECT, ssl_policy="edge")


def test_delete_proxy(compute: Compute) -> None:
    _insert_proxy(compute, "web")

    compute.proxies.delete(project=PROJECT, target_https_proxy="web").result(
        timeout=TIMEOUT_SECONDS
    )

    with pytest.raises(gexc.NotFound):
        compute.proxies.get(project=PROJECT, target_https_proxy="web")


def test_unknown_resources_not_found(compute: Compute) -> None:
    with pytest.raises(gexc.NotFound) as policy_error:
        compute.policies.get(project=PROJECT, ssl_policy="absent")
    with pytest.raises(gexc.NotFound):
        compute.proxies.get(project=PROJECT, target_https_proxy="absent")
    with pytest.raises(gexc.NotFound):
        compute.policies.delete(project=PROJECT, ssl_policy="absent")
    with pytest.raises(gexc.NotFound):
        compute.operations.get(project=PROJECT, operation="operation-absent")

    assert _reason(policy_error.value) == "notFound"


@pytest.mark.parametrize("project", ["Bad_Project", "abc", "x" * 31])
def test_unknown_project_not_found(compute: Compute, project: str) -> None:
    with pytest.raises(gexc.NotFound) as caught:
        compute.policies.get(project=project, ssl_policy="edge")

    assert f"projects/{project}" in caught.value.message


def test_list_pages_through_every_policy(compute: Compute) -> None:
    for name in ("a-edge", "b-edge", "c-edge"):
        _insert_policy(compute, name=name)
    other = compute_v1.SslPolicy(name="elsewhere")
    compute.policies.insert(project="other-project", ssl_policy_resource=other)

    pager = compute.policies.list(
        request=compute_v1.ListSslPoliciesRequest(project=PROJECT, max_results=2)
    )
    first_page = next(iter(pager.pages))
    names = [policy.name for policy in pager]

    assert len(first_page.items) == 2
    assert first_page.next_page_token
    assert names == ["a-edge", "b-edge", "c-edge"]


def test_list_rejects_filters(compute: Compute) -> None:
    with pytest.raises(gexc.BadRequest):
        list(
            compute.policies.list(
                request=compute_v1.ListSslPoliciesRequest(
                    project=PROJECT, filter='name = "edge"'
                )
            )
        )


def test_list_proxies(compute: Compute) -> None:
    _insert_proxy(compute, "web")
    _insert_proxy(compute, "api")

    names = [proxy.name for proxy in compute.proxies.list(project=PROJECT)]

    assert names == ["api", "web"]


def test_state_survives_restart(state_dir: Path) -> None:
    server, compute = _start(state_dir)
    try:
        policy = _insert_policy(compute, name="edge", profile="MODERN")
        _insert_proxy(compute, "web", ssl_policy=policy.self_link)
    finally:
        server.stop()

    server, compute = _start(state_dir)
    try:
        restored = compute.policies.get(project=PROJECT, ssl_policy="edge")
        proxy = compute.proxies.get(project=PROJECT, target_https_proxy="web")
    finally:
        server.stop()

    assert restored.fingerprint == policy.fingerprint
    assert restored.profile == "MODERN"
    assert proxy.ssl_policy == policy.self_link
