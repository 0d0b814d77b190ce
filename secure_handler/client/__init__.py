"""A client for TorchServe's inference API (and management API) that fails safely.

Needs httpx: `pip install 'secure-handler[client]'`.

* Every request is validated (pydantic) before it leaves: model name and version match a
  strict pattern, the body is within `max_request_bytes`, the content type is allowed.
  A refused request raises the same typed error the server would (`PayloadTooLarge`,
  `UnsupportedMediaType`, `MalformedRequest`) and is never sent.
* Bearer token from `token=` or from TorchServe's `key_file.json` (re-read once when the
  server rejects it: keys change when TorchServe restarts).
* Explicit connect and read timeouts; bounded retries with exponential backoff, only on 503
  and on connection failures (the request cannot have been processed then).
* Our handlers' JSON error bodies become the matching `secure_handler.errors` class, carrying
  `code`, `http_status` and the body; TorchServe's own errors become the client errors below.

Every error is a `secure_handler.errors` class, chosen from the error body's `code` through
the one error table (`secure_handler.errors.ERROR_TABLE`), never from message text; TorchServe's
own error shape (`{"type": ...}`) maps by its type. The client-side ones: `ConnectionFailed`
(no connection after every retry), `ConnectionLost` (broke mid-request; not retried),
`RequestTimedOut` (read timeout; not retried), `ResponseTooLarge`, `UnexpectedResponse`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from secure_handler import errors
from secure_handler.deploy.launcher import read_key_file
from secure_handler.errors import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    ModelNotFound,
    RequestTimedOut,
    ResponseTooLarge,
    SecureHandlerError,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
    error_class,
)

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "NAME_PATTERN",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "ConnectionLost",
    "ModelNotFound",
    "PredictRequest",
    "RequestTimedOut",
    "ResponseTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "UnexpectedResponse",
]

logger = logging.getLogger(__name__)

#: Model names and versions: no path separators, no dots first, at most 64 characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

DEFAULT_CONTENT_TYPES = frozenset({
    "image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
    "application/json", "text/plain", "application/octet-stream",
})
MiB = 1024 * 1024


# --- errors: the classes live in secure_handler.errors, mapped by code -------------


_TORCHSERVE_TYPES: dict[str, type[SecureHandlerError]] = {
    "InvalidKeyException": Unauthorized,
    "ModelNotFoundException": ModelNotFound,
    "ModelVersionNotFoundException": ModelNotFound,
    "ServiceUnavailableException": ServiceUnavailable,
}
_STATUS_FALLBACK: dict[int, type[SecureHandlerError]] = {
    401: Unauthorized, 403: errors.Forbidden, 404: ModelNotFound, 413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType, 503: ServiceUnavailable, 507: errors.OutOfMemory,
}


def _raise_for(status: int, body: bytes, headers: Mapping[str, str]) -> None:
    """Raise the typed error for a non-2xx response."""
    parsed = _json_or_none(body)
    cls: type[SecureHandlerError] = UnexpectedResponse
    message = f"HTTP {status}"
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        code = str(parsed["error"].get("code", ""))
        message = str(parsed["error"].get("message", message))
        cls = error_class(code) or UnexpectedResponse
    elif isinstance(parsed, dict) and "type" in parsed:  # TorchServe's own error body
        message = str(parsed.get("message", message))
        cls = _TORCHSERVE_TYPES.get(str(parsed["type"]), _STATUS_FALLBACK.get(
            status, errors.InferenceFailed if status >= 500 else UnexpectedResponse))
    else:
        cls = _STATUS_FALLBACK.get(status, UnexpectedResponse)
    exc = cls(message)
    exc.http_status = status  # type: ignore[attr-defined]
    exc.body = parsed if parsed is not None else body[:1000]  # type: ignore[attr-defined]
    raise exc


def _retryable(status: int, body: bytes) -> bool:
    """Whether an error answer may succeed if sent again: by its code, else a bare 503."""
    if status < 400:
        return False
    parsed = _json_or_none(body) if len(body) < 65536 else None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        cls = error_class(str(parsed["error"].get("code", "")))
        if cls is not None:
            return cls.retryable
    return status == 503


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- requests ----------------------------------------------------------------------------


class PredictRequest(BaseModel):
    """One inference call, validated before it is sent.

    Validate with `context={"max_request_bytes": int, "content_types": set[str]}`.
    """

    model_config = ConfigDict(frozen=True)

    model: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(None, pattern=NAME_PATTERN)
    body: bytes
    content_type: str = Field(pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+"
                                      r"(\s*;\s*[A-Za-z0-9_.-]+=[A-Za-z0-9_.\"-]+)*$")

    @field_validator("body")
    @classmethod
    def _size(cls, value: bytes, info: ValidationInfo) -> bytes:
        limit = (info.context or {}).get("max_request_bytes")
        if limit is not None and len(value) > limit:
            raise ValueError(f"payload_too_large: body is {len(value)} bytes, over the "
                             f"client's max_request_bytes {limit}")
        if not value:
            raise ValueError("empty_body: the body is empty")
        return value

    @field_validator("content_type")
    @classmethod
    def _allowed(cls, value: str, info: ValidationInfo) -> str:
        allowed = (info.context or {}).get("content_types")
        media = value.split(";", 1)[0].strip().lower()
        if allowed is not None and media not in allowed:
            raise ValueError(f"unsupported_media_type: {media} is not in the allowed types "
                             f"({', '.join(sorted(allowed))})")
        return value

    @property
    def path(self) -> str:
        return f"/predictions/{self.model}" + (f"/{self.version}" if self.version else "")


def _validation_error(exc: ValidationError) -> SecureHandlerError:
    """The typed error for the first problem, with every problem in the message."""
    problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    text = "; ".join(problems) + " (not sent)"
    for code, cls in (("payload_too_large", errors.PayloadTooLarge),
                      ("unsupported_media_type", errors.UnsupportedMediaType),
                      ("empty_body", errors.EmptyBody)):
        if code in text:
            return cls(text)
    return errors.MalformedRequest(text)


def _encode(data: Any, content_type: str | None, max_bytes: int) -> tuple[bytes, str]:
    """Body bytes and content type for `data` (bytes, str, JSON value or file path)."""
    if isinstance(data, Path):
        size = data.stat().st_size
        if size > max_bytes:  # check before reading: the file may be huge
            raise errors.PayloadTooLarge(f"{data} is {size} bytes, over the client's "
                                         f"max_request_bytes {max_bytes} (not sent)")
        guessed = mimetypes.guess_type(data.name)[0]
        return data.read_bytes(), content_type or guessed or "application/octet-stream"
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), content_type or "application/octet-stream"
    if isinstance(data, str):
        return data.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    return json.dumps(data, separators=(",", ":")).encode(), content_type or "application/json"


# --- the clients -------------------------------------------------------------------------


# One send's outcome: (status, body, headers), or the transport exception it raised.
_Outcome = tuple[int, bytes, Mapping[str, str]] | Exception


@dataclass(frozen=True)
class _Policy:
    retries: int
    backoff: float
    max_backoff: float

    def delay(self, attempt: int, headers: Mapping[str, str]) -> float:
        after = headers.get("retry-after", "")
        if after.isdigit():
            return min(float(after), self.max_backoff)
        return min(self.backoff * float(2**attempt), self.max_backoff)


class _Base:
    """Validation, auth and response handling shared by the sync and async clients."""

    def __init__(
        self,
        inference_url: str = "http://127.0.0.1:8080",
        *,
        management_url: str | None = None,
        token: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        max_request_bytes: int = 10 * MiB,
        max_response_bytes: int = 16 * MiB,
        content_types: Iterable[str] = DEFAULT_CONTENT_TYPES,
    ) -> None:
        for url in filter(None, (inference_url, management_url)):
            if not re.match(r"^https?://[^/?#\s]+/?$", url):
                raise ValueError(f"expected http(s)://host[:port], got {url!r}")
        if retries < 0 or retries > 10:
            raise ValueError("retries must be between 0 and 10")
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
        self._token = token
        self._key_file = Path(key_file) if key_file is not None else None
        self._keys: dict[str, str] | None = None
        if token is not None and key_file is not None:
            raise ValueError("give token or key_file, not both")
        self.policy = _Policy(retries, backoff, max_backoff)
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        self.content_types = frozenset(t.lower() for t in content_types)
        self._timeout = (connect_timeout, read_timeout)

    def _httpx_timeout(self) -> httpx.Timeout:
        import httpx

        connect, read = self._timeout
        return httpx.Timeout(read, connect=connect)

    def _token_for(self, api: str, reload: bool = False) -> str | None:
        if self._key_file is None:
            return self._token
        if reload or self._keys is None:
            self._keys = read_key_file(self._key_file)
        return self._keys.get(api)

    def _headers(self, api: str, reload: bool = False) -> dict[str, str]:
        token = self._token_for(api, reload)
        if token is None:
            return {}
        if not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError("the token contains whitespace or non-ASCII characters")
        return {"Authorization": f"Bearer {token}"}

    def _request_headers(self, api: str, reload: bool, content_type: str | None) -> dict[str, str]:
        headers = self._headers(api, reload=reload)
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _may_reload_token(self, reloaded: bool) -> bool:
        """After an `Unauthorized`: read key_file.json once more (TorchServe restarted)."""
        return not reloaded and self._key_file is not None

    def _retry_delay(self, attempt: int, method: str, url: str, outcome: _Outcome) -> float | None:
        """Seconds to wait before retrying `outcome`, or None when it is the answer.

        Only answers whose code the error table marks retryable (or a bare 503) and failures
        before the request reached the server are retried, at most `retries` times; any other
        transport failure raises at once (it may have run).
        """
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, _connect_errors()):
                raise _transport_error(method, url, outcome) from outcome
            if attempt >= self.policy.retries:
                raise ConnectionFailed(f"{method} {url}: {outcome!r}") from outcome
            return self.policy.delay(attempt, {})
        status, body, headers = outcome
        if not _retryable(status, body) or attempt >= self.policy.retries:
            return None
        return self.policy.delay(attempt, headers)

    def _predict_request(self, model: str, data: Any, content_type: str | None,
                         version: str | None) -> PredictRequest:
        body, ctype = _encode(data, content_type, self.max_request_bytes)
        context = {"max_request_bytes": self.max_request_bytes,
                   "content_types": self.content_types}
        try:
            return PredictRequest.model_validate(
                {"model": model, "version": version, "body": body, "content_type": ctype},
                context=context)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def _management(self, path: str) -> str:
        if self.management_url is None:
            raise ValueError("this client has no management_url")
        return self.management_url + path

    @staticmethod
    def _check_name(value: str | None) -> None:
        if value is not None and not re.fullmatch(NAME_PATTERN, value):
            raise errors.MalformedRequest(f"{value!r} is not a valid model name or version")

    def _result(self, status: int, body: bytes, headers: Mapping[str, str]) -> Any:
        if not 200 <= status < 300:  # redirects are not followed: a 3xx is an error too
            _raise_for(status, body, headers)
        try:
            return json.loads(body)
        except ValueError:
            raise UnexpectedResponse(f"HTTP {status} with a body that is not JSON "
                                     f"({len(body)} bytes)") from None


def _too_large(limit: int) -> ResponseTooLarge:
    return ResponseTooLarge(f"the response is over the client's max_response_bytes {limit}")


def _connect_errors() -> tuple[type[BaseException], ...]:
    import httpx

    # Only failures before the request reached the server: retrying them cannot run it twice.
    return (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _transport_errors() -> tuple[type[Exception], ...]:
    import httpx

    return (httpx.TransportError,)


def _transport_error(method: str, url: str, exc: Exception) -> SecureHandlerError:
    """Map a failure after the request may have reached the server (never retried)."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return RequestTimedOut(f"{method} {url}: no complete response in time ({exc!r})")
    return ConnectionLost(f"{method} {url}: the connection failed mid-request ({exc!r})")


class Client(_Base):
    """Synchronous client. Use as a context manager, or call `close()`.

    >>> with Client("http://127.0.0.1:8080", key_file="key_file.json") as client:
    ...     client.predict("resnet", Path("cat.jpg"))
    """

    def __init__(self, inference_url: str = "http://127.0.0.1:8080", *,
                 transport: httpx.BaseTransport | None = None, verify: Any = True,
                 **options: Any) -> None:
        super().__init__(inference_url, **options)
        import httpx

        self._http = httpx.Client(timeout=self._httpx_timeout(), transport=transport,
                                  verify=verify, follow_redirects=False, trust_env=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> Any:
        """`GET /ping` (TorchServe checks the inference token here too)."""
        return self._call("GET", self.inference_url + "/ping", "inference")

    def predict(self, model: str, data: Any, *, content_type: str | None = None,
                version: str | None = None) -> Any:
        """Run inference and return the parsed JSON result.

        `data`: bytes (with `content_type`), a `Path` (type from its suffix), a str (UTF-8
        text) or any JSON value.
        """
        request = self._predict_request(model, data, content_type, version)
        return self._call("POST", self.inference_url + request.path, "inference",
                          request.body, request.content_type)

    def models(self) -> Any:
        """`GET /models` on the management API."""
        return self._call("GET", self._management("/models"), "management")

    def describe(self, model: str, version: str | None = None) -> Any:
        """`GET /models/{model}[/{version}]` on the management API."""
        self._check_name(model)
        self._check_name(version)
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._call("GET", self._management(path), "management")

    def _call(self, method: str, url: str, api: str, body: bytes | None = None,
              content_type: str | None = None) -> Any:
        reloaded = False
        while True:
            headers = self._request_headers(api, reloaded, content_type)
            try:
                return self._result(*self._send_with_retries(method, url, headers, body))
            except Unauthorized:
                if not self._may_reload_token(reloaded):
                    raise
                reloaded = True

    def _send_with_retries(self, method: str, url: str, headers: dict[str, str],
                           body: bytes | None) -> tuple[int, bytes, Mapping[str, str]]:
        attempt = 0
        while True:
            outcome: _Outcome
            try:
                outcome = self._send(method, url, headers, body)
            except _transport_errors() as exc:
                outcome = exc
            delay = self._retry_delay(attempt, method, url, outcome)
            if delay is None:
                assert not isinstance(outcome, BaseException)  # raised or retried above
                return outcome
            logger.info("retrying %s %s in %.2fs (attempt %d)", method, url, delay, attempt + 1)
            time.sleep(delay)
            attempt += 1

    def _send(self, method: str, url: str, headers: dict[str, str],
              body: bytes | None) -> tuple[int, bytes, Mapping[str, str]]:
        with self._http.stream(method, url, headers=headers, content=body) as resp:
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise _too_large(self.max_response_bytes)
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), dict(resp.headers)


class AsyncClient(_Base):
    """Asynchronous twin of `Client` (same arguments, `await` every call)."""

    def __init__(self, inference_url: str = "http://127.0.0.1:8080", *,
                 transport: httpx.AsyncBaseTransport | None = None, verify: Any = True,
                 **options: Any) -> None:
        super().__init__(inference_url, **options)
        import httpx

        self._http = httpx.AsyncClient(timeout=self._httpx_timeout(), transport=transport,
                                       verify=verify, follow_redirects=False, trust_env=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> Any:
        return await self._call("GET", self.inference_url + "/ping", "inference")

    async def predict(self, model: str, data: Any, *, content_type: str | None = None,
                      version: str | None = None) -> Any:
        request = self._predict_request(model, data, content_type, version)
        return await self._call("POST", self.inference_url + request.path, "inference",
                                request.body, request.content_type)

    async def models(self) -> Any:
        return await self._call("GET", self._management("/models"), "management")

    async def describe(self, model: str, version: str | None = None) -> Any:
        self._check_name(model)
        self._check_name(version)
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return await self._call("GET", self._management(path), "management")

    async def _call(self, method: str, url: str, api: str, body: bytes | None = None,
                    content_type: str | None = None) -> Any:
        reloaded = False
        while True:
            headers = self._request_headers(api, reloaded, content_type)
            try:
                return self._result(*await self._send_with_retries(method, url, headers, body))
            except Unauthorized:
                if not self._may_reload_token(reloaded):
                    raise
                reloaded = True

    async def _send_with_retries(self, method: str, url: str, headers: dict[str, str],
                                 body: bytes | None) -> tuple[int, bytes, Mapping[str, str]]:
        attempt = 0
        while True:
            outcome: _Outcome
            try:
                outcome = await self._send(method, url, headers, body)
            except _transport_errors() as exc:
                outcome = exc
            delay = self._retry_delay(attempt, method, url, outcome)
            if delay is None:
                assert not isinstance(outcome, BaseException)  # raised or retried above
                return outcome
            await asyncio.sleep(delay)
            attempt += 1

    async def _send(self, method: str, url: str, headers: dict[str, str],
                    body: bytes | None) -> tuple[int, bytes, Mapping[str, str]]:
        async with self._http.stream(method, url, headers=headers, content=body) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise _too_large(self.max_response_bytes)
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), dict(resp.headers)
