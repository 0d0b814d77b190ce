"""`audit-config`: one row per misconfiguration, each caught with the right severity.

Every row starts from the hardened config (which must audit clean), changes one thing (a key, a
line of raw text, the command line or the environment) and names the findings it must cause.
No other medium or high finding may appear, so a row also proves the rule is precise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secure_handler.cli import main
from secure_handler.deploy.audit import (
    AuditContext,
    audit,
    audit_file,
    blocking,
    format_findings,
    format_markdown,
    parse_cmdline,
)
from secure_handler.deploy.tsconfig import (
    DEFAULT_ALLOWED_URLS,
    HandlerLimits,
    ModelSpec,
    hardened_properties,
    render_properties,
    store_allowed_urls,
)

LIMITS = HandlerLimits(max_request_bytes=1024 * 1024, max_batch_size=8)


@dataclass
class Row:
    id: str
    expect: list[tuple[str, str]]
    set: dict[str, str] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    raw: str = ""  # appended verbatim, for what a key=value mapping cannot express
    cmdline: str | None = None
    env: dict[str, str] = field(default_factory=dict)


GOOD_CMD = "torchserve --start --ncs --ts-config {config} --model-store {store}"

ROWS = [
    # Addresses
    Row("inference_wildcard", [("inference_address", "high")],
        set={"inference_address": "http://0.0.0.0:8080"}),
    Row("management_public_ip", [("management_address", "high")],
        set={"management_address": "http://10.1.2.3:8081"}),
    Row("inference_hostname", [("inference_address", "high")],
        set={"inference_address": "http://api.example.com:8080"}),
    Row("management_public_tls", [("management_address", "medium")],
        set={"management_address": "https://0.0.0.0:8081", "certificate_file": "{tmp}/c.pem",
             "private_key_file": "{tmp}/k.pem"}),
    Row("inference_public_tls", [("inference_address", "low")],
        set={"inference_address": "https://0.0.0.0:8443", "certificate_file": "{tmp}/c.pem",
             "private_key_file": "{tmp}/k.pem"}),
    Row("metrics_public", [("metrics_address", "medium")],
        set={"metrics_address": "http://0.0.0.0:8082"}),
    Row("grpc_inference_wildcard", [("grpc_inference_address", "high")],
        set={"grpc_inference_address": "0.0.0.0"}),
    Row("grpc_management_ipv6_wildcard", [("grpc_management_address", "high")],
        set={"grpc_management_address": "::"}),
    Row("grpc_management_public_ssl", [("grpc_management_address", "medium")],
        set={"grpc_management_address": "0.0.0.0", "enable_grpc_ssl": "true"}),
    Row("ipv6_http_address_unparseable", [("inference_address", "medium")],
        set={"inference_address": "http://[::]:8080"}),
    Row("https_self_signed", [("inference_address", "medium")],
        set={"inference_address": "https://127.0.0.1:8443"}),
    Row("private_key_missing", [("private_key_file", "medium")],
        set={"inference_address": "https://127.0.0.1:8443", "certificate_file": "{tmp}/c.pem",
             "private_key_file": "{tmp}/absent.pem"}),
    Row("keystore_default_password", [("keystore_pass", "medium")],
        set={"keystore": "{tmp}/ts.p12"}),
    # Authorization and model management
    Row("token_auth_disabled", [("disable_token_authorization", "high")],
        set={"disable_token_authorization": "true"}),
    Row("token_auth_disabled_any_case", [("disable_token_authorization", "high")],
        set={"disable_token_authorization": "TRUE"}),
    Row("token_expiry_huge", [("token_expiration_min", "medium")],
        set={"token_expiration_min": "100000"}),
    Row("model_api_enabled", [("enable_model_api", "high")], set={"enable_model_api": "true"}),
    Row("allowed_urls_missing", [("allowed_urls", "high")], drop=("allowed_urls",)),
    Row("allowed_urls_default", [("allowed_urls", "high")],
        set={"allowed_urls": DEFAULT_ALLOWED_URLS}),
    Row("allowed_urls_any_http", [("allowed_urls", "high")],
        set={"allowed_urls": "file:///srv/store/.*\\.mar,HTTPS?://.*"}),
    Row("allowed_urls_one_remote_host", [("allowed_urls", "medium")],
        set={"allowed_urls": "https://models\\.example\\.com/.*\\.mar"}),
    # Java fetches file://HOST/... over FTP from HOST.
    Row("allowed_urls_any_file", [("allowed_urls", "high")], set={"allowed_urls": "file://.*"}),
    Row("allowed_urls_escapes_store", [("allowed_urls", "medium")],
        set={"allowed_urls": "file://{store}/.*"}),
    Row("use_env_allowed_urls", [("use_env_allowed_urls", "medium")],
        set={"use_env_allowed_urls": "true"}),
    # Python dependencies and environment
    Row("install_py_dep_per_model", [("install_py_dep_per_model", "high")],
        set={"install_py_dep_per_model": "true"}),
    Row("enable_envvars_config", [("enable_envvars_config", "medium")],
        set={"enable_envvars_config": "true"}),
    Row("envvars_turn_token_auth_off",
        [("enable_envvars_config", "medium"), ("disable_token_authorization", "high")],
        set={"enable_envvars_config": "true"}, env={"TS_DISABLE_TOKEN_AUTHORIZATION": "true"}),
    Row("blacklist_env_vars_missing", [("blacklist_env_vars", "medium")],
        drop=("blacklist_env_vars",)),
    Row("blacklist_env_vars_weak", [("blacklist_env_vars", "low")],
        set={"blacklist_env_vars": "AWS_.*"}),
    # Sizes and queues
    Row("limit_max_image_pixels_false", [("limit_max_image_pixels", "medium")],
        set={"limit_max_image_pixels": "false"}),
    Row("limit_max_image_pixels_trailing_space",
        [("limit_max_image_pixels", "medium"), ("limit_max_image_pixels", "low")],
        raw="limit_max_image_pixels=true \n"),
    Row("max_request_size_above_handler", [("max_request_size", "medium")],
        set={"max_request_size": str(100 * 1024 * 1024)}),
    Row("max_request_size_default_above_handler", [("max_request_size", "medium")],
        drop=("max_request_size",)),
    Row("max_response_size_above_handler", [("max_response_size", "medium")],
        set={"max_response_size": str(100 * 1024 * 1024)}),
    Row("max_request_size_below_handler", [("max_request_size", "low")],
        set={"max_request_size": "1000"}),
    Row("job_queue_huge", [("job_queue_size", "medium")], set={"job_queue_size": "5000"}),
    Row("job_queue_unbounded", [("job_queue_size", "high")], set={"job_queue_size": "2147483647"}),
    Row("job_queue_not_a_number", [("job_queue_size", "medium")], set={"job_queue_size": "lots"}),
    Row("response_timeout_long", [("default_response_timeout", "low")],
        set={"default_response_timeout": "3600"}),
    Row("cors_any_origin", [("cors_allowed_origin", "medium")], set={"cors_allowed_origin": "*"}),
    # Code and commands from the config
    Row("vmargs_javaagent", [("vmargs", "high")], raw="vmargs=-Xmx2g -javaagent:/tmp/a.jar\n"),
    Row("vmargs_on_error", [("vmargs", "high")], raw="vmargs=-XX:OnError=/bin/sh\n"),
    Row("vmargs_memory_only", [("vmargs", "low")], raw="vmargs=-Xmx2g\n"),
    Row("vmargs_hidden_by_continuation",
        [("vmargs", "high"), ("vmargs", "low"), ("note", "medium")],
        raw="note=harmless\\\nvmargs=-Xmx1g\n"),
    Row("plugins_path", [("plugins_path", "medium")], raw="plugins_path=/opt/ts-plugins\n"),
    Row("system_metrics_cmd", [("system_metrics_cmd", "high")],
        set={"system_metrics_cmd": "sh -c id"}),
    Row("load_models_url", [("load_models", "high")],
        set={"load_models": "m=https://example.com/m.mar"}),
    Row("batch_size_above_handler", [("models", "medium")],
        set={"models": json.dumps({"m": {"1.0": {"marName": "m.mar", "batchSize": 64}}})}),
    Row("models_json_invalid", [("models", "medium")], set={"models": "{not json"}),
    Row("env_reference_missing", [("metrics_mode", "medium")],
        set={"metrics_mode": "$$UNSET_VARIABLE$$"}),
    Row("env_reference", [("metrics_mode", "low")], set={"metrics_mode": "$$MODE$$"},
        env={"MODE": "prometheus"}),
    Row("duplicate_key", [("enable_model_api", "low")], raw="enable_model_api=false\n"),
    Row("misspelt_key", [("disable_token_authorisation", "medium")],
        set={"disable_token_authorisation": "false"}),
    # Command line (parsed with TorchServe's own parser)
    Row("cmd_disable_token_auth", [("--disable-token-auth", "high")],
        cmdline=GOOD_CMD + " --disable-token-auth"),
    Row("cmd_dt", [("--disable-token-auth", "high")], cmdline=GOOD_CMD + " --dt"),
    Row("cmd_abbreviated_flag", [("--disable-token-auth", "high")],
        cmdline=GOOD_CMD + " --disable-tok"),
    Row("cmd_enable_model_api", [("--enable-model-api", "high")],
        cmdline=GOOD_CMD + " --enable-model-api"),
    Row("cmd_missing_ncs", [("--ncs", "medium")],
        cmdline="torchserve --start --ts-config {config} --model-store {store}"),
    Row("cmd_missing_ts_config", [("--ts-config", "high")],
        cmdline="torchserve --start --ncs --model-store {store}"),
    Row("cmd_other_ts_config", [("--ts-config", "medium")],
        cmdline="torchserve --start --ncs --ts-config /etc/other.properties"),
    Row("cmd_remote_model", [("load_models", "high")],
        cmdline=GOOD_CMD + " --models m=http://example.com/m.mar"),
    Row("cmd_plugins_path", [("plugins_path", "medium")], cmdline=GOOD_CMD + " --ppath /opt/p"),
    Row("cmd_unparseable", [("cmdline", "medium")], cmdline=GOOD_CMD + " --no-such-flag"),
    # Environment
    Row("torch_force_no_weights_only", [("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "high")],
        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    Row("torch_force_no_weights_only_yes", [("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "high")],
        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "YES"}),
    Row("ts_config_file_elsewhere", [("TS_CONFIG_FILE", "high")],
        env={"TS_CONFIG_FILE": "/etc/other.properties"}),
    Row("ts_disable_token_env_dormant", [("TS_DISABLE_TOKEN_AUTHORIZATION", "low")],
        env={"TS_DISABLE_TOKEN_AUTHORIZATION": "true"}),
]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def _hardened(store: Path) -> dict[str, str]:
    model = ModelSpec("m", "m.mar", batch_size=8)
    return hardened_properties(store, models=(model,), max_request_bytes=LIMITS.max_request_bytes)


def _audit_row(row: Row, store: Path, tmp_path: Path) -> list[tuple[str, str]]:
    props = _hardened(store)
    for key in row.drop:
        del props[key]
    for name in ("c.pem", "k.pem", "ts.p12"):  # TLS material, private as it should be
        (tmp_path / name).write_text("-----")
        (tmp_path / name).chmod(0o600)
    props.update({k: v.replace("{store}", str(store)).replace("{tmp}", str(tmp_path))
                  for k, v in row.set.items()})
    config = tmp_path / "config.properties"
    config.write_text(render_properties(props) + row.raw, "latin-1")
    cmdline = row.cmdline.format(config=config, store=store) if row.cmdline else None
    found = audit_file(config, cmdline=cmdline, environ=row.env, limits=LIMITS,
                       model_store=store)
    return [(f.key, f.severity) for f in found]


def test_hardened_config_audits_clean(store: Path, tmp_path: Path) -> None:
    found = _audit_row(Row("clean", [], cmdline=GOOD_CMD), store, tmp_path)
    assert found == []


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_each_misconfiguration_is_caught(row: Row, store: Path, tmp_path: Path) -> None:
    found = _audit_row(row, store, tmp_path)
    for expected in row.expect:
        assert expected in found, f"{row.id}: missing {expected} in {found}"
    serious = [f for f in found if f[1] != "low" and f not in row.expect]
    assert serious == [], f"{row.id}: unexpected {serious}"


def test_world_writable_store_is_flagged(store: Path, tmp_path: Path) -> None:
    store.chmod(0o777)
    found = _audit_row(Row("ww", []), store, tmp_path)
    assert ("model_store", "medium") in found


def test_world_writable_workflow_store_is_flagged(store: Path, tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    workflows.chmod(0o777)
    found = _audit_row(Row("wf", [], set={"workflow_store": str(workflows)}), store, tmp_path)
    assert ("workflow_store", "medium") in found


def test_writable_plugins_directory_is_high(store: Path, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    plugins.chmod(0o777)
    found = _audit_row(Row("pw", [], raw=f"plugins_path={plugins}\n"), store, tmp_path)
    assert ("plugins_path", "high") in found


def test_escaped_keys_are_read_like_java(store: Path, tmp_path: Path) -> None:
    # `\u0065nable_model_api` is `enable_model_api` to TorchServe; a grep would miss it.
    found = _audit_row(Row("esc", [], raw="\\u0065nable_model_api : \\\n    true\n"),
                       store, tmp_path)
    assert ("enable_model_api", "high") in found


def test_torch_flag_off_is_not_a_finding(store: Path, tmp_path: Path) -> None:
    found = _audit_row(Row("off", [], env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "0"}),
                       store, tmp_path)
    assert found == []


def test_cmdline_parsed_by_torchserve_parser() -> None:
    args, error = parse_cmdline(["torchserve", "--start", "--ncs", "--disable-tok"])
    assert error is None
    assert args is not None
    assert args.token_auth
    assert args.no_config_snapshots
    assert parse_cmdline(["torchserve", "--bogus"])[0] is None


def test_findings_carry_cwe_cve_and_fix(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.properties"
    props = _hardened(store)
    del props["allowed_urls"]
    config.write_text(render_properties(props))
    [finding] = blocking(audit_file(config, limits=LIMITS, model_store=store))
    assert finding.key == "allowed_urls"
    assert "CVE-2023-43654" in finding.cve
    assert "CWE-918" in finding.cwe
    assert store_allowed_urls(store) in finding.fix
    assert finding.to_dict()["severity"] == "high"
    assert "CVE-2023-43654" in format_findings([finding])
    assert format_markdown([finding]).count("\n") == 2


def test_handler_limits_come_from_the_context() -> None:
    # One frontend serves every model, so its limit is sized by the largest handler limit.
    text = render_properties({"max_request_size": str(5 * 1024 * 1024)})
    small, large = HandlerLimits(1024, 4), HandlerLimits(4 * 1024 * 1024, 16)
    ctx = AuditContext.build(text, model_limits={"a": small, "b": large})
    assert ctx.limits == large
    assert not [f for f in audit(ctx) if f.key == "max_request_size"]
    only_small = audit(AuditContext.build(text, model_limits={"a": small}))
    assert [(f.key, f.severity) for f in only_small if f.key == "max_request_size"] == [
        ("max_request_size", "medium")]


# --- the command ---------------------------------------------------------------------------


def _write_bad(tmp_path: Path) -> Path:
    config = tmp_path / "bad.properties"
    config.write_text("inference_address=http://0.0.0.0:8080\nenable_model_api=true\n")
    return config


def test_audit_config_command_exit_codes(tmp_path: Path, store: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write_bad(tmp_path)
    assert main(["audit-config", str(bad), "--no-env"]) == 1
    out = capsys.readouterr().out
    assert "HIGH" in out
    assert "enable_model_api" in out

    good = tmp_path / "good.properties"
    good.write_text(render_properties(_hardened(store)))
    cmd = GOOD_CMD.format(config=good, store=store)
    assert main(["audit-config", str(good), "--cmdline", cmd, "--no-env",
                 "--handler-limits", f"max_request_bytes={LIMITS.max_request_bytes}"]) == 0


def test_audit_config_json_and_markdown(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write_bad(tmp_path)
    assert main(["audit-config", str(bad), "--no-env", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    keys = {(f["key"], f["severity"]) for f in report["findings"]}
    assert ("enable_model_api", "high") in keys
    assert report["counts"]["high"] >= 2
    assert main(["audit-config", str(bad), "--no-env", "--markdown"]) == 1
    assert capsys.readouterr().out.startswith("| severity | key | why | fix |")


def test_audit_config_reads_environment(tmp_path: Path, store: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.properties"
    good.write_text(render_properties(_hardened(store)))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "true")
    assert main(["audit-config", str(good)]) == 1
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in capsys.readouterr().out


def test_audit_config_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit-config", str(tmp_path / "missing.properties")]) == 2
    broken = tmp_path / "broken.properties"
    broken.write_text("a=\\u12\n")
    assert main(["audit-config", str(broken)]) == 2
    assert "uxxxx" in capsys.readouterr().err


# --- the model API behind the gateway (register coherence) ----------------------------------


def _gateway(tmp_path: Path, store: Path, management_url: str = "http://127.0.0.1:8081") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({  # JSON is YAML; the gateway's own loader reads it
        "upstream": {"inference_url": "http://127.0.0.1:8080", "management_url": management_url},
        "model_store": str(store), "models": {}, "audit_log": str(tmp_path / "audit.log"),
    }))
    return path


def _model_api_findings(tmp_path: Path, store: Path, gateway: Path | None,
                        **changes: str) -> list[tuple[str, str]]:
    model = ModelSpec("m", "m.mar", batch_size=8)
    props = hardened_properties(store, models=(model,), max_request_bytes=LIMITS.max_request_bytes,
                                enable_model_api=True)
    config = tmp_path / "config.properties"
    config.write_text(render_properties({**props, **changes}))
    found = audit_file(config, cmdline=GOOD_CMD.format(config=config, store=store), environ={},
                       limits=LIMITS, model_store=store, gateway_config=gateway)
    return [(f.key, f.severity) for f in found]


def test_model_api_behind_the_named_gateway_is_low(tmp_path: Path, store: Path) -> None:
    found = _model_api_findings(tmp_path, store, _gateway(tmp_path, store))
    assert found == [("enable_model_api", "low")]


@pytest.mark.parametrize(("gateway_url", "changes"), [
    (None, {}),  # no gateway named
    ("http://127.0.0.1:9081", {}),  # the gateway talks to another server
    ("http://127.0.0.1:8081", {"management_address": "http://0.0.0.0:8081"}),
    ("http://127.0.0.1:8081", {"management_address": "HTTP://0:8081"}),
    ("http://127.0.0.1:8081", {"grpc_management_address": "0.0.0.0", "enable_grpc_ssl": "true"}),
    ("http://127.0.0.1:8081", {"disable_token_authorization": "true"}),
])
def test_model_api_without_a_safe_gateway_is_high(tmp_path: Path, store: Path,
                                                  gateway_url: str | None,
                                                  changes: dict[str, str]) -> None:
    gateway = _gateway(tmp_path, store, gateway_url) if gateway_url else None
    found = _model_api_findings(tmp_path, store, gateway, **changes)
    assert ("enable_model_api", "high") in found


def test_model_api_gateway_on_another_store_or_unreadable_is_high(tmp_path: Path,
                                                                  store: Path) -> None:
    other = tmp_path / "other-store"
    other.mkdir()
    found = _model_api_findings(tmp_path, store, _gateway(tmp_path, other))
    assert ("enable_model_api", "high") in found
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstream: [not, a, mapping]\n")
    assert ("enable_model_api", "high") in _model_api_findings(tmp_path, store, broken)


def test_model_api_on_the_command_line_follows_the_same_rule(tmp_path: Path,
                                                             store: Path) -> None:
    config = tmp_path / "config.properties"
    config.write_text(render_properties(_hardened(store)))
    cmd = GOOD_CMD.format(config=config, store=store) + " --enable-model-api"
    gateway = _gateway(tmp_path, store)
    with_gateway = audit_file(config, cmdline=cmd, environ={}, limits=LIMITS,
                              model_store=store, gateway_config=gateway)
    assert [(f.key, f.severity) for f in with_gateway] == [("--enable-model-api", "low")]
    without = audit_file(config, cmdline=cmd, environ={}, limits=LIMITS, model_store=store)
    assert [(f.key, f.severity) for f in without] == [("--enable-model-api", "high")]
