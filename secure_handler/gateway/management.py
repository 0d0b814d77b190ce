"""The management operations the gateway allows, and the checks on their parameters.

Only four operations reach TorchServe's management port: list, describe, scale workers and
register. Register takes a model NAME; the gateway itself turns it into the plain archive name
`<name>.mar` inside the model store. Anything else in `url=` (a scheme, an absolute path,
`..`, percent-encoded or doubly encoded tricks, a backslash, a NUL) is refused before TorchServe
sees it: the URL download of CVE-2023-43654 (SSRF, CWE-918) and path traversal (CWE-22).
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from pathlib import Path

from secure_handler.errors import MalformedRequest, ModelNotFound
from secure_handler.gateway.config import NAME_PATTERN
from secure_handler.gateway.errors import ForbiddenModelSource

__all__ = [
    "describe_params",
    "list_params",
    "register_params",
    "scale_params",
    "store_archive",
]

#: The one shape a register `url=` may have: a plain archive name, no directory part.
_ARCHIVE_RE = re.compile(NAME_PATTERN.rstrip("$") + r"\.mar$")
_NAME_RE = re.compile(NAME_PATTERN)


def _bad(message: str) -> MalformedRequest:
    return MalformedRequest(message)


def _single(items: Sequence[tuple[str, str]], allowed: set[str]) -> dict[str, str]:
    """Query parameters as a dict; unknown or repeated names are refused (no HTTP parameter
    pollution: TorchServe and the gateway might otherwise read different values)."""
    params: dict[str, str] = {}
    for name, value in items:
        if name not in allowed:
            raise _bad(f"parameter {name[:40]!r} is not allowed here")
        if name in params:
            raise _bad(f"parameter {name!r} given more than once")
        params[name] = value
    return params


def _int(params: dict[str, str], name: str, low: int, high: int) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    # Digits first: int() of more than 4,300 digits raises, which was a 500.
    if (not value.isascii() or not value.isdigit() or len(value) > 12
            or not low <= int(value) <= high):
        raise _bad(f"{name} must be an integer from {low} to {high}")
    return str(int(value))


def _bool(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if value.lower() not in ("true", "false"):
        raise _bad(f"{name} must be true or false")
    return value.lower()


def _drop_none(params: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in params.items() if v is not None}


def store_archive(store: Path, url: str) -> str:
    """Check that `url` is a plain archive name of a regular file inside `store`; return it.

    Raises Forbidden (`forbidden_model_source`) for anything that could leave the store or
    stand for another archive, and ModelNotFound (404) when no such archive exists.
    """
    if not _ARCHIVE_RE.fullmatch(url):
        raise ForbiddenModelSource(
            "models are registered by name from the model store; URLs and paths are refused")
    try:
        info = (store / url).lstat()
    except FileNotFoundError:
        raise ModelNotFound(f"no archive {url!r} in the model store") from None
    except OSError as exc:
        raise ForbiddenModelSource("the archive cannot be checked") from exc
    # Not followed: a symlink (to another archive in the store or anywhere else) would load
    # other weights under this name.
    if not stat.S_ISREG(info.st_mode):
        raise ForbiddenModelSource("the archive must be a regular file in the model store")
    return url


def register_params(
    items: Sequence[tuple[str, str]], store: Path, max_workers: int
) -> tuple[str, dict[str, str]]:
    """The model name and TorchServe's register parameters, from the client's query.

    The client gives `model_name`; `url=`, if given, must be exactly `<model_name>.mar` (the
    archive TorchServe loads is the one the name was granted for). `handler`, `runtime` and
    every other parameter TorchServe knows are refused.
    """
    allowed = {"model_name", "url", "initial_workers", "batch_size", "max_batch_delay",
               "response_timeout", "synchronous"}
    params = _single(items, allowed)
    if "url" in params:
        store_archive(store, params["url"])  # refuse before anything else, whatever the name
    name = params.get("model_name") or params.get("url", "").removesuffix(".mar")
    if not _NAME_RE.fullmatch(name):
        raise _bad("model_name must be a plain model name")
    url = f"{name}.mar"
    if params.get("url", url) != url:
        raise ForbiddenModelSource(
            f"url must be exactly {url!r}: a name registers only its own archive")
    store_archive(store, url)
    upstream = _drop_none({
        "url": url,
        "model_name": name,
        "initial_workers": _int(params, "initial_workers", 0, max_workers),
        "batch_size": _int(params, "batch_size", 1, 1024),
        "max_batch_delay": _int(params, "max_batch_delay", 0, 60_000),
        "response_timeout": _int(params, "response_timeout", 1, 3600),
        "synchronous": _bool(params, "synchronous"),
    })
    return name, upstream


def scale_params(items: Sequence[tuple[str, str]], max_workers: int) -> dict[str, str]:
    """TorchServe's scale-workers parameters, bounded by `max_workers`."""
    params = _single(items, {"min_worker", "max_worker", "synchronous", "timeout"})
    upstream = _drop_none({
        "min_worker": _int(params, "min_worker", 0, max_workers),
        "max_worker": _int(params, "max_worker", 0, max_workers),
        "synchronous": _bool(params, "synchronous"),
        "timeout": _int(params, "timeout", 0, 600),
    })
    if "min_worker" not in upstream and "max_worker" not in upstream:
        raise _bad("give min_worker and/or max_worker")
    low, high = upstream.get("min_worker"), upstream.get("max_worker")
    if low is not None and high is not None and int(low) > int(high):
        raise _bad("min_worker must not exceed max_worker")
    return upstream


def list_params(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """TorchServe's list-models paging parameters."""
    params = _single(items, {"limit", "next_page_token"})
    return _drop_none({
        "limit": _int(params, "limit", 1, 1000),
        "next_page_token": _int(params, "next_page_token", 0, 1_000_000),
    })


def describe_params(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Describe takes no parameters: `customized=true` would run handler code."""
    _single(items, set())
    return {}
