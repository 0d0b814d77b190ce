"""`secure-handler scan`: AST analysis of handler code, resolved names, reviewed-line waivers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from secure_handler.cli import main
from secure_handler.supply.findings import RULES
from secure_handler.supply.scan import scan_source
from secure_handler.supply.templates import HANDLER_KINDS, render_handler


def rules(source: str) -> list[str]:
    return [f.rule for f in scan_source(textwrap.dedent(source), "h.py") if not f.allowed]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # process execution, however the name is reached (CWE-78)
        ("import subprocess as sp\nsp.run(['id'])\n", ["SH101"]),
        ("from subprocess import Popen as P\n", ["SH101"]),
        ("from os import system as s\ns('id')\n", ["SH101"]),
        ("from os import *\n", ["SH101"]),
        ("import os\nos.system('id')\n", ["SH101"]),
        ("import os as o\nrun = o.popen\n", ["SH101"]),
        ("import os\nalias = os\nalias2 = alias\nalias2.execv('/bin/sh', [])\n", ["SH101"]),
        ("import posix\nposix.system('id')\n", ["SH101"]),
        ("import torch\ntorch.os.system('id')\n", ["SH101"]),
        ("import os\ngetattr(os, 'system')('id')\n", ["SH101"]),
        ("import torch\ngetattr(getattr(torch, 'os'), 'spawnv')\n", ["SH101"]),
        ("import pty\n", ["SH101"]),
        # computed attribute names cannot be resolved, so they are findings (CWE-470)
        ("import os\ngetattr(os, 'sys' + 'tem')('id')\n", ["SH202"]),
        ("import os\nname = 'system'\nsetattr(os, name, None)\n", ["SH202"]),
        ("import operator\nimport os\noperator.attrgetter('system')(os)\n", ["SH202"]),
        # deserialization (CWE-502)
        ("import pickle\n", ["SH102"]),
        ("from joblib import load\n", ["SH102"]),
        ("import torch\ntorch.load('w.pt')\n", ["SH204"]),
        ("import torch\ntorch.load('w.pt', weights_only=False)\n", ["SH204"]),
        ("from torch import load\nload('w.pt')\n", ["SH204"]),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)\n", ["SH204"]),
        # native code, network, dynamic imports
        ("import ctypes\n", ["SH103"]),
        ("import socket\n", ["SH104"]),
        ("import urllib.request\n", ["SH104"]),
        ("import torch\ntorch.hub.load('x/y', 'm')\n", ["SH104"]),
        ("from importlib import import_module\n", ["SH105"]),
        # code evaluation (CWE-95) and reflection
        ("eval('1+1')\n", ["SH201"]),
        ("exec('x = 1')\n", ["SH201"]),
        ("compile('1', 'f', 'eval')\n", ["SH201"]),
        ("m = __import__('o' + 's')\n", ["SH201"]),
        ("x = ().__class__.__base__.__subclasses__()\n", ["SH205"]),
        ("import sys\nsys.modules['os'].system('id')\n", ["SH205"]),
        ("g = globals()\n", ["SH205"]),
        ("b = __builtins__\n", ["SH205"]),
        # files (CWE-73)
        ("open('/tmp/x', 'w')\n", ["SH203"]),
        ("def f(p):\n    return open(p)\n", ["SH203"]),
        ("def f(m):\n    return open('a.json', m)\n", ["SH203"]),
    ],
)
def test_dangerous_code_is_flagged(source: str, expected: list[str]) -> None:
    assert sorted(set(rules(source))) == expected


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nm = torch.jit.load('m.pt')\n",
        "import torch\ntorch.load('w.pt', weights_only=True)\n",
        "import json\nlabels = json.load(open('index_to_name.json'))\n",
        "from re import compile\npattern = compile('a+')\n",
        "import os\npath = os.path.join('a', 'b')\n",
        "class H:\n    def f(self):\n        return self.model.code, type(self).__name__\n",
        "import numpy as np\nnp.load('a.npy')\n",
        "getattr(object(), 'literal_name', None)\n",
    ],
)
def test_ordinary_code_passes(source: str) -> None:
    assert rules(source) == []


def test_a_handler_subclassing_ours_passes_cleanly() -> None:
    source = """
        import torch
        from secure_handler import SecureImageClassifier


        class Handler(SecureImageClassifier):
            \"\"\"Top-3 with rounded scores.\"\"\"

            def postprocess(self, outputs):
                probs = torch.softmax(outputs, dim=1)
                return [[round(p, 3) for p in row] for row in probs.tolist()]
    """
    assert scan_source(textwrap.dedent(source), "handler.py") == []


@pytest.mark.parametrize("kind", sorted(HANDLER_KINDS))
def test_generated_handlers_scan_clean(kind: str) -> None:
    assert scan_source(render_handler(kind), f"{kind}.py") == []


def test_findings_carry_rule_file_line_and_cwe() -> None:
    source = "import json\n\nimport subprocess as sp\n"
    [hit] = scan_source(source, "handler.py")
    assert (hit.rule, hit.location, hit.cwe) == ("SH101", "handler.py:3", "CWE-78")
    assert hit.cwe == RULES["SH101"].cwe
    assert "subprocess" in hit.message


def test_allow_comment_waives_only_the_named_rule_on_that_line() -> None:
    source = textwrap.dedent("""
        import os
        open(os.path.join('cache', 'x'), 'wb')  # secure-handler: allow[SH203] reviewed: cache
        open(os.path.join('cache', 'y'), 'wb')
        eval('1')  # secure-handler: allow[SH203]
    """)
    found = scan_source(source, "h.py")
    by_line = {(f.location, f.rule): f.allowed for f in found}
    assert by_line == {("h.py:3", "SH203"): True, ("h.py:4", "SH203"): False,
                       ("h.py:5", "SH201"): False}  # fmt: skip


def test_allow_marker_inside_a_string_is_not_a_comment() -> None:
    source = "eval('x')  ; s = '# secure-handler: allow[SH201]'\n"
    assert rules(source) == ["SH201"]


def test_unparseable_source_is_a_finding_not_a_pass() -> None:
    assert rules("def broken(:\n") == ["SH001"]
    assert [f.rule for f in scan_source(b"\xff\xfe not utf-8", "h.py")] == ["SH001"]


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
        ("SH101", f"{bad}:1", "CWE-78")
    ]
    assert main(["scan", str(tmp_path / "missing.py")]) == 2


def test_cli_scan_human_output_names_rule_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "h.py"
    bad.write_text("import os\nx = getattr(os, 'sys' + 'tem')\n")
    assert main(["scan", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: SH202 dynamic-attribute [CWE-470]" in out
