"""Handler code judged by an allowlist: each hostile file is written here, then refused.

Every case names the rule and the line that refuse it, so a refusal for the wrong reason
fails. The families are the ones a review used to beat the old denylist 60 times out of 60:
encoding cookies, eval/exec reached through aliases, string-to-code gateways in the standard
library, reflection through frames, processes/files/network through modules nobody listed, and
an archive waiving its own findings. The last tests run the real `archive` and `verify` (and
the real torch-model-archiver) on such files, and on members Python could import code from.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from support import LABELS, archive_mar, build_tiny_classifier

from secure_handler.cli import main
from secure_handler.supply.findings import RULES
from secure_handler.supply.scan import scan_source, scan_tree
from secure_handler.supply.templates import HANDLER_KINDS, render_handler

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def refused(source: str | bytes, filename: str = "handler.py") -> set[tuple[str, int]]:
    if isinstance(source, str):
        source = textwrap.dedent(source)
    found = scan_source(source, filename)
    return {(f.rule, int(f.location.rsplit(":", 1)[1])) for f in found if not f.allowed}


# --- one create-and-refuse case per rule and family ----------------------------------------

FAKE_OBJECT_HANDLER = """\
import numpy as np


def fake(address):
    return np.ndarray((1,), dtype=object, buffer=bytearray(address.to_bytes(8, "little")))[0]


run = fake(id(divmod) + {offset})
run("open({marker!r}, 'w').write('x')")
"""

PARSE_RAW_HANDLER = """\
from secure_handler import ImageLimits

PAYLOAD = b"cposix\\nsystem\\n(Vtouch {marker}\\ntR."
ImageLimits.parse_raw(PAYLOAD, proto="pickle", allow_pickle=True)
"""

MODEL_COPY_HANDLER = """\
import numpy as np
from secure_handler import ImageLimits


class Box:
    __slots__ = ("item",)


box = Box()
box.item = divmod
address = int(repr(box).rsplit(" ", 1)[1].rstrip(">"), 16)
layout = {{"shape": (3,), "typestr": "<u8", "data": (address, False), "version": 3}}
words = np.asarray(ImageLimits().model_copy(update={{"__array_interface__": layout}}))
words[2] = words[2] + {offset}
box.item("open({marker!r}, 'w').write('x')")
"""

CASES: dict[str, tuple[str | bytes, set[tuple[str, int]]]] = {
    # SH001: the scan cannot parse it, so it cannot vouch for it
    "unparseable": ("def broken(:\n", {("SH001", 1)}),
    # SH002: Python decodes with the cookie and runs the hidden line; a UTF-8 reader sees a
    # comment. Any declaration other than UTF-8, in any form, is refused.
    "utf-7-cookie": (b"# coding: utf-7\nx = 1\n", {("SH002", 1)}),
    "unicode-escape-cookie": (b"# -*- coding: unicode_escape -*-\nx = 1\n", {("SH002", 1)}),
    "raw-unicode-escape-line-2": (
        b"#!/usr/bin/env python\n# coding=raw_unicode_escape\nx = 1\n", {("SH002", 1)}),
    "vim-modeline": (b"# vim: set fileencoding=utf-7 :\nx = 1\n", {("SH002", 1)}),
    "emacs-modeline-cr-lines": (b"#!/bin/python\r# -*- coding: latin-1 -*-\rx = 1\r",
                                {("SH002", 1)}),
    "not-utf-8": (b"x = '\xe9t\xe9'\n", {("SH002", 1)}),
    # SH003: syntax the scan does not judge (class patterns read attributes by name)
    "match-class-pattern": ("match x:\n    case int(real=r):\n        pass\n", {("SH003", 1)}),
    "async": ("async def f():\n    return 1\n", {("SH003", 1)}),
    "global": ("def f():\n    global torch\n", {("SH003", 2)}),
    "nonlocal": ("def f():\n    x = 1\n    def g():\n        nonlocal x\n", {("SH003", 4)}),
    # SH110: modules outside the allowlist, string-to-code gateways included
    "subprocess": ("import subprocess\n", {("SH110", 1)}),
    "timeit": ("import timeit\ntimeit.timeit('print(1)', number=1)\n", {("SH110", 1)}),
    "cprofile": ("import cProfile\ncProfile.run('print(1)')\n", {("SH110", 1)}),
    "bdb": ("from bdb import Bdb\nBdb().run('print(1)')\n", {("SH110", 1)}),
    "logging-config": ("import logging.config\n", {("SH110", 1)}),
    "pkgutil": ("from pkgutil import resolve_name\n", {("SH110", 1)}),
    "pydoc-locate": ("import pydoc\npydoc.locate('os.system')('id')\n", {("SH110", 1)}),
    "pydoc-pipepager": ("from pydoc import pipepager\npipepager('x', 'sh')\n", {("SH110", 1)}),
    "torch-dotted-importer": ("from torch._utils import _import_dotted_name\n",
                              {("SH110", 1)}),
    "torch-package": ("import torch.package\n", {("SH110", 1)}),
    "importlib": ("import importlib\n", {("SH110", 1)}),
    "inspect": ("import inspect\ninspect.getattr_static(1, 'real')\n", {("SH110", 1)}),
    "sys-modules": ("from sys import modules\n", {("SH110", 1)}),
    "posixsubprocess": ("import _posixsubprocess\n", {("SH110", 1)}),
    "yaml-unsafe-load": ("import yaml\nyaml.unsafe_load('!!python/object:x {}')\n",
                         {("SH110", 1)}),
    "asyncio": ("import asyncio\nasyncio.open_connection('10.0.0.1', 80)\n", {("SH110", 1)}),
    "pathlib-write": ("from pathlib import Path\nPath('/tmp/x').write_text('x')\n",
                      {("SH110", 1)}),
    "os-open": ("import os\nos.open('/tmp/x', 0o1101)\n", {("SH110", 1)}),
    "shutil": ("import shutil\n", {("SH110", 1)}),
    "tarfile": ("import tarfile\ntarfile.open('a.tar').extractall('/')\n", {("SH110", 1)}),
    "ctypes": ("import ctypes\n", {("SH110", 1)}),
    "socket": ("import socket\n", {("SH110", 1)}),
    # SH111: allowed modules, names that are not on their list
    "torch-save": ("import torch\ntorch.save({}, '/tmp/x')\n", {("SH111", 2)}),
    "torch-from-file": ("import torch\ntorch.from_file('/etc/passwd', size=8)\n",
                        {("SH111", 2)}),
    "torch-load-library": ("import torch\ntorch.ops.load_library('x.so')\n", {("SH111", 2)}),
    "torch-jit": ("import torch\ntorch.jit.load('m.pt')\n", {("SH111", 2)}),
    "torch-hub": ("from torch import hub\n", {("SH111", 1)}),
    # torch.cuda / torch.random are modules named like operations: not values either
    "torch-module-named-like-op": ("import torch\nx = torch.cuda.memory\n", {("SH111", 2)}),
    "numpy-load-positional": ("import numpy as np\nnp.load('f.npy', None, True)\n",
                              {("SH111", 2)}),
    "logging-filehandler": ("import logging\nlogging.FileHandler('/tmp/x')\n", {("SH111", 2)}),
    "logging-dictconfig": ("import logging\nlogging.config.dictConfig({})\n", {("SH111", 2)}),
    "string-formatter": ("import string\nstring.Formatter().get_field('0.__globals__', [], {})\n",
                         {("SH111", 2)}),
    "attrgetter": ("from operator import attrgetter\n", {("SH111", 1)}),
    "get-type-hints": ("import typing\ntyping.get_type_hints(f)\n", {("SH111", 2)}),
    "secure-handler-internals": ("from secure_handler import loading\n", {("SH111", 1)}),
    # SH112, SH113: names the scan cannot see, modules outside the archive
    "star-import": ("from math import *\n", {("SH112", 1)}),
    "relative-outside": ("from . import helper\n", {("SH113", 1)}),
    # SH114: a module object must stay `module.name`, an imported name is never rebound
    "module-alias": ("import torch\nt = torch\nt.save({}, '/tmp/x')\n",
                     {("SH114", 2), ("SH212", 3)}),
    "module-in-list": ("import torch\n[torch][0].save({}, '/tmp/x')\n",
                       {("SH114", 2), ("SH212", 2)}),
    "module-argument": ("import numpy\nf(numpy)\n", {("SH114", 2)}),
    "rebind-import": ("import torch\ntorch = object()\n", {("SH114", 2)}),
    "import-as-parameter": ("import math\ndef f(math):\n    return math.pi\n",
                            {("SH114", 2)}),
    "monkeypatch-module": ("import torch\ntorch.cat = print\n", {("SH114", 2)}),
    "two-imports-one-name": ("import numpy as m\nimport math as m\n", {("SH114", 2)}),
    # SH210: a forbidden builtin may not be referenced at all, whatever the syntax
    "eval-call": ("eval('1')\n", {("SH210", 1)}),
    "eval-list-element": ("[eval][0]('1')\n", {("SH210", 1)}),
    "eval-map": ("list(map(eval, ['1']))\n", {("SH210", 1)}),
    "eval-default-arg": ("def f(e=eval):\n    return e('1')\n", {("SH210", 1)}),
    "exec-walrus": ("(e := exec)\ne('x = 1')\n", {("SH210", 1)}),
    "eval-annotated": ("e: object = eval\n", {("SH210", 1)}),
    "eval-tuple": ("a, e = 1, eval\n", {("SH210", 1)}),
    "eval-for-target": ("for e in [eval]:\n    e('1')\n", {("SH210", 1)}),
    "import-builtin": ("m = __import__('os')\n", {("SH210", 1)}),
    "compile": ("code = compile('1', 'f', 'eval')\n", {("SH210", 1)}),
    "open": ("open('/tmp/x', 'w').write('x')\n", {("SH210", 1), ("SH212", 1)}),
    "globals": ("g = globals()\n", {("SH210", 1)}),
    "vars": ("v = vars()\n", {("SH210", 1)}),
    "type-three-args": ("T = type('T', (), {})\n", {("SH210", 1)}),
    "breakpoint": ("breakpoint()\n", {("SH210", 1)}),
    "input": ("x = input()\n", {("SH210", 1)}),
    "import-as-builtins": ("import numpy as __builtins__\n", {("SH211", 1)}),
    "import-as-forbidden-builtin": ("from numpy import zeros as open\n", {("SH210", 1)}),
    "system-exit": ("raise SystemExit(0)\n", {("SH210", 1)}),
    "shadow-builtin": ("def eval(x):\n    return x\n", {("SH210", 1)}),
    # SH211: private and special attributes, frames, overriding the library's internals
    "subclasses": ("x = ().__class__.__base__.__subclasses__()\n", {("SH211", 1)}),
    "traceback-frame": (
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    b = e.__traceback__.tb_frame\n",
        {("SH211", 4)}),
    "generator-frame": ("def g():\n    yield 1\nb = g().gi_frame.f_back.f_builtins\n",
                        {("SH211", 3)}),
    "builtins-name": ("b = __builtins__\n", {("SH211", 1)}),
    "private-base-method": ("class H:\n    def f(self):\n        self._load_pickled_model()\n",
                            {("SH211", 3)}),
    "override-private": ("class H:\n    def _load_model(self, d):\n        return None\n",
                         {("SH211", 2)}),
    "private-class-attribute": ("class H:\n    _pool = None\n", {("SH211", 2)}),
    "define-getattribute": ("class H:\n    def __getattribute__(self, n):\n        return 1\n",
                            {("SH211", 2)}),
    "fstring-reflection": ("x = f'{(1).__class__}'\n", {("SH211", 1)}),
    # SH212: writes, code and raw memory through VALUES, whatever they are
    "model-save": ("class H:\n    def f(self):\n        self.model.save('/tmp/x')\n",
                   {("SH212", 3)}),
    "ndarray-tofile": ("import numpy as np\nnp.zeros(3).tofile('/tmp/x')\n", {("SH212", 2)}),
    "ndarray-class-tofile": ("import numpy as np\nnp.ndarray.tofile(a, '/tmp/x')\n",
                             {("SH111", 2), ("SH212", 2)}),
    "untyped-storage": ("def f(t):\n    return t.untyped_storage().from_file('/etc/x')\n",
                        {("SH212", 2)}),
    "script-define": ("class H:\n    def f(self):\n        self.model.define('def g(): ...')\n",
                      {("SH212", 3)}),
    "image-show": ("def f(img):\n    img.show()\n", {("SH212", 2)}),
    "str-format-fields": ("x = '{0.__init__.__globals__}'.format(f)\n", {("SH212", 1)}),
    "worker-socket": ("class H:\n    def f(self):\n        self.context.cl_socket.sendall(b'x')\n",
                      {("SH212", 3)}),
    "logger-handlers": ("import logging\nh = logging.getLogger().root.handlers\n",
                        {("SH212", 2)}),
    # SH213: attribute names computed at run time
    "getattr-computed": ("def f(x):\n    return getattr(x, 'sa' + 've')\n", {("SH213", 2)}),
    "setattr-variable": ("def f(x, n):\n    setattr(x, n, 1)\n", {("SH213", 2)}),
    "getattr-as-value": ("g = getattr\n", {("SH213", 1)}),
    "getattr-literal-forbidden": ("import torch\ngetattr(torch, 'save')\n", {("SH111", 2)}),
    "getattr-literal-dunder": ("def f(x):\n    return getattr(x, '__globals__')\n",
                               {("SH211", 2)}),
    # SH214: class creation that evaluates strings as code (pydantic models), unnamed bases
    "pydantic-subclass": ("from secure_handler import ImageLimits\n\n\nclass L(ImageLimits):\n"
                          "    x: 'int' = 1\n", {("SH214", 4)}),
    "computed-base": ("class H:\n    def f(self):\n        class L(self.limits_model):\n"
                      "            pass\n", {("SH214", 3)}),
    "metaclass-through-kwargs": ("class X(**{'metaclass': M}):\n    pass\n", {("SH214", 1)}),
    "rebound-base": ("B = int\nB = object\n\n\nclass X(B):\n    pass\n", {("SH214", 5)}),
    "singledispatch": ("from functools import singledispatch\n", {("SH111", 1)}),
    "typevar-bound-string": ("from typing import TypeVar\n", {("SH111", 1)}),
    # objects from raw memory: an object-dtype array over bytes the handler wrote turns an
    # address into any object (`id(divmod) + 80` is `eval` here); addresses are not given out
    "ndarray-over-raw-bytes": (FAKE_OBJECT_HANDLER.format(offset=80, marker="m"), {("SH111", 5),
                                                                       ("SH210", 8)}),
    "ndarray-alias": ("import numpy as np\nN = np.ndarray\n", {("SH111", 2)}),
    "ndarray-imported-call": ("from numpy import ndarray\na = ndarray((1,), object)\n",
                              {("SH111", 2)}),
    "ndarray-dataclass-field": ("import dataclasses\nimport numpy as np\n\n\n"
                                "@dataclasses.dataclass\nclass C:\n    x: np.ndarray\n",
                                {("SH111", 7)}),
    "ndarray-default-argument": ("import numpy as np\ndef f(x=np.ndarray):\n    return x\n",
                                 {("SH111", 2)}),
    "id-builtin": ("a = id(divmod)\n", {("SH210", 1)}),
    # reaching classes the allowlist never names: TorchServe's BaseHandler.initialize loads
    # whatever path a forged context names, with torch.jit.load / torch.load / dlopen
    "mro-reaches-base": ("from secure_handler import SecureImageClassifier\n"
                         "b = SecureImageClassifier.mro()[-3]\n", {("SH212", 2)}),
    "super-with-arguments": ("from secure_handler import SecureBaseHandler, SecureImageClassifier"
                             "\n\n\nclass H(SecureImageClassifier):\n    def initialize(self, c):"
                             "\n        super(SecureBaseHandler, self).initialize(c)\n",
                             {("SH210", 6)}),
    # the pydantic API the library's limits models inherit: unpickling, files, evaluation
    "pydantic-parse-raw-pickle": (PARSE_RAW_HANDLER.format(marker="m"), {("SH212", 4)}),
    "pydantic-parse-raw-on-instance": ("class H:\n    def f(self, b):\n        return "
                                       "self.limits.parse_raw(b, proto='pickle')\n",
                                       {("SH212", 3)}),
    "pydantic-model-rebuild": ("from secure_handler import ImageLimits\n"
                               "ImageLimits.model_rebuild(force=True)\n", {("SH212", 2)}),
    # a copy whose update names `__array_interface__`: numpy then reads and writes any memory
    "model-copy-update": (MODEL_COPY_HANDLER.format(offset=80, marker="m"), {("SH212", 13)}),
    "v1-copy-update": ("class H:\n    def f(self):\n        return self.limits.copy("
                       "update={'__array_interface__': {}})\n", {("SH212", 3)}),
    "model-copy-splat": ("class H:\n    def f(self, kw):\n        return "
                         "self.limits.model_copy(**kw)\n", {("SH212", 3)}),
    "model-copy-getattr": ("class H:\n    def f(self):\n        return getattr(self.limits, "
                           "'model_copy')(update={})\n", {("SH212", 3)}),
    "copy-method-alias": ("class H:\n    def f(self):\n        c = self.limits.copy\n",
                          {("SH212", 3)}),
    # functools.wraps copying attributes the caller names (`__array_interface__` of a
    # temporary array: a view of freed memory)
    "wraps-assigned": ("import functools\n\n\ndef f(a, g):\n    functools.wraps(a, "
                       "assigned=('__array_interface__',), updated=())(g)\n", {("SH111", 5)}),
    "wraps-positional-names": ("from functools import wraps\n\n\ndef f(a, g):\n"
                               "    wraps(a, ('x',))(g)\n", {("SH111", 5)}),
    "wraps-as-value": ("import functools\nw = functools.wraps\n", {("SH111", 2)}),
    # an exception that carries the object a library lookup failed on (a module, say)
    "attribute-error-object": ("try:\n    pass\nexcept AttributeError as e:\n    m = e.obj\n",
                               {("SH212", 4)}),
    # monkeypatching what was imported: the library's classes, torch's, by store/del/setattr
    "patch-library-class": ("from secure_handler import SecureImageClassifier\n"
                            "SecureImageClassifier.initialize = print\n", {("SH114", 2)}),
    "patch-torch-class": ("import torch\ntorch.Tensor.add = print\n", {("SH114", 2)}),
    "setattr-torch-class": ("import torch\nsetattr(torch.Tensor, 'mul', print)\n",
                            {("SH114", 2)}),
    "delete-library-method": ("from secure_handler import SecureImageClassifier\n"
                              "del SecureImageClassifier.handle\n", {("SH114", 2)}),
    # the loaded model's compiler IR: editing forward's graph makes the next call write files
    "script-graph-edit": ("class H:\n    def f(self):\n        g = self.model.graph\n",
                          {("SH212", 3)}),
    "script-method-graph": ("class H:\n    def f(self):\n        g = self.model.forward"
                            ".inlined_graph\n", {("SH212", 3)}),
    "script-method-owner": ("class H:\n    def f(self):\n        m = self.model.forward.owner"
                            "\n", {("SH212", 3)}),
    # an archive waiving its own finding: comments are never read
    "self-waiver": ("eval('1')  # secure-handler: allow[SH210] reviewed\n", {("SH210", 1)}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_handler_code_is_refused(case: str) -> None:
    """Each family of the review, and each scan rule, refuses with the expected rule and line."""
    source, expected = CASES[case]
    assert refused(source) == expected


def test_every_scan_rule_has_a_case() -> None:
    scan_rules = {r for r in RULES if r.startswith(("SH00", "SH11", "SH21"))}
    assert len(scan_rules) == 13  # SH001-003, SH110-114, SH210-214; SH10x/SH20x: the lint
    covered = {rule for _, expected in CASES.values() for rule, _ in expected}
    covered |= {rule for _, expected in SHADOWS.values() for rule, _ in expected}
    assert scan_rules <= covered, sorted(scan_rules - covered)


def test_encoding_cookie_case_really_runs_its_hidden_line(tmp_path: Path) -> None:
    """The utf-7 family is real: `+AAo-` decodes to a newline, so Python runs the rest of
    what a UTF-8 reader sees as a comment."""
    marker = tmp_path / "ran"
    hidden = f"open({str(marker)!r}, 'w').write('x')".encode("ascii")
    payload = b"# coding: utf-7\nx = 1  # +AAo-" + hidden + b"\n"
    script = tmp_path / "h.py"
    script.write_bytes(payload)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    assert marker.exists()  # Python executed the hidden statement
    assert refused(payload) == {("SH002", 1)}


def test_pydantic_subclass_case_really_evaluates_a_string(tmp_path: Path) -> None:
    """SH214 is not hypothetical: pydantic evaluates a subclass's string annotation, so a
    class body that names only allowed things runs code given as text."""
    marker = tmp_path / "ran"
    source = (
        "from secure_handler import ImageLimits\n\n\nclass L(ImageLimits):\n"
        f"    x: \"[open({str(marker)!r}, 'w'), int][1]\" = 1\n"
    )
    script = tmp_path / "h.py"
    script.write_text(source)
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, capture_output=True)
    assert marker.exists()
    assert refused(source) == {("SH214", 4)}


def test_fake_object_case_really_runs_eval(tmp_path: Path) -> None:
    """The raw-memory family is real: an object array over a bytearray holding an address
    returns the object there, so `divmod`'s neighbour `eval` runs a string. The offset is
    measured in the same interpreter, so the proof does not depend on one build's layout."""
    marker = tmp_path / "ran"
    offset = subprocess.run(
        [sys.executable, "-c", "print(id(eval) - id(divmod))"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    source = FAKE_OBJECT_HANDLER.format(offset=offset, marker=str(marker))
    (tmp_path / "fakeobj_handler.py").write_text(source)
    subprocess.run([sys.executable, "-c", "import fakeobj_handler"], cwd=tmp_path, check=True,
                   timeout=120, capture_output=True)  # fmt: skip
    assert marker.exists()
    assert refused(source) == {("SH111", 5), ("SH210", 8)}


def test_parse_raw_case_really_unpickles_and_runs_a_process(tmp_path: Path) -> None:
    """The library's limits models inherit pydantic's v1 `parse_raw`, which unpickles when
    asked to: a pickle written as a bytes literal runs `touch` in the worker."""
    marker = tmp_path / "ran"
    source = PARSE_RAW_HANDLER.format(marker=marker)
    (tmp_path / "parse_raw_handler.py").write_text(source)
    # pydantic then refuses the unpickled value (the exit status is 1): the process ran first
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import parse_raw_handler"],
                   cwd=tmp_path, check=False, timeout=120, capture_output=True)  # fmt: skip
    assert marker.exists()
    assert refused(source) == {("SH212", 4)}


def test_model_copy_case_really_rewrites_memory_and_runs_eval(tmp_path: Path) -> None:
    """`model_copy(update=...)` puts `__array_interface__` on the copy; numpy then maps any
    address as a writable array, so a slot holding `divmod` is rewritten to hold `eval`."""
    marker = tmp_path / "ran"
    offset = subprocess.run(
        [sys.executable, "-c", "print(id(eval) - id(divmod))"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    source = MODEL_COPY_HANDLER.format(offset=offset, marker=str(marker))
    (tmp_path / "model_copy_handler.py").write_text(source)
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import model_copy_handler"],
                   cwd=tmp_path, check=True, timeout=120, capture_output=True)  # fmt: skip
    assert marker.exists()
    assert refused(source) == {("SH212", 13)}


def test_wraps_case_really_leaves_a_view_of_freed_memory() -> None:
    """The wraps family is real: numpy honours the copied interface after the array is gone."""
    import functools

    import numpy as np

    def holder() -> None:
        return None

    def copy_interface() -> None:
        functools.wraps(np.arange(8, dtype=np.uint8), assigned=("__array_interface__",),
                        updated=())(holder)  # fmt: skip

    copy_interface()
    view = np.asarray(holder)  # type: ignore[call-overload]
    assert (view.dtype, view.shape) == (np.uint8, (8,))  # memory no array owns any more
    assert refused("import functools\nfunctools.wraps(a, ('x',))(g)\n") == {("SH111", 2)}


def test_plain_copies_stay_allowed() -> None:
    source = ("import copy\nimport functools\n\n\ndef f(arr, d, limits, g):\n"
              "    functools.wraps(g)(f)\n"
              "    return arr.copy(), d.copy(), copy.copy(d), limits.model_copy(deep=True)\n")
    assert refused(source) == set()


GRAPH_EDIT = """\
def poison(model, path):
    graph = model.graph
    ret = graph.return_node()
    node = graph.create("aten::save", [ret.input(), graph.insertConstant(path)], 0)
    node.insertBefore(ret)
"""


def test_graph_edit_case_really_makes_forward_write_a_file(tmp_path: Path) -> None:
    """SH212 on `graph`: a handler that edits the loaded model's IR (allowed names only, before
    this rule) makes `forward` call `aten::save`, so serving one request writes a file."""
    marker = tmp_path / "written.pt"
    (tmp_path / "graph_edit.py").write_text(GRAPH_EDIT)
    (tmp_path / "plus_one.py").write_text(
        "import torch\n\n\nclass PlusOne(torch.nn.Module):\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        return x + 1\n"
    )
    script = (
        "import warnings\nwarnings.simplefilter('ignore')\nimport sys, torch\n"
        "from plus_one import PlusOne\nfrom graph_edit import poison\n"
        "model = torch.jit.script(PlusOne())\npoison(model, sys.argv[1])\n"
        "model(torch.zeros(2))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(marker)], cwd=tmp_path, check=True,
                   timeout=300, capture_output=True)  # fmt: skip
    assert marker.exists()
    assert refused(GRAPH_EDIT) == {("SH212", 2)}


# --- archive modules named like modules outside the archive (SH412) -------------------------

#: The worker runs the module Python already imported or finds first on `sys.path` (the
#: standard library, site-packages and TorchServe's own folder are all there), while the scan
#: judged the archive's own file of that name.
SHADOWS: dict[str, tuple[dict[str, bytes], set[tuple[str, str]]]] = {
    "stdlib-os": ({"os.py": b"def system(command):\n    return 0\n",
                   "handler.py": b"import os\nos.system('id')\n"}, {("SH412", "os.py")}),
    "torch": ({"torch.py": b"def save(obj, path):\n    return None\n",
               "handler.py": b"import torch\ntorch.save(1, '/tmp/x')\n"},
              {("SH412", "torch.py")}),
    "library-package": ({"secure_handler/__init__.py": b"x = 1\n",
                         "handler.py": b"import secure_handler\n"},
                        {("SH412", "secure_handler/__init__.py")}),
    "namespace-package": ({"subprocess/run.py": b"x = 1\n", "handler.py": b"x = 1\n"},
                          {("SH412", "subprocess/run.py")}),
    "torchserve-folder": ({"model_server.py": b"def start():\n    return None\n",
                           "handler.py": b"import model_server\nmodel_server.start()\n"},
                          {("SH412", "model_server.py")}),
    "startup-hook": ({"sitecustomize.py": b"x = 1\n", "handler.py": b"x = 1\n"},
                     {("SH412", "sitecustomize.py")}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SHADOWS))
def test_archive_module_named_like_an_outside_module_is_refused(case: str) -> None:
    files, expected = SHADOWS[case]
    assert {(f.rule, f.location) for f in scan_tree(files).findings} == expected


def test_shadow_case_really_runs_the_real_module(tmp_path: Path) -> None:
    """CWE-427: with the model directory on PYTHONPATH the archive's `os.py` is never the
    `os` the handler gets; the scan judged a harmless `system`, Python ran the real one."""
    marker = tmp_path / "ran"
    files = {"os.py": b"def system(command):\n    return 0\n",
             "shadow_handler.py": f"import os\nos.system('touch {marker}')\n".encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", "import shadow_handler"], cwd=tmp_path, env=env,
                   check=True, timeout=60, capture_output=True)  # fmt: skip
    assert marker.exists()
    assert {(f.rule, f.location) for f in scan_tree(files).findings} == {("SH412", "os.py")}


# --- no false refusals ------------------------------------------------------------------------

REALISTIC_HANDLER = '''\
"""A custom text handler that uses most of what the allowlist offers."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from secure_handler import InvalidText, SecureTextClassifier

logger = logging.getLogger(__name__)
WORD = re.compile(r"[a-z']+")


@dataclass
class Scored:
    label: str
    score: float
    notes: list[str] = field(default_factory=list)


class TopicHandler(SecureTextClassifier):
    """Own word filter, temperature, top-2 with entropy."""

    temperature = 1.5

    def __init__(self) -> None:
        super().__init__()
        self.seen = Counter()

    def decode(self, payload: str, idx: int) -> list[int]:
        words = WORD.findall(payload.lower())
        if not words:
            raise InvalidText("no words")
        self.seen.update(words)
        return super().decode(" ".join(words), idx)

    def format_outputs(self, outputs: Any, items: Any) -> list[Any]:
        with torch.inference_mode():
            probs = F.softmax(outputs.float() / self.temperature, dim=-1)
            top = torch.topk(probs, k=min(2, probs.shape[-1]), dim=-1)
        rows = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            entropy = -sum(v * math.log(v) for v in values if v > 0)
            spread = float(np.asarray(values, dtype=np.float32).std())
            best = Scored(str(indices[0]), round(values[0], 4), [f"{spread:.3f}"])
            rows.append({"label": best.label, "score": best.score, "entropy": entropy,
                         "notes": best.notes, "raw": json.dumps(values)})
        if getattr(self, "limits", None) is not None and hasattr(self.model, "eval"):
            logger.debug("scored %d rows", len(rows))
        return rows
'''


@pytest.mark.parametrize("kind", sorted(HANDLER_KINDS))
def test_generated_handlers_pass(kind: str) -> None:
    assert scan_source(render_handler(kind), f"secure_handler_{kind}.py") == []


@pytest.mark.parametrize("example", ["image_classifier", "object_detector", "text_classifier"])
def test_example_handlers_pass(example: str) -> None:
    handler = EXAMPLES / example / "handler.py"
    assert scan_source(handler.read_bytes(), str(handler)) == []


def test_realistic_custom_handler_passes() -> None:
    assert scan_source(REALISTIC_HANDLER, "handler.py") == []


def test_archive_modules_import_each_other_and_a_bom_is_fine() -> None:
    files = {
        "handler.py": b"\xef\xbb\xbffrom secure_handler import SecureImageClassifier\n"
        b"import textutil\nfrom pkg.scoring import best\n\n\n"
        b"class H(SecureImageClassifier):\n    def format_outputs(self, outputs, items):\n"
        b"        return [best(textutil.clean(str(o))) for o in outputs.tolist()]\n",
        "textutil.py": b"# -*- coding: utf-8 -*-\nimport re\n\n\ndef clean(s):\n"
        b"    return re.sub(r'\\s+', ' ', s)\n",
        "pkg/__init__.py": b"",
        "pkg/scoring.py": b"from .rules import RULE\n\n\ndef best(s):\n    return RULE + s\n",
        "pkg/rules.py": b"RULE = 'top: '\n",
    }
    assert scan_tree(files).findings == []


def test_every_python_member_is_judged_not_only_the_handler() -> None:
    files = {
        "handler.py": b"from helper import boot\n",
        "helper.py": b"import torch\nboot = torch.ones(1)\nleak = torch.save\n",
        "unused/tool.py": b"import subprocess\n",
    }
    found = {(f.rule, f.location) for f in scan_tree(files, "m.mar!").findings}
    assert found == {("SH111", "m.mar!helper.py:3"), ("SH110", "m.mar!unused/tool.py:1")}


def test_an_archive_module_cannot_reexport_what_it_imported() -> None:
    files = {
        "handler.py": b"import helper\nfrom helper import torch\nx = helper.torch.cat\n",
        "helper.py": b"import torch\n",
    }
    found = {(f.rule, f.location) for f in scan_tree(files).findings}
    assert found == {("SH111", "handler.py:2"), ("SH111", "handler.py:3")}


def test_findings_name_rule_line_cwe_and_fix() -> None:
    [hit] = scan_source("import json\n\nimport subprocess as sp\n", "handler.py")
    assert (hit.rule, hit.location, hit.cwe) == ("SH110", "handler.py:3", RULES["SH110"].cwe)
    assert "subprocess" in hit.message
    assert "fix: move this into a reviewed package installed in the image" in hit.message


# --- end to end: archive, verify and lock never take a waiver from the archive ---------------


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(TorchScript model, labels) for the archives built here."""
    directory = tmp_path_factory.mktemp("allowlist-src")
    labels = directory / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    return build_tiny_classifier(directory), labels


SAVING_HANDLER = (
    "from secure_handler import SecureImageClassifier\n\n\n"
    "class Handler(SecureImageClassifier):\n"
    "    def setup(self):\n"
    "        self.model.save('/tmp/secure-handler-cache.pt')  # secure-handler: allow[SH212]\n"
)
SAVING_LINE = "self.model.save('/tmp/secure-handler-cache.pt')  # secure-handler: allow[SH212]"


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(argv)
    return code, json.loads(capsys.readouterr().out or capsys.readouterr().err or "null")


def blocking_rules(payload: Any) -> set[tuple[str, str]]:
    return {(f["rule"], f["location"]) for f in payload["findings"] if not f["allowed"]}


def archive_argv(src: tuple[Path, Path], export: Path, handler: Path, *extra: str) -> list[str]:
    return [
        "archive", "--model-name", "h", "--version", "1.0", "--serialized-file", str(src[0]),
        "--handler", str(handler), "--extra-files", str(src[1]), "--export-path",
        str(export), "--json", *extra,
    ]  # fmt: skip


def write_policy(path: Path, line: str, rule: str = "SH212") -> Path:
    from secure_handler.supply.policy import line_sha256

    waiver = {"file": "handler.py", "rule": rule, "line_sha256": line_sha256(line),
              "reason": "reviewed: the cache path is fixed"}  # fmt: skip
    path.write_text(json.dumps({"format": "secure-handler-policy/1", "waivers": [waiver]}))
    return path


def test_self_waiver_comment_is_ignored_by_archive_verify_and_lock(
    tmp_path: Path, src: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """CWE-749: the archive's own `allow[...]` comment waived its finding in archive, verify,
    lock and serve. Comments are not read; each step refuses."""
    handler = tmp_path / "handler.py"
    handler.write_text(SAVING_HANDLER)
    code, result = run_json(archive_argv(src, tmp_path, handler), capsys)
    assert (code, blocking_rules(result)) == (1, {("SH212", "h.mar!handler.py:6")})
    assert not (tmp_path / "h.mar").exists()

    store = tmp_path / "store"
    mar = archive_mar(store, "h", src[0], handler, [src[1]])  # the stock archiver builds it
    code, report = run_json(["verify", "--json", "--allow-missing-digests", str(mar)], capsys)
    assert (code, blocking_rules(report)) == (1, {("SH212", "h.mar!handler.py:6")})
    assert main(["lock", str(store), "-o", str(tmp_path / "models.lock")]) == 1
    assert not (tmp_path / "models.lock").exists()


def test_serve_refuses_a_self_waivered_handler_even_when_the_lock_pins_it(
    tmp_path: Path, src: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve` accepted the archive's own waiver too: with a lock written by hand that pins
    the exact archive, it still refuses before TorchServe starts."""
    from secure_handler.supply.verify import LOCK_FORMAT, render_lock, verify_mar

    handler = tmp_path / "handler.py"
    handler.write_text(SAVING_HANDLER)
    store = tmp_path / "store"
    mar = archive_mar(store, "h", src[0], handler, [src[1]])
    lock = tmp_path / "models.lock"
    lock.write_text(render_lock({"format": LOCK_FORMAT, "models": [verify_mar(mar).lock_entry()]}))
    capsys.readouterr()
    argv = ["serve", "--model-store", str(store), "--lock", str(lock),
            "--state", str(tmp_path / "state.json")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err
    assert "h.mar!handler.py:6: SH212" in err
    assert not (tmp_path / "state.json").exists()


def test_operator_policy_waiver_is_recorded_in_the_lock_and_required_by_verify(
    tmp_path: Path, src: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A waiver comes from the operator's policy file, is recorded in the lock, and a lock
    that records it verifies only with the same waiver (not without, not with another)."""
    handler = tmp_path / "handler.py"
    handler.write_text(SAVING_HANDLER)
    policy = write_policy(tmp_path / "policy.json", SAVING_LINE)
    store = tmp_path / "store"
    code, result = run_json(archive_argv(src, store, handler, "--policy", str(policy)), capsys)
    assert (code, blocking_rules(result)) == (0, set())
    [waived] = [f for f in result["findings"] if f["allowed"]]
    assert (waived["rule"], waived["location"]) == ("SH212", "h.mar!handler.py:6")

    lock = tmp_path / "models.lock"
    assert main(["lock", str(store), "-o", str(lock), "--policy", str(policy)]) == 0
    [entry] = json.loads(lock.read_text())["models"]
    assert entry["waivers"] == [{"file": "handler.py", "rule": "SH212",
                                 "line_sha256": json.loads(policy.read_text())["waivers"][0][
                                     "line_sha256"]}]  # fmt: skip
    verify_lock = ["verify", "--json", "--lock", str(lock), str(store / "h.mar")]
    assert run_json([*verify_lock, "--policy", str(policy)], capsys)[0] == 0

    code, report = run_json(verify_lock, capsys)  # no policy: the finding blocks again
    assert code == 1
    assert {r for r, _ in blocking_rules(report)} == {"SH212", "SH507"}

    other = write_policy(tmp_path / "other.json", "self.model.save('/elsewhere')")
    code, report = run_json([*verify_lock, "--policy", str(other)], capsys)
    assert (code, {r for r, _ in blocking_rules(report)}) == (1, {"SH212", "SH507"})


def test_a_policy_cannot_waive_an_encoding_or_syntax_refusal(tmp_path: Path) -> None:
    from secure_handler.supply.policy import load_policy

    bad = write_policy(tmp_path / "p.json", "# coding: utf-7", rule="SH002")
    with pytest.raises(ValueError, match="SH002 cannot be waived"):
        load_policy(bad)


# --- item 4: members Python could import code from, found by their bytes -----------------------


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("evil.py", "import os\nos.system('id')\n")
    return buf.getvalue()


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"import os\n"
        info = tarfile.TarInfo("evil.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _pyc_bytes() -> bytes:
    import importlib.util
    import marshal

    code = compile("import os\n", "evil.py", "exec")
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


CARRIERS = {
    # (member name, bytes, rule): names and first bytes that look harmless
    "text-then-zip": ("notes.txt", b"release notes\n" + _zip_bytes(), "SH410"),
    "json-then-zip": ("vocab.json", b'{"a": 1}\n' + _zip_bytes(), "SH410"),
    "python-then-zip": ("helper.py", b"X = 1\n#" + _zip_bytes(), "SH410"),
    "wheel": ("plugin.whl", _zip_bytes(), "SH410"),
    "egg": ("lib.egg", b"not even a zip", "SH410"),
    "tar-by-content": ("weights.dat", _tar_bytes(), "SH410"),
    "gzip-by-content": ("blob.bin", b"\x1f\x8b\x08\x00" + bytes(16), "SH410"),
    "pth": ("hooks.pth", b"import os; os.system('id')\n", "SH412"),
    "entry-points": ("evil-1.0.dist-info/entry_points.txt",
                     b"[torch.backends]\nx = evil:load\n", "SH412"),
    "elf-by-content": ("labels.dat", b"\x7fELF\x02\x01\x01" + bytes(57), "SH408"),
    "pyc-by-content": ("cache.txt", _pyc_bytes(), "SH408"),
    "pyd": ("fast.pyd", b"MZ", "SH408"),
}  # fmt: skip


@pytest.fixture(scope="module")
def clean_mar(tmp_path_factory: pytest.TempPathFactory, src: tuple[Path, Path]) -> Path:
    export = tmp_path_factory.mktemp("allowlist-clean")
    handler = export / "handler.py"
    handler.write_text(render_handler("image"))
    assert main(archive_argv(src, export, handler)[:-1]) == 0
    return export / "h.mar"


@pytest.mark.parametrize("case", sorted(CARRIERS))
def test_member_python_could_import_code_from_is_refused(
    tmp_path: Path, clean_mar: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """CWE-94/CWE-427: zipimport reads a zip from the END of any file; .pth, package metadata,
    bytecode and native code are importable too. Found by content, whatever the name."""
    name, data, rule = CARRIERS[case]
    mar = tmp_path / "h.mar"
    with zipfile.ZipFile(clean_mar) as zin, zipfile.ZipFile(mar, "w") as out:
        for info in zin.infolist():
            out.writestr(info, zin.read(info))
        out.writestr(name, data)
    code, report = run_json(["verify", "--json", str(mar)], capsys)
    assert code == 1
    # SH503 also fires (the member is not in the digests); the carrier rule must be there too
    assert (rule, f"h.mar!{name}") in blocking_rules(report)


def test_verify_refuses_an_archive_module_that_shadows_os(
    tmp_path: Path, clean_mar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mar = tmp_path / "h.mar"
    with zipfile.ZipFile(clean_mar) as zin, zipfile.ZipFile(mar, "w") as out:
        for info in zin.infolist():
            out.writestr(info, zin.read(info))
        out.writestr("os.py", b"def system(command):\n    return 0\n")
    code, report = run_json(["verify", "--json", str(mar)], capsys)
    assert code == 1
    assert ("SH412", "h.mar!os.py") in blocking_rules(report)


def test_archive_refuses_a_text_extra_file_with_a_zip_appended(
    tmp_path: Path, src: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"release notes\n" + _zip_bytes())
    handler = tmp_path / "handler.py"
    handler.write_text(render_handler("image"))
    argv = archive_argv(src, tmp_path, handler)
    argv[argv.index("--extra-files") + 1] += f",{notes}"
    code, result = run_json(argv, capsys)
    assert (code, blocking_rules(result)) == (1, {("SH410", "h.mar!notes.txt")})
