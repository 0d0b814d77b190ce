"""Audit rules for the server's environment: variables that choose what code TorchServe runs.

Four kinds of reader take code locations from the environment: the dynamic loader (`LD_*`),
the JVM and TorchServe's launcher (`JAVA_HOME`, `PATH` for `java`, and `nvidia-smi` and
`python` that the frontend runs), the Python interpreters (`PYTHON*`), and the frontend itself
(`TS_MODEL_SERVER_HOME` names the folder whose `ts/model_service_worker.py` every worker runs;
Java reads it whatever `enable_envvars_config` says). A path named there must be absolute and
writable only by root or the server's user: a relative or empty entry is resolved in each
process's working directory, and a worker's is the archive TorchServe extracted, so the
archive's files would load as native code or run as programs before any check of it.

In those namespaces the audit works from an allowlist: a variable it does not know is rated
high, because it cannot say what it does to the server (e.g. `PYTHONWARNINGS` imports modules,
`LD_DEBUG_OUTPUT` writes files).
"""

from __future__ import annotations

import os
import re
import site
import stat
from collections.abc import Iterator
from pathlib import Path

from secure_handler.deploy.audit import jvm
from secure_handler.deploy.audit.context import ENV_OVERRIDES, AuditContext
from secure_handler.deploy.audit.report import ConfigFinding

__all__ = ["LOADER_VARS", "RULES", "WATCHED_PREFIXES", "others_write", "writable_chain"]

#: Variables naming where code is loaded from, and how their entries are separated (None: one
#: path). `$JAVA_HOME/bin/java` is what the launcher runs; without JAVA_HOME it is `java` from
#: PATH, where the frontend also finds `nvidia-smi` and the CPU launcher's `python`.
LOADER_VARS: dict[str, str | None] = {
    "JAVA_HOME": None, "PATH": ":", "LD_PRELOAD": r"[:\s]+", "LD_AUDIT": ":",
    "LD_LIBRARY_PATH": ":", "PYTHONPATH": ":", "PYTHONHOME": ":", "PYTHONUSERBASE": None,
    "PYTHONPYCACHEPREFIX": None,
}
#: Where a JAVA_HOME's code lives: the binary the launcher runs and the JVM's libraries.
_JAVA_PARTS = ("bin", "bin/java", "lib", "lib/server", "lib/server/libjvm.so")

#: Namespaces read by TorchServe, the JVM, the dynamic loader and Python.
WATCHED_PREFIXES = ("TS_", "JAVA", "_JAVA", "JDK_", "JRE_", "OPENJ9", "IBM_JAVA", "LD_",
                    "PYTHON")
#: Variables of those namespaces that choose no code and open no door (checked: the reader's
#: documentation or source), or that another rule judges.
_KNOWN = frozenset({
    # CPython: buffering, hashing, encodings, diagnostics, no user site, safe path
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "PYTHONIOENCODING",
    "PYTHONUTF8", "PYTHONFAULTHANDLER", "PYTHONNOUSERSITE", "PYTHONSAFEPATH",
    "PYTHONCOERCECLOCALE", "PYTHONOPTIMIZE", "PYTHONTRACEMALLOC", "PYTHONDEVMODE",
    "PYTHONNODEBUGRANGES", "PYTHONINTMAXSTRDIGITS", "PYTHONMALLOC",
    # the official Python container images describe their build with these; CPython reads none
    "PYTHON_VERSION", "PYTHON_SHA256", "PYTHON_PIP_VERSION", "PYTHON_SETUPTOOLS_VERSION",
    "PYTHON_GET_PIP_URL", "PYTHON_GET_PIP_SHA256",
    # JVM images set these; `java` reads neither, and CLASSPATH is ignored beside `-cp`
    "JAVA_VERSION", "JAVA_OPTS", "JAVA_HOME", "CLASSPATH",
    # glibc: resolve symbols at start-up (no file named)
    "LD_BIND_NOW",
    # TorchServe: read by the frontend or the worker, judged elsewhere or harmless
    "TS_CONFIG_FILE", "TS_MODEL_SERVER_HOME", "TS_BENCHMARK",
    *jvm.JVM_ENV_VARS, *LOADER_VARS, *ENV_OVERRIDES,
})


def loader_environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for name, separator in LOADER_VARS.items():
        value = ctx.environ.get(name)
        if not value:
            continue
        entries = re.split(separator, value) if separator else [value]
        relative = [e or "(empty)" for e in entries if _cwd_relative(name, e)]
        writable = [e or "(empty)" for e in entries if not _cwd_relative(name, e)
                    and any(writable_chain(p) for p in _code_paths(name, Path(e or ".")))]
        if relative:
            yield ctx.finding("high", name, f"{', '.join(relative)} is not an absolute path: "
                              "each process resolves it in its own working directory, and a "
                              "worker's is the archive TorchServe extracted, so files of the "
                              "archive would be loaded or run before any check of it.",
                              f"Use absolute root-owned paths in {name}, or unset it.",
                              cwe=["CWE-427", "CWE-426"], source="environment", value=value)
        if writable:
            yield ctx.finding("high", name, f"names {', '.join(writable)}, which other users "
                              "can write (or a folder on the way to it): they can put code "
                              "there that TorchServe's processes load.",
                              f"Point {name} at root-owned paths only, or unset it.",
                              cwe=["CWE-427", "CWE-732"], source="environment", value=value)
        elif not relative and name in ("LD_PRELOAD", "LD_AUDIT"):
            yield ctx.finding("medium", name, "every process of the server (JVM and workers) "
                              "loads these libraries first.", f"Unset {name} unless you put "
                              "it there (e.g. an allocator), and keep the files root-owned.",
                              cwe=["CWE-427"], source="environment", value=value)


def _cwd_relative(name: str, entry: str) -> bool:
    """An entry resolved in the working directory: empty, or relative. A preload without a
    `/` is a library name, searched for in the loader's paths (judged in LD_LIBRARY_PATH).
    PYTHONPATH is the exception: TorchServe already puts each worker's working directory (the
    model folder) on it, so a relative entry adds only the launcher's, judged as the audit's
    own."""
    if name == "PYTHONPATH" or (name in ("LD_PRELOAD", "LD_AUDIT") and entry and "/" not in entry):
        return False
    return not entry.startswith("/")


def _code_paths(name: str, path: Path) -> list[Path]:
    return [path, *(path / part for part in _JAVA_PARTS)] if name == "JAVA_HOME" else [path]


def writable_chain(path: Path) -> bool:
    """Someone else can put a file at `path`: it, or a folder on the way, is writable by
    other users or owned by one; a missing path counts as whatever its nearest folder allows
    (in a sticky /tmp anyone can create it first)."""
    path = path if path.is_absolute() else Path.cwd() / path
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and others_write(existing, sticky_protects=False):
        return True
    return any(others_write(p, sticky_protects=True) for p in (existing, *existing.parents))


def others_write(path: Path, *, sticky_protects: bool) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    open_bits = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if sticky_protects and info.st_mode & stat.S_ISVTX:
        open_bits = 0  # others may add entries, not replace this one
    return bool(open_bits) or info.st_uid not in (0, os.getuid())


def user_site(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """CPython outside a virtual environment puts `$HOME/.local/lib/pythonX.Y/site-packages`
    on every worker's path and runs the `.pth` files there at start-up (judged for the
    interpreter running the audit, which is the one the launcher passes as `--python`)."""
    home = ctx.environ.get("HOME")
    if (not site.ENABLE_USER_SITE or not home or ctx.environ.get("PYTHONNOUSERSITE")
            or "PYTHONUSERBASE" in ctx.environ):  # PYTHONUSERBASE is judged above
        return
    base = Path(home) / ".local"
    if not home.startswith("/") or writable_chain(base):
        yield ctx.finding("high", "HOME", f"{base} is relative, or other users can write it "
                          "(or a folder above it): a `.pth` file they put in its site-packages "
                          "runs in every worker at start-up.", "Set PYTHONNOUSERSITE=1, run "
                          "TorchServe from a virtual environment, or give the server a private "
                          "HOME.", cwe=["CWE-427", "CWE-732"], source="environment", value=home)


def model_server_home(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """`ConfigManager.getModelServerHome` reads TS_MODEL_SERVER_HOME before anything else."""
    value = ctx.environ.get("TS_MODEL_SERVER_HOME")
    if value is None or _is_installed_home(value):
        return
    yield ctx.finding("high", "TS_MODEL_SERVER_HOME", f"the frontend runs every worker as "
                      f"`{value}/ts/model_service_worker.py` (and its metrics collector from "
                      "there), not the installed TorchServe: whoever fills that folder runs "
                      "code in every worker.", "Unset TS_MODEL_SERVER_HOME.",
                      cwe=["CWE-427", "CWE-94"], source="environment", value=value)


def _is_installed_home(value: str) -> bool:
    import ts

    try:
        return os.path.samefile(value, Path(ts.__file__).resolve().parent.parent)
    except OSError:
        return False


def extraction_folder(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """TorchServe unpacks every archive into `<java.io.tmpdir>/models/<uuid>` and the worker
    runs from there; the launcher sets java.io.tmpdir from TEMP (else the JVM uses /tmp).
    If another user owns or can write `models`, they can swap an unpacked model's files."""
    models = Path(ctx.environ.get("TEMP") or "/tmp") / "models"
    if models.exists() and writable_chain(models):
        yield ctx.finding("high", "TEMP", f"TorchServe unpacks archives into {models}/<id>, "
                          "and another user owns or can write that folder (or one above it): "
                          "they can replace an unpacked model's files before its worker "
                          "loads them.", "Set TEMP to a folder only the server's user can "
                          "write (the launcher passes it as -Djava.io.tmpdir).",
                          cwe=["CWE-377", "CWE-732"], source="environment", value=str(models))


def unknown_environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for name, value in sorted(ctx.environ.items()):
        if name.upper().startswith(WATCHED_PREFIXES) and name not in _KNOWN:
            yield ctx.finding("high", name, "a variable in a namespace that TorchServe, the "
                              "JVM, the dynamic loader or Python read, and not one the audit "
                              "knows: it cannot say what it does to the server (PYTHONWARNINGS "
                              "imports modules, LD_DEBUG_OUTPUT writes files...).",
                              f"Unset {name}.", cwe=["CWE-15"], source="environment",
                              value=value)


RULES = (loader_environment, user_site, model_server_home, extraction_folder, unknown_environment)
