"""Audit a TorchServe `config.properties`, its command line and its environment.

The ShellTorch attacks on TorchServe (2023) came from configuration: a management API
reachable from outside, `allowed_urls` letting the server fetch any URL (CVE-2023-43654) and,
through a registered archive, YAML deserialization (CVE-2022-1471). This module reads a config
the way TorchServe 0.12 reads it and reports every setting that reopens one of those doors.

What TorchServe actually uses is reconstructed first (`effective_properties`):

1. the file, parsed with the Java rules (`secure_handler.deploy.javaprops`);
2. `$$NAME$$` references replaced from the environment, as the frontend does;
3. with `enable_envvars_config=true`, every `TS_*` variable overriding its key
   (`TS_ALLOWED_URLS` only with `use_env_allowed_urls=true`);
4. the Python launcher's own line-by-line view, which is where `vmargs` and `plugins_path`
   come from.

Each rule is a small function over that `AuditContext`; `audit()` runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from secure_handler.deploy.javaprops import Entry, entries, launcher_view
from secure_handler.deploy.tsconfig import (
    DEFAULT_ALLOWED_URLS,
    HandlerLimits,
    frontend_request_limit,
    is_loopback,
    store_allowed_urls,
)

__all__ = [
    "AuditContext",
    "ConfigFinding",
    "Severity",
    "audit",
    "audit_file",
    "blocking",
    "count_by_severity",
    "format_findings",
    "format_markdown",
    "parse_cmdline",
]

Severity = Literal["high", "medium", "low"]
_RANK: dict[str, int] = {"high": 0, "medium": 1, "low": 2}

MiB = 1024 * 1024
#: TorchServe 0.12 defaults, from `ConfigManager.java`.
DEFAULTS = {
    "inference_address": "http://127.0.0.1:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://127.0.0.1:8082",
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
    "max_request_size": "6553500",
    "max_response_size": "6553500",
    "job_queue_size": "100",
    "default_response_timeout": "120",
    "allowed_urls": DEFAULT_ALLOWED_URLS,
    "token_expiration_min": "60",
    "enable_metrics_api": "true",
    "limit_max_image_pixels": "true",
}

#: `ConfigManager`'s `TS_*` fields: with `enable_envvars_config=true` the environment variable
#: of that name replaces the key (read from the 0.12.0 frontend jar with `javap -constants`).
ENV_OVERRIDES = {
    f"TS_{key.upper()}": key for key in (
        "debug", "inference_address", "management_address", "metrics_address", "load_models",
        "blacklist_env_vars", "default_workers_per_model", "default_response_timeout",
        "default_startup_timeout", "unregister_model_timeout", "number_of_netty_threads",
        "netty_client_threads", "job_queue_size", "number_of_gpu", "metrics_config",
        "metrics_mode", "model_metrics_auto_detect", "disable_system_metrics", "ipex_enable",
        "cpu_launcher_enable", "cpu_launcher_args", "ipex_gpu_enable", "async_logging",
        "cors_allowed_origin", "cors_allowed_methods", "cors_allowed_headers",
        "decode_input_request", "keystore", "keystore_pass", "keystore_type",
        "certificate_file", "private_key_file", "max_request_size", "max_response_size",
        "limit_max_image_pixels", "default_service_handler", "service_envelope",
        "model_server_home", "model_store", "prefer_direct_buffer", "allowed_urls",
        "install_py_dep_per_model", "enable_metrics_api", "grpc_inference_address",
        "grpc_management_address", "grpc_inference_port", "grpc_management_port",
        "enable_grpc_ssl", "initial_worker_port", "initial_distribution_port",
        "workflow_store", "cpp_log_config", "disable_token_authorization", "enable_model_api",
    )
}
ENV_OVERRIDES["TS_TOKEN_EXPIRATION_TIME_MIN"] = "token_expiration_min"
ENV_OVERRIDES["TS_OPEN_INFERENCE_PROTOCOL"] = "ts_open_inference_protocol"

#: Every key TorchServe 0.12 reads (frontend and launcher); used to spot misspelt keys.
KNOWN_KEYS = frozenset(ENV_OVERRIDES.values()) | {
    "use_native_io", "io_ratio", "metric_time_interval", "enable_envvars_config",
    "model_snapshot", "models", "version", "system_metrics_cmd", "use_env_allowed_urls",
    "vmargs", "plugins_path", "snapshot_store", "python", "token_expiration_min",
    "grpc_inference_max_connection_age_ms", "grpc_management_max_connection_age_ms",
    "grpc_inference_max_connection_age_grace_ms", "grpc_management_max_connection_age_grace_ms",
    "ts_header_key_sequence_id", "ts_header_key_sequence_start", "ts_header_key_sequence_end",
    "tsConfigFile",
}

_BOOLEAN_KEYS = (
    "disable_token_authorization", "enable_model_api", "install_py_dep_per_model",
    "enable_envvars_config", "limit_max_image_pixels", "enable_grpc_ssl",
    "use_env_allowed_urls", "enable_metrics_api",
)
# `TorchServe`'s `ConnectorType` parser, verbatim (`ConfigManager.ADDRESS_PATTERN`).
_ADDRESS = re.compile(r"((https|http)://([^:^/]+)(:([0-9]+))?)|(unix:(/.*))")
_ENV_REF = re.compile(r"\$\$([^$]+[^$])\$\$")
_TRUE_VALUES = ("1", "y", "yes", "true")  # torch.serialization's reading of env flags
# JVM options that load code, run commands or open remote control channels.
_DANGEROUS_JVM = re.compile(
    r"^-(javaagent|agentlib|agentpath|Xbootclasspath|Xrunjdwp|Xdebug|cp$|classpath$|"
    r"XX:OnError|XX:OnOutOfMemoryError|XX:\+EnableDynamicAgentLoading|"
    r"Djava\.(class|library)\.path|Djava\.security\.manager|Djava\.system\.class\.loader|"
    r"Dcom\.sun\.management\.jmxremote|Dlog4j)",
)
_SECRET_SAMPLES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_CLIENT_SECRET", "GITHUB_TOKEN", "DB_PASSWORD",
)


@dataclass(frozen=True)
class ConfigFinding:
    """One problem: how bad, which setting, why (CWE/CVE) and the fix."""

    severity: Severity
    key: str
    why: str
    fix: str
    cwe: tuple[str, ...] = ()
    cve: tuple[str, ...] = ()
    value: str | None = None
    source: str = "config"

    @property
    def references(self) -> str:
        """`CWE-306, CVE-2023-43654` style list, empty when none applies."""
        return ", ".join((*self.cwe, *self.cve))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as printed by `--json`."""
        return {
            "severity": self.severity, "key": self.key, "value": self.value,
            "source": self.source, "why": self.why, "fix": self.fix,
            "cwe": list(self.cwe), "cve": list(self.cve),
        }

    def __str__(self) -> str:
        refs = f" ({self.references})" if self.references else ""
        return f"{self.severity}: {self.key}: {self.why}{refs} Fix: {self.fix}"


@dataclass
class AuditContext:
    """Everything the rules look at; build it with `AuditContext.build`."""

    props: dict[str, str]
    sources: dict[str, str]
    entries: list[Entry]
    launcher: dict[str, str]
    environ: Mapping[str, str]
    cmdline: argparse.Namespace | None = None
    cmdline_error: str | None = None
    config_path: Path | None = None
    model_store: Path | None = None
    limits: HandlerLimits = field(default_factory=HandlerLimits)
    model_limits: Mapping[str, HandlerLimits] = field(default_factory=dict)
    env_refs: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        text: str,
        *,
        config_path: Path | None = None,
        cmdline: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        limits: HandlerLimits | None = None,
        model_limits: Mapping[str, HandlerLimits] | None = None,
        model_store: Path | None = None,
    ) -> AuditContext:
        """Parse `text` and reconstruct the settings TorchServe will run with.

        Raises:
            PropertiesError: the file is not valid Java properties.
        """
        found = entries(text)
        ctx = cls(
            props={e.key: e.value for e in found},
            sources={e.key: f"config line {e.line}" for e in found},
            entries=found, launcher=launcher_view(text), environ=dict(environ or {}),
            config_path=config_path, model_limits=dict(model_limits or {}),
        )
        if cmdline is not None:
            ctx.cmdline, ctx.cmdline_error = parse_cmdline(cmdline)
        ctx._resolve_env_refs()
        ctx._apply_env_overrides()
        ctx.model_store = model_store or ctx._store_from_settings()
        ctx.limits = limits or HandlerLimits.combined(ctx.model_limits.values())
        return ctx

    def _resolve_env_refs(self) -> None:
        for key, value in list(self.props.items()):
            names = _ENV_REF.findall(value)
            if names:
                self.env_refs[key] = names
                self.props[key] = _ENV_REF.sub(
                    lambda m: self.environ.get(m.group(1), m.group(0)), value)

    def _apply_env_overrides(self) -> None:
        if not java_bool(self.props.get("enable_envvars_config", "false")):
            return
        use_env_urls = self.props.get("use_env_allowed_urls", "false").lower() == "true"
        for name, key in ENV_OVERRIDES.items():
            if name not in self.environ or (key == "allowed_urls" and not use_env_urls):
                continue
            self.props[key] = self.environ[name]
            self.sources[key] = f"environment {name}"

    def _store_from_settings(self) -> Path | None:
        store = getattr(self.cmdline, "model_store", None) or self.props.get("model_store")
        return Path(store) if store else None

    def get(self, key: str) -> str | None:
        """The effective value, or TorchServe's default, or None."""
        return self.props.get(key, DEFAULTS.get(key))

    def flag(self, key: str) -> bool:
        """A boolean as TorchServe reads it: `Boolean.parseBoolean` (only "true", any case)."""
        return java_bool(self.get(key) or "false")

    def where(self, key: str) -> str:
        return self.sources.get(key, "default" if key in DEFAULTS else "absent")


def java_bool(value: str) -> bool:
    """`Boolean.parseBoolean`: true only for "true" in any case, no trimming."""
    return value.lower() == "true"


def java_int(value: str | None) -> int | None:
    """`Integer.parseInt` (no trimming); None when Java would throw."""
    if value is None or not re.fullmatch(r"[+-]?[0-9]+", value):
        return None
    number = int(value)
    return number if -(2**31) <= number < 2**31 else None


def parse_cmdline(cmdline: Sequence[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parse a `torchserve ...` command line with TorchServe's own argument parser.

    Using the real parser matters: argparse accepts unambiguous prefixes, so `--disable-tok`
    is `--disable-token-auth` to TorchServe and must be to the audit too.
    """
    from ts.arg_parser import ArgParser

    args = list(cmdline)
    if args and not args[0].startswith("-"):
        args = args[1:]  # the executable
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return ArgParser.ts_parser().parse_args(args), None
    except SystemExit:
        return None, stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else "?"


# --- rules -------------------------------------------------------------------------------

Rule = Callable[[AuditContext], Iterable[ConfigFinding]]
_RULES: list[Rule] = []


def _rule(func: Rule) -> Rule:
    _RULES.append(func)
    return func


def _f(severity: Severity, key: str, why: str, fix: str, *, cwe: Iterable[str] = (),
       cve: Iterable[str] = (), ctx: AuditContext | None = None, source: str | None = None,
       value: str | None = None) -> ConfigFinding:
    if ctx is not None and value is None:
        value = ctx.get(key)
    if source is None:
        source = ctx.where(key) if ctx is not None else "config"
    return ConfigFinding(severity, key, why, fix, tuple(cwe), tuple(cve), value, source)


@_rule
def _http_addresses(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for api in ("inference", "management", "metrics"):
        key = f"{api}_address"
        value = ctx.get(key) or ""
        match = _ADDRESS.fullmatch(value)
        if not match:
            yield _f("medium", key, f"`{value}` is not an address TorchServe accepts (it wants "
                     "http(s)://host[:port] with no IPv6 literal, or unix:/path); it will not "
                     "start.", "Use http://127.0.0.1:PORT.", cwe=["CWE-1284"], ctx=ctx)
            continue
        if match.group(6) or is_loopback(match.group(3)):
            continue
        yield from _public_address(ctx, api, key, match.group(2) == "https")


def _public_address(ctx: AuditContext, api: str, key: str, tls: bool) -> Iterator[ConfigFinding]:
    where = f"{ctx.get(key)} is reachable from other hosts"
    if api == "metrics":
        if ctx.flag("enable_metrics_api"):
            yield _f("medium", key, f"{where}, and TorchServe checks no token on the metrics "
                     "API: anyone can read model names, load and latencies.",
                     "Bind metrics to 127.0.0.1 and scrape through a local agent, or set "
                     "enable_metrics_api=false.", cwe=["CWE-306", "CWE-200"], ctx=ctx)
        return
    if not tls:
        yield _f("high", key, f"{where} over plain http: bearer tokens and payloads cross the "
                 "network in clear text" + (", and the management API can register models "
                 "(the ShellTorch entry point)" if api == "management" else "") + ".",
                 "Bind to 127.0.0.1, or use https:// with certificate_file and private_key_file "
                 "behind a gateway.", cwe=["CWE-319", "CWE-306"], ctx=ctx)
    elif api == "management":
        yield _f("medium", key, f"{where}: the management API should never face the network "
                 "(ShellTorch); TorchServe's 48-bit tokens are its only guard.",
                 "Bind management_address to 127.0.0.1.", cwe=["CWE-306", "CWE-330"], ctx=ctx)
    else:
        yield _f("low", key, f"{where}; TorchServe has no rate limits or per-client keys.",
                 "Put the secure-handler gateway (or another proxy) in front.",
                 cwe=["CWE-770"], ctx=ctx)


@_rule
def _tls_material(ctx: AuditContext) -> Iterator[ConfigFinding]:
    https = [k for k in ("inference_address", "management_address", "metrics_address")
             if (ctx.get(k) or "").startswith("https://")]
    has_files = ctx.get("certificate_file") and ctx.get("private_key_file")
    if https and not (ctx.get("keystore") or has_files):
        yield _f("medium", https[0], "https is on but no keystore or certificate_file/"
                 "private_key_file is set: TorchServe generates a self-signed certificate that "
                 "clients cannot verify.", "Set certificate_file and private_key_file.",
                 cwe=["CWE-295"], ctx=ctx)
    if ctx.get("keystore") and ctx.get("keystore_pass") in (None, "changeit"):
        yield _f("medium", "keystore_pass", "the keystore password is TorchServe's default "
                 "`changeit`.", "Set a real keystore_pass (or use PEM files).",
                 cwe=["CWE-798", "CWE-1188"], ctx=ctx, value=ctx.get("keystore_pass"))


@_rule
def _key_permissions(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for key in ("private_key_file", "keystore"):
        value = ctx.get(key)
        if not value:
            continue
        try:
            mode = Path(value).stat().st_mode
        except OSError:
            yield _f("medium", key, f"{value} does not exist or cannot be read; TorchServe "
                     "will not start with TLS.", "Point it at the real file.", ctx=ctx)
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
            yield _f("medium", key, f"{value} is readable or writable by other users: the TLS "
                     "private key can be copied or replaced.", f"chmod 600 {value}",
                     cwe=["CWE-732"], ctx=ctx)


@_rule
def _grpc(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for api in ("inference", "management"):
        key = f"grpc_{api}_address"
        host = ctx.get(key) or ""
        if is_loopback(host):
            continue
        if not ctx.flag("enable_grpc_ssl"):
            yield _f("high", key, f"gRPC {api} listens on `{host}` (all or public interfaces) "
                     "without TLS (enable_grpc_ssl is off): tokens and payloads in clear "
                     "text, and a second API surface next to the HTTP one.",
                     "Set it to 127.0.0.1 (TorchServe cannot turn gRPC off).",
                     cwe=["CWE-319", "CWE-306"], ctx=ctx)
        elif api == "management":
            yield _f("medium", key, f"gRPC management listens on `{host}`; the management API "
                     "should never face the network.", "Set it to 127.0.0.1.",
                     cwe=["CWE-306"], ctx=ctx)


@_rule
def _token_auth(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("disable_token_authorization"):
        yield _f("high", "disable_token_authorization", "token authorization is off: anyone "
                 "who reaches a port can run inference and use the management API.",
                 "Remove the key (token auth is on by default) or set it to false.",
                 cwe=["CWE-306"], ctx=ctx)
    if ctx.cmdline is not None and ctx.cmdline.token_auth:
        yield _f("high", "--disable-token-auth", "the command line turns token authorization "
                 "off, whatever the config says.", "Drop --disable-token-auth / --dt.",
                 cwe=["CWE-306"], source="cmdline", value="")
    raw = ctx.get("token_expiration_min")
    try:
        minutes = float(raw) if raw is not None else 60.0
    except ValueError:
        yield _f("low", "token_expiration_min", f"`{raw}` is not a number; TorchServe falls "
                 "back to 60 minutes.", "Set a whole number of minutes.", ctx=ctx)
        return
    if minutes > 24 * 60:
        yield _f("medium", "token_expiration_min", f"tokens live {minutes:g} minutes; a leaked "
                 "8-character (48-bit) token stays valid that long.",
                 "Keep it at 60 or less and rotate via the /token API.",
                 cwe=["CWE-613"], ctx=ctx)


@_rule
def _model_api(ctx: AuditContext) -> Iterator[ConfigFinding]:
    why = ("the model API lets a caller register archives, and an archive runs its handler "
           "code in the workers (ShellTorch: register a MAR from a URL, then run it).")
    if ctx.flag("enable_model_api"):
        yield _f("high", "enable_model_api", why, "Set enable_model_api=false; load models "
                 "at start-up from a verified store (`secure-handler serve`).",
                 cwe=["CWE-306", "CWE-94"], cve=["CVE-2023-43654"], ctx=ctx)
    if ctx.cmdline is not None and ctx.cmdline.model_mode:
        yield _f("high", "--enable-model-api", why, "Drop --enable-model-api.",
                 cwe=["CWE-306", "CWE-94"], cve=["CVE-2023-43654"], source="cmdline", value="")


_REMOTE_PROBES = ("http://attacker.example/m.mar", "https://attacker.example/m.mar")


def _outside_probes(store: Path | None) -> list[str]:
    probes = ["file:///etc/passwd", "file:///tmp/evil.mar"]
    if store is not None:
        base = str(store.resolve())
        probes += [f"file://{base}/../evil.mar", f"file://{base}/sub/evil.mar"]
    return probes


@_rule
def _allowed_urls(ctx: AuditContext) -> Iterator[ConfigFinding]:
    value = ctx.get("allowed_urls") or ""
    fix = f"Set allowed_urls={store_allowed_urls(ctx.model_store or Path('/path/to/store'))}"
    patterns = []
    for pattern in value.split(","):
        try:
            patterns.append(re.compile(pattern, re.IGNORECASE))  # Java: CASE_INSENSITIVE
        except re.error as exc:
            yield _f("low", "allowed_urls", f"cannot evaluate `{pattern}` ({exc}); check it "
                     "by hand.", fix, ctx=ctx)
    remote = [p for p in _REMOTE_PROBES if any(r.fullmatch(p) for r in patterns)]
    if remote:
        state = ("missing, so TorchServe's default `file://.*|http(s)?://.*` applies"
                 if "allowed_urls" not in ctx.props else "permissive")
        yield _f("high", "allowed_urls", f"allowed_urls is {state}: it admits {remote[0]}, so "
                 "a register call (or load_models) makes the server download and run an "
                 "archive from anywhere.", fix,
                 cwe=["CWE-918", "CWE-494"], cve=["CVE-2023-43654"], ctx=ctx)
        return
    fetching = [r.pattern for r in patterns if re.match(r"\^?\(?https?", r.pattern, re.I)]
    if fetching:
        yield _f("medium", "allowed_urls", f"`{fetching[0]}` lets the server download archives; "
                 "nothing checks them against a lock before their handler runs.", fix,
                 cwe=["CWE-494"], cve=["CVE-2023-43654"], ctx=ctx)
        return
    probes = _outside_probes(ctx.model_store)
    outside = [p for p in probes if any(r.fullmatch(p) for r in patterns)]
    if outside:
        yield _f("medium", "allowed_urls", f"allowed_urls admits files outside the model "
                 f"store, e.g. {outside[0]}.", fix, cwe=["CWE-22"], ctx=ctx)


@_rule
def _env_urls(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("use_env_allowed_urls"):
        yield _f("medium", "use_env_allowed_urls", "allowed_urls may come from the environment "
                 "(TS_ALLOWED_URLS), so whoever sets the server's environment decides where "
                 "models come from.", "Set use_env_allowed_urls=false.",
                 cwe=["CWE-15"], cve=["CVE-2023-43654"], ctx=ctx)


@_rule
def _py_deps(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("install_py_dep_per_model"):
        yield _f("high", "install_py_dep_per_model", "TorchServe pip-installs each archive's "
                 "requirements file when it loads the model: any package, any index, install "
                 "scripts run on the server.", "Set install_py_dep_per_model=false and bake "
                 "dependencies into the image.", cwe=["CWE-829", "CWE-494"], ctx=ctx)


@_rule
def _envvars_config(ctx: AuditContext) -> Iterator[ConfigFinding]:
    overrides = sorted(n for n in ENV_OVERRIDES if n in ctx.environ)
    if ctx.flag("enable_envvars_config"):
        extra = f" Overridden now: {', '.join(overrides)}." if overrides else ""
        yield _f("medium", "enable_envvars_config", "every TS_* environment variable overrides "
                 "the file (e.g. TS_DISABLE_TOKEN_AUTHORIZATION), so the audited file is not "
                 "the whole truth." + extra, "Set enable_envvars_config=false.",
                 cwe=["CWE-15"], ctx=ctx)
    elif "TS_DISABLE_TOKEN_AUTHORIZATION" in ctx.environ:
        yield _f("low", "TS_DISABLE_TOKEN_AUTHORIZATION", "set in the environment; ignored "
                 "while enable_envvars_config is false, but one config change away from "
                 "turning token auth off.", "Unset it.", cwe=["CWE-306"], source="environment",
                 value=ctx.environ["TS_DISABLE_TOKEN_AUTHORIZATION"])


@_rule
def _image_pixels(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if not ctx.flag("limit_max_image_pixels"):
        yield _f("medium", "limit_max_image_pixels", "false makes TorchServe's vision handlers "
                 "set PIL.Image.MAX_IMAGE_PIXELS = None for the whole worker: no "
                 "decompression-bomb guard for any image.", "Set limit_max_image_pixels=true.",
                 cwe=["CWE-400", "CWE-409"], ctx=ctx)


def _size_bound(limits: HandlerLimits) -> int:
    # Anything above what the generated config allows is refused by the handler anyway,
    # after the frontend has buffered it.
    return frontend_request_limit(limits.max_request_bytes)


@_rule
def _sizes(ctx: AuditContext) -> Iterator[ConfigFinding]:
    bound = _size_bound(ctx.limits)
    for key in ("max_request_size", "max_response_size"):
        size = java_int(ctx.get(key))
        if size is None:
            yield _f("medium", key, f"`{ctx.get(key)}` is not an integer; TorchServe will not "
                     "start.", f"Set {key}={bound}.", cwe=["CWE-1284"], ctx=ctx)
        elif size > bound:
            yield _f("medium", key, f"{size} bytes is above what the handlers accept "
                     f"(max_request_bytes {ctx.limits.max_request_bytes}, at most {bound} with "
                     "base64 and envelope): the frontend buffers bodies (and each queued job) "
                     "that can only be refused.", f"Set {key} to at most {bound}.",
                     cwe=["CWE-770", "CWE-400"], ctx=ctx)
        elif key == "max_request_size" and size < ctx.limits.max_request_bytes:
            yield _f("low", key, f"{size} bytes is below the handlers' max_request_bytes "
                     f"({ctx.limits.max_request_bytes}): large valid requests get Netty's bare "
                     "413 instead of the handler's JSON error.",
                     f"Set {key}={bound}.", ctx=ctx)


@_rule
def _job_queue(ctx: AuditContext) -> Iterator[ConfigFinding]:
    size = java_int(ctx.get("job_queue_size"))
    if size is None or size <= 0:
        yield _f("medium", "job_queue_size", f"`{ctx.get('job_queue_size')}` is not a positive "
                 "integer; TorchServe will not start.", "Set job_queue_size=100.", ctx=ctx)
        return
    request = java_int(ctx.get("max_request_size")) or 0
    exposure = size * request
    detail = f"{size} queued jobs of up to {request} bytes each (~{exposure / 2**30:.1f} GiB per " \
             "model) are held in memory before anyone refuses them."
    if size >= 100_000 or exposure > 16 * 2**30:
        yield _f("high", "job_queue_size", "the job queue is effectively unbounded: " + detail,
                 "Set job_queue_size to ~100 (a full queue answers 503, which clients retry).",
                 cwe=["CWE-770", "CWE-400"], ctx=ctx)
    elif size > 1000:
        yield _f("medium", "job_queue_size", "the job queue is very large: " + detail,
                 "Set job_queue_size to ~100.", cwe=["CWE-770"], ctx=ctx)


@_rule
def _cors(ctx: AuditContext) -> Iterator[ConfigFinding]:
    origin = ctx.get("cors_allowed_origin")
    if origin is not None and origin.strip() in ("*", "null"):
        yield _f("medium", "cors_allowed_origin", f"`{origin.strip()}` lets any web page call "
                 "the APIs from a visitor's browser (and read the answers).",
                 "Remove cors_allowed_* or list the exact origins.", cwe=["CWE-942"], ctx=ctx)


@_rule
def _launcher_settings(ctx: AuditContext) -> Iterator[ConfigFinding]:
    """`vmargs` and `plugins_path` are read by the launcher's own parser; check both views."""
    for key in ("vmargs", "plugins_path"):
        seen, java = ctx.launcher.get(key), ctx.props.get(key)
        if seen is not None and java != seen:
            yield _f("high", key, f"TorchServe's launcher reads {key}=`{seen}` but a Java "
                     f"properties reader sees {'nothing' if java is None else repr(java)}: the "
                     "two parsers disagree (a continuation, escape or separator hides it).",
                     "Rewrite the file as plain `key=value` lines; remove the setting.",
                     cwe=["CWE-436"], source="launcher", value=seen)
    yield from _vmargs(ctx)
    yield from _plugins(ctx)


def _vmargs(ctx: AuditContext) -> Iterator[ConfigFinding]:
    vmargs = ctx.launcher.get("vmargs")
    if not vmargs:
        return
    bad = [arg for arg in vmargs.split() if _DANGEROUS_JVM.match(arg)]
    if bad:
        yield _f("high", "vmargs", f"JVM arguments from the config load code or run commands "
                 f"in the frontend: {' '.join(bad)}.", "Remove them from vmargs.",
                 cwe=["CWE-94", "CWE-78"], source="launcher", value=vmargs)
    else:
        yield _f("low", "vmargs", "the config passes extra JVM arguments; whoever can edit the "
                 "config controls the JVM.", "Keep only memory/GC flags; keep the file "
                 "root-owned.", cwe=["CWE-15"], source="launcher", value=vmargs)


def _plugins(ctx: AuditContext) -> Iterator[ConfigFinding]:
    paths = [p for p in (ctx.launcher.get("plugins_path"),
                         getattr(ctx.cmdline, "plugins_path", None)) if p]
    for path in paths:
        writable = _writable_by_others(Path(path.rstrip("*").rstrip("/") or "/"))
        yield _f("high" if writable else "medium", "plugins_path", f"every jar in `{path}` runs "
                 "inside the frontend with its privileges" + (" and the directory is writable "
                 "by other users" if writable else "") + ".", "Remove plugins_path, or make the "
                 "directory root-owned and pin its jars.", cwe=["CWE-829"]
                 + (["CWE-732"] if writable else []), source="launcher", value=path)


def _writable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH)) and not mode & stat.S_ISVTX


@_rule
def _commands(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.get("system_metrics_cmd"):
        yield _f("high", "system_metrics_cmd", "TorchServe runs this command line periodically "
                 "to collect system metrics: a config edit becomes command execution.",
                 "Remove system_metrics_cmd.", cwe=["CWE-78"], ctx=ctx)
    if ctx.flag("cpu_launcher_enable") and ctx.get("cpu_launcher_args"):
        yield _f("low", "cpu_launcher_args", "arguments are passed to the CPU launcher that "
                 "starts every worker.", "Review them; keep the file root-owned.",
                 cwe=["CWE-88"], ctx=ctx)


@_rule
def _blacklist(ctx: AuditContext) -> Iterator[ConfigFinding]:
    value = ctx.get("blacklist_env_vars")
    fix = "Set blacklist_env_vars=.*(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL).*|AWS_.*|HF_.*"
    if not value:
        yield _f("medium", "blacklist_env_vars", "every environment variable of the server "
                 "(cloud credentials, API keys) is visible to the handler code in the workers.",
                 fix, cwe=["CWE-526"], ctx=ctx)
        return
    try:
        pattern = re.compile(value)
    except re.error as exc:
        yield _f("medium", "blacklist_env_vars", f"not a valid regex ({exc}).", fix,
                 cwe=["CWE-526"], ctx=ctx)
        return
    missed = [name for name in _SECRET_SAMPLES if not pattern.fullmatch(name)]
    if missed:
        yield _f("low", "blacklist_env_vars", f"does not hide {', '.join(missed)} from the "
                 "workers.", fix, cwe=["CWE-526"], ctx=ctx)


@_rule
def _timeouts(ctx: AuditContext) -> Iterator[ConfigFinding]:
    timeout = java_int(ctx.get("default_response_timeout"))
    if timeout is not None and timeout > 600:
        yield _f("low", "default_response_timeout", f"a stuck batch holds its worker for "
                 f"{timeout} s before TorchServe restarts it.", "Use 60-120 s.",
                 cwe=["CWE-400"], ctx=ctx)


def _remote(location: str) -> bool:
    return bool(re.match(r"^([^=]+=)?\s*https?://", location, re.IGNORECASE))


@_rule
def _load_models(ctx: AuditContext) -> Iterator[ConfigFinding]:
    listed = [m for m in (ctx.get("load_models") or "").split(",") if m.strip()]
    listed += list(getattr(ctx.cmdline, "models", None) or [])
    for item in filter(_remote, listed):
        yield _f("high", "load_models", f"`{item}` is downloaded at start-up and its handler "
                 "runs: code from the network, not verified against a lock.",
                 "Put the archive in the model store, lock it, and load it by name.",
                 cwe=["CWE-494"], cve=["CVE-2023-43654"], ctx=ctx, value=item)


@_rule
def _models_json(ctx: AuditContext) -> Iterator[ConfigFinding]:
    raw = ctx.get("models")
    if not raw:
        return
    try:
        models = json.loads(raw)
        versions = [(n, v, s) for n, vs in models.items() for v, s in vs.items()]
        batches = [(n, v, int(s.get("batchSize", 1))) for n, v, s in versions]
    except (ValueError, AttributeError, TypeError) as exc:
        yield _f("medium", "models", f"not the JSON TorchServe expects ({exc}).",
                 "Regenerate it with `secure-handler config`.", cwe=["CWE-1284"], ctx=ctx)
        return
    for name, version, batch in batches:
        limit = ctx.model_limits.get(name, ctx.limits).max_batch_size
        if batch > limit:
            yield _f("medium", "models", f"{name} {version}: batchSize {batch} is above the "
                     f"handler's max_batch_size {limit}; the surplus rows of every full batch "
                     "are refused with 503.", f"Set batchSize <= {limit}.",
                     cwe=["CWE-770"], ctx=ctx, value=f"{name}.batchSize={batch}")


@_rule
def _env_references(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for key, names in ctx.env_refs.items():
        missing = [n for n in names if n not in ctx.environ]
        if missing:
            yield _f("medium", key, f"refers to $${missing[0]}$$, which is not set; TorchServe "
                     "refuses to start.", "Set the variable or write the value.", ctx=ctx)
        else:
            yield _f("low", key, f"takes its value from the environment ({', '.join(names)}); "
                     "the file alone does not say what runs.", "Write the value in the file.",
                     cwe=["CWE-15"], ctx=ctx)


@_rule
def _file_hygiene(ctx: AuditContext) -> Iterator[ConfigFinding]:
    counts: dict[str, int] = {}
    for entry in ctx.entries:
        counts[entry.key] = counts.get(entry.key, 0) + 1
    for key, count in counts.items():
        if count > 1:
            yield _f("low", key, f"set {count} times; only the last one counts, and a reviewer "
                     "may read the first.", "Keep one line per key.", cwe=["CWE-436"], ctx=ctx)
        elif key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)
            if close:
                yield _f("low", key, f"TorchServe has no such key and ignores it; did you mean "
                         f"`{close[0]}`?", f"Rename it to {close[0]}.", ctx=ctx)
    for key in _BOOLEAN_KEYS:
        raw = ctx.props.get(key)
        if raw is not None and raw.strip().lower() == "true" and not java_bool(raw):
            yield _f("low", key, f"`{raw}` has whitespace around `true`; TorchServe reads it "
                     "as false.", f"Write exactly {key}=true or false.", ctx=ctx)


@_rule
def _model_store(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.model_store is not None and _writable_by_others(ctx.model_store):
        yield _f("medium", "model_store", f"{ctx.model_store} is writable by other users: "
                 "anyone there can drop or swap an archive.", "chmod go-w the store; verify it "
                 "against a lock before every start (`secure-handler serve`).",
                 cwe=["CWE-732", "CWE-494"], ctx=ctx, value=str(ctx.model_store))


@_rule
def _cmdline(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.cmdline_error:
        yield _f("medium", "cmdline", f"torchserve would refuse this command line: "
                 f"{ctx.cmdline_error}", "Fix the arguments.", source="cmdline", value="")
    args = ctx.cmdline
    if args is None:
        return
    if not args.no_config_snapshots:
        yield _f("medium", "--ncs", "without --ncs TorchServe writes config snapshots and, when "
                 "started without --ts-config, silently loads the last snapshot instead of "
                 "your file.", "Add --ncs.", cwe=["CWE-1188"], source="cmdline", value="")
    config = args.ts_config
    if not config and not ctx.environ.get("TS_CONFIG_FILE"):
        yield _f("high", "--ts-config", "no --ts-config (nor TS_CONFIG_FILE): TorchServe loads "
                 "the last snapshot or ./config.properties, not the audited file.",
                 "Add --ts-config FILE.", cwe=["CWE-1188"], source="cmdline", value="")
    elif config and ctx.config_path is not None and not _same_file(config, ctx.config_path):
        yield _f("medium", "--ts-config", f"the command starts with `{config}`, not the audited "
                 f"{ctx.config_path}.", "Audit the file the command uses.", source="cmdline",
                 value=config)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


@_rule
def _environment(ctx: AuditContext) -> Iterator[ConfigFinding]:
    flag = ctx.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if flag is not None and flag.lower() in _TRUE_VALUES:
        yield _f("high", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "makes every torch.load in the "
                 "workers (TorchServe's eager path, its text and densenet handlers) unpickle "
                 "arbitrary objects: a crafted file runs code.", "Unset it.",
                 cwe=["CWE-502"], source="environment", value=flag)
    ts_config = ctx.environ.get("TS_CONFIG_FILE")
    if ts_config and ctx.config_path is not None and not _same_file(ts_config, ctx.config_path):
        yield _f("high", "TS_CONFIG_FILE", f"the environment points TorchServe at `{ts_config}`, "
                 "which wins over --ts-config: the audited file is not the one used.",
                 "Unset TS_CONFIG_FILE.", cwe=["CWE-15"], source="environment", value=ts_config)


# --- entry points ------------------------------------------------------------------------


def audit(ctx: AuditContext) -> list[ConfigFinding]:
    """Run every rule; findings sorted high → low, then by key."""
    found = [finding for rule in _RULES for finding in rule(ctx)]
    return sorted(found, key=lambda f: (_RANK[f.severity], f.key))


def audit_file(
    path: str | os.PathLike[str],
    *,
    cmdline: str | Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    limits: HandlerLimits | None = None,
    model_limits: Mapping[str, HandlerLimits] | None = None,
    model_store: Path | None = None,
) -> list[ConfigFinding]:
    """Audit a config file as TorchServe reads it (ISO-8859-1 bytes).

    `cmdline` is the `torchserve ...` command (a string is split like a shell would);
    `environ` the server's environment (None: no environment checks).

    Raises:
        OSError: the file cannot be read.
        PropertiesError: it is not valid Java properties.
    """
    text = Path(path).read_bytes().decode("latin-1")
    if isinstance(cmdline, str):
        cmdline = shlex.split(cmdline)
    ctx = AuditContext.build(
        text, config_path=Path(path), cmdline=cmdline, environ=environ, limits=limits,
        model_limits=model_limits, model_store=model_store,
    )
    return audit(ctx)


def blocking(findings: Iterable[ConfigFinding]) -> list[ConfigFinding]:
    """The findings that refuse a start: every high one."""
    return [f for f in findings if f.severity == "high"]


def count_by_severity(findings: Iterable[ConfigFinding]) -> dict[str, int]:
    counts = dict.fromkeys(_RANK, 0)
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def format_findings(findings: Sequence[ConfigFinding]) -> str:
    """Human output: one block per finding and a summary line."""
    lines = []
    for f in findings:
        value = "" if f.value in (None, "") else f" = {_short(f.value)}"
        refs = f" [{f.references}]" if f.references else ""
        lines += [f"{f.severity.upper():<7}{f.key}{value}  ({f.source})",
                  f"       why: {f.why}{refs}", f"       fix: {f.fix}"]
    counts = count_by_severity(findings)
    lines.append(", ".join(f"{n} {sev}" for sev, n in counts.items()) if findings
                 else "no findings")
    return "\n".join(lines)


def format_markdown(findings: Sequence[ConfigFinding]) -> str:
    """A Markdown table (severity, key, why, fix) for reports and READMEs."""
    rows = ["| severity | key | why | fix |", "|---|---|---|---|"]
    for f in findings:
        refs = f" ({f.references})" if f.references else ""
        cells = [f.severity, f"`{f.key}`", f.why + refs, f.fix]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _short(value: str, width: int = 60) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."
