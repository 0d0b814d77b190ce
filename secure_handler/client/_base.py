"""What the sync and async clients share: validation, tokens, retries, answer handling."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from secure_handler import errors
from secure_handler.client._wire import (
    DEFAULT_CONTENT_TYPES,
    NAME_PATTERN,
    PredictRequest,
    encode_body,
    raise_for,
    retryable_answer,
    validation_error,
)
from secure_handler.errors import (
    ConnectionFailed,
    ConnectionLost,
    RequestTimedOut,
    ResponseTooLarge,
    SecureHandlerError,
    UnexpectedResponse,
)
from secure_handler.keyfile import read_key_file
from secure_handler.limits import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    MAX_JSON_ITEMS,
    json_items,
)

if TYPE_CHECKING:
    import httpx


logger = logging.getLogger(__name__)



__all__ = [
    "ClientBase",
    "Outcome",
    "Policy",
    "connect_errors",
    "too_large",
    "transport_error",
    "transport_errors",
]


# --- the clients -------------------------------------------------------------------------


# One send's outcome: (status, body, headers), or the transport exception it raised.
Outcome = tuple[int, bytes, Mapping[str, str]] | Exception


@dataclass(frozen=True)
class Policy:
    retries: int
    backoff: float
    max_backoff: float

    def delay(self, attempt: int, headers: Mapping[str, str]) -> float:
        after = headers.get("retry-after", "")
        if after.isdigit():
            return min(float(after), self.max_backoff)
        return min(self.backoff * float(2**attempt), self.max_backoff)


class ClientBase:
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
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
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
        self.policy = Policy(retries, backoff, max_backoff)
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

    def _retry_delay(self, attempt: int, method: str, url: str, outcome: Outcome) -> float | None:
        """Seconds to wait before retrying `outcome`, or None when it is the answer.

        Only answers whose code the error table marks retryable (or a bare 503) and failures
        before the request reached the server are retried, at most `retries` times; any other
        transport failure raises at once (it may have run).
        """
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, connect_errors()):
                raise transport_error(method, url, outcome) from outcome
            if attempt >= self.policy.retries:
                raise ConnectionFailed(f"{method} {url}: {outcome!r}") from outcome
            return self.policy.delay(attempt, {})
        status, body, headers = outcome
        if not retryable_answer(status, body) or attempt >= self.policy.retries:
            return None
        return self.policy.delay(attempt, headers)

    def _predict_request(self, model: str, data: Any, content_type: str | None,
                         version: str | None) -> PredictRequest:
        body, ctype = encode_body(data, content_type, self.max_request_bytes)
        context = {"max_request_bytes": self.max_request_bytes,
                   "content_types": self.content_types}
        try:
            return PredictRequest.model_validate(
                {"model": model, "version": version, "body": body, "content_type": ctype},
                context=context)
        except ValidationError as exc:
            raise validation_error(exc) from None

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
            raise_for(status, body, headers)
        if json_items(body) > MAX_JSON_ITEMS:  # parsing it could cost seconds and GBs
            raise UnexpectedResponse(f"HTTP {status} with a JSON body of more than "
                                     f"{MAX_JSON_ITEMS} items ({len(body)} bytes)")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise UnexpectedResponse(f"HTTP {status} with a body that is not JSON "
                                     f"({len(body)} bytes)") from None


def too_large(limit: int) -> ResponseTooLarge:
    return ResponseTooLarge(f"the response is over the client's max_response_bytes {limit}")


def connect_errors() -> tuple[type[BaseException], ...]:
    import httpx

    # Only failures before the request reached the server: retrying them cannot run it twice.
    return (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def transport_errors() -> tuple[type[Exception], ...]:
    import httpx

    return (httpx.TransportError,)


def transport_error(method: str, url: str, exc: Exception) -> SecureHandlerError:
    """Map a failure after the request may have reached the server (never retried)."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return RequestTimedOut(f"{method} {url}: no complete response in time ({exc!r})")
    return ConnectionLost(f"{method} {url}: the connection failed mid-request ({exc!r})")


