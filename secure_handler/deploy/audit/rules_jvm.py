"""Audit rules for code the frontend's JVM, the environment or the config itself loads.

`vmargs` and `plugins_path` reach the JVM through TorchServe's Python launcher, which reads the
file with its own parser and splits `vmargs` with `str.split()`; the JVM option variables
(`JAVA_TOOL_OPTIONS`, `JDK_JAVA_OPTIONS`, `_JAVA_OPTIONS`) reach it from the environment. Every
resulting JVM argument is judged by the allowlist in `jvm` (heap and GC settings only). The
launcher decodes the file in the locale's encoding, so non-ASCII bytes outside comments are
refused; `model_store` reaches Java from the launcher too (as `-s`). The CPU launcher's
arguments start every worker and are judged by an allowlist of core-pinning options.
Variables that name code to load (`JAVA_HOME`, `LD_PRELOAD`, `PYTHONPATH`...) are judged in
`rules_env`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from secure_handler.deploy.audit import jvm
from secure_handler.deploy.audit.context import AuditContext
from secure_handler.deploy.audit.report import ConfigFinding
from secure_handler.deploy.audit.rules_env import others_write, writable_chain

__all__ = ["RULES"]

_JVM_FIX = ("Keep only heap and GC settings (-Xmx, -Xms, -Xss, -XX:MaxRAMPercentage=, "
            "-XX:+UseG1GC, ...); load nothing into the JVM.")


def parser_disagreement(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """The launcher and Java must read the keys the launcher takes the same way: `vmargs`,
    `plugins_path`, and `model_store` (passed to Java as `-s`, overriding Java's reading)
    unless the command line names the store."""
    keys = ["vmargs", "plugins_path"]
    keys += [] if getattr(ctx.cmdline, "model_store", None) else ["model_store"]
    for key in keys:
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


def launcher_encoding(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """Non-ASCII bytes outside comments: the launcher decodes them in the locale's encoding.

    Java reads ISO-8859-1; the launcher reads UTF-8, GB18030, Shift_JIS... as the machine's
    locale says. Bytes A1 A1 are U+3000 in GB18030 (a space `strip()` removes, so the line is
    `vmargs=` to the launcher), and a Shift_JIS or Big5 character can swallow the next ASCII
    byte. No one decoding shows what the launcher sees: refuse the bytes instead.
    """
    lines = re.split(r"\r\n|\r|\n", ctx.text)
    for number, line in enumerate(lines, 1):
        if line.isascii() or line.lstrip(" \t\x0b\x0c").startswith("#"):
            continue
        yield ctx.finding("high", f"config line {number}", "non-ASCII bytes outside a comment: "
                          "TorchServe's Python launcher decodes the file in the server's locale "
                          "encoding (it reads vmargs, plugins_path and model_store from it) "
                          "while Java reads ISO-8859-1, so what this line says depends on the "
                          f"machine: `{_visible(line[:60])}`.", "Write non-ASCII characters "
                          "as \\uXXXX escapes (`secure-handler config` does).",
                          cwe=["CWE-436", "CWE-176"], source="config", value=line[:200])


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


def plugins(ctx: AuditContext) -> Iterator[ConfigFinding]:
    paths = [p for p in ctx.launcher_values("plugins_path") if p]  # the launcher skips ""
    if getattr(ctx.cmdline, "plugins_path", None):
        paths.append(ctx.cmdline.plugins_path)  # type: ignore[union-attr]
    for path in paths:
        # The launcher appends `:<value>/*` (or `:<value>` when it holds a `*`) to the Java
        # class path; an empty or relative entry is the frontend's working directory.
        fragment = path if "*" in path else path + "/*"
        entries = fragment.split(":")
        relative = [e or "(empty)" for e in entries if not e.startswith("/")]
        folders = [Path(e.rstrip("*").rstrip("/") or "/") for e in entries if e.startswith("/")]
        # A sticky folder does not help: anyone may add a jar, and `*` loads every jar.
        writable = [str(p) for p in folders if others_write(p, sticky_protects=False)
                    or writable_chain(p)]
        bad = relative + writable
        yield ctx.finding("high" if bad else "medium", "plugins_path", f"every jar in "
                          f"`{path}` runs inside the frontend with its privileges"
                          + (f", and {', '.join(bad)} is relative (the frontend's working "
                             "directory) or writable by other users" if bad else "") + ".",
                          "Remove plugins_path, or make it an absolute root-owned directory "
                          "and pin its jars.", cwe=["CWE-829"] + (["CWE-732"] if bad else []),
                          source="launcher", value=path)


def commands(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.get("system_metrics_cmd"):
        yield ctx.finding("high", "system_metrics_cmd", "TorchServe runs this command line "
                          "periodically to collect system metrics: a config edit becomes "
                          "command execution.", "Remove system_metrics_cmd.", cwe=["CWE-78"])
    if ctx.flag("cpu_launcher_enable"):
        yield from _cpu_launcher(ctx, ctx.get("cpu_launcher_args") or "")


#: `torch.backends.xeon.run_cpu` options that only pin cores and pick instances. Left out:
#: --no-python and -m/--module (the next word becomes the program it runs), --log-path and
#: --log-file-prefix (files written), --enable-tcmalloc/--enable-jemalloc (preloads found in
#: environment-chosen folders), and argparse's abbreviations of any option.
_RUN_CPU_ALLOWED = re.compile(
    r"--(?:use[-_]default[-_]allocator|skip[-_]cross[-_]node[-_]cores|latency[-_]mode"
    r"|throughput[-_]mode|use[-_]logical[-_]core|disable[-_]numactl|disable[-_]taskset"
    r"|disable[-_]iomp|multi[-_]instance)"
    r"|(?:--(?:ncores[-_]per[-_]instance|ninstances|rank|node[-_]id)=?)?[0-9]{1,6}"
    r"|(?:--core[-_]list=?)?[0-9][0-9,-]{0,200}"
    r"|--(?:ncores[-_]per[-_]instance|ninstances|rank|node[-_]id|core[-_]list)",
    re.ASCII,
)


def _cpu_launcher(ctx: AuditContext, args: str) -> Iterator[ConfigFinding]:
    """The frontend runs `python -m torch.backends.xeon.run_cpu ARGS ... --no_python hostname`
    to probe, then starts each worker through it: ARGS are split on single spaces, as
    `WorkerLifeCycle.launcherArgsToList` does (`String.split(" ")`)."""
    tokens = args.split(" ") if args else []
    while tokens and tokens[-1] == "":  # Java's split drops trailing empty strings
        tokens.pop()
    bad = [t for t in tokens if not _RUN_CPU_ALLOWED.fullmatch(t)]
    if bad:
        yield ctx.finding("high", "cpu_launcher_args", "the CPU launcher (torch's run_cpu) "
                          "starts every worker with these arguments, and these are not core "
                          f"pinning options: {' '.join(_visible(b) or '(empty)' for b in bad)}. "
                          "`--no_python PROGRAM` runs any program, `-m` any module, and an "
                          "empty word (two spaces) is taken as the program.",
                          "Keep only --ncores-per-instance N, --node-id N, --core-list LIST, "
                          "--use-logical-core, --disable-numactl/-taskset/-iomp and the like, "
                          "one space apart.", cwe=["CWE-88", "CWE-94"])
    else:
        yield ctx.finding("medium", "cpu_launcher_enable", "every worker starts through "
                          "torch's run_cpu, which runs numactl/taskset from PATH and "
                          "preloads libiomp5 from $CONDA_PREFIX/lib, $VIRTUAL_ENV/lib or "
                          "~/.local/lib when it finds it there.", "Leave cpu_launcher_enable "
                          "off, or check those folders and add --disable-iomp.",
                          cwe=["CWE-427"])


def _visible(text: str) -> str:
    """`text` with invisible or unusual characters escaped, so the report shows them."""
    return text if text.isascii() and text.isprintable() else \
        text.encode("unicode_escape").decode("ascii")


RULES = (parser_disagreement, launcher_encoding, vmargs, jvm_environment, plugins, commands)
