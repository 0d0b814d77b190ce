"""Every `audit-config` rule, in one ordered tuple; the rules about sizes, the file and the start.

Each rule is a plain function `AuditContext -> Iterator[ConfigFinding]`. The network, model
source and JVM rules live in their own modules; this one holds the rest (environment overrides,
sizes and queues, secrets in the environment, the file's own hygiene, the command line) and
assembles `RULES`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from secure_handler.deploy.audit import rules_env, rules_jvm, rules_network, rules_sources
from secure_handler.deploy.audit.context import (
    ENV_OVERRIDES,
    KNOWN_KEYS,
    AuditContext,
    java_bool,
    java_int,
)
from secure_handler.deploy.audit.jregex import JavaRegexError, compile_java
from secure_handler.deploy.audit.report import ConfigFinding
from secure_handler.deploy.audit.rules_sources import writable_by_others
from secure_handler.deploy.tsconfig import frontend_request_limit

__all__ = ["RULES", "Rule"]

Rule = Callable[[AuditContext], Iterable[ConfigFinding]]

_BOOLEAN_KEYS = (
    "disable_token_authorization", "enable_model_api", "install_py_dep_per_model",
    "enable_envvars_config", "limit_max_image_pixels", "enable_grpc_ssl",
    "use_env_allowed_urls", "enable_metrics_api",
)
_TRUE_VALUES = ("1", "y", "yes", "true")  # torch.serialization's reading of env flags
_SECRET_SAMPLES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_CLIENT_SECRET", "GITHUB_TOKEN", "DB_PASSWORD",
)


def envvars_config(ctx: AuditContext) -> Iterator[ConfigFinding]:
    overrides = sorted(n for n in ENV_OVERRIDES if n in ctx.environ)
    if ctx.flag("enable_envvars_config"):
        extra = f" Overridden now: {', '.join(overrides)}." if overrides else ""
        yield ctx.finding("medium", "enable_envvars_config", "every TS_* environment variable "
                          "overrides the file (e.g. TS_DISABLE_TOKEN_AUTHORIZATION), so the "
                          "audited file is not the whole truth." + extra,
                          "Set enable_envvars_config=false.", cwe=["CWE-15"])
    elif "TS_DISABLE_TOKEN_AUTHORIZATION" in ctx.environ:
        yield ctx.finding("low", "TS_DISABLE_TOKEN_AUTHORIZATION", "set in the environment; "
                          "ignored while enable_envvars_config is false, but one config change "
                          "away from turning token auth off.", "Unset it.", cwe=["CWE-306"],
                          source="environment",
                          value=ctx.environ["TS_DISABLE_TOKEN_AUTHORIZATION"])


def image_pixels(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if not ctx.flag("limit_max_image_pixels"):
        yield ctx.finding("medium", "limit_max_image_pixels", "false makes TorchServe's vision "
                          "handlers set PIL.Image.MAX_IMAGE_PIXELS = None for the whole worker: "
                          "no decompression-bomb guard for any image.",
                          "Set limit_max_image_pixels=true.", cwe=["CWE-400", "CWE-409"])


def decode_input(ctx: AuditContext) -> Iterator[ConfigFinding]:
    # TorchServe's default is true: the worker then parses exact application/json itself with
    # json.loads (the last of duplicate keys wins, NaN accepted) before the handler's strict
    # reader sees the body, so two readers can disagree on what a request says.
    value = ctx.get("decode_input_request")
    if value is None or java_bool(value):
        yield ctx.finding("medium", "decode_input_request", "true (TorchServe's default) makes "
                          "the worker parse JSON and text bodies itself, leniently, before the "
                          "handler's strict reader: duplicate keys are resolved silently.",
                          "Set decode_input_request=false.", cwe=["CWE-436", "CWE-20"])


def sizes(ctx: AuditContext) -> Iterator[ConfigFinding]:
    # Anything above what the generated config allows is refused by the handler anyway,
    # after the frontend has buffered it.
    bound = frontend_request_limit(ctx.limits.max_request_bytes)
    for key in ("max_request_size", "max_response_size"):
        size = java_int(ctx.get(key))
        if size is None:
            yield ctx.finding("medium", key, f"`{ctx.get(key)}` is not an integer; TorchServe "
                              "will not start.", f"Set {key}={bound}.", cwe=["CWE-1284"])
        elif size > bound:
            yield ctx.finding("medium", key, f"{size} bytes is above what the handlers accept "
                              f"(max_request_bytes {ctx.limits.max_request_bytes}, at most "
                              f"{bound} with base64 and envelope): the frontend buffers bodies "
                              "(and each queued job) that can only be refused.",
                              f"Set {key} to at most {bound}.", cwe=["CWE-770", "CWE-400"])
        elif key == "max_request_size" and size < ctx.limits.max_request_bytes:
            yield ctx.finding("low", key, f"{size} bytes is below the handlers' "
                              f"max_request_bytes ({ctx.limits.max_request_bytes}): large valid "
                              "requests get Netty's bare 413 instead of the handler's JSON "
                              "error.", f"Set {key}={bound}.")


def job_queue(ctx: AuditContext) -> Iterator[ConfigFinding]:
    size = java_int(ctx.get("job_queue_size"))
    if size is None or size <= 0:
        yield ctx.finding("medium", "job_queue_size", f"`{ctx.get('job_queue_size')}` is not "
                          "a positive integer; TorchServe will not start.",
                          "Set job_queue_size=100.")
        return
    request = java_int(ctx.get("max_request_size")) or 0
    exposure = size * request
    detail = (f"{size} queued jobs of up to {request} bytes each (~{exposure / 2**30:.1f} GiB "
              "per model) are held in memory before anyone refuses them.")
    if size >= 100_000 or exposure > 16 * 2**30:
        yield ctx.finding("high", "job_queue_size", "the job queue is effectively unbounded: "
                          + detail, "Set job_queue_size to ~100 (a full queue answers 503, "
                          "which clients retry).", cwe=["CWE-770", "CWE-400"])
    elif size > 1000:
        yield ctx.finding("medium", "job_queue_size", "the job queue is very large: " + detail,
                          "Set job_queue_size to ~100.", cwe=["CWE-770"])


def blacklist(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """Judged as Java reads it (`Pattern.compile(...).matcher(name).matches()`)."""
    value = ctx.get("blacklist_env_vars")
    fix = "Set blacklist_env_vars=.*(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL).*|AWS_.*|HF_.*"
    if not value:
        yield ctx.finding("medium", "blacklist_env_vars", "every environment variable of the "
                          "server (cloud credentials, API keys) is visible to the handler code "
                          "in the workers.", fix, cwe=["CWE-526"])
        return
    try:
        pattern = compile_java(value)
    except JavaRegexError as exc:
        yield ctx.finding("medium", "blacklist_env_vars", f"the audit cannot judge this Java "
                          f"pattern ({exc}).", fix, cwe=["CWE-526"])
        return
    missed = [name for name in _SECRET_SAMPLES if not pattern.matches(name)]
    if missed:
        yield ctx.finding("low", "blacklist_env_vars", f"does not hide {', '.join(missed)} "
                          "from the workers.", fix, cwe=["CWE-526"])


def timeouts(ctx: AuditContext) -> Iterator[ConfigFinding]:
    timeout = java_int(ctx.get("default_response_timeout"))
    if timeout is not None and timeout > 600:
        yield ctx.finding("low", "default_response_timeout", f"a stuck batch holds its worker "
                          f"for {timeout} s before TorchServe restarts it.", "Use 60-120 s.",
                          cwe=["CWE-400"])


def env_references(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for name in dict.fromkeys(ctx.env_ref_errors):
        yield ctx.finding("medium", name, "its value is not a valid Java replacement template "
                          "(a trailing `\\` or `$`, or `$` before a non-digit); TorchServe "
                          "refuses to start.", "Write the value in the file.",
                          source="environment", value=ctx.environ.get(name, ""))
    for key, names in ctx.env_refs.items():
        missing = [n for n in names if n not in ctx.environ]
        if missing:
            yield ctx.finding("medium", key, f"refers to $${missing[0]}$$, which is not set; "
                              "TorchServe refuses to start.", "Set the variable or write the "
                              "value.")
        else:
            yield ctx.finding("low", key, f"takes its value from the environment "
                              f"({', '.join(names)}); the file alone does not say what runs.",
                              "Write the value in the file.", cwe=["CWE-15"])


def file_hygiene(ctx: AuditContext) -> Iterator[ConfigFinding]:
    counts: dict[str, int] = {}
    for entry in ctx.entries:
        counts[entry.key] = counts.get(entry.key, 0) + 1
    for key, count in counts.items():
        if count > 1:
            yield ctx.finding("low", key, f"set {count} times; only the last one counts, and a "
                              "reviewer may read the first.", "Keep one line per key.",
                              cwe=["CWE-436"])
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            yield ctx.finding("medium", key, "not a key TorchServe 0.12 reads; the audit does "
                              "not guess what it is for (a typo leaves the default in force)."
                              + hint, f"Rename it to {close[0]}." if close else "Remove it.",
                              cwe=["CWE-1284"])
    for key in _BOOLEAN_KEYS:
        raw = ctx.props.get(key)
        if raw is not None and raw.strip().lower() == "true" and raw.lower() != "true":
            yield ctx.finding("low", key, f"`{raw}` has whitespace around `true`; TorchServe "
                              "reads it as false.", f"Write exactly {key}=true or false.")


def cmdline(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.cmdline_error:
        yield ctx.finding("medium", "cmdline", f"torchserve would refuse this command line: "
                          f"{ctx.cmdline_error}", "Fix the arguments.", source="cmdline",
                          value="")
    args = ctx.cmdline
    if args is None:
        return
    if not args.no_config_snapshots:
        yield ctx.finding("medium", "--ncs", "without --ncs TorchServe writes config snapshots "
                          "and, when started without --ts-config, silently loads the last "
                          "snapshot instead of your file.", "Add --ncs.", cwe=["CWE-1188"],
                          source="cmdline", value="")
    if args.log_config:
        # The launcher passes -Dlog4j.configurationFile=file://...: log4j2 appenders can send
        # every log line to any host or file.
        writable = writable_by_others(Path(args.log_config)) or writable_by_others(
            Path(args.log_config).parent)
        yield ctx.finding("medium" if writable else "low", "--log-config", "the frontend's "
                          "log4j2 reads this file; its appenders can ship every log line "
                          "(model names, request ids, errors) to any host or file"
                          + (", and other users can write it" if writable else "") + ".",
                          "Keep the file root-owned (chmod 644, in a root-owned folder).",
                          cwe=["CWE-732", "CWE-532"], source="cmdline", value=args.log_config)
    config = args.ts_config
    if not config and not ctx.environ.get("TS_CONFIG_FILE"):
        yield ctx.finding("high", "--ts-config", "no --ts-config (nor TS_CONFIG_FILE): "
                          "TorchServe loads the last snapshot or ./config.properties, not the "
                          "audited file.", "Add --ts-config FILE.", cwe=["CWE-1188"],
                          source="cmdline", value="")
    elif config and ctx.config_path is not None and not same_file(config, ctx.config_path):
        yield ctx.finding("medium", "--ts-config", f"the command starts with `{config}`, not "
                          f"the audited {ctx.config_path}.", "Audit the file the command uses.",
                          source="cmdline", value=config)


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    flag = ctx.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if flag is not None and flag.lower() in _TRUE_VALUES:
        yield ctx.finding("high", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "makes every torch.load "
                          "in the workers (TorchServe's eager path, its text and densenet "
                          "handlers) unpickle arbitrary objects: a crafted file runs code.",
                          "Unset it.", cwe=["CWE-502"], source="environment", value=flag)
    ts_config = ctx.environ.get("TS_CONFIG_FILE")
    if ts_config and ctx.config_path is not None and not same_file(ts_config, ctx.config_path):
        yield ctx.finding("high", "TS_CONFIG_FILE", f"the environment points TorchServe at "
                          f"`{ts_config}`, which wins over --ts-config: the audited file is not "
                          "the one used.", "Unset TS_CONFIG_FILE.", cwe=["CWE-15"],
                          source="environment", value=ts_config)


RULES: tuple[Rule, ...] = (
    *rules_network.RULES, *rules_sources.RULES, *rules_jvm.RULES, *rules_env.RULES,
    envvars_config, image_pixels, decode_input, sizes, job_queue, blacklist, timeouts,
    env_references, file_hygiene, cmdline, environment,
)
