"""Audit rules for code the frontend's JVM or the config itself starts.

`vmargs` and `plugins_path` reach the JVM through TorchServe's Python launcher, which reads the
file with its own parser and splits `vmargs` with `str.split()`; the JVM option variables
(`JAVA_TOOL_OPTIONS`, `JDK_JAVA_OPTIONS`, `_JAVA_OPTIONS`) reach it from the environment. Every
resulting JVM argument is judged by the allowlist in `jvm` (heap and GC settings only).
"""

from __future__ import annotations

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
    for value in ctx.launcher_values("vmargs"):
        if not value:
            continue
        bad = jvm.disallowed(jvm.launcher_tokens(value))
        if bad:
            yield ctx.finding("high", "vmargs", "TorchServe's launcher splits vmargs with "
                              "Python's str.split() (every Unicode space) and passes the JVM "
                              f"arguments that are not heap or GC settings: "
                              f"{' '.join(_visible(b) for b in bad)}. They can load code "
                              "(agents, argument files, modules, system properties).",
                              "Remove them from vmargs. " + _JVM_FIX, cwe=["CWE-94", "CWE-15"],
                              source="launcher", value=value)
        else:
            yield ctx.finding("low", "vmargs", "the config passes extra JVM arguments (heap and "
                              "GC settings only).", "Keep the file root-owned.", cwe=["CWE-15"],
                              source="launcher", value=value)


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


def plugins(ctx: AuditContext) -> Iterator[ConfigFinding]:
    paths = [*ctx.launcher_values("plugins_path")]
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


RULES = (parser_disagreement, vmargs, jvm_environment, plugins, commands)
