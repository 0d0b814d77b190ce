"""Audit rules for who can reach TorchServe: addresses, TLS, gRPC, tokens, the model API, CORS.

Addresses are read with TorchServe's own pattern (case-insensitive: `HTTP://0.0.0.0:8080` is
plain HTTP on every interface) and a host counts as local only when it surely is. The model API
(register/unregister) is allowed only behind the secure-handler gateway: the operator names the
gateway's config (`--gateway-config`), the management API stays on loopback, and the gateway's
upstream and store are this server's.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from secure_handler.deploy.audit.context import AuditContext, loopback_host, parse_address
from secure_handler.deploy.audit.report import ConfigFinding

__all__ = ["RULES", "gateway_problems"]

_APIS = ("inference", "management", "metrics")


def http_addresses(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for api in _APIS:
        key = f"{api}_address"
        address = ctx.address(key)
        if address is None:
            yield ctx.finding("medium", key, f"`{ctx.get(key)}` is not an address TorchServe "
                              "accepts (it wants http(s)://host[:port] with no IPv6 literal, "
                              "or unix:/path); it will not start.", "Use http://127.0.0.1:PORT.",
                              cwe=["CWE-1284"])
        elif not address.local:
            yield from _public_address(ctx, api, key, address.scheme == "https")


def _public_address(ctx: AuditContext, api: str, key: str, tls: bool) -> Iterator[ConfigFinding]:
    where = f"{ctx.get(key)} is reachable from other hosts (or is not surely loopback)"
    if api == "metrics":
        if ctx.flag("enable_metrics_api"):
            yield ctx.finding("medium", key, f"{where}, and TorchServe checks no token on the "
                              "metrics API: anyone can read model names, load and latencies.",
                              "Bind metrics to 127.0.0.1 and scrape through a local agent, or "
                              "set enable_metrics_api=false.", cwe=["CWE-306", "CWE-200"])
        return
    if not tls:
        yield ctx.finding("high", key, f"{where} over plain http: bearer tokens and payloads "
                          "cross the network in clear text" + (", and the management API can "
                          "register models (the ShellTorch entry point)" if api == "management"
                          else "") + ".", "Bind to 127.0.0.1, or use https:// with "
                          "certificate_file and private_key_file behind a gateway.",
                          cwe=["CWE-319", "CWE-306"])
    elif api == "management":
        yield ctx.finding("medium", key, f"{where}: the management API should never face the "
                          "network (ShellTorch); TorchServe's 48-bit tokens are its only guard.",
                          "Bind management_address to 127.0.0.1.", cwe=["CWE-306", "CWE-330"])
    else:
        yield ctx.finding("low", key, f"{where}; TorchServe has no rate limits or per-client "
                          "keys.", "Put the secure-handler gateway (or another proxy) in front.",
                          cwe=["CWE-770"])


def tls_material(ctx: AuditContext) -> Iterator[ConfigFinding]:
    https = [f"{api}_address" for api in _APIS
             if getattr(ctx.address(f"{api}_address"), "scheme", "") == "https"]
    has_files = ctx.get("certificate_file") and ctx.get("private_key_file")
    if https and not (ctx.get("keystore") or has_files):
        yield ctx.finding("medium", https[0], "https is on but no keystore or certificate_file/"
                          "private_key_file is set: TorchServe generates a self-signed "
                          "certificate that clients cannot verify.",
                          "Set certificate_file and private_key_file.", cwe=["CWE-295"])
    if ctx.get("keystore") and ctx.get("keystore_pass") in (None, "changeit"):
        yield ctx.finding("medium", "keystore_pass", "the keystore password is TorchServe's "
                          "default `changeit`.", "Set a real keystore_pass (or use PEM files).",
                          cwe=["CWE-798", "CWE-1188"], value=ctx.get("keystore_pass") or "")


def key_permissions(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for key in ("private_key_file", "keystore"):
        value = ctx.get(key)
        if not value:
            continue
        try:
            mode = Path(value).stat().st_mode
        except OSError:
            yield ctx.finding("medium", key, f"{value} does not exist or cannot be read; "
                              "TorchServe will not start with TLS.", "Point it at the real file.")
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
            yield ctx.finding("medium", key, f"{value} is readable or writable by other users: "
                              "the TLS private key can be copied or replaced.",
                              f"chmod 600 {value}", cwe=["CWE-732"])


def grpc(ctx: AuditContext) -> Iterator[ConfigFinding]:
    for api in ("inference", "management"):
        key = f"grpc_{api}_address"
        host = ctx.get(key) or ""
        if loopback_host(host):
            continue
        if not ctx.flag("enable_grpc_ssl"):
            yield ctx.finding("high", key, f"gRPC {api} listens on `{host}` (all or public "
                              "interfaces) without TLS (enable_grpc_ssl is off): tokens and "
                              "payloads in clear text, and a second API surface next to the "
                              "HTTP one.", "Set it to 127.0.0.1 (TorchServe cannot turn gRPC "
                              "off).", cwe=["CWE-319", "CWE-306"])
        elif api == "management":
            yield ctx.finding("medium", key, f"gRPC management listens on `{host}`; the "
                              "management API should never face the network.",
                              "Set it to 127.0.0.1.", cwe=["CWE-306"])


def _token_auth_off(ctx: AuditContext) -> bool:
    return ctx.flag("disable_token_authorization") or bool(
        ctx.cmdline is not None and ctx.cmdline.token_auth)


def token_auth(ctx: AuditContext) -> Iterator[ConfigFinding]:
    if ctx.flag("disable_token_authorization"):
        yield ctx.finding("high", "disable_token_authorization", "token authorization is off: "
                          "anyone who reaches a port can run inference and use the management "
                          "API.", "Remove the key (token auth is on by default) or set it to "
                          "false.", cwe=["CWE-306"])
    if ctx.cmdline is not None and ctx.cmdline.token_auth:
        yield ctx.finding("high", "--disable-token-auth", "the command line turns token "
                          "authorization off, whatever the config says.",
                          "Drop --disable-token-auth / --dt.", cwe=["CWE-306"],
                          source="cmdline", value="")
    raw = ctx.get("token_expiration_min")
    minutes = 60.0 if raw is None else java_double(raw)
    if minutes is None:
        yield ctx.finding("low", "token_expiration_min", f"`{raw}` is not a number; TorchServe "
                          "falls back to 60 minutes.", "Set a whole number of minutes.")
        return
    if not minutes <= 24 * 60:  # NaN and Infinity included
        yield ctx.finding("medium", "token_expiration_min", f"tokens live {minutes:g} minutes; "
                          "a leaked 8-character (48-bit) token stays valid that long.",
                          "Keep it at 60 or less and rotate via the /token API.",
                          cwe=["CWE-613"])


def java_double(text: str) -> float | None:
    """`Double.valueOf`: trims control characters and spaces, takes `1e3`, `5d`, `NaN`,
    `Infinity` and hex floats (`0x1p30`) but no `_` or Unicode digits; None where it throws.
    Values Python cannot read the same way (NaN, hex) come back as infinity: no expiry."""
    text = text.strip("".join(chr(c) for c in range(0x21)))
    if re.fullmatch(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?", text):
        return float(text.rstrip("fFdD"))
    if re.fullmatch(r"[+-]?(?:NaN|Infinity|0[xX][0-9a-fA-F.]+[pP][+-]?[0-9]+)[fFdD]?", text):
        return math.inf
    return None


def gateway_problems(ctx: AuditContext) -> list[str]:
    """Why the model API is not safely behind the named gateway; empty when it is."""
    if ctx.gateway_config is None:
        return ["no gateway config is named (audit-config --gateway-config FILE)"]
    from secure_handler.gateway.config import load_config

    try:
        gateway = load_config(ctx.gateway_config)
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return [f"the gateway config {ctx.gateway_config} cannot be read: "
                f"{str(exc).splitlines()[0]}"]
    problems = []
    management = ctx.address("management_address")
    if management is None or not management.local or management.unix_path is not None:
        problems.append(f"management_address `{ctx.get('management_address')}` is not a "
                        "loopback http(s) address the gateway can own")
    upstream = parse_address(gateway.upstream.management_url)
    if management is not None and (upstream is None or (upstream.host.lower(), upstream.port)
                                   != (management.host.lower(), management.port)):
        problems.append(f"the gateway's upstream.management_url "
                        f"`{gateway.upstream.management_url}` is not this server's "
                        f"management_address `{ctx.get('management_address')}`")
    if not loopback_host(ctx.get("grpc_management_address") or ""):
        problems.append("gRPC management (which can register too, with no gateway in front) "
                        f"listens on `{ctx.get('grpc_management_address')}`")
    if _token_auth_off(ctx):
        problems.append("token authorization is off, so any local process can register")
    if ctx.model_store is None or not _same_dir(gateway.model_store, ctx.model_store):
        problems.append(f"the gateway's model_store {gateway.model_store} is not this "
                        f"server's store {ctx.model_store}")
    return problems


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def model_api(ctx: AuditContext) -> Iterator[ConfigFinding]:
    switches: list[tuple[str, str | None, str | None]] = []
    if ctx.flag("enable_model_api"):
        switches.append(("enable_model_api", None, None))
    if ctx.cmdline is not None and ctx.cmdline.model_mode:
        switches.append(("--enable-model-api", "cmdline", ""))
    if not switches:
        return
    problems = gateway_problems(ctx)
    why = ("the model API lets a caller register archives, and an archive runs its handler "
           "code in the workers (ShellTorch: register a MAR from a URL, then run it)")
    for key, source, value in switches:
        if problems:
            yield ctx.finding("high", key, f"{why}; it is not safely behind a gateway: "
                              + "; ".join(problems) + ".", "Set enable_model_api=false and load "
                              "models at start-up from a verified store (`secure-handler "
                              "serve`), or keep management on 127.0.0.1 and name the gateway "
                              "config in front of it (--gateway-config).",
                              cwe=["CWE-306", "CWE-94"], cve=["CVE-2023-43654"],
                              source=source, value=value)
        else:
            yield ctx.finding("low", key, f"the model API is on behind the gateway of "
                              f"{ctx.gateway_config}: management stays on loopback and the "
                              "gateway registers only <name>.mar from this store.",
                              "Keep TorchServe's management port unreachable except through "
                              "the gateway.", cwe=["CWE-306"], source=source, value=value)


def cors(ctx: AuditContext) -> Iterator[ConfigFinding]:
    origin = ctx.get("cors_allowed_origin")
    if origin is not None and origin.strip() in ("*", "null"):
        yield ctx.finding("medium", "cors_allowed_origin", f"`{origin.strip()}` lets any web "
                          "page call the APIs from a visitor's browser (and read the answers).",
                          "Remove cors_allowed_* or list the exact origins.", cwe=["CWE-942"])


RULES = (http_addresses, tls_material, key_permissions, grpc, token_auth, model_api, cors)
