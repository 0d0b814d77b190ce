"""`secure-handler scan`: the allowlist scan on files, and the old denylist as `--lint`.

The hostile cases of the allowlist, one per rule and family, are in
tests/attacks/test_handler_allowlist.py; here: the CLI, the lint, and what each gives back.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from secure_handler.cli import main
from secure_handler.supply.lint import lint_source
from secure_handler.supply.policy import line_sha256
from secure_handler.supply.scan import scan_source
from secure_handler.supply.scan_rules import refused_value_attributes, torch_name_allowed
from secure_handler.supply.templates import render_handler


def lint(source: str) -> list[str]:
    return [f.rule for f in lint_source(textwrap.dedent(source), "h.py")]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import subprocess as sp\nsp.run(['id'])\n", ["SH101"]),
        ("from os import system as s\ns('id')\n", ["SH101"]),
        ("import torch\ntorch.os.system('id')\n", ["SH101"]),
        ("import os\ngetattr(os, 'sys' + 'tem')('id')\n", ["SH202"]),
        ("import pickle\n", ["SH102"]),
        ("import torch\ntorch.load('w.pt')\n", ["SH204"]),
        ("import ctypes\n", ["SH103"]),
        ("import socket\n", ["SH104"]),
        ("from importlib import import_module\n", ["SH105"]),
        ("eval('1+1')\n", ["SH201"]),
        ("x = ().__class__.__base__.__subclasses__()\n", ["SH205"]),
        ("open('/tmp/x', 'w')\n", ["SH203"]),
    ],
)
def test_lint_flags_known_dangerous_names(source: str, expected: list[str]) -> None:
    assert sorted(set(lint(source))) == expected


def test_lint_reads_no_waiver_comments() -> None:
    assert lint("eval('1')  # secure-handler: allow[SH201]\n") == ["SH201"]


def test_lint_misses_what_the_allowlist_refuses() -> None:
    """Why the lint is not a guarantee: an alias through a list hides eval from it."""
    source = "x = [eval][0]\n"
    assert lint(source) == []
    assert [f.rule for f in scan_source(source, "h.py")] == ["SH210"]


def test_torch_names_follow_the_operation_allowlist() -> None:
    assert [torch_name_allowed(n) for n in ("cat", "add_", "save", "from_file", "cuda")] == [
        True, True, False, False, False
    ]  # fmt: skip
    refused = refused_value_attributes()
    assert {"save", "tofile", "untyped_storage", "from_file", "format"} <= refused
    assert not {"softmax", "tolist", "view", "eval", "decode", "get", "items"} & refused


def test_refused_value_names_are_derived_from_the_types_a_handler_reaches() -> None:
    """TorchScript's IR entry points and pydantic's non-data API are derived, so a new name in
    either library is refused by default; the data API and common names stay allowed."""
    refused = refused_value_attributes()
    assert {"graph", "inlined_graph", "owner", "define", "save_to_buffer"} <= refused
    assert {"parse_raw", "parse_file", "model_rebuild", "update_forward_refs"} <= refused
    assert {"mro", "obj"} <= refused
    kept = {"code", "name", "schema", "model_dump", "model_copy", "model_validate", "copy",
            "dict", "json", "forward", "eval", "parameters", "state_dict", "training"}
    assert not kept & refused


def test_archive_module_names_are_judged_against_every_module_outside() -> None:
    from secure_handler.supply.scan import shadows_outside_module

    outside = ["os", "json", "torch", "numpy", "secure_handler", "ts", "sitecustomize",
               "model_server", "utils", "context", "PIL", "pydantic"]  # fmt: skip
    assert all(shadows_outside_module(name) for name in outside)
    assert not any(shadows_outside_module(n) for n in ("handler", "textutil", "my_labels"))


def test_waivable_findings_carry_the_hash_a_policy_names() -> None:
    source = "class H:\n    def f(self):\n        self.model.save(\n            'x')\n"
    [hit] = scan_source(source, "h.py")
    digest = line_sha256("self.model.save(\n'x')")  # the whole statement, each line stripped
    assert (hit.rule, hit.location) == ("SH212", "h.py:3")
    assert hit.message.endswith(f"[line_sha256 {digest}]")


def test_cli_scan_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = tmp_path / "clean.py"
    clean.write_text(render_handler("image"))
    bad = tmp_path / "bad.py"
    bad.write_text("import subprocess as sp\nsp.call('id', shell=True)\n")
    assert main(["scan", str(clean)]) == 0
    capsys.readouterr()
    assert main(["scan", "--json", str(clean), str(bad)]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False
    assert [(f["rule"], f["location"], f["cwe"]) for f in payload["findings"]] == [
        ("SH110", f"{bad}:1", "CWE-749")
    ]
    assert main(["scan", str(tmp_path / "missing.py")]) == 2


def test_cli_scan_directory_is_one_tree_with_rule_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "handler.py").write_text("from util import f\n")
    (tmp_path / "util.py").write_text("def f(x):\n    return getattr(x, 'sa' + 've')\n")
    assert main(["scan", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}/util.py:2: SH213 computed-attribute [CWE-470]" in out
    assert "handler.py" not in out.split("\n", 1)[1]  # the import of a sibling module is fine


def test_cli_scan_policy_waives_a_reviewed_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text("def f(img):\n    img.show()\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "format: secure-handler-policy/1\nwaivers:\n  - file: handler.py\n    rule: SH212\n"
        f"    line_sha256: {line_sha256('img.show()')}\n    reason: debugging build only\n"
    )
    assert main(["scan", str(handler)]) == 1
    capsys.readouterr()
    assert main(["scan", "--json", "--policy", str(policy), str(handler)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["waivers"] == [
        {"file": "handler.py", "rule": "SH212", "line_sha256": line_sha256("img.show()")}
    ]
    assert [f["allowed"] for f in payload["findings"]] == [True]
    assert main(["scan", "--policy", str(tmp_path / "absent.yaml"), str(handler)]) == 2


def test_cli_lint_says_it_is_a_lint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "h.py"
    bad.write_text("import os\nx = getattr(os, 'sys' + 'tem')\n")
    assert main(["scan", "--lint", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("LINT (advice, not a guarantee")
    assert f"{bad}:2: SH202 dynamic-attribute [CWE-470]" in out
    assert main(["scan", "--lint", "--json", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)["lint"] is True
