"""Bad config and parameters fail before any cloud call, naming field, value, fix."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from tasks.config import (
    INGRESS_CONTAINER_PORT,
    MCP_SERVER_SOURCE,
    load_config,
    mcp_tool_names,
    parse_request,
)
from tasks.errors import ConfigError
from tests.conftest import REPO_ROOT, local_target_data, write_target


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
    assert "'all'" in message
    assert "use 'internal'" in message


def test_unknown_ingress_shows_value(tmp_path: Path) -> None:
    message = _config_error(tmp_path, lambda d: d["mcp"].update(ingress="public"))
    assert "mcp.ingress" in message
    assert "got 'public'" in message
    assert "'internal-and-cloud-load-balancing'" in message


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


# --- values that must fail at load, before any cloud call ---------------------------


def _load_changed(tmp_path: Path, change: Any) -> None:
    data = copy.deepcopy(local_target_data())
    change(data)
    load_config(write_target(tmp_path / "target.yaml", data))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_model_gib", math.inf),
        ("key_rollback_window_hours", math.inf),
        ("key_destroy_grace_hours", -math.inf),
        ("model_load_mib_per_second", math.inf),
        ("startup_margin", math.nan),
    ],
)
def test_non_finite_float_rejected(tmp_path: Path, field: str, value: float) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, lambda d: d["llm"].update({field: value}))
    message = str(caught.value)
    assert f"llm.{field}" in message
    assert "finite number" in message
    assert f"got {value!r}" in message


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("key_rollback_window_hours", 1e12, "8760"),
        ("key_destroy_grace_hours", 1e12, "8760"),
        ("expected_model_gib", 1e30, "1024"),
        ("model_load_mib_per_second", 1e300, "1000000"),
    ],
)
def test_huge_float_rejected(
    tmp_path: Path, field: str, value: float, bound: str
) -> None:
    message = _config_error(tmp_path, lambda d: d["llm"].update({field: value}))
    assert f"llm.{field}" in message
    assert bound in message
    assert repr(value) in message


def test_inf_written_as_yaml_rejected(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    text = Path("deployments/targets/local.yaml").read_text()
    path.write_text(
        text.replace(
            "  max_tokens_cap: 64\n",
            "  max_tokens_cap: 64\n  expected_model_gib: .inf\n",
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "llm.expected_model_gib" in str(caught.value)
    assert "got inf" in str(caught.value)


def test_non_utf8_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_bytes(b"target:\n  project: caf\xe9-project\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not UTF-8" in message
    assert "0xe9" in message


def test_directory_target_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    message = str(caught.value)
    assert "is a directory" in message
    assert "not found" not in message
    assert str(tmp_path) in message


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file_lists_sections(tmp_path: Path, text: str) -> None:
    path = tmp_path / "target.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "is empty" in message
    assert "target, llm, mcp, probe_principal, outsider_principal, alerts" in message
    assert "valid dictionary" not in message


def test_list_file_needs_mapping(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text("- target\n- llm\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "YAML list, not a mapping" in str(caught.value)


def test_same_service_names_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, lambda d: d["mcp"].update(name=d["llm"]["name"]))
    message = str(caught.value)
    assert "mcp.name" in message
    assert "'llm'" in message
    assert "different names" in message


@pytest.mark.parametrize(
    ("service", "field", "value"),
    [
        ("llm", "cpu", "lots"),
        ("mcp", "cpu", "0"),
        ("mcp", "cpu", "0m"),
        ("mcp", "cpu", "-1"),
        ("mcp", "cpu", "1.5"),
        ("mcp", "cpu", "9"),
        ("mcp", "cpu", "0.01"),
        ("mcp", "cpu", "1 "),
        ("mcp", "cpu", "1\n"),
        ("mcp", "memory", "1Gi\n"),
        ("mcp", "memory", "big"),
        ("mcp", "memory", "-5Gi"),
        ("mcp", "memory", "0Mi"),
        ("mcp", "memory", "2GB"),
        ("mcp", "memory", "512"),
        ("mcp", "memory", "64Gi"),
        ("llm", "guard_cpu", "fast"),
        ("llm", "guard_memory", "1Tb"),
    ],
)
def test_malformed_resources_rejected(
    tmp_path: Path, service: str, field: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, lambda d: d[service].update({field: value}))
    message = str(caught.value)
    assert f"{service}.{field}" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("cpu", "memory"),
    [("1000m", "1024Mi"), ("1", "1G"), ("2", "8Gi"), ("4", "2Gi"), ("8", "32Gi")],
)
def test_cloud_run_resource_pairs_accepted(
    tmp_path: Path, cpu: str, memory: str
) -> None:
    data = copy.deepcopy(local_target_data())
    data["mcp"].update(cpu=cpu, memory=memory)
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert config.mcp.cpu == cpu
    assert config.mcp.memory == memory


def test_yaml_number_cpu_becomes_text(tmp_path: Path) -> None:
    data = copy.deepcopy(local_target_data())
    data["mcp"].update(cpu=2, memory="2Gi")
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert config.mcp.cpu == "2"


@pytest.mark.parametrize(
    ("service", "values", "reason"),
    [
        ("mcp", {"cpu": "3"}, "3 vCPU per instance, which Cloud Run does not offer"),
        ("mcp", {"cpu": "500m"}, "first generation execution environment"),
        ("mcp", {"memory": "8Gi"}, "allows 0.5 to 4 GiB with 1 vCPU"),
        ("mcp", {"cpu": "4", "memory": "1Gi"}, "allows 2 to 16 GiB with 4 vCPU"),
        ("mcp", {"cpu": "8", "memory": "2Gi"}, "allows 4 to 32 GiB with 8 vCPU"),
        ("llm", {"cpu": "2"}, "3 vCPU per instance"),
        ("llm", {"memory": "8Gi"}, "allows 0.5 to 8 GiB with 2 vCPU"),
    ],
)
def test_instance_resources_checked(
    tmp_path: Path, service: str, values: dict[str, str], reason: str
) -> None:
    message = _config_error(tmp_path, lambda d: d[service].update(values))
    assert f"  {service}: " in message
    assert reason in message
    for value in values.values():
        assert repr(value) in message


def test_unknown_tool_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load_changed(tmp_path, lambda d: d["mcp"].update(tool_allowlist=["shell"]))
    message = str(caught.value)
    assert "mcp.tool_allowlist" in message
    assert "'shell'" in message
    assert "model_card, lookup_doc, cite_source" in message


def test_duplicate_tool_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path,
        lambda d: d["mcp"].update(tool_allowlist=["model_card", "model_card"]),
    )
    assert "mcp.tool_allowlist" in message
    assert "'model_card' more than once" in message


def test_every_server_tool_accepted(tmp_path: Path) -> None:
    data = copy.deepcopy(local_target_data())
    data["mcp"]["tool_allowlist"] = list(mcp_tool_names())
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert "cite_source" in config.mcp.tool_allowlist


def test_tool_names_match_server() -> None:
    from containers.mcp.server import TOOL_FACTORIES

    assert MCP_SERVER_SOURCE.is_file()
    assert mcp_tool_names() == tuple(TOOL_FACTORIES)


@pytest.mark.parametrize("email", ["not an email", "", "oncall@", "@example.com"])
def test_bad_notification_email_rejected(tmp_path: Path, email: str) -> None:
    message = _config_error(
        tmp_path, lambda d: d["alerts"].update(notification_email=email)
    )
    assert "alerts.notification_email" in message
    assert repr(email) in message
    assert "not an email address" in message


@pytest.mark.parametrize("principal", ["", "user:someone@example.com", "x y"])
def test_outsider_must_be_service_account(tmp_path: Path, principal: str) -> None:
    message = _config_error(tmp_path, lambda d: d.update(outsider_principal=principal))
    assert "outsider_principal" in message
    assert repr(principal) in message
    assert "not a service account email" in message


def test_outsider_equal_to_probe_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, lambda d: d.update(outsider_principal=d["probe_principal"])
    )
    assert "outsider_principal 'refresh-probe@" in message
    assert "is also the probe_principal" in message


def test_outsider_invoker_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path,
        lambda d: d.update(
            outsider_principal="mcp-runtime@local-project.iam.gserviceaccount.com"
        ),
    )
    assert "outsider_principal 'mcp-runtime@" in message
    assert "is an invoker" in message


@pytest.mark.parametrize(
    ("command", "index"), [([""], 0), (["python3", " "], 1), (["", "x"], 0)]
)
def test_empty_engine_argument_rejected(
    tmp_path: Path, command: list[str], index: int
) -> None:
    message = _config_error(tmp_path, lambda d: d["llm"].update(engine_command=command))
    assert "llm.engine_command" in message
    assert f"entry {index} is {command[index]!r}" in message


def test_empty_engine_command_rejected(tmp_path: Path) -> None:
    message = _config_error(tmp_path, lambda d: d["llm"].update(engine_command=[]))
    assert "llm.engine_command" in message


def test_engine_port_on_ingress_rejected(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, lambda d: d["llm"].update(engine_port=INGRESS_CONTAINER_PORT)
    )
    assert "llm.engine_port" in message
    assert "8080 is the port of the guard container" in message


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_engine_port_out_of_range_rejected(tmp_path: Path, port: int) -> None:
    message = _config_error(tmp_path, lambda d: d["llm"].update(engine_port=port))
    assert "llm.engine_port" in message
    assert f"got {port}" in message


@pytest.mark.parametrize(
    ("section", "allowed"),
    [
        ("llm", "service_account"),
        ("mcp", "tool_allowlist"),
        ("alerts", "rate_limit_seconds"),
        ("target", "localcloud_state_dir"),
    ],
)
def test_unknown_key_lists_allowed(tmp_path: Path, section: str, allowed: str) -> None:
    message = _config_error(tmp_path, lambda d: d[section].update(colour="blue"))
    assert f"{section}.colour: unknown key 'colour'" in message
    assert f"{section} accepts" in message
    assert allowed in message


def test_unknown_nested_key_lists_allowed(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path, lambda d: d["llm"].update(gpu={"type": "nvidia-l4", "cnt": 1})
    )
    assert "llm.gpu.cnt: unknown key 'cnt'" in message
    assert "llm.gpu accepts type, count, zonal_redundancy" in message


def test_unknown_top_level_key_lists_sections(tmp_path: Path) -> None:
    message = _config_error(tmp_path, lambda d: d.update(region="us-central1"))
    assert "unknown key 'region'" in message
    assert "the top level accepts target, llm, mcp" in message


def test_unknown_request_key_lists_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_request({"repo": "local-models/tiny-llama"})
    assert "unknown key 'repo'" in str(caught.value)
    assert "repo_id" in str(caught.value)


@pytest.mark.parametrize(
    "region", ["us central1/../x", "US-CENTRAL1", "", "us-central", "global"]
)
def test_malformed_region_rejected(tmp_path: Path, region: str) -> None:
    message = _config_error(tmp_path, lambda d: d["target"].update(region=region))
    assert "target.region" in message
    assert repr(region) in message
    assert "'us-central1'" in message


@pytest.mark.parametrize(
    "region", ["europe-west4", "northamerica-northeast1", "me-central2"]
)
def test_real_regions_accepted(tmp_path: Path, region: str) -> None:
    data = copy.deepcopy(local_target_data())
    data["target"]["region"] = region
    config = load_config(write_target(tmp_path / "target.yaml", data))
    assert config.target.region == region


def test_repeated_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    text = (REPO_ROOT / "deployments" / "targets" / "local.yaml").read_text()
    path.write_text(text + "\nreport_dir: other-reports\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "'report_dir' twice" in str(caught.value)


def test_deeply_nested_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "nests too deeply" in str(caught.value)
