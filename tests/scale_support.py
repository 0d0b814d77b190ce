"""Two "pods" on one machine, for the scale-out test and `benchmarks/bench_scale.py`.

A pod is what deploy/ runs in Kubernetes: one real TorchServe (its own ports, working
directory and TMPDIR) and one `secure-handler gateway` process in front of it holding its
tokens. The pods share one real `redis-server` for the gateways' per-key limits. A small load
balancer sends each request to the next pod that its readiness probe (the gateway's `/readyz`:
TorchServe answers `/ping`) reports ready, as a Kubernetes Service does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from support import LABELS, archive_mar, build_tiny_classifier, write_image_handler

from secure_handler.deploy.launcher import TorchServe, free_port
from secure_handler.deploy.tsconfig import ModelSpec, Ports, hardened_properties, render_properties
from secure_handler.gateway.keys import hash_key

REPO = Path(__file__).resolve().parents[1]

__all__ = ["Balancer", "Outcome", "Pod", "gateway_process", "pods", "redis_server", "send"]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; stopped at the end."""
    exe = shutil.which("redis-server")
    if exe is None:
        subprocess.run(["bash", str(REPO / "scripts" / "redis.sh"), "install"], check=True)
        exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
             "no", "--dir", str(workdir)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        _wait_redis(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_redis(port: int, proc: subprocess.Popen[bytes]) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING in 30 s")
    finally:
        client.close()


@dataclass
class Pod:
    """One TorchServe and its gateway."""

    name: str
    torchserve: TorchServe
    inference_url: str
    gateway_url: str
    gateway: subprocess.Popen[bytes]
    workdir: Path

    def kill_torchserve(self) -> None:
        """SIGKILL TorchServe's whole process group (frontend and workers): a crashed pod."""
        proc = self.torchserve.process
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)

    def access_log_lines(self, needle: str) -> int:
        """Requests TorchServe logged with `needle` in the line (its own access log)."""
        path = self.workdir / "ts" / "logs" / "access_log.log"
        text = path.read_text("utf-8", "replace") if path.exists() else ""
        return sum(needle in line for line in text.splitlines())


def _gateway_config(pod_dir: Path, store: Path, ports: Ports, models: Sequence[str],
                    keys: dict[str, dict[str, Any]], redis_url: str) -> Path:
    config = {
        "listen_host": "127.0.0.1",
        "upstream": {"inference_url": f"http://127.0.0.1:{ports.inference}",
                     "management_url": f"http://127.0.0.1:{ports.management}",
                     "key_file": str(pod_dir / "ts" / "key_file.json")},
        "model_store": str(store),
        "models": {m: {"content_types": ["image/jpeg", "image/png", "application/json"]}
                   for m in models},
        "keys": [{"name": name, "sha256": hash_key(entry["key"]), "scopes": ["inference"],
                  "models": list(models), "rate": entry["rate"]} for name, entry in keys.items()],
        "rate_limit_backend": "redis",
        "redis": {"url": redis_url},
        "audit_log": str(pod_dir / "audit.jsonl"),
    }
    path = pod_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


@contextmanager
def _pod(name: str, workdir: Path, store: Path, specs: Sequence[ModelSpec],
         keys: dict[str, dict[str, Any]], redis_url: str) -> Iterator[Pod]:
    pod_dir = workdir / name
    (pod_dir / "ts").mkdir(parents=True, exist_ok=True)
    ports = Ports(*(free_port() for _ in range(6)))
    config = pod_dir / "config.properties"
    config.write_text(render_properties(hardened_properties(store, ports, tuple(specs))))
    env = {"PYTHONPATH": str(REPO)}
    with TorchServe(config, store, pod_dir / "ts", env=env) as server:
        management = f"http://127.0.0.1:{ports.management}"
        for spec in specs:
            server.wait_ready(management, spec.name, timeout=300)
        gateway_yaml = _gateway_config(pod_dir, store, ports, [s.name for s in specs], keys,
                                       redis_url)
        with gateway_process(gateway_yaml, pod_dir / "gateway.log") as (proc, url):
            yield Pod(name, server, f"http://127.0.0.1:{ports.inference}", url, proc, pod_dir)


@contextmanager
def gateway_process(config: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "secure_handler.cli", "gateway", "--config", str(config),
           "--port", str(port), "--log-level", "WARNING"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready after 120 s: {log.read_text()[-2000:]}")


@contextmanager
def pods(count: int, workdir: Path, store: Path, specs: Sequence[ModelSpec],
         keys: dict[str, dict[str, Any]]) -> Iterator[tuple[list[Pod], str]]:
    """`count` pods sharing one redis-server; yields the pods and the Redis URL."""
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(workdir / "redis"))
        started = [stack.enter_context(_pod(f"pod{i}", workdir, store, specs, keys, redis_url))
                   for i in range(count)]
        yield started, redis_url


@dataclass
class Outcome:
    """One request as the load generator saw it."""

    pod: str
    sent: float
    done: float
    status: int  # 0: no HTTP answer at all (an exception), which must never happen
    code: str | None
    error: str | None = None


@dataclass
class Balancer:
    """Round robin over the pods whose readiness probe last said ready (a Service's view)."""

    pods: list[Pod]
    probe_interval_s: float = 0.2
    ready: dict[str, bool] = field(default_factory=dict)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.ready = {p.name: True for p in self.pods}

    def pick(self) -> Pod:
        with self._lock:
            live = [p for p in self.pods if self.ready[p.name]] or self.pods
            pod = live[self._next % len(live)]
            self._next += 1
            return pod

    @contextmanager
    def probing(self) -> Iterator[None]:
        thread = threading.Thread(target=self._probe_loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(10)

    def _probe_loop(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.wait(self.probe_interval_s):
                for pod in self.pods:
                    try:
                        ok = client.get(pod.gateway_url + "/readyz").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with self._lock:
                        self.ready[pod.name] = ok


def send(client: httpx.Client, pod: Pod, path: str, body: bytes, content_type: str,
         key: str) -> Outcome:
    """One POST through `pod`'s gateway; every failure is an Outcome, never an exception."""
    sent = time.monotonic()
    try:
        resp = client.post(pod.gateway_url + path, content=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": content_type})
    except httpx.HTTPError as exc:
        return Outcome(pod.name, sent, time.monotonic(), 0, None, type(exc).__name__)
    code = None
    if resp.status_code >= 400:
        try:
            error = resp.json().get("error")
            code = error.get("code") if isinstance(error, dict) else resp.json().get("code")
        except ValueError:
            code = "not-json"
    return Outcome(pod.name, sent, time.monotonic(), resp.status_code, code)


def tiny_store(tmp: Path) -> Path:
    """A model store with the tiny classifier archived for batches of 8 (pods and bench)."""
    src = tmp / "src"
    model = build_tiny_classifier(src)
    labels = src / "index_to_name.json"
    labels.write_text(json.dumps(LABELS))
    store = tmp / "store"
    archive_mar(store, "tiny", model, write_image_handler(src), [labels],
                {"handler": {"max_batch_size": 8}, "batchSize": 8, "maxBatchDelay": 20})
    return store
