"""A 32×32 RGB ``folder:`` dataset end to end: PNG files as a user keeps them → build → serve →
a stock tritonclient sending FP32 [0, 1] pixels and UINT8 pixels (issue 14, item 3).

The dataset is drawn here, seeded: three classes a small CNN separates at once (a red square, a
green bar, a blue disk on dark noise, each at a random place and size, colours jittered), in
``train/`` and ``test/`` folders. Held-out images come from another seed and are never written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from compression import data
from compression.core.family import load_family
from server.settings import ServeOptions
from tests.build_configs import SMALL_CNN, build_family, config_toml, variant
from tests.harness import serve_in_thread

pytestmark = pytest.mark.slow
CLASSES = ("red-square", "green-bar", "blue-disk")  # written in this order; sorted on load
SIZE = 32


def config(images: Path) -> str:
    return config_toml(
        family="rgb", seed=0,
        max_drop=25.0,  # 24 validation images: one image is 4.2 points; serve both cheap variants
        data=f"folder:{images}",
        arch=SMALL_CNN,
        train={"epochs": 6, "lr": 1e-2, "batch_size": 32, "augment_shift": 0, "patience": 3},
        variants=[variant("int8", calibration_images=64),
                  variant("early-exit", head_pool=4, frozen_epochs=1, joint_epochs=1)])


def draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """One [32, 32, 3] uint8 image of class ``label`` (index into `CLASSES`)."""
    img = rng.integers(0, 70, (SIZE, SIZE, 3))
    base = np.array([[200, 40, 40], [40, 190, 40], [50, 60, 210]][label])
    colour = np.clip(base + rng.integers(-40, 41, 3), 0, 255)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if label == 0:  # a square of side 8..14
        s = rng.integers(8, 15)
        y0, x0 = rng.integers(0, SIZE - s, 2)
        mask = (yy >= y0) & (yy < y0 + s) & (xx >= x0) & (xx < x0 + s)
    elif label == 1:  # a horizontal bar, 3..5 high, half to nearly all of the width
        t, length = rng.integers(3, 6), rng.integers(SIZE // 2, SIZE - 3)
        y0, x0 = rng.integers(0, SIZE - t), rng.integers(0, SIZE - length)
        mask = (yy >= y0) & (yy < y0 + t) & (xx >= x0) & (xx < x0 + length)
    else:  # a disk of radius 4..7
        r = rng.integers(4, 8)
        cy, cx = rng.integers(r, SIZE - r, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[mask] = colour
    return img.astype(np.uint8)


def write_dataset(root: Path, *, train: int, test: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train), ("test", test)):
        for i in range(per_class * len(CLASSES)):
            path = root / split / CLASSES[i % 3] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw(i % 3, rng)).save(path)


def held_out(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, 32, 32] images never written to disk, and their labels as the family
    numbers them (sorted folder names)."""
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n_per_class * 3)]
    x = np.stack([draw(label, rng).transpose(2, 0, 1) for label in labels])
    served = sorted(CLASSES)
    return x, np.array([served.index(CLASSES[label]) for label in labels])


@pytest.fixture(scope="module")
def rgb_family(tmp_path_factory: pytest.TempPathFactory, build_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("rgb")
    write_dataset(root / "images", train=80, test=30, seed=0)
    return build_family(root, config(root / "images"), cache_dir=build_cache)


def test_the_manifest_records_rgb_shape_class_names_and_normalisation(rgb_family: Path) -> None:
    manifest = load_family(rgb_family).manifest
    spec = manifest["dataset"]["spec"]
    assert spec.startswith("folder:") and manifest["dataset"]["splits"]["test"] == 90
    assert manifest["input"]["shape"] == [3, SIZE, SIZE]
    assert manifest["output"]["classes"] == sorted(CLASSES)
    splits = data.split(data.load(spec), seed=0)
    norm = manifest["input"]["normalization"]
    assert norm == {**splits.normalization(), "in_graph": True} and len(norm["mean"]) == 3
    # three different channel means: a per-channel normalisation, not one broadcast value
    assert len(set(norm["mean"])) == 3


PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    target, model, images = sys.argv[1:4]
    u8 = np.load(images, allow_pickle=False)
    client = grpcclient.InferenceServerClient(url=target)
    meta = client.get_model_metadata(model, as_json=True)

    def infer(pixels, datatype, version):
        answers = []
        for batch in np.array_split(pixels, 3):
            inp = grpcclient.InferInput("input", list(batch.shape), datatype)
            inp.set_data_from_numpy(batch)
            r = client.infer(model, [inp], model_version=version)
            answers.append((r.as_numpy("logits"), r.get_response().model_version))
        return {"logits": np.concatenate([a for a, _ in answers]).tolist(),
                "variants": sorted({v for _, v in answers})}

    out = {"inputs": meta["inputs"], "versions": meta.get("versions", []), "answers": {}}
    for version in ["", *(v for v in out["versions"] if "@" not in v)]:
        out["answers"][version] = {
            "FP32": infer(u8.astype(np.float32) / 255, "FP32", version),
            "UINT8": infer(u8, "UINT8", version)}
    try:
        bad = grpcclient.InferInput("input", list(u8[:1].shape), "INT8")
        bad.set_data_from_numpy(u8[:1].astype(np.int8))
        client.infer(model, [bad])
        out["int8_input"] = None
    except InferenceServerException as exc:
        out["int8_input"] = {"status": exc.status(), "message": exc.message()}
    print(json.dumps(out))
""")


def test_tritonclient_fp32_and_uint8_pixels_agree_and_are_accurate(rgb_family: Path,
                                                                   tmp_path: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] (dev extra) is not installed")
    x_u8, y = held_out(20, seed=12345)
    np.save(tmp_path / "held_out.npy", x_u8)
    with serve_in_thread(rgb_family, options=ServeOptions(threads=2)) as server:
        # Its own interpreter: tritonclient and our generated code both define `inference.*`.
        proc = subprocess.run([sys.executable, "-c", PROBE, server.target, "rgb",
                               str(tmp_path / "held_out.npy")],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    # ModelMetadata still advertises FP32; UINT8 is accepted on top
    assert out["inputs"] == [{"name": "input", "datatype": "FP32",
                              "shape": ["-1", "3", str(SIZE), str(SIZE)]}]
    assert {"full", "int8", "early-exit"} <= set(out["versions"])
    for version, answers in out["answers"].items():
        fp32, uint8 = (np.array(answers[d]["logits"]) for d in ("FP32", "UINT8"))
        assert fp32.shape == (len(y), 3), version
        assert answers["FP32"]["variants"] == answers["UINT8"]["variants"], version
        # the server's u8 / 255 is the client's, bit for bit: the same graph gives the same logits
        np.testing.assert_allclose(uint8, fp32, rtol=0, atol=1e-5, err_msg=version)
        accuracy = float((uint8.argmax(1) == y).mean())
        assert accuracy >= (0.9 if version in ("", "full") else 0.8), (version, accuracy)
    # the normalisation is inside the graph: the served logits are the full graph's on raw pixels
    graph = load_family(rgb_family).graph("full").SerializeToString()
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    local = sess.run(None, {"input": x_u8.astype(np.float32) / 255})[0]
    np.testing.assert_allclose(np.array(out["answers"]["full"]["UINT8"]["logits"]), local,
                               rtol=1e-4, atol=1e-4)
    bad = out["int8_input"]
    assert bad is not None and bad["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].datatype 'INT8'" in bad["message"] and "'UINT8'" in bad["message"]
