"""Audit rules for where models come from: `allowed_urls`, `load_models`, snapshots, the store.

`allowed_urls` is judged as Java reads it (`jregex`: a pattern outside the common subset is
refused), for every URL at once (`languages`), and with what Java then does with an admitted
URL: `file://HOST/...` is fetched over FTP from HOST, and a file URL's path is percent-decoded
(`%2e%2e%2f` climbs out of the store although TorchServe refuses a literal `..`). Models named at
start-up must be plain file names in the store: anything else is fetched or copied from
outside what `serve` verified.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from secure_handler.deploy.audit.context import AuditContext
from secure_handler.deploy.audit.jregex import CharSet, JavaRegexError, Nfa, compile_java
from secure_handler.deploy.audit.languages import Dfa, authorities, literal, witness
from secure_handler.deploy.audit.report import RANK, ConfigFinding, Severity
from secure_handler.deploy.tsconfig import store_allowed_urls

__all__ = ["RULES", "writable_by_others"]

#: Characters of an archive name that a file URL may carry after the store (no `/`, no `%`).
_NAME_CHARS = CharSet.of("abcdefghijklmnopqrstuvwxyz0123456789_.-").case_insensitive()
#: A model at start-up: `[name=]file.mar` with a plain archive name in the store (a name
#: without `.mar` may be a folder, which TorchServe serves as an unpacked, unverified model).
_STORE_ITEM = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]*=)?[A-Za-z0-9][A-Za-z0-9_.-]*\.mar",
                         re.ASCII)
_EXAMPLES = ("http://attacker.example/m.mar", "https://attacker.example/m.mar",
             "file://attacker.example/m.mar", "file:///tmp/evil.mar")


def _fix(ctx: AuditContext) -> str:
    return f"Set allowed_urls={store_allowed_urls(ctx.model_store or Path('/path/to/store'))}"


def allowed_urls(ctx: AuditContext) -> Iterator[ConfigFinding]:
    value = ctx.get("allowed_urls") or ""
    state = ("missing, so TorchServe's default `file://.*|http(s)?://.*` applies"
             if "allowed_urls" not in ctx.props else f"`{_short(value)}`")
    found: list[ConfigFinding] = []
    for pattern in value.split(","):  # Java's String.split(",")
        try:
            nfa = compile_java(pattern, ignore_case=True)
        except JavaRegexError as exc:
            found.append(ctx.finding(
                "high", "allowed_urls", f"`{pattern}` uses a construct the audit does not "
                f"judge ({exc}): Java may read it as admitting any URL.", "Write it with "
                "literals, escaped punctuation, simple classes, groups and greedy quantifiers "
                "only. " + _fix(ctx), cwe=["CWE-918", "CWE-185"], cve=["CVE-2023-43654"]))
            continue
        found += _judge(ctx, pattern, nfa, state)
    # One finding, the worst: every problem here has the same fix.
    yield from sorted(found, key=lambda f: RANK[f.severity])[:1]


#: The URL shapes judged below; `java.net.URL` opens more (leading blanks and `url:` are
#: skipped, `file:/path` is a local file, ftp: and jar: fetch), so a pattern that admits any
#: other string is refused.
_JUDGED_SHAPES = ("http://", "https://", "file://")


def _judge(ctx: AuditContext, pattern: str, nfa: Nfa, state: str) -> Iterator[ConfigFinding]:
    cwe, cve = ("CWE-918", "CWE-494"), ("CVE-2023-43654",)
    other = witness(nfa, Dfa.unprefixed(_JUDGED_SHAPES))
    if other is not None:
        yield ctx.finding("high", "allowed_urls", f"allowed_urls is {state}: `{pattern}` "
                          f"admits {other!r}, which does not start with http://, https:// or "
                          "file://; TorchServe opens what it admits with java.net.URL, which "
                          "skips leading blanks and `url:`, reads `file:/path` as a local file "
                          "and fetches ftp: and jar: URLs.", _fix(ctx), cwe=cwe, cve=cve)
        return
    use = ("a register or workflow call (the workflow API is not gated by enable_model_api) "
           "or load_models makes the server download and run an archive")
    for scheme, transport in (("http://", "plain http"), ("https://", "https"),
                              ("file://", "FTP (Java fetches file://HOST/ over FTP)")):
        hosts = authorities(nfa, scheme)
        local = hosts is not None and set(hosts) <= {"", "localhost"} and scheme == "file://"
        if hosts == [] or local:
            continue
        example = _example(nfa, scheme)
        if hosts is None:
            yield ctx.finding("high", "allowed_urls", f"allowed_urls is {state}: `{pattern}` "
                              f"admits {scheme} URLs to hosts that are not fixed names (e.g. "
                              f"{example}), so {use} from anywhere.", _fix(ctx), cwe=cwe, cve=cve)
            continue
        # The host is what follows the last `@` of the authority (java.net.URL).
        remote = sorted({h.rpartition("@")[2] for h in hosts} - {"", "localhost"}) or hosts
        severity: Severity = "medium" if scheme == "https://" else "high"
        yield ctx.finding(severity, "allowed_urls", f"`{pattern}` lets the server download "
                          f"archives over {transport} from "
                          f"{', '.join(h or '(no host)' for h in remote)}; nothing checks "
                          "them against a lock before their handler runs"
                          + ("" if severity == "medium" else ", and anyone on the path can "
                             "swap them") + ".", _fix(ctx), cwe=cwe, cve=cve)
    yield from _outside_store(ctx, pattern, nfa)


def _outside_store(ctx: AuditContext, pattern: str, nfa: Nfa) -> Iterator[ConfigFinding]:
    """Local file URLs must name an archive directly in the store, no `%` decoding tricks."""
    inside = literal(str(ctx.model_store.resolve()) + "/") if ctx.model_store else []
    escape = witness(nfa, Dfa.outside(literal("file://"), inside, _NAME_CHARS))
    if escape is None or not ctx.model_store:
        if escape is not None:
            yield ctx.finding("medium", "allowed_urls", f"`{pattern}` admits local files and "
                              "the model store is not known, so the audit cannot tell whether "
                              "they stay in it.", "Pass --model-store. " + _fix(ctx),
                              cwe=["CWE-22"])
        return
    probes = [f"file://{ctx.model_store.resolve()}/%2e%2e%2fevil.mar", *_EXAMPLES]
    example = next((p for p in probes if nfa.matches(p)), escape)
    yield ctx.finding("medium", "allowed_urls", f"`{pattern}` admits files outside the model "
                      f"store, e.g. {example} (Java percent-decodes file paths).", _fix(ctx),
                      cwe=["CWE-22"])


def _example(nfa: Nfa, scheme: str) -> str:
    for probe in _EXAMPLES:
        if probe.startswith(scheme) and nfa.matches(probe):
            return probe
    return witness(nfa, Dfa.prefix(literal(scheme))) or scheme


def _short(value: str, width: int = 80) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def env_urls(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("use_env_allowed_urls"):
        yield ctx.finding("medium", "use_env_allowed_urls", "allowed_urls may come from the "
                          "environment (TS_ALLOWED_URLS), so whoever sets the server's "
                          "environment decides where models come from.",
                          "Set use_env_allowed_urls=false.", cwe=["CWE-15"],
                          cve=["CVE-2023-43654"])


def load_models(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """`load_models` and `--models`: `ALL` or `[name=]archive` names in the store, nothing else.

    TorchServe downloads a URL (http, https, file, FTP through file://HOST) into the store and
    loads it; a path is cut to its last segment. Either way what runs is not what `serve`
    verified or what the reader of the config expects.
    """
    # `ALL` is the whole value, in any case (`ModelServer.initModelStore`); inside a list it is
    # a file name like any other. The command line's `--models` are joined with `,`.
    lists: list[tuple[str, str | None]] = [(ctx.get("load_models") or "", None)]
    models: list[str] | None = getattr(ctx.cmdline, "models", None)
    if models:
        lists.append((",".join(models), "cmdline"))
    items = [(item, source) for value, source in lists if value.lower() != "all"
             for item in value.split(",")]
    for item, source in items:
        if item == "" or _STORE_ITEM.fullmatch(item):
            continue
        yield ctx.finding("high", "load_models", f"`{item}` is not an archive name in the "
                          "model store: TorchServe fetches URLs (http, https, file://, FTP) "
                          "into the store and loads them, and cuts paths to their file name, "
                          "so what runs "
                          "is not what `serve` verified against the lock.",
                          "List models as NAME=FILE.mar with FILE.mar directly in the store.",
                          cwe=["CWE-494", "CWE-22"], cve=["CVE-2023-43654"], source=source,
                          value=item)


def model_snapshot(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.get("model_snapshot"):
        yield ctx.finding("high", "model_snapshot", "TorchServe restores the models of this "
                          "snapshot instead of load_models, from archive locations the audit "
                          "does not check.", "Remove model_snapshot; list models in "
                          "load_models (`secure-handler config`).", cwe=["CWE-494"])


def models_json(ctx: AuditContext) -> Iterator[ConfigFinding]:
    raw = ctx.get("models")
    if not raw:
        return
    try:
        models = json.loads(raw)
        versions = [(n, v, s) for n, vs in models.items() for v, s in vs.items()]
        batches = [(n, v, int(s.get("batchSize", 1))) for n, v, s in versions]
    except (ValueError, AttributeError, TypeError, ArithmeticError, RecursionError) as exc:
        yield ctx.finding("medium", "models", f"not the JSON TorchServe expects ({exc}).",
                          "Regenerate it with `secure-handler config`.", cwe=["CWE-1284"])
        return
    for name, version, batch in batches:
        limit = ctx.model_limits.get(name, ctx.limits).max_batch_size
        if batch > limit:
            yield ctx.finding("medium", "models", f"{name} {version}: batchSize {batch} is "
                              f"above the handler's max_batch_size {limit}; the surplus rows of "
                              "every full batch are refused with 503.",
                              f"Set batchSize <= {limit}.", cwe=["CWE-770"],
                              value=f"{name}.batchSize={batch}")


def py_deps(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("install_py_dep_per_model"):
        yield ctx.finding("high", "install_py_dep_per_model", "TorchServe pip-installs each "
                          "archive's requirements file when it loads the model: any package, "
                          "any index, install scripts run on the server.",
                          "Set install_py_dep_per_model=false and bake dependencies into the "
                          "image.", cwe=["CWE-829", "CWE-494"])


def handler_defaults(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """Settings that replace what an archive runs (`ModelManager.createModelArchive`)."""
    if ctx.get("default_service_handler"):
        yield ctx.finding("high", "default_service_handler", "TorchServe runs this handler "
                          "(a module or a file path, anywhere) for every archive whose manifest "
                          "names none: code that no verified archive carries.",
                          "Remove default_service_handler; archives name their handler "
                          "(`secure-handler archive`).", cwe=["CWE-94", "CWE-494"])
    if ctx.get("service_envelope"):
        yield ctx.finding("high", "service_envelope", "TorchServe wraps every handler in this "
                          "envelope, imported as `ts.torch_handler.request_envelope.<value>` "
                          "(a relative name reaches any ts module): its batch handling fails "
                          "the whole batch on one bad request and rewrites what the secure "
                          "handlers validate.", "Remove service_envelope; the secure handlers "
                          "read KServe v1 and OIP v2 bodies themselves.", cwe=["CWE-94",
                                                                               "CWE-400"])


def writable_by_others(path: Path) -> bool:
    """Group- or world-writable without the sticky bit (anyone there can swap files)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH)) and not mode & stat.S_ISVTX


def model_store(ctx: AuditContext) -> Iterator[ConfigFinding]:
    server = ctx.server_store
    if server is not None and ctx.model_store is not None and not _same_dir(server,
                                                                            ctx.model_store):
        yield ctx.finding("high", "model_store", f"TorchServe will load models from {server} "
                          f"(its launcher passes `-s` from the command line or from its own "
                          "reading of the file, and TS_MODEL_STORE wins when "
                          f"enable_envvars_config is on), not from the audited store "
                          f"{ctx.model_store}: what runs is not what was verified.",
                          "Write model_store once, as a plain `model_store=PATH` line, pass the "
                          "same --model-store, and audit that store.", cwe=["CWE-436", "CWE-494"],
                          value=str(server))
    # The workflow store holds archives the (ungated) workflow API registers by name; Java
    # takes -w, then the file's key, then the model store.
    workflow = getattr(ctx.cmdline, "workflow_store", None) or ctx.get("workflow_store")
    stores = {("model_store", store) for store in (ctx.model_store, server) if store}
    stores |= {("workflow_store", Path(workflow))} if workflow else set()
    for key, store in sorted(stores):
        if writable_by_others(store):
            yield ctx.finding("medium", key, f"{store} is writable by other users: anyone "
                              "there can drop or swap an archive.", "chmod go-w the store; "
                              "verify it against a lock before every start "
                              "(`secure-handler serve`).", cwe=["CWE-732", "CWE-494"],
                              value=str(store))


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


RULES = (allowed_urls, env_urls, load_models, model_snapshot, models_json, py_deps,
         handler_defaults, model_store)
