"""`Client` and `AsyncClient`: the same calls over httpx, blocking or async."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from secure_handler.client._base import (
    ClientBase,
    Outcome,
    too_large,
    transport_errors,
)
from secure_handler.errors import (
    Unauthorized,
)

if TYPE_CHECKING:
    import httpx


logger = logging.getLogger(__name__)



__all__ = [
    "AsyncClient",
    "Client",
]


class Client(ClientBase):
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
            outcome: Outcome
            try:
                outcome = self._send(method, url, headers, body)
            except transport_errors() as exc:
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
                    raise too_large(self.max_response_bytes)
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), dict(resp.headers)


class AsyncClient(ClientBase):
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
            outcome: Outcome
            try:
                outcome = await self._send(method, url, headers, body)
            except transport_errors() as exc:
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
                    raise too_large(self.max_response_bytes)
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), dict(resp.headers)
