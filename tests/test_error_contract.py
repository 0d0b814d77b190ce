"""The one error contract: the table, the tree, the client's mapping and the README agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from secure_handler import errors
from secure_handler.client._wire import raise_for as _raise_for
from secure_handler.errors import ERROR_TABLE, SecureHandlerError

README = Path(__file__).resolve().parents[1] / "README.md"
LOAD_TIME = {"configuration_error", "unsafe_model", "integrity_error"}


def _classes() -> list[type[SecureHandlerError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, SecureHandlerError) and c.__module__ == errors.__name__]


def test_every_class_has_a_row_and_every_row_its_class() -> None:
    for cls in _classes():
        spec = ERROR_TABLE[cls.code]
        assert spec.status == cls.status
        assert issubclass(spec.cls, cls) or spec.cls is cls
    for code, spec in ERROR_TABLE.items():
        assert spec.cls.code == code
        assert spec.cls.status == spec.status
        assert spec.retryable is spec.cls.retryable
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code)
        assert 400 <= spec.status < 600


@pytest.mark.parametrize("code", sorted(ERROR_TABLE))
def test_the_client_raises_the_documented_class_for_every_code(code: str) -> None:
    spec = ERROR_TABLE[code]
    body = b'{"error": {"code": "%s", "message": "m"}}' % code.encode()
    with pytest.raises(SecureHandlerError) as raised:
        _raise_for(spec.status, body, {})
    assert type(raised.value) is spec.cls
    assert raised.value.message == "m"


def test_the_client_never_reads_the_message_for_a_class() -> None:
    body = b'{"error": {"code": "no_such_code", "message": "payload_too_large rate_limited"}}'
    with pytest.raises(errors.UnexpectedResponse):
        _raise_for(400, body, {})


def test_gateway_codes_are_rows_of_the_table() -> None:
    # Every code literal the gateway's sources name is a row; the gateway builds no codes itself.
    root = Path(errors.__file__).parent / "gateway"
    source = "\n".join(p.read_text() for p in root.glob("*.py"))
    assert "GatewayError(4" not in source
    assert "GatewayError(5" not in source
    for name in re.findall(r"\b([A-Z][A-Za-z]+)\(", source):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, SecureHandlerError):
            assert ERROR_TABLE[cls.code].status == cls.status


def _readme_rows() -> dict[str, tuple[int, str, bool]]:
    section = README.read_text().split("## Error codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in re.finditer(r"^\| (\d{3}) \| `([a-z0-9_]+)` \| `(\w+)` \| (yes|no) \|", section, re.M):
        rows[m.group(2)] = (int(m.group(1)), m.group(3), m.group(4) == "yes")
    return rows


def test_readme_error_table_is_the_error_table() -> None:
    rows = _readme_rows()
    expected = {code: (s.status, s.cls.__name__, s.retryable)
                for code, s in ERROR_TABLE.items() if code not in LOAD_TIME}
    assert rows == expected
