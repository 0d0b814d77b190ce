"""Scale-out on one machine: two pods (TorchServe + gateway each, own ports and TMPDIR) behind
a round-robin balancer, sharing one real redis-server.

* load is spread over both pods and every request is answered and served by the pod it went to;
* the per-key limit is one limit across both pods, exactly: a burst of N through both lets
  exactly N in;
* SIGKILL of one pod's TorchServe mid-run turns only that pod's requests in flight (and those
  routed to it before its readiness probe noticed) into typed 502/503; the other pod goes on,
  and no request is lost or left without an answer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from scale_support import Balancer, Outcome, Pod, pods, send, tiny_store
from support import image_bytes

from secure_handler.deploy.tsconfig import ModelSpec
from secure_handler.gateway.keys import generate_key

GENEROUS = {"per_second": 100_000, "burst": 100_000}
BURST = 25
# Refills one request per 1000 s: during the test the bucket holds exactly BURST.
STINGY = {"per_second": 0.001, "burst": BURST}
IMAGE = image_bytes("green", fmt="PNG")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("scale-out")
    store = tiny_store(tmp)
    keys = {"load": {"key": generate_key(), "rate": GENEROUS},
            "stingy": {"key": generate_key(), "rate": STINGY}}
    spec = ModelSpec("tiny", "tiny.mar", batch_size=8, max_batch_delay_ms=20)
    with pods(2, tmp, store, [spec], keys) as (started, _):
        yield {"pods": started, "keys": {n: e["key"] for n, e in keys.items()}}


def predict(client: httpx.Client, pod: Pod, key: str) -> Outcome:
    return send(client, pod, "/predictions/tiny", IMAGE, "image/png", key)


def run_load(balancer: Balancer, key: str, count: int, workers: int = 8,
             during: Any = None) -> list[Outcome]:
    """`count` requests from `workers` threads through the balancer; `during(outcomes)` runs
    in its own thread while they do."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        with httpx.Client(timeout=60) as client:
            result = predict(client, balancer.pick(), key)
        with lock:
            outcomes.append(result)

    side = threading.Thread(target=during, args=(outcomes,)) if during else None
    with ThreadPoolExecutor(workers) as pool:
        if side:
            side.start()
        list(pool.map(one, range(count)))
    if side:
        side.join(60)
    return outcomes


def test_load_is_spread_over_both_pods_and_every_request_is_served(cluster) -> None:
    started: list[Pod] = cluster["pods"]
    before = {p.name: p.access_log_lines("/predictions/tiny") for p in started}
    outcomes = run_load(Balancer(started), cluster["keys"]["load"], 80)
    assert Counter(o.status for o in outcomes) == {200: 80}
    by_pod = Counter(o.pod for o in outcomes)
    assert by_pod == {"pod0": 40, "pod1": 40}
    for pod in started:  # each pod's own TorchServe served what was sent to it, no more
        assert pod.access_log_lines("/predictions/tiny") - before[pod.name] == by_pod[pod.name]


def test_the_per_key_limit_is_exact_across_pods(cluster) -> None:
    started: list[Pod] = cluster["pods"]
    outcomes = run_load(Balancer(started), cluster["keys"]["stingy"], BURST * 3, workers=12)
    statuses = Counter(o.status for o in outcomes)
    assert statuses == {200: BURST, 429: 2 * BURST}
    assert {o.code for o in outcomes if o.status == 429} == {"rate_limited"}
    admitted = Counter(o.pod for o in outcomes if o.status == 200)
    assert set(admitted) == {"pod0", "pod1"}  # both gateways drew from the one bucket


def test_killing_one_torchserve_fails_only_its_in_flight_requests(cluster) -> None:
    started: list[Pod] = cluster["pods"]
    victim, survivor = started
    balancer = Balancer(started)
    killed_at: list[float] = []

    def kill_mid_run(outcomes: list[Outcome]) -> None:
        while len(outcomes) < 60:  # well into the run
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        victim.kill_torchserve()

    with balancer.probing():
        outcomes = run_load(balancer, cluster["keys"]["load"], 300, during=kill_mid_run)
    assert killed_at
    kill = killed_at[0]
    assert len(outcomes) == 300
    assert all(o.status != 0 for o in outcomes), [o.error for o in outcomes if o.status == 0]
    # The survivor served every request routed to it, before and after the kill.
    on_survivor = [o for o in outcomes if o.pod == survivor.name]
    assert {o.status for o in on_survivor} == {200}
    assert sum(o.sent > kill for o in on_survivor) > 50
    # The victim's failures are typed and all were in flight at the kill or routed after it.
    failed = [o for o in outcomes if o.status != 200]
    assert failed, "the kill hit no request in flight"
    assert {o.pod for o in failed} == {victim.name}
    assert {(o.status, o.code) for o in failed} <= {(502, "upstream_unavailable"),
                                                   (503, "service_unavailable")}
    assert all(o.done >= kill for o in failed)
    # Every request the victim finished before the kill succeeded.
    assert all(o.status == 200 for o in outcomes if o.pod == victim.name and o.done < kill)
    # The balancer's probe took the victim out: after that, nothing more was sent to it.
    assert balancer.ready[victim.name] is False
    late = [o for o in outcomes if o.pod == victim.name and o.sent > kill + 3.0]
    assert late == []
