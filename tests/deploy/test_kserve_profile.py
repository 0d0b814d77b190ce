"""The `kserve` profile: the config.properties it writes passes the whole audit and the
profile's own rules, and each hostile change to it is refused by the rule that names it."""

from __future__ import annotations

import json

import pytest

from secure_handler.deploy.audit import AuditContext, audit
from secure_handler.deploy.profiles import (
    KSERVE_CONFIG,
    KSERVE_STORE,
    kserve_findings,
    kserve_properties,
)
from secure_handler.deploy.tsconfig import ModelSpec, render_properties

COMMAND = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(KSERVE_CONFIG),
           "--model-store", str(KSERVE_STORE)]
MODELS = [ModelSpec("shapes", "shapes.mar", batch_size=8), ModelSpec("topics", "topics.mar")]


def context(props: dict[str, str], command: list[str] = COMMAND) -> AuditContext:
    return AuditContext.build(render_properties(props), cmdline=command, environ={})


def test_the_profile_is_clean_for_the_audit_and_its_own_rules() -> None:
    props = kserve_properties(MODELS)
    ctx = context(props)
    assert audit(ctx) == []
    assert kserve_findings(ctx) == []
    assert props["model_store"] == str(KSERVE_STORE)
    assert props["inference_address"] == "http://127.0.0.1:8085"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert "service_envelope" not in props
    assert props["load_models"] == "shapes=shapes.mar,topics=topics.mar"


@pytest.mark.parametrize(("key", "value", "severity"), [
    ("inference_address", "https://0.0.0.0:8085", "high"),
    ("management_address", "http://10.0.0.5:8086", "high"),
    ("metrics_address", "http://0.0.0.0:8082", "high"),
    ("inference_address", "http://127.0.0.1:8080", "medium"),  # the gateway's port
    ("service_envelope", "kservev2", "high"),
    ("service_envelope", "kserve", "high"),
    ("disable_token_authorization", "true", "high"),
    ("model_store", "/home/model-server/model-store", "medium"),
    ("allowed_urls", "file://.*|http(s)?://.*", "high"),
    ("allowed_urls", "file:///mnt/models/.*", "high"),
])
def test_each_hostile_change_is_refused_by_name(key: str, value: str, severity: str) -> None:
    props = kserve_properties(MODELS)
    props[key] = value
    found = [f for f in kserve_findings(context(props)) if f.key == key]
    assert [f.severity for f in found] == [severity]
    assert found[0].fix


def test_token_auth_turned_off_on_the_command_line_is_refused() -> None:
    ctx = context(kserve_properties(MODELS), [*COMMAND, "--disable-token-auth"])
    found = [f for f in kserve_findings(ctx) if f.key == "disable_token_authorization"]
    assert [f.severity for f in found] == ["high"]


def test_config_command_writes_the_kserve_profile(tmp_path, capsys) -> None:
    from support import classifier_mar

    from secure_handler.cli import main
    from secure_handler.deploy.profiles import kserve_command, kserve_file_findings

    store = tmp_path / "store"
    classifier_mar(tmp_path, store, "tiny")
    out = tmp_path / "config.properties"
    code = main(["config", "--model-store", str(store), "--profile", "kserve", "--out", str(out),
                 "--json"])
    assert code == 0
    text = out.read_text("ascii")
    assert f"model_store={KSERVE_STORE}\n" in text
    assert "load_models=tiny=tiny.mar\n" in text
    assert "inference_address=http://127.0.0.1:8085\n" in text
    assert kserve_file_findings(out, kserve_command(out)) == []
    report = json.loads(capsys.readouterr().out)
    assert report["command"] == kserve_command()
    assert report["findings"] == []


def test_audit_config_applies_the_kserve_rules(tmp_path, capsys) -> None:
    from secure_handler.cli import main
    from secure_handler.deploy.tsconfig import store_allowed_urls

    # A config fine for the general audit, but not the pod's: the store is not where KServe
    # mounts the storageUri.
    props = kserve_properties(MODELS)
    props["model_store"] = "/srv/models"
    props["allowed_urls"] = store_allowed_urls("/srv/models")
    path = tmp_path / "config.properties"
    path.write_text(render_properties(props), "ascii")
    assert main(["audit-config", str(path), "--no-env", "--json"]) == 0
    general = json.loads(capsys.readouterr().out)
    assert [f for f in general["findings"] if f["severity"] != "low"] == []
    code = main(["audit-config", str(path), "--no-env", "--json", "--profile", "kserve"])
    report = json.loads(capsys.readouterr().out)
    assert code != 0
    keys = {(f["key"], f["severity"]) for f in report["findings"]}
    assert {("model_store", "medium"), ("allowed_urls", "high")} <= keys
