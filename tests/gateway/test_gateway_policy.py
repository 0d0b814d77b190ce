"""The gateway's pure parts: keys, `new-key`, config checks, register/scale parameters, buckets.

No server is needed here; the same rules are exercised end to end in the other files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from secure_handler.cli import main
from secure_handler.gateway.audit import AuditLog, AuditRecord
from secure_handler.gateway.config import (
    GatewayConfig,
    KeyEntry,
    RateLimit,
    load_config,
    parse_rate,
)
from secure_handler.gateway.errors import GatewayError
from secure_handler.gateway.keys import KEY_PREFIX, KeyRing, bearer_token, generate_key, hash_key
from secure_handler.gateway.management import register_params, scale_params
from secure_handler.gateway.ratelimit import MemoryRateLimiter
from secure_handler.gateway.routing import client_bucket

# --- keys -----------------------------------------------------------------------------------


def test_generated_keys_are_256_bit_and_distinct() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == len(KEY_PREFIX) + 43  # 32 bytes, URL-safe base64 without padding


def _entry(name: str, key: str, **kw: object) -> KeyEntry:
    data = {"name": name, "sha256": hash_key(key), "scopes": ["inference"],
            "rate": {"per_second": 1, "burst": 1}, **kw}
    return KeyEntry.model_validate(data)


def test_keyring_finds_the_right_entry_and_nothing_else() -> None:
    a, b = generate_key(), generate_key()
    ring = KeyRing([_entry("a", a), _entry("b", b)])
    assert ring.authenticate(a).name == "a"  # type: ignore[union-attr]
    assert ring.authenticate(b).name == "b"  # type: ignore[union-attr]
    assert ring.authenticate(a[:-1]) is None
    assert ring.authenticate(hash_key(a)) is None  # the stored hash is not a key
    assert ring.authenticate("") is None
    assert ring.authenticate(None) is None


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("Bearer  abc ", "abc"),
    ("Basic abc", None), ("Bearer", None), ("Bearer a b", None), ("abc", None),
    ("Bearer " + "x" * 600, None),
])
def test_bearer_token_parsing(header: str, token: str | None) -> None:
    assert bearer_token({"authorization": header}) == token


def test_new_key_prints_the_key_once_and_an_entry_with_only_its_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["gateway", "new-key", "alice", "--scopes", "inference", "management",
                 "--models", "tiny", "spare:1.0", "--rate", "120/m", "--burst", "7"])
    out = capsys.readouterr().out
    assert code == 0
    key = next(w for w in out.split() if w.startswith(KEY_PREFIX))
    assert out.count(key) == 1
    entry = yaml.safe_load(out[out.index("- name:"):])[0]
    assert entry == {"name": "alice", "sha256": hash_key(key),
                     "scopes": ["inference", "management"], "models": ["tiny", "spare:1.0"],
                     "rate": {"per_second": 2.0, "burst": 7}}
    KeyEntry.model_validate(entry)  # pastes straight into gateway.yaml


def test_new_key_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "new-key", "svc", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entry"]["sha256"] == hash_key(data["key"])
    assert data["key"] not in json.dumps(data["entry"])


@pytest.mark.parametrize("argv", [
    ["gateway", "new-key", "bad/name"],
    ["gateway", "new-key", "ok", "--models", "../x"],
    ["gateway", "new-key", "ok", "--rate", "0"],
    ["gateway", "new-key", "ok", "--rate", "5/fortnight"],
    ["gateway", "new-key", "ok", "--scopes", "admin"],
])
def test_new_key_refuses_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert KEY_PREFIX not in capsys.readouterr().out


# --- config ---------------------------------------------------------------------------------


def _config_dict(tmp_path: Path) -> dict[str, object]:
    return {
        "upstream": {"inference_url": "http://127.0.0.1:8080",
                     "management_url": "http://127.0.0.1:8081", "key_file": "ts/key_file.json"},
        "model_store": "store", "audit_log": "audit.jsonl",
        "models": {"tiny": {"content_types": ["Image/JPEG"]}},
        "keys": [_entry("a", generate_key(), models=["tiny:1.0"]).model_dump(mode="json")],
    }


def test_load_config_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config_dict(tmp_path)))
    config = load_config(path)
    assert config.model_store == tmp_path / "store"
    assert config.upstream.key_file == tmp_path / "ts" / "key_file.json"
    assert config.models["tiny"].content_types == ("image/jpeg",)
    assert config.keys[0].models[0].versions == ("1.0",)
    assert main(["gateway", "--config", str(path), "--check"]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"models": {"../x": {"content_types": ["a/b"]}}}, "invalid model name"),
    ({"models": {"other": {"content_types": ["a/b"]}}}, "grants models not under"),
    ({"rate_limit_backend": "redis"}, "needs a `redis:` section"),
    ({"upstream": {"inference_url": "http://h/x", "management_url": "http://h"}}, "pattern"),
    ({"surprise": 1}, "Extra inputs are not permitted"),
])
def test_config_refuses(tmp_path: Path, change: dict[str, object], message: str) -> None:
    data = {**_config_dict(tmp_path), **change}
    with pytest.raises(ValueError, match=message):
        GatewayConfig.model_validate(data)


def test_config_refuses_a_duplicate_key(tmp_path: Path) -> None:
    data = _config_dict(tmp_path)
    data["keys"] = [data["keys"][0], data["keys"][0]]  # type: ignore[index]
    with pytest.raises(ValueError, match="unique"):
        GatewayConfig.model_validate(data)


def test_parse_rate() -> None:
    assert parse_rate("5") == RateLimit(per_second=5, burst=5)
    assert parse_rate("90/m") == RateLimit(per_second=1.5, burst=2)
    assert parse_rate("1/h", burst=3) == RateLimit(per_second=1 / 3600, burst=3)


# --- register / scale parameters (SSRF, CWE-918; traversal, CWE-22) ----------------------------

SSRF_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "https://attacker.example/tiny.mar",
    "HTTP://127.0.0.1:8081/models",
    "//attacker.example/tiny.mar",
    "s3://bucket/tiny.mar",
    "file:///etc/passwd",
    "file://{store}/tiny.mar",
    "{store}/tiny.mar",
    "/etc/passwd",
    "../tiny.mar",
    "../../etc/tiny.mar",
    "..%2ftiny.mar",
    "%2e%2e%2ftiny.mar",
    "%252e%252e%252ftiny.mar",
    "tiny.mar%00.txt",
    "tiny.mar\x00",
    "tiny.mar\n",
    "sub/tiny.mar",
    "sub\\tiny.mar",
    "..\\tiny.mar",
    "tiny.mar?x=http://a",
    "tiny.mar#frag",
    "tiny.MAR",
    "tiny",
    "\uff0e\uff0e/tiny.mar",  # full-width dots
    " tiny.mar",
    "",
]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    (store / "tiny.mar").write_bytes(b"PK")
    return store


@pytest.mark.parametrize("url", SSRF_URLS)
def test_register_refuses_anything_but_a_store_archive_name(store: Path, url: str) -> None:
    url = url.format(store=store)
    with pytest.raises(GatewayError) as err:
        register_params([("model_name", "tiny"), ("url", url)], store, 4)
    assert err.value.status == 403
    assert err.value.code == "forbidden_model_source"


def test_register_refuses_a_symlink_out_of_the_store(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.mar"
    outside.write_bytes(b"PK")
    (store / "link.mar").symlink_to(outside)
    with pytest.raises(GatewayError) as err:
        register_params([("model_name", "link")], store, 4)
    assert err.value.code == "forbidden_model_source"


@pytest.mark.parametrize(("items", "code"), [
    ([("model_name", "tiny"), ("handler", "evil.py")], "malformed_request"),
    ([("model_name", "tiny"), ("runtime", "python")], "malformed_request"),
    ([("model_name", "tiny"), ("url", "tiny.mar"), ("url", "http://a/b.mar")],
     "malformed_request"),
    ([("model_name", "tiny"), ("model_name", "spare")], "malformed_request"),
    ([("model_name", "../tiny")], "malformed_request"),
    ([("model_name", "tiny"), ("initial_workers", "99")], "malformed_request"),
    ([("model_name", "tiny"), ("initial_workers", "-1")], "malformed_request"),
    ([("model_name", "tiny"), ("initial_workers", "١")], "malformed_request"),  # Arabic one
    ([("model_name", "missing")], "model_not_found"),
])
def test_register_refuses_other_parameters(
    store: Path, items: list[tuple[str, str]], code: str
) -> None:
    with pytest.raises(GatewayError) as err:
        register_params(items, store, 4)
    assert err.value.code == code


def test_register_translates_a_name_to_the_store_archive(store: Path) -> None:
    name, params = register_params(
        [("model_name", "tiny"), ("initial_workers", "1"), ("synchronous", "TRUE")], store, 4
    )
    assert name == "tiny"
    assert params == {"url": "tiny.mar", "model_name": "tiny", "initial_workers": "1",
                      "synchronous": "true"}


@pytest.mark.parametrize(("items", "ok"), [
    ([("min_worker", "1"), ("max_worker", "2")], True),
    ([("min_worker", "3"), ("max_worker", "2")], False),
    ([("max_worker", "5")], False),
    ([("synchronous", "true")], False),
    ([("min_worker", "1"), ("min_worker", "1")], False),
    ([("min_worker", "1"), ("number_gpu", "8")], False),
])
def test_scale_params(items: list[tuple[str, str]], ok: bool) -> None:
    if ok:
        assert scale_params(items, 4) == dict(items)
    else:
        with pytest.raises(GatewayError):
            scale_params(items, 4)


# --- the in-memory token bucket -----------------------------------------------------------------


def test_memory_bucket_burst_then_refill() -> None:
    limiter, limit = MemoryRateLimiter(), RateLimit(per_second=2, burst=3)
    decisions = [limiter.take("k", limit, now=100.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[-1].retry_after_s == pytest.approx(0.5)
    assert decisions[-1].retry_after_header == "1"
    assert limiter.take("k", limit, now=100.5).allowed
    assert not limiter.take("k", limit, now=100.5).allowed
    assert limiter.take("other", limit, now=100.5).allowed  # buckets are independent


def test_memory_buckets_refilled_ones_go_first_and_the_count_is_bounded() -> None:
    limiter, limit = MemoryRateLimiter(max_buckets=10), RateLimit(per_second=1, burst=2)
    for i in range(10):
        limiter.take(f"addr:{i}", limit, now=0.0)
    limiter.take("addr:new", limit, now=0.5)  # 11 buckets, none full again: the oldest goes
    assert len(limiter) == 10
    assert limiter.evicted_early == 1
    # Every request drops up to two of the least recently used buckets that are full again.
    limiter.take("addr:newer", limit, now=5.0)
    assert len(limiter) == 9
    assert limiter.evicted_early == 1


def test_memory_limiter_stays_bounded_under_a_flood_of_addresses() -> None:
    limiter, limit = MemoryRateLimiter(max_buckets=1000), RateLimit(per_second=0.001, burst=1)
    for i in range(50_000):  # fresh addresses, none ever refilled
        limiter.take(f"addr:{i}", limit, now=float(i) / 1000)
        assert len(limiter) <= 1000
    # A client seen recently keeps its (empty) bucket across the churn of others.
    limiter.take("addr:recent", limit, now=60.0)
    for i in range(500):
        limiter.take(f"addr:late-{i}", limit, now=60.0)
    assert not limiter.take("addr:recent", limit, now=60.0).allowed


# --- the audit log file ---------------------------------------------------------------------


def _record(request_id: str) -> AuditRecord:
    return AuditRecord(key="k", client="127.0.0.1", action="management.list", model="m" * 500,
                       outcome="allowed", status=200, request_id=request_id)


def test_audit_log_appends_private_lines_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    try:
        log.write(_record("one"))
        path.rename(tmp_path / "audit.jsonl.1")  # what logrotate does
        log.write(_record("two"))
    finally:
        log.close()
    [old] = [json.loads(x) for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    [new] = [json.loads(x) for x in path.read_text().splitlines()]
    assert (old["request_id"], new["request_id"]) == ("one", "two")
    assert len(new["model"]) == 128  # client-supplied strings are clipped
    assert path.stat().st_mode & 0o777 == 0o600


# --- what a per-client limit counts --------------------------------------------------------------


@pytest.mark.parametrize(("host", "bucket"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # one host may hold the whole /64
    ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
    ("unknown", "unknown"),
])
def test_client_bucket_counts_ipv6_by_its_64(host: str, bucket: str) -> None:
    assert client_bucket(host) == bucket
