"""Audit rules for code the frontend's JVM, the environment or the config itself loads.

`vmargs` and `plugins_path` reach the JVM through TorchServe's Python launcher, which reads the
file with its own parser and splits `vmargs` with `str.split()`; the JVM option variables
(`JAVA_TOOL_OPTIONS`, `JDK_JAVA_OPTIONS`, `_JAVA_OPTIONS`) reach it from the environment. Every
resulting JVM argument is judged by the allowlist in `jvm` (heap and GC settings only).
Variables that name code to load (`JAVA_HOME`, `LD_PRELOAD`, `PYTHONPATH`...) must name paths
no other user can write.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from secure_handler.deploy.audit import jvm
from secure_handler.deploy.audit.context import AuditContext
from secure_handler.deploy.audit.report import ConfigFinding
from secure_handler.deploy.audit.rules_sources import writable_by_others

__all__ = ["RULES"]

_JVM_FIX = ("Keep only heap and GC settings (-Xmx, -Xms, -Xss, -XX:MaxRAMPercentage=, "
            "-XX:+UseG1GC, ...); load nothing into the JVM.")


def parser_disagreement(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """The launcher and Java must read `vmargs` and `plugins_path` the same way."""
    for key in ("vmargs", "plugins_path"):
        java = ctx.props.get(key)
        for seen in ctx.launcher_values(key):
            if java != seen:
                yield ctx.finding("high", key, f"TorchServe's launcher reads {key}="
                                  f"`{_visible(seen)}` but a Java properties reader sees "
                                  f"{'nothing' if java is None else repr(java)}: the two "
                                  "parsers disagree (a continuation, escape, separator or "
                                  "encoding hides it).", "Rewrite the file as plain ASCII "
                                  "`key=value` lines; remove the setting.", cwe=["CWE-436"],
                                  source="launcher", value=seen)


def vmargs(ctx: AuditContext) -> Iterator[ConfigFinding]:
    values = [v for v in ctx.launcher_values("vmargs") if v]
    if not values:
        return
    # One finding, over every decoding the launcher may use (a separator seen in one only).
    bad = list(dict.fromkeys(b for v in values for b in jvm.disallowed(jvm.launcher_tokens(v))))
    if bad:
        yield ctx.finding("high", "vmargs", "TorchServe's launcher splits vmargs with Python's "
                          "str.split() (every Unicode space) and passes the JVM arguments that "
                          f"are not heap or GC settings: {' '.join(_visible(b) for b in bad)}. "
                          "They can load code (agents, argument files, modules, system "
                          "properties).", "Remove them from vmargs. " + _JVM_FIX,
                          cwe=["CWE-94", "CWE-15"], source="launcher", value=values[0])
    else:
        yield ctx.finding("low", "vmargs", "the config passes extra JVM arguments (heap and GC "
                          "settings only).", "Keep the file root-owned.", cwe=["CWE-15"],
                          source="launcher", value=values[0])


def jvm_environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for name in jvm.JVM_ENV_VARS:
        value = ctx.environ.get(name)
        if not value:
            continue
        bad = jvm.disallowed(jvm.env_tokens(value))
        if bad:
            yield ctx.finding("high", name, f"the JVM reads options from {name}, and these are "
                              f"not heap or GC settings: {' '.join(_visible(b) for b in bad)}; "
                              "they run in TorchServe's frontend (agents, argument files, "
                              "system properties).", f"Unset {name}. " + _JVM_FIX,
                              cwe=["CWE-94", "CWE-15"], source="environment", value=value)
        else:
            yield ctx.finding("low", name, "JVM options come from the environment (heap and GC "
                              "settings only); the config alone does not say how the JVM runs.",
                              "Move them to vmargs.", cwe=["CWE-15"], source="environment",
                              value=value)


#: Variables naming code every server process loads: the java binary ($JAVA_HOME/bin/java,
#: run by the launcher), shared libraries, and the workers' Python import path.
_LOADER_VARS = {"JAVA_HOME": None, "LD_PRELOAD": r"[:\s]+", "LD_AUDIT": ":",
                "LD_LIBRARY_PATH": ":", "PYTHONPATH": ":", "PYTHONHOME": ":"}


def loader_environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for name, separator in _LOADER_VARS.items():
        value = ctx.environ.get(name)
        if not value:
            continue
        entries = [e for e in (re.split(separator, value) if separator else [value]) if e]
        writable = [e for e in entries if _writable_chain(Path(e))]
        if writable:
            yield ctx.finding("high", name, f"names {', '.join(writable)}, which other users "
                              "can write (or a folder on the way to it): they can put code "
                              "there that TorchServe's processes load.",
                              f"Point {name} at root-owned paths only, or unset it.",
                              cwe=["CWE-427", "CWE-732"], source="environment", value=value)
        elif name in ("LD_PRELOAD", "LD_AUDIT"):
            yield ctx.finding("medium", name, "every process of the server (JVM and workers) "
                              "loads these libraries first.", f"Unset {name} unless you put "
                              "it there (e.g. an allocator), and keep the files root-owned.",
                              cwe=["CWE-427"], source="environment", value=value)


def _writable_chain(path: Path) -> bool:
    """Someone else can put a file at `path`: it, or a folder on the way, is writable by
    other users or owned by one; a missing path counts as whatever its nearest folder allows
    (in a sticky /tmp anyone can create it first)."""
    path = path if path.is_absolute() else Path.cwd() / path
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and _others_write(existing, sticky_protects=False):
        return True
    return any(_others_write(p, sticky_protects=True) for p in (existing, *existing.parents))


def _others_write(path: Path, *, sticky_protects: bool) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    open_bits = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if sticky_protects and info.st_mode & stat.S_ISVTX:
        open_bits = 0  # others may add entries, not replace this one
    return bool(open_bits) or info.st_uid not in (0, os.getuid())


def plugins(ctx: AuditContext) -> Iterator[ConfigFinding]:
    paths = [p for p in ctx.launcher_values("plugins_path") if p]  # the launcher skips ""
    if getattr(ctx.cmdline, "plugins_path", None):
        paths.append(ctx.cmdline.plugins_path)  # type: ignore[union-attr]
    for path in paths:
        # The launcher appends the value to the Java class path: `:` separates entries.
        entries = [Path(p.rstrip("*").rstrip("/") or "/") for p in path.split(":") if p]
        writable = [str(p) for p in entries if writable_by_others(p)]
        yield ctx.finding("high" if writable else "medium", "plugins_path", f"every jar in "
                          f"`{path}` runs inside the frontend with its privileges"
                          + (f" and {', '.join(writable)} is writable by other users"
                             if writable else "") + ".", "Remove plugins_path, or make the "
                          "directory root-owned and pin its jars.", cwe=["CWE-829"]
                          + (["CWE-732"] if writable else []), source="launcher", value=path)


def commands(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.get("system_metrics_cmd"):
        yield ctx.finding("high", "system_metrics_cmd", "TorchServe runs this command line "
                          "periodically to collect system metrics: a config edit becomes "
                          "command execution.", "Remove system_metrics_cmd.", cwe=["CWE-78"])
    if ctx.flag("cpu_launcher_enable") and ctx.get("cpu_launcher_args"):
        yield ctx.finding("low", "cpu_launcher_args", "arguments are passed to the CPU launcher "
                          "that starts every worker.", "Review them; keep the file root-owned.",
                          cwe=["CWE-88"])


def _visible(text: str) -> str:
    """`text` with invisible or unusual characters escaped, so the report shows them."""
    return text if text.isascii() and text.isprintable() else \
        text.encode("unicode_escape").decode("ascii")


RULES = (parser_disagreement, vmargs, jvm_environment, loader_environment, plugins, commands)
