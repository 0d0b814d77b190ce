"""The three example models: built locally with `--quick`, loaded as TorchScript, right answers.

Each `examples/<kind>/build_model.py` runs as a subprocess (as a user runs it), once per
module. The models are then checked on their own (`torch.jit.load`, the documented contract,
inputs made by the example's generator) and behind the example's own `handler.py`,
`model-config.yaml` and labels, driven through TorchServe's real `Context`.

Bounds: the quick image model must classify at least 90% of generated PNG/JPEG samples and
the quick text model 85% of a generated held-out corpus and every hand-written sample (the
generated corpus mixes in words of other topics, so 100% is not reachable); the detector must
find every drawn shape with the right class at IoU >= 0.5.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from secure_handler.testing import Request, make_context, run_batch

pytestmark = pytest.mark.slow  # five model builds, about 30 s on 2 cores

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MANIFEST = {"model": {"modelName": "example", "serializedFile": "model.pt",
                      "handler": "handler.py", "modelVersion": "1.0"}}


def load_module(folder: str, name: str) -> ModuleType:
    """Import `examples/<folder>/<name>.py` (the folders are not packages) under a unique name."""
    path = EXAMPLES / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{folder}_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def build(folder: str, out: Path, *flags: str) -> dict[str, Any]:
    """Run the example's build_model.py --quick; its last stdout line is a JSON report."""
    script = EXAMPLES / folder / "build_model.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--quick", *flags],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out / "model.pt").is_file()
    return report


def jit_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated",
                                category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]


def model_dir(folder: str, built: Path, dest: Path) -> Path:
    """What the MAR would hold: model.pt, the example's labels, the build's vocab."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(built / "model.pt", dest / "model.pt")
    shutil.copy(EXAMPLES / folder / "index_to_name.json", dest / "index_to_name.json")
    if (built / "vocab.json").is_file():
        shutil.copy(built / "vocab.json", dest / "vocab.json")
    return dest


def example_handler(folder: str, directory: Path, **overrides: Any) -> tuple[Any, Any]:
    """The example's one handler class, initialised with its model-config.yaml (+ overrides)."""
    config = yaml.safe_load((EXAMPLES / folder / "model-config.yaml").read_text("utf-8"))
    assert config["batchSize"] <= config["handler"]["max_batch_size"]
    config["handler"].update(overrides)
    module = load_module(folder, "handler")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__]
    assert len(classes) == 1, "the archiver needs exactly one class in handler.py"
    ctx = make_context(directory, MANIFEST, config, batch_size=config["batchSize"])
    handler = classes[0]()
    handler.initialize(ctx)
    return handler, ctx


def labels_file(folder: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((EXAMPLES / folder / "index_to_name.json").read_text())
    return data


# --- image classifier ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> ModuleType:
    return load_module("image_classifier", "sample_inputs")


@pytest.fixture(scope="module")
def image_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("image-build")
    return out, build("image_classifier", out)


def test_image_build_report(image_build: tuple[Path, dict[str, Any]], shapes: ModuleType) -> None:
    _, report = image_build
    assert report["classes"] == list(shapes.CLASSES)
    assert report["held_out_accuracy"] >= 0.9
    assert report["served_accuracy"] >= 0.9
    names = labels_file("image_classifier")
    assert [names[str(i)] for i in range(len(names))] == list(shapes.CLASSES)


def test_image_model_contract(image_build: tuple[Path, dict[str, Any]], shapes: ModuleType) -> None:
    model = jit_load(image_build[0] / "model.pt")
    with torch.inference_mode():
        for side in (224, 56, 300):  # adaptive pooling: any size, 224 is what the handler sends
            logits = model(torch.randn(3, 3, side, side))
            assert logits.shape == (3, len(shapes.CLASSES))
            assert torch.isfinite(logits).all()


def test_image_model_names_generated_shapes(image_build: tuple[Path, dict[str, Any]],
                                            shapes: ModuleType) -> None:
    model = jit_load(image_build[0] / "model.pt")
    items = shapes.samples(40, seed=31_337)
    x = torch.from_numpy(np.stack([shapes.preprocess(data) for _, _, data in items]))
    with torch.inference_mode():
        predicted = model(x).argmax(1).tolist()
    right = sum(shapes.CLASSES[p] == shape for p, (shape, _, _) in zip(predicted, items,
                                                                          strict=True))
    assert right / len(items) >= 0.9, (right, len(items))


def test_image_example_handler_serves_shapes(image_build: tuple[Path, dict[str, Any]],
                                             shapes: ModuleType, tmp_path: Path) -> None:
    handler, ctx = example_handler("image_classifier",
                                   model_dir("image_classifier", image_build[0], tmp_path))
    items = shapes.samples(len(shapes.CLASSES), seed=2024)
    requests = [Request.as_worker(data, f"image/{fmt.lower()}") for _, fmt, data in items]
    requests.append(Request.as_worker(items[1][2][:200], "image/jpeg"))  # truncated JPEG
    results = run_batch(handler, ctx, requests)
    for (status, body), (shape, _, _) in zip(results, items, strict=False):
        assert status == 200, body
        assert body["predictions"][0]["label"] == shape, body
        assert len(body["predictions"]) == 3  # top_k in model-config.yaml
    assert results[-1][0] == 422
    assert results[-1][1]["error"]["code"] == "invalid_image"


def test_image_samples_are_deterministic_files(shapes: ModuleType, tmp_path: Path) -> None:
    paths = shapes.write_samples(tmp_path, count=4, seed=5)
    assert [p.read_bytes() for p in paths] == [d for _, _, d in shapes.samples(4, seed=5)]
    for path in paths:
        shape = path.stem.split("-", 1)[1]
        assert shape in shapes.CLASSES
        with Image.open(path) as img:
            assert img.format == ("PNG" if path.suffix == ".png" else "JPEG")


# --- text classifier ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> ModuleType:
    return load_module("text_classifier", "corpus")


@pytest.fixture(scope="module")
def text_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outs = {}
    for contract in ("ids_mask", "bag"):
        outs[contract] = tmp_path_factory.mktemp(f"text-{contract}")
        report = build("text_classifier", outs[contract], "--contract", contract)
        assert report["contract"] == contract
        assert report["hand_written_accuracy"] == 1.0
    return outs


def vocab_of(out: Path) -> dict[str, int]:
    data: dict[str, int] = json.loads((out / "vocab.json").read_text("utf-8"))
    return data


def test_text_vocab_is_json_with_pad_and_unk(text_builds: dict[str, Path]) -> None:
    vocab = vocab_of(text_builds["ids_mask"])
    assert vocab["<pad>"] == 0
    assert vocab["<unk>"] == 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab == vocab_of(text_builds["bag"])  # same corpus, same seed


def test_text_tokenization_rule(corpus: ModuleType) -> None:
    # NFKC folds the full-width letters, lower-casing, then runs of [a-z0-9'].
    assert corpus.tokenize("Ｔhe STRIKER's goal—2:1!") == ["the", "striker's", "goal", "2", "1"]
    assert corpus.tokenize("café ﬁnal") == ["caf", "final"]  # é dropped; the ﬁ ligature folds
    vocab = {"<pad>": 0, "<unk>": 1, "rain": 2}
    assert corpus.encode("Rain, RAIN and snow", vocab) == [2, 2, 1, 1]


def test_text_model_contract_ignores_padding(text_builds: dict[str, Path],
                                             corpus: ModuleType) -> None:
    model = jit_load(text_builds["ids_mask"] / "model.pt")
    ids = corpus.encode("the striker scored a late goal", vocab_of(text_builds["ids_mask"]))
    short = torch.tensor([ids])
    padded = torch.tensor([ids + [0] * 7, [5] * len(ids) + [9] * 7])
    mask = torch.tensor([[1] * len(ids) + [0] * 7, [1] * (len(ids) + 7)])
    with torch.inference_mode():
        alone = model(short, torch.ones_like(short))
        both = model(padded, mask)
    assert alone.shape == (1, 4)
    assert both.shape == (2, 4)
    assert both.dtype == torch.float32
    torch.testing.assert_close(both[:1], alone)


def test_text_models_classify(text_builds: dict[str, Path], corpus: ModuleType) -> None:
    vocab = vocab_of(text_builds["ids_mask"])
    texts, labels = corpus.corpus(400, seed=777)
    rows = [corpus.encode(t, vocab) for t in [*texts, *(s for s, _ in corpus.SAMPLES)]]
    want = torch.tensor([*labels, *(corpus.CLASSES.index(c) for _, c in corpus.SAMPLES)])
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
    mask = (torch.arange(longest) < torch.tensor([len(r) for r in rows])[:, None]).long()
    flat = torch.tensor([i for r in rows for i in r])
    offsets = torch.tensor([0, *np.cumsum([len(r) for r in rows])[:-1].tolist()])
    with torch.inference_mode():
        by_mask = jit_load(text_builds["ids_mask"] / "model.pt")(ids, mask)
        by_bag = jit_load(text_builds["bag"] / "model.pt")(flat, offsets)
    torch.testing.assert_close(by_bag, by_mask, rtol=1e-4, atol=1e-4)
    predicted = by_mask.argmax(1)
    assert (predicted[:400] == want[:400]).float().mean() >= 0.85
    assert predicted[400:].tolist() == want[400:].tolist()  # every hand-written sentence


@pytest.mark.parametrize("contract", ["ids_mask", "bag"])
def test_text_example_handler_serves_topics(text_builds: dict[str, Path], corpus: ModuleType,
                                            tmp_path: Path, contract: str) -> None:
    directory = model_dir("text_classifier", text_builds[contract], tmp_path)
    # model-config.yaml names ids_mask; the bag build is served with the other model input.
    handler, ctx = example_handler("text_classifier", directory, model_input=contract)
    requests = [Request.as_worker(s.encode(), "text/plain") for s, _ in corpus.SAMPLES]
    # Two batches within max_batch_size (8); the first also carries a Latin-1 body.
    latin1 = Request.as_worker("café".encode("latin-1"), "application/octet-stream")
    results = [*run_batch(handler, ctx, [*requests[:4], latin1]),
               *run_batch(handler, ctx, requests[4:])]
    refused = results.pop(4)
    assert refused[0] == 422
    assert refused[1]["error"]["code"] == "invalid_text"
    for (status, body), (_, topic) in zip(results, corpus.SAMPLES, strict=True):
        assert status == 200, body
        assert body["predictions"][0]["label"] == topic, body


def test_text_handler_tokenizes_like_the_corpus(text_builds: dict[str, Path],
                                                corpus: ModuleType, tmp_path: Path) -> None:
    directory = model_dir("text_classifier", text_builds["ids_mask"], tmp_path)
    handler, _ = example_handler("text_classifier", directory)
    vocab = vocab_of(directory)
    for sentence in ["Ｔhe STRIKER's goal—2:1!", "Rain, RAIN and snow", "ﬁnal café"]:
        cleaned = corpus.normalize(sentence)  # NFKC; the handler lower-cases in the tokenizer
        assert handler.tokenizer.encode(cleaned, 100) == corpus.encode(sentence, vocab)


# --- object detector ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes() -> ModuleType:
    return load_module("object_detector", "scenes")


@pytest.fixture(scope="module")
def detector_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outs = {}
    for contract in ("tensor", "list"):
        outs[contract] = tmp_path_factory.mktemp(f"detector-{contract}")
        report = build("object_detector", outs[contract], "--contract", contract)
        for result in report["accuracy"].values():
            assert result["recall_at_iou_0.5"] == 1.0
    return outs


# Mixed sizes and aspect ratios (at most 2:1), PNG and JPEG.
SCENE_SIZES = [(320, 320), (640, 360), (300, 500), (800, 420), (256, 480)]


def decoded(scenes: ModuleType, index: int) -> tuple[Any, Image.Image]:
    width, height = SCENE_SIZES[index]
    scene = scenes.make_scene(900 + index, width, height)
    data = scenes.encode(scene.image, "JPEG" if index % 2 else "PNG")
    with Image.open(io.BytesIO(data)) as img:
        return scene, img.convert("RGB")


def assert_found(scenes: ModuleType, scene: Any, boxes: list[Any], labels: list[int]) -> None:
    assert len(boxes) == len(scene.boxes), (boxes, scene.boxes)
    assert min(scenes.match(scene, boxes, labels)) >= 0.5, (boxes, labels, scene)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_detector_tensor_contract(detector_builds: dict[str, Path], scenes: ModuleType,
                                  resize: str) -> None:
    model = jit_load(detector_builds["tensor"] / "model.pt")
    cases = [decoded(scenes, i) for i in range(len(SCENE_SIZES))]
    inputs = [scenes.resize_input(img, 320, resize) for _, img in cases]
    with torch.inference_mode():
        boxes, scores, labels = model(torch.from_numpy(np.stack([p for p, _, _ in inputs])))
    n = boxes.shape[1]
    assert boxes.shape == (len(cases), n, 4)
    assert scores.shape == labels.shape == (len(cases), n)
    assert labels.dtype == torch.int64
    for i, ((scene, _), (_, sx, sy)) in enumerate(zip(cases, inputs, strict=True)):
        keep = scores[i] > 0.3
        assert (scores[i][~keep] == 0).all()  # padding slots
        assert (boxes[i][~keep] == 0).all()
        mapped = (boxes[i][keep] * torch.tensor([sx, sy, sx, sy])).tolist()
        assert_found(scenes, scene, mapped, labels[i][keep].tolist())


def test_detector_list_contract_mixed_sizes(detector_builds: dict[str, Path],
                                            scenes: ModuleType) -> None:
    model = jit_load(detector_builds["list"] / "model.pt")
    cases = [decoded(scenes, i) for i in range(len(SCENE_SIZES))]
    images = [torch.from_numpy(scenes.to_tensor_input(img)) for _, img in cases]
    with torch.inference_mode():
        losses, detections = model(images)
    assert losses == {}
    assert len(detections) == len(cases)
    for (scene, _), found in zip(cases, detections, strict=True):
        assert set(found) == {"boxes", "labels", "scores"}
        assert found["labels"].dtype == torch.int64
        assert_found(scenes, scene, found["boxes"].tolist(), found["labels"].tolist())


def test_detector_finds_nothing_on_a_plain_image(detector_builds: dict[str, Path]) -> None:
    plain = torch.full((1, 3, 320, 320), 0.3)
    with torch.inference_mode():
        _, scores, _ = jit_load(detector_builds["tensor"] / "model.pt")(plain)
        _, found = jit_load(detector_builds["list"] / "model.pt")([plain[0, :, :100]])
    assert (scores == 0).all()
    assert found[0]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("contract", ["tensor", "list"])
def test_detector_example_handler_serves_boxes(detector_builds: dict[str, Path],
                                               scenes: ModuleType, tmp_path: Path,
                                               contract: str) -> None:
    directory = model_dir("object_detector", detector_builds[contract], tmp_path)
    handler, ctx = example_handler("object_detector", directory)
    truth, requests = [], []
    for i, (width, height) in enumerate(SCENE_SIZES):
        scene = scenes.make_scene(900 + i, width, height)
        fmt = "JPEG" if i % 2 else "PNG"
        truth.append(scene)
        requests.append(Request.as_worker(scenes.encode(scene.image, fmt), f"image/{fmt.lower()}"))
    requests.append(Request.as_worker(b"GIF89a" + bytes(30), "image/gif"))
    results = run_batch(handler, ctx, requests)
    names = labels_file("object_detector")
    for (status, body), scene in zip(results, truth, strict=False):
        assert status == 200, body
        boxes = [d["box"] for d in body["detections"]]
        labels = [scenes.CLASSES.index(d["label"]) for d in body["detections"]]
        assert all(names[str(d["class"])] == d["label"] for d in body["detections"])
        assert_found(scenes, scene, boxes, labels)
    assert results[-1][0] == 415
    assert results[-1][1]["error"]["code"] == "unsupported_media_type"


def test_scenes_are_deterministic_and_apart(scenes: ModuleType, tmp_path: Path) -> None:
    a, b = scenes.make_scene(3, 400, 300), scenes.make_scene(3, 400, 300)
    assert a.boxes == b.boxes
    assert a.labels == b.labels
    assert a.image.tobytes() == b.image.tobytes()
    for i, box in enumerate(a.boxes):
        assert 0 < box[0] < box[2] < 400
        assert 0 < box[1] < box[3] < 300
        assert all(scenes.iou(box, other) == 0 for other in a.boxes[i + 1:])
    truth = json.loads(scenes.write_samples(tmp_path, count=2).read_text())
    assert sorted(truth) == ["scene-00.png", "scene-01.jpg"]
