"""Bad config and parameters fail before any cloud call, naming field, value, fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tasks.config import load_config, parse_request
from tasks.errors import ConfigError
from tests.conftest import local_target_data, write_target


def _config_error(tmp_path: Path, change: Any) -> str:
    data = copy.deepcopy(local_target_data())
    change(data)
    path = write_target(tmp_path / "target.yaml", data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_local_target_is_valid() -> None:
    config = load_config(Path("deployments/targets/local.yaml"))
    assert config.target.kind == "local"


def test_gcp_example_is_valid() -> None:
    config = load_config(Path("deployments/targets/gcp.example.yaml"))
    assert config.llm.gpu is not None


@pytest.mark.parametrize("member", ["allUsers", "allAuthenticatedUsers"])
def test_public_invoker_rejected(tmp_path: Path, member: str) -> None:
    message = _config_error(tmp_path, lambda d: d["mcp"]["invokers"].append(member))
    assert "mcp.invokers" in message
    assert repr(member) in message
    assert "makes the service public" in message


def test_unknown_gpu_type_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, lambda d: d["llm"].update(gpu={"type": "nvidia-h100", "count": 1})
    )
    assert "llm.gpu.type" in message
    assert "'nvidia-h100'" in message
    assert "nvidia-l4" in message


def test_default_compute_service_account_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path,
        lambda d: d["llm"].update(
            service_account="123456789012-compute@developer.gserviceaccount.com"
        ),
    )
    assert "Compute Engine default service account" in message


def test_ingress_all_rejected(tmp_path: Path) -> None:
    message = _config_error(tmp_path, lambda d: d["llm"].update(ingress="all"))
    assert "llm.ingress" in message


def test_missing_max_instances_rejected(tmp_path: Path) -> None:
    message = _config_error(tmp_path, lambda d: d["mcp"].pop("max_instances"))
    assert "mcp.max_instances" in message


def test_probe_principal_must_invoke(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path,
        lambda d: d.update(
            probe_principal="someone-else@local-project.iam.gserviceaccount.com"
        ),
    )
    assert "probe_principal" in message
    assert "add 'serviceAccount:someone-else" in message


def test_missing_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "repo_id",
    ["no-slash", "a/b/c", "org/name with space", "org/na--me", "/leading", "org/"],
)
def test_malformed_repo_id_rejected(repo_id: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_request({"repo_id": repo_id})
    assert "repo_id" in str(caught.value)
    assert repr(repo_id) in str(caught.value)


def test_patterns_without_weights_rejected() -> None:
    with pytest.raises(ConfigError, match="match no safetensors weights"):
        parse_request({"allow_patterns": ["*.json"]})


def test_absolute_pattern_rejected() -> None:
    with pytest.raises(ConfigError, match="can never match"):
        parse_request({"allow_patterns": ["/etc/*.safetensors"]})


def test_load_balancer_defaults() -> None:
    config = load_config(Path("deployments/targets/local.yaml"))
    assert config.load_balancer is not None
    assert config.load_balancer.profile == "MODERN"
    assert config.load_balancer.min_tls_version == "TLS_1_2"


def test_load_balancer_is_optional(tmp_path: Path) -> None:
    data = copy.deepcopy(local_target_data())
    del data["load_balancer"]
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert config.load_balancer is None


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("profile", "COMPATIBLE", "allows TLS 1.0"),
        ("profile", "CUSTOM", "accepts only MODERN or RESTRICTED"),
        ("profile", "modern", "is invalid"),
        ("min_tls_version", "TLS_1_0", "deprecated (RFC 8996)"),
        ("min_tls_version", "TLS_1_1", "deprecated (RFC 8996)"),
        ("min_tls_version", "1.2", "is invalid"),
    ],
)
def test_weak_load_balancer_tls_rejected(
    tmp_path: Path, field: str, value: str, reason: str
) -> None:
    message = _config_error(
        tmp_path, lambda d: d["load_balancer"].update({field: value})
    )
    assert f"load_balancer.{field}" in message
    assert repr(value) in message
    assert reason in message


@pytest.mark.parametrize("field", ["target_https_proxy", "ssl_policy"])
def test_load_balancer_name_must_be_rfc1035(tmp_path: Path, field: str) -> None:
    message = _config_error(
        tmp_path, lambda d: d["load_balancer"].update({field: "Edge_Proxy"})
    )
    assert f"load_balancer.{field}" in message
    assert "'Edge_Proxy'" in message
    assert "lowercase letters, digits or hyphens" in message


def test_tls_1_3_needs_restricted_profile(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, lambda d: d["load_balancer"].update(min_tls_version="TLS_1_3")
    )
    assert "load_balancer" in message
    assert "needs profile 'RESTRICTED', not 'MODERN'" in message


def test_tls_1_3_restricted_accepted(tmp_path: Path) -> None:
    data = copy.deepcopy(local_target_data())
    data["load_balancer"].update(profile="RESTRICTED", min_tls_version="TLS_1_3")
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert config.load_balancer is not None
    assert config.load_balancer.min_tls_version == "TLS_1_3"
