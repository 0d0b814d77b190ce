"""What `audit-config` looks at: the settings as TorchServe 0.12 will really run with them.

The same file is read twice by TorchServe, and an audit that reads it once can be fooled:

1. the Java frontend: `java.util.Properties` on ISO-8859-1 bytes (`secure_handler.deploy.
   javaprops`), `$$NAME$$` references replaced from the environment, and with
   `enable_envvars_config=true` every `TS_*` variable overriding its key;
2. the Python launcher (`ts/model_server.py`): a line-by-line reader of the text in the
   locale's encoding, which is where `vmargs` and `plugins_path` come from. It is rebuilt here
   for UTF-8 and for ISO-8859-1, so a separator that only one decoding sees is still found.

The command line is parsed with TorchServe's own argument parser, and addresses with the
frontend's own pattern (`ConfigManager.ADDRESS_PATTERN`, compiled `CASE_INSENSITIVE`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from secure_handler.deploy.audit.report import ConfigFinding, Severity
from secure_handler.deploy.javaprops import Entry, entries, launcher_view
from secure_handler.deploy.tsconfig import DEFAULT_ALLOWED_URLS, HandlerLimits

__all__ = [
    "DEFAULTS",
    "ENV_OVERRIDES",
    "KNOWN_KEYS",
    "Address",
    "AuditContext",
    "java_bool",
    "java_int",
    "loopback_host",
    "parse_address",
    "parse_cmdline",
]

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
        "grpc_inference_max_connection_age_ms", "grpc_management_max_connection_age_ms",
        "grpc_inference_max_connection_age_grace_ms",
        "grpc_management_max_connection_age_grace_ms",
    )
}
ENV_OVERRIDES["TS_TOKEN_EXPIRATION_TIME_MIN"] = "token_expiration_min"
ENV_OVERRIDES["TS_OPEN_INFERENCE_PROTOCOL"] = "ts_open_inference_protocol"
ENV_OVERRIDES.update({f"TS_HEADER_KEY_SEQUENCE_{part}": f"ts_header_key_sequence_{part.lower()}"
                      for part in ("ID", "START", "END")})

#: Every key TorchServe 0.12 reads (frontend and launcher). Anything else is flagged: the
#: audit does not guess what an unknown key does.
KNOWN_KEYS = frozenset(ENV_OVERRIDES.values()) | {
    "use_native_io", "io_ratio", "metric_time_interval", "enable_envvars_config",
    "model_snapshot", "models", "version", "system_metrics_cmd", "use_env_allowed_urls",
    "vmargs", "plugins_path", "snapshot_store", "python", "token_expiration_min",
    "grpc_inference_max_connection_age_ms", "grpc_management_max_connection_age_ms",
    "grpc_inference_max_connection_age_grace_ms", "grpc_management_max_connection_age_grace_ms",
    "ts_header_key_sequence_id", "ts_header_key_sequence_start", "ts_header_key_sequence_end",
    "tsConfigFile",
}

# `ConfigManager.ADDRESS_PATTERN`, compiled with flag 2 (`CASE_INSENSITIVE`, ASCII only), used
# with `matches()`. Java's `.` stops at every line terminator, Python's only at `\n`: spelled out.
_ADDRESS = re.compile(r"((https|http)://([^:^/]+)(:([0-9]+))?)|(unix:(/[^\n\r\x85\u2028\u2029]*))",
                      re.IGNORECASE | re.ASCII)
_ENV_REF = re.compile(r"\$\$([^$]+[^$])\$\$")


@dataclass(frozen=True)
class Address:
    """One parsed `*_address`: scheme in lower case, host and port, or a unix socket path."""

    scheme: str
    host: str
    port: str | None
    unix_path: str | None

    @property
    def local(self) -> bool:
        """Reachable only from this machine: a unix socket or a loopback host."""
        return self.unix_path is not None or loopback_host(self.host, ipv6=False)


def parse_address(value: str) -> Address | None:
    """The address as `Connector.parse` reads it, or None where TorchServe refuses to start."""
    match = _ADDRESS.fullmatch(value)
    if match is None:
        return None
    if match.group(7) is not None:
        return Address("unix", "", None, match.group(7))
    return Address(match.group(2).lower(), match.group(3), match.group(5), None)


def loopback_host(host: str, *, ipv6: bool = True) -> bool:
    """Only what is surely loopback: `localhost` or a canonical loopback IP literal.

    Nothing is stripped or normalised: `127.0.0.1 ` or `0x7f.1` are what Java resolves them
    to, not what they look like, so they count as public.
    """
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback and (ipv6 or address.version == 4)


@dataclass
class AuditContext:
    """Everything the rules look at; build it with `AuditContext.build`."""

    props: dict[str, str]
    sources: dict[str, str]
    entries: list[Entry]
    launchers: list[dict[str, str]]
    environ: Mapping[str, str]
    cmdline: argparse.Namespace | None = None
    cmdline_error: str | None = None
    config_path: Path | None = None
    model_store: Path | None = None
    server_store: Path | None = None
    gateway_config: Path | None = None
    limits: HandlerLimits = field(default_factory=HandlerLimits)
    model_limits: Mapping[str, HandlerLimits] = field(default_factory=dict)
    env_refs: dict[str, list[str]] = field(default_factory=dict)
    text: str = ""  # the file as Java reads it (ISO-8859-1)
    env_ref_errors: list[str] = field(default_factory=list)  # values Java cannot substitute

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
        gateway_config: Path | None = None,
    ) -> AuditContext:
        """Parse `text` (the file's bytes as ISO-8859-1) and rebuild what TorchServe runs with.

        Raises:
            PropertiesError: the file is not valid Java properties.
        """
        found = entries(text)
        ctx = cls(
            props={e.key: e.value for e in found},
            sources={e.key: f"config line {e.line}" for e in found},
            entries=found, launchers=launcher_views(text), environ=dict(environ or {}),
            config_path=config_path, model_limits=dict(model_limits or {}),
            gateway_config=gateway_config, text=text,
        )
        if cmdline is not None:
            ctx.cmdline, ctx.cmdline_error = parse_cmdline(cmdline)
        ctx._resolve_env_refs()
        ctx._apply_env_overrides()
        ctx.server_store = ctx._store_from_settings()
        ctx.model_store = model_store or ctx.server_store
        ctx.limits = limits or HandlerLimits.combined(ctx.model_limits.values())
        return ctx

    def _resolve_env_refs(self) -> None:
        """`ConfigManager.resolveEnvVarVals`: each `$$NAME$$` is replaced with
        `Matcher.appendReplacement`, which reads the variable's value as a replacement
        template (`\\x` is `x`, `$1` is the name), not as literal text."""
        for key, value in list(self.props.items()):
            names = _ENV_REF.findall(value)
            if names:
                self.env_refs[key] = names
                self.props[key] = _ENV_REF.sub(self._env_value, value)

    def _env_value(self, match: re.Match[str]) -> str:
        value = self.environ.get(match.group(1))
        if value is None:
            return match.group(0)
        replaced = java_replacement(value, match)
        if replaced is None:
            self.env_ref_errors.append(match.group(1))
            return match.group(0)
        return replaced

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
        """The store TorchServe uses. The launcher passes `-s` to Java from the command line
        or, failing that, from ITS reading of the file (Java's own reading is overridden);
        with enable_envvars_config, TS_MODEL_STORE is applied after `-s` and wins."""
        if self.where("model_store").startswith("environment"):
            store = self.props.get("model_store")
        else:
            store = getattr(self.cmdline, "model_store", None) or next(
                iter(self.launcher_values("model_store")), None)
        return Path(store) if store else None

    @property
    def launcher(self) -> dict[str, str]:
        """The launcher's view of the file under UTF-8 (the usual locale)."""
        return self.launchers[0]

    def launcher_values(self, key: str) -> list[str]:
        """Every distinct value of `key` the launcher may read, one per decoding."""
        return list(dict.fromkeys(v[key] for v in self.launchers if key in v))

    def get(self, key: str) -> str | None:
        """The effective value, or TorchServe's default, or None."""
        return self.props.get(key, DEFAULTS.get(key))

    def flag(self, key: str) -> bool:
        """A boolean as TorchServe reads it: `Boolean.parseBoolean` (only "true", any case)."""
        return java_bool(self.get(key) or "false")

    def where(self, key: str) -> str:
        return self.sources.get(key, "default" if key in DEFAULTS else "absent")

    def address(self, key: str) -> Address | None:
        return parse_address(self.get(key) or "")

    def finding(self, severity: Severity, key: str, why: str, fix: str, *,
                cwe: Iterable[str] = (), cve: Iterable[str] = (), source: str | None = None,
                value: str | None = None) -> ConfigFinding:
        """A finding about `key`; value and source default to the effective setting's."""
        return ConfigFinding(severity, key, why, fix, tuple(cwe), tuple(cve),
                             self.get(key) if value is None else value,
                             self.where(key) if source is None else source)


def launcher_views(text: str) -> list[dict[str, str]]:
    """The launcher's reading of the file under UTF-8 (when the bytes are UTF-8) and
    ISO-8859-1: Python's `str.split()` and `strip()` break on different characters in each."""
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError:  # not bytes read as ISO-8859-1: take the text as it is
        return [launcher_view(text)]
    views = []
    with contextlib.suppress(UnicodeDecodeError):
        views.append(launcher_view(data.decode("utf-8")))
    views.append(launcher_view(text))
    return views


def java_replacement(template: str, match: re.Match[str]) -> str | None:
    """What `Matcher.appendReplacement(sb, template)` inserts for `match`; None where Java
    throws (a trailing `\\` or `$`, `${name}`, a group the pattern does not have)."""
    out: list[str] = []
    i, groups = 0, (match.re.groups or 0)
    while i < len(template):
        c = template[i]
        if c == "\\":
            if i + 1 == len(template):
                return None
            out.append(template[i + 1])
            i += 2
        elif c == "$":
            if i + 1 == len(template) or template[i + 1] not in "0123456789":
                return None
            ref, i = int(template[i + 1]), i + 2
            while i < len(template) and template[i] in "0123456789" \
                    and ref * 10 + int(template[i]) <= groups:
                ref, i = ref * 10 + int(template[i]), i + 1
            if ref > groups:
                return None
            out.append(match.group(ref) or "")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def java_bool(value: str) -> bool:
    """`Boolean.parseBoolean`: true only for "true" in any case, no trimming."""
    return value.lower() == "true"


def java_int(value: str | None) -> int | None:
    r"""`Integer.parseInt` (no trimming); None when Java would throw.

    Java's `Character.digit` takes every Unicode decimal digit (`٣` is 3), as `\d` and `int`
    do in Python; an ASCII-only reading would call `١٠٠٠٠٠٠` "not a number" and miss its size.
    """
    if value is None or not re.fullmatch(r"[+-]?\d+", value):
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
