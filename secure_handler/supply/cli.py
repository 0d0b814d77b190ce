"""`secure-handler archive | verify | scan | lock | sign`: the supply-chain commands.

Exit codes: 0 ok, 1 findings or refusal, 2 usage or IO error. `--json` prints one JSON object
on stdout; otherwise findings are printed one per line as `location: RULE name [CWE] why`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_handler.supply.build import ArchiveRequest, ArchiverError, build_archive
from secure_handler.supply.policy import add_policy_argument, policy_from_args
from secure_handler.supply.scan_cli import add_scan, emit, finding_lines
from secure_handler.supply.templates import HANDLER_KINDS
from secure_handler.supply.verify import (
    LockResult,
    MarReport,
    VerifyOptions,
    lock_store,
    parse_sha256,
    read_lock,
    render_lock,
    verify_mar,
    verify_store,
)
from secure_handler.supply.zipsafe import ZipLimits

__all__ = ["register"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `archive`, `verify`, `scan`, `lock` and `sign` to the `secure-handler` parser."""
    _add_archive(sub)
    _add_verify(sub)
    add_scan(sub)
    _add_lock(sub)
    _add_sign(sub)


# --- shared options ------------------------------------------------------------------------


def _add_policy(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy (everything optional is refused by default)")
    group.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle extra files whose globals picklescan rates safe (they are still listed)",
    )
    group.add_argument(
        "--allow-requirements",
        action="store_true",
        help="allow a requirements file (TorchServe may pip-install it)",
    )
    group.add_argument(
        "--allow-builtin-handler",
        action="append",
        default=[],
        metavar="NAME",
        help="allow a handler module that is not in the archive (repeatable)",
    )
    add_policy_argument(group)
    group.add_argument("--max-members", type=int, default=ZipLimits.max_members)
    group.add_argument("--max-total-bytes", type=int, default=ZipLimits.max_total_bytes)
    group.add_argument(
        "--max-ratio",
        type=float,
        default=ZipLimits.max_ratio,
        help="largest compression ratio for members of 1 MiB or more",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _options(args: argparse.Namespace, require_digests: bool = True) -> VerifyOptions:
    limits = ZipLimits(args.max_members, args.max_total_bytes, args.max_ratio)
    return VerifyOptions(
        allow_pickle=args.allow_pickle,
        allow_requirements=args.allow_requirements,
        builtin_handlers=frozenset(args.allow_builtin_handler),
        require_digests=require_digests,
        limits=limits,
        policy=policy_from_args(args),
    )




def _usage_error(command: str, exc: BaseException) -> int:
    print(f"secure-handler {command}: {exc}", file=sys.stderr)
    return EXIT_USAGE


# --- archive -----------------------------------------------------------------------------


def _add_archive(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "archive",
        help="check inputs, then build a MAR with digests",
        description="Build a MAR with torch-model-archiver after checks; write "
        "<name>.mar, <name>.mar.sha256 and embedded per-member digests.",
    )
    p.add_argument("--model-name", required=True)
    p.add_argument("-v", "--version", required=True)
    p.add_argument(
        "--serialized-file",
        required=True,
        type=Path,
        help="the TorchScript model (torch.jit.script/trace output)",
    )
    p.add_argument(
        "--handler",
        required=True,
        help=f"{'|'.join(HANDLER_KINDS)} (generates the handler) or a .py file",
    )
    p.add_argument(
        "--extra-files",
        default="",
        help="comma-separated files or directories (JSON, YAML, text...)",
    )
    p.add_argument("-c", "--config-file", type=Path, help="model-config.yaml")
    p.add_argument(
        "-r", "--requirements-file", type=Path, help="refused unless --allow-requirements"
    )
    p.add_argument("--model-file", type=Path, help="always refused: eager models unpickle")
    p.add_argument("--export-path", type=Path, default=Path("."))
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing MAR")
    _add_policy(p)
    p.set_defaults(func=_cmd_archive)


def _cmd_archive(args: argparse.Namespace) -> int:
    extras = tuple(Path(x.strip()) for x in args.extra_files.split(",") if x.strip())
    request = ArchiveRequest(
        model_name=args.model_name,
        version=args.version,
        serialized_file=args.serialized_file,
        handler=args.handler,
        export_path=args.export_path,
        extra_files=extras,
        config_file=args.config_file,
        requirements_file=args.requirements_file,
        model_file=args.model_file,
        force=args.force,
    )
    try:
        result = build_archive(request, _options(args))
    except (ValueError, ArchiverError) as exc:
        return _usage_error("archive", exc)
    if result.ok:
        head = [f"OK wrote {result.mar}", f"  sha256 {result.sha256}  ({result.sidecar})"]
    else:
        head = [f"REFUSED {args.model_name}: nothing was written"]
    notes = [f"  note: {n}" for n in result.notes]
    emit(args, result.to_dict(), [*head, *finding_lines(result.findings), *notes])
    return EXIT_OK if result.ok else EXIT_FINDINGS


# --- verify ------------------------------------------------------------------------------


def _add_verify(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "verify",
        help="check a MAR (or a whole model store with --lock)",
        description="Check a MAR: zip safety, manifest, TorchScript layout, "
        "handler scan, pickles, embedded digests; optionally its SHA-256, its "
        "lock entry or its signature. With --lock and a directory, check a "
        "whole model store.",
    )
    p.add_argument("target", type=Path, help="a .mar file, or a model store with --lock")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--sha256", metavar="HEX|FILE", help="expected SHA-256, or its sidecar")
    pin.add_argument("--lock", type=Path, metavar="FILE", help="lock file from `lock`")
    p.add_argument("--signature", type=Path, help="model_signing bundle (needs --public-key)")
    p.add_argument("--public-key", type=Path, help="EC public key (PEM) for --signature")
    p.add_argument(
        "--allow-missing-digests",
        action="store_true",
        help="accept a MAR without embedded digests (e.g. with --sha256)",
    )
    _add_policy(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    if bool(args.signature) != bool(args.public_key):
        return _usage_error("verify", ValueError("--signature and --public-key go together"))
    try:
        options = _options(args, require_digests=not args.allow_missing_digests)
        if args.target.is_dir():
            if args.lock is None:
                raise ValueError("a directory is verified as a model store: pass --lock FILE")
            return _verify_store(args, options)
        report = _verify_one(args, options)
    except ValueError as exc:
        return _usage_error("verify", exc)
    status = "OK" if report.ok else "REFUSED"
    head = [
        f"{status} {report.path}",
        f"  sha256 {report.sha256}  model {report.name} version {report.version}",
    ]
    notes = [f"  note: {n}" for n in report.notes]
    emit(args, report.to_dict(), [*head, *finding_lines(report.findings), *notes])
    return EXIT_OK if report.ok else EXIT_FINDINGS


def _verify_one(args: argparse.Namespace, options: VerifyOptions) -> MarReport:
    expected = parse_sha256(args.sha256) if args.sha256 else None
    entry = None
    if args.lock is not None:
        entries = [m for m in read_lock(args.lock)["models"] if m.get("mar") == args.target.name]
        if not entries:
            raise ValueError(f"{args.target.name} is not in the lock file {args.lock}")
        entry = entries[0]
    report = verify_mar(args.target, options, expected_sha256=expected, lock_entry=entry)
    if args.signature:
        from secure_handler.supply.signing import SigningUnavailable, verify_signature

        try:
            bad = verify_signature(args.target, args.signature, args.public_key)
        except SigningUnavailable as exc:
            raise ValueError(str(exc)) from exc
        if bad:
            report.findings.append(bad)
        else:
            report.notes.append(f"signature {args.signature.name} verified")
    return report


def _verify_store(args: argparse.Namespace, options: VerifyOptions) -> int:
    findings = verify_store(args.target, args.lock, options)
    ok = not findings
    head = [f"{'OK' if ok else 'REFUSED'} model store {args.target} against {args.lock}"]
    payload = {
        "ok": ok,
        "store": str(args.target),
        "lock": str(args.lock),
        "findings": [f.to_dict() for f in findings],
    }
    emit(args, payload, [*head, *finding_lines(findings)])
    return EXIT_OK if ok else EXIT_FINDINGS


# --- lock --------------------------------------------------------------------------------


def _add_lock(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "lock",
        help="verify a model store and pin every MAR in a lock file",
        description="Verify every MAR in MODEL_STORE and write the lock file "
        "(name, version, SHA-256s) to stdout or -o. Point the worker at it "
        "with SECURE_HANDLER_TRUST_STORE.",
    )
    p.add_argument("store", type=Path, help="the model store directory")
    p.add_argument("-o", "--output", type=Path, help="write the lock here (else stdout)")
    _add_policy(p)
    p.set_defaults(func=_cmd_lock)


def _cmd_lock(args: argparse.Namespace) -> int:
    if not args.store.is_dir():
        return _usage_error("lock", ValueError(f"{args.store} is not a directory"))
    ignore = [args.output] if args.output else []
    try:
        options = _options(args)
    except ValueError as exc:
        return _usage_error("lock", exc)
    result = lock_store(args.store, options, ignore)
    if not result.ok:
        lines = [f"REFUSED: nothing locked in {args.store}", *_lock_lines(result)]
        _emit_stream(args, _lock_payload(result), lines, sys.stdout if args.output else sys.stderr)
        return EXIT_FINDINGS
    text = render_lock(result.lock)
    if args.output is None:
        sys.stdout.write(text)  # the lock itself is the output; the summary goes to stderr
        print(f"locked {len(result.reports)} archive(s) from {args.store}", file=sys.stderr)
        return EXIT_OK
    args.output.write_text(text, "utf-8")
    lines = [f"OK locked {len(result.reports)} archive(s) into {args.output}"]
    emit(args, _lock_payload(result), [*lines, *_lock_lines(result)])
    return EXIT_OK


def _lock_lines(result: LockResult) -> list[str]:
    lines = finding_lines(result.findings)
    for report in result.reports:
        lines.append(
            f"  {'ok' if report.ok else 'REFUSED'} {Path(report.path).name} "
            f"{report.name} {report.version} {report.sha256}"
        )
        lines += finding_lines(report.findings, "    ")
    return lines


def _lock_payload(result: LockResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "lock": result.lock if result.ok else None,
        "findings": [f.to_dict() for f in result.findings],
        "archives": [r.to_dict() for r in result.reports],
    }


def _emit_stream(
    args: argparse.Namespace, payload: dict[str, Any], lines: Sequence[str], stream: Any
) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True), file=stream)
    else:
        for line in lines:
            print(line, file=stream)


# --- sign --------------------------------------------------------------------------------


def _add_sign(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "sign",
        help="sign a MAR with an EC key (OpenSSF model_signing)",
        description="Sign a MAR offline with an elliptic-curve private key "
        "(model_signing, the `sign` extra). Check it with `verify MAR "
        "--signature SIG --public-key PUB`.",
    )
    p.add_argument("mar", type=Path)
    p.add_argument("--private-key", required=True, type=Path, help="EC private key (PEM)")
    p.add_argument("--signature", type=Path, help="output bundle (default <mar>.sig)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_sign)


def _cmd_sign(args: argparse.Namespace) -> int:
    from secure_handler.supply.signing import SigningUnavailable, sign_mar

    if not args.mar.is_file():
        return _usage_error("sign", FileNotFoundError(f"{args.mar} does not exist"))
    try:
        out = sign_mar(args.mar, args.private_key, args.signature)
    except (SigningUnavailable, ValueError) as exc:
        return _usage_error("sign", exc)
    emit(
        args,
        {"ok": True, "mar": str(args.mar), "signature": str(out)},
        [f"OK signed {args.mar} -> {out}"],
    )
    return EXIT_OK
