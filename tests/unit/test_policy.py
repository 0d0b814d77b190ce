"""Operator policy files: validated waivers that match a member, a rule and a line's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_handler.supply.policy import Policy, line_sha256, load_policy
from secure_handler.supply.scan import scan_tree

SOURCE = b"def f(img, arr):\n    img.show()\n    arr.tofile('/tmp/x')\n"
SHOW = line_sha256("img.show()")


def policy(*waivers: dict[str, Any]) -> Policy:
    return Policy.model_validate({"format": "secure-handler-policy/1", "waivers": waivers})


def waiver(**over: Any) -> dict[str, Any]:
    return {"file": "h.py", "rule": "SH212", "line_sha256": SHOW, "reason": "reviewed", **over}


def test_line_hash_is_of_the_stripped_text() -> None:
    assert line_sha256("   img.show()  \t") == SHOW
    assert line_sha256("img.show( )") != SHOW


def test_a_waiver_matches_member_rule_and_line_text_only() -> None:
    report = scan_tree({"h.py": SOURCE}, policy=policy(waiver()))
    assert [(f.location, f.allowed) for f in report.findings] == [("h.py:2", True),
                                                                  ("h.py:3", False)]  # fmt: skip
    assert report.waivers == [{"file": "h.py", "rule": "SH212", "line_sha256": SHOW}]
    assert "waived by operator policy: reviewed" in report.findings[0].message


@pytest.mark.parametrize(
    "other",
    [{"file": "other.py"}, {"rule": "SH211"}, {"line_sha256": line_sha256("img.show(1)")}],
)
def test_a_waiver_for_anything_else_waives_nothing(other: dict[str, Any]) -> None:
    report = scan_tree({"h.py": SOURCE}, policy=policy(waiver(**other)))
    assert not any(f.allowed for f in report.findings)
    assert report.waivers == []


def test_a_waiver_follows_the_line_when_other_lines_move() -> None:
    moved = b"# a new first line\n" + SOURCE
    report = scan_tree({"h.py": moved}, policy=policy(waiver()))
    assert [(f.location, f.allowed) for f in report.findings][0] == ("h.py:3", True)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (waiver(rule="SH002"), "SH002 cannot be waived"),
        (waiver(rule="SH001"), "SH001 cannot be waived"),
        (waiver(line_sha256="abc"), "line_sha256"),
        (waiver(file="/etc/passwd"), "name an archive member"),
        (waiver(file="../h.py"), "name an archive member"),
        (waiver(reason=""), "reason"),
        (waiver(extra="x"), "extra"),
    ],
)
def test_invalid_waivers_are_refused_with_a_reason(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(bad)


def test_load_policy_reads_yaml_and_json_and_says_what_is_wrong(tmp_path: Path) -> None:
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"format": "secure-handler-policy/1", "waivers": [waiver()]}))
    as_yaml = tmp_path / "p.yaml"
    as_yaml.write_text(
        "format: secure-handler-policy/1\nwaivers:\n"
        f"  - {{file: h.py, rule: SH212, line_sha256: {SHOW}, reason: reviewed}}\n"
    )
    assert load_policy(as_json) == load_policy(as_yaml)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("format: secure-handler-policy/2\n")
    with pytest.raises(ValueError, match="not a secure-handler-policy/1 policy"):
        load_policy(wrong)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid json"):
        load_policy(broken)
