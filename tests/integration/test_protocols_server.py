"""Real clients nobody here wrote, against a real TorchServe serving the three examples.

NVIDIA's `tritonclient[http]` (OIP v2) and KServe's SDK REST client (v1 and v2) talk to
TorchServe's own `/v2/models/{m}/infer` and `/v1/models/{m}:predict` routes with its inference
token. Several requests go at once into batches of 8 (maxBatchDelay 300 ms), valid and hostile
together; every answer must equal what `/predictions` answers for the same input, and every
hostile one must surface as the client's own exception with the right status and code.

Needs the `kserve` test extra (`scripts/kserve_venv.sh`): kserve pins psutil<6 and
protobuf<7, so these run from their own virtual environment.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

tritonhttp = pytest.importorskip("tritonclient.http", reason="needs the kserve test extra")
kserve = pytest.importorskip("kserve", reason="needs the kserve test extra")
import httpx  # noqa: E402
from support import archive_mar, image_bytes, post, running_server  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import secure_handler  # noqa: E402
from secure_handler.deploy.tsconfig import ModelSpec  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FOLDERS = {"shapes": "image_classifier", "topics": "text_classifier", "scenes": "object_detector"}
WIDE = image_bytes("red", size=(5000, 10), fmt="PNG")  # over max_image_side (4096)
TEXTS = ["the striker scored a late goal", "heavy rain and wind tonight",
         "shares rallied as investors cheered", "simmer the garlic in butter"]


def _example(folder: str) -> Any:
    path = EXAMPLES / folder / ("sample_inputs.py" if folder == "image_classifier" else "scenes.py")
    spec = importlib.util.spec_from_file_location(f"protocols_{folder}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _build(folder: str, out: Path, store: Path, name: str) -> None:
    """The example's build_model.py --quick, archived with its own handler, config, labels."""
    src = EXAMPLES / folder
    proc = subprocess.run([sys.executable, str(src / "build_model.py"), "--out", str(out),
                           "--quick"], capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((src / "model-config.yaml").read_text("utf-8"))
    # The archive's own settings win over config.properties: wait long enough to batch.
    config["maxBatchDelay"] = 300
    extra = sorted(out.glob("*.json")) + [src / "index_to_name.json"]
    handler = Path(shutil.copy(src / "handler.py", out / "handler.py"))
    archive_mar(store, name, out / "model.pt", handler, extra, config)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("protocols-server")
    store = tmp / "store"
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda item: _build(item[1], tmp / item[0], store, item[0]),
                      FOLDERS.items()))
    specs = [ModelSpec(name, f"{name}.mar", batch_size=8, max_batch_delay_ms=300)
             for name in FOLDERS]
    # The worker imports secure_handler from where this test does.
    env = {"PYTHONPATH": str(Path(secure_handler.__file__).resolve().parents[1])}
    with running_server(tmp / "work", store, specs, env=env) as info:
        yield info


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_text(value: Any) -> str:
    """A BYTES element as tritonclient hands it back (str from JSON, bytes from binary)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def auth(server: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.tokens['inference']}"}


def plain(server: Any, model: str, body: bytes, content_type: str) -> dict[str, Any]:
    status, answer = post(f"{server.inference_url}/predictions/{model}", body, content_type,
                          server.tokens["inference"])
    assert status == 200, answer
    return answer


def batch_sizes(server: Any) -> list[int]:
    """Rows per batch the handlers logged for protocol batches (model_log.log)."""
    log = server.server.workdir / "logs" / "model_log.log"
    text = log.read_text("utf-8", "replace") if log.exists() else ""
    return [int(n) for n in re.findall(r"protocol batch rows=(\d+)", text)]


def new_batch_sizes(server: Any, before: int) -> list[int]:
    """The batch sizes logged after the first `before`; TorchServe writes its model log
    asynchronously, so wait a little for the lines to land."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = batch_sizes(server)[before:]
        if found:
            return found
        time.sleep(0.2)
    return []


# --- NVIDIA tritonclient (OIP v2) ---------------------------------------------------------


def triton(server: Any) -> Any:
    return tritonhttp.InferenceServerClient(server.inference_url.removeprefix("http://"),
                                            concurrency=8, network_timeout=120)


def triton_inputs(values: list[str], binary: bool = False) -> list[Any]:
    tensor = tritonhttp.InferInput("input-0", [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return [tensor]


def test_tritonclient_images_in_shared_batches(server: Any) -> None:
    shapes = _example("image_classifier")
    images = [data for _, _, data in shapes.samples(6, seed=99)]
    expected = [plain(server, "shapes", data, "application/octet-stream")["predictions"] for data in images]
    client = triton(server)
    wanted = [tritonhttp.InferRequestedOutput(n, binary_data=False)
              for n in ("label", "probability", "class")]
    jobs = [([b64(images[0]), b64(images[1])], "ok"), ([b64(images[2])], "ok"),
            ([b64(images[3]), b64(WIDE)], "image_too_large"),
            ([b64(images[4]), b64(images[5])], "ok"),
            ([b64(images[0][:300])], "invalid_image"),
            ([b64(images[1])] * 9, "too_many_instances")]
    before = len(batch_sizes(server))
    pending = [client.async_infer("shapes", triton_inputs(values), outputs=wanted,
                                  request_id=f"r{i}", headers=auth(server))
               for i, (values, _) in enumerate(jobs)]
    index = {0: [0, 1], 1: [2], 3: [4, 5]}
    for i, (request, (values, outcome)) in enumerate(zip(pending, jobs, strict=True)):
        if outcome != "ok":
            with pytest.raises(InferenceServerException) as info:
                request.get_result()
            status = {"image_too_large": "422", "invalid_image": "422",
                      "too_many_instances": "413"}[outcome]
            assert info.value.status() == status
            assert f"[{outcome}]" in info.value.message()
            continue
        result = request.get_result()
        assert result.get_response()["id"] == f"r{i}"
        labels = result.as_numpy("label")
        probabilities = result.as_numpy("probability")
        assert labels.shape == probabilities.shape == (len(values), 3)
        for row, sample in enumerate(index[i]):
            want = expected[sample]
            assert [as_text(x) for x in labels[row]] == [p["label"] for p in want]
            assert probabilities[row].tolist() == pytest.approx(
                [p["probability"] for p in want])
            assert result.as_numpy("class")[row].tolist() == [p["class"] for p in want]
    client.close()
    assert max(new_batch_sizes(server, before), default=0) >= 2, "no request shared a batch"


def test_tritonclient_binary_tensors_are_refused_by_name(server: Any) -> None:
    client = triton(server)
    with pytest.raises(InferenceServerException) as info:
        client.infer("topics", triton_inputs(["rain"], binary=True), headers=auth(server))
    client.close()
    assert info.value.status() == "400"
    assert "binary_data=False" in info.value.message()


def test_tritonclient_text_and_detector(server: Any) -> None:
    client = triton(server)
    result = client.infer("topics", triton_inputs(TEXTS), headers=auth(server))
    top1 = [as_text(row[0]) for row in result.as_numpy("label")]
    assert top1 == [plain(server, "topics", t.encode(), "text/plain")["predictions"][0]["label"]
                    for t in TEXTS]
    scenes = _example("object_detector")
    images = [scenes.encode(scenes.make_scene(seed, 400, 300).image, "PNG") for seed in (3, 4)]
    result = client.infer("scenes", triton_inputs([b64(x) for x in images]),
                          headers=auth(server))
    client.close()
    counts = result.as_numpy("count").tolist()
    boxes = result.as_numpy("boxes")
    assert boxes.shape == (sum(counts), 4)
    start = 0
    for data, count in zip(images, counts, strict=True):
        want = plain(server, "scenes", data, "image/png")["detections"]
        assert count == len(want)
        assert boxes[start:start + count].ravel().tolist() == pytest.approx(
            [v for d in want for v in d["box"]])
        labels = result.as_numpy("labels")[start:start + count]
        assert [as_text(x) for x in labels] == [d["label"] for d in want]
        start += count


# --- KServe's SDK REST client (v1 and v2) -----------------------------------------------------


def kserve_client(protocol: str) -> Any:
    return kserve.InferenceRESTClient(kserve.RESTConfig(protocol=protocol, timeout=120))


def kserve_v2_request(model: str, values: list[str]) -> Any:
    tensor = kserve.InferInput("input-0", [len(values)], "BYTES", values)
    return kserve.InferRequest(model_name=model, infer_inputs=[tensor])


def gather(client: Any, *calls: Any) -> list[Any]:
    """Run the client's calls at once (so they can share a batch), then close the client,
    all on one event loop (its connection pool belongs to that loop)."""
    async def run() -> list[Any]:
        try:
            return list(await asyncio.gather(*calls, return_exceptions=True))
        finally:
            await client.close()

    return asyncio.run(run())


def test_kserve_v2_client_text_batch_with_a_hostile_neighbour(server: Any) -> None:
    client = kserve_client("v2")
    base, headers = server.inference_url, auth(server)
    calls = [client.infer(base, kserve_v2_request("topics", [t]), "topics", headers=headers)
             for t in TEXTS]
    calls.append(client.infer(base, kserve_v2_request("topics", ["x" * 10_001]), "topics",
                              headers=headers))
    calls.append(client.infer(base, kserve_v2_request("topics", ["a\u202egood"]), "topics",
                              headers=headers))
    results = gather(client, *calls)
    for text, answer in zip(TEXTS, results, strict=False):
        want = plain(server, "topics", text.encode(), "text/plain")["predictions"]
        output = {o.name: o for o in answer.outputs}["label"]
        assert output.shape == [1, 2]
        assert output.data == [p["label"] for p in want]
    for error, code in zip(results[len(TEXTS):], ("text_too_long", "invalid_text"),
                           strict=True):
        assert isinstance(error, httpx.HTTPStatusError)
        assert error.response.status_code == 422
        assert error.response.json()["code"] == code
        assert f"[{code}]" in str(error)


def test_kserve_v1_client_images_and_text(server: Any) -> None:
    shapes = _example("image_classifier")
    images = [data for _, _, data in shapes.samples(3, seed=7)]
    client = kserve_client("v1")
    base, headers = server.inference_url, auth(server)
    calls = [
        client.infer(base, {"instances": [b64(images[0]), {"data": b64(images[1])}]},
                     "shapes", headers=headers),
        client.infer(base, {"instances": [{"text": TEXTS[0]}, TEXTS[1]]}, "topics",
                     headers=headers),
        client.infer(base, {"instances": [b64(images[2]), 7]}, "shapes", headers=headers),
        client.infer(base, {"instances": ["R0lGODlhAQABAAAAACw="]}, "shapes", headers=headers),
    ]
    images_answer, texts_answer, mixed, gif = gather(client, *calls)
    assert images_answer["predictions"] == [plain(server, "shapes", x, "application/octet-stream")
                                            for x in images[:2]]
    assert texts_answer["predictions"] == [plain(server, "topics", t.encode(), "text/plain")
                                           for t in TEXTS[:2]]
    assert isinstance(mixed, httpx.HTTPStatusError)
    assert mixed.response.status_code == 400
    assert mixed.response.json()["code"] == "malformed_request"
    assert isinstance(gif, httpx.HTTPStatusError)
    assert (gif.response.status_code, gif.response.json()["code"]) == (
        415, "unsupported_media_type")


def test_v2_and_v1_bodies_on_each_others_routes_answer_in_their_own_protocol(
        server: Any) -> None:
    """The worker cannot see the route: the body's shape decides, on any route."""
    body = json.dumps({"instances": [TEXTS[2]]}).encode()
    status, answer = post(f"{server.inference_url}/v2/models/topics/infer", body,
                          "application/json", server.tokens["inference"])
    assert status == 200
    assert answer["predictions"][0] == plain(server, "topics", TEXTS[2].encode(), "text/plain")
