"""Sign and verify MARs with OpenSSF model_signing, key-based and offline (the `sign` extra).

A SHA-256 pin says "this is the file I locked"; a signature says "someone holding this key
published it", which survives copying a MAR between machines. model_signing hashes the MAR as
a single file, wraps the digest in an in-toto statement and signs it into a Sigstore bundle
with an elliptic-curve key. Key signing needs no network: no Fulcio, no Rekor, no OIDC.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from secure_handler.errors import ConfigurationError
from secure_handler.supply.findings import Finding, finding

__all__ = ["SigningUnavailable", "default_signature_path", "sign_mar", "verify_signature"]

logger = logging.getLogger(__name__)

_HINT = "install the `sign` extra: pip install 'secure-handler[sign]'"


class SigningUnavailable(ConfigurationError, RuntimeError):
    """model_signing is not installed (or fails to import)."""


def _model_signing() -> Any:
    try:
        import model_signing  # optional: the `sign` extra
    except ImportError as exc:  # model-signing 1.1.1 also needs pyOpenSSL at import
        raise SigningUnavailable(f"model_signing is unavailable ({exc}); {_HINT}") from exc
    return model_signing


def default_signature_path(mar: Path) -> Path:
    """`<name>.mar.sig`, next to the MAR."""
    return mar.with_name(mar.name + ".sig")


def sign_mar(mar: Path, private_key: Path, signature: Path | None = None) -> Path:
    """Sign `mar` with an EC private key (PEM); returns the signature (Sigstore bundle) path."""
    ms = _model_signing()
    out = signature or default_signature_path(mar)
    ms.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(mar, out)
    return out


def verify_signature(mar: Path, signature: Path, public_key: Path) -> Finding | None:
    """None when `signature` verifies `mar` under `public_key`, else an SH510 finding."""
    ms = _model_signing()
    config = ms.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    try:
        config.verify(mar, signature)
    except Exception as exc:  # model_signing raises ValueError and crypto errors alike
        logger.warning("signature check of %s failed: %s", mar, exc)
        reason = str(exc).split(":", 1)[0] or type(exc).__name__
        return finding("SH510", mar.name, f"signature {signature.name} does not verify: {reason}")
    return None
