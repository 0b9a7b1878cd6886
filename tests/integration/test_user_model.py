"""Bring your own model (issue 14, item 2): a ResNet-style network with skip connections, written
in `tests.fixtures_models` as a user would write it, named in the config by its factory, builds a
family with every method on 32×32 RGB images, and the server answers with each variant.

Small on purpose (180 images, one or two epochs per training): this is about every method working
on an arbitrary module, not about accuracy (max_drop = 100: one try per variant).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient
from compression import export
from compression.core.family import load_family
from compression.core.ort import session
from compression.models import build_model
from server.settings import ServeOptions
from tests.build_configs import build_family, config_toml, one_torch_thread, variant
from tests.harness import serve_in_thread

pytestmark = pytest.mark.slow
FACTORY = "tests.fixtures_models:resnet"
METHODS = {"pruned-weights", "pruned-neurons", "distilled", "int8", "clustered", "binary",
           "low-rank", "depthwise", "early-exit"}


def config(npz: Path) -> str:
    return config_toml(
        family="resnet", seed=0,
        max_drop=100,  # every method, one try each: the search is tested in test_max_drop.py
        data=f"npz:{npz}",
        model=FACTORY, model_args={"num_classes": 3, "width": 8},
        train={"epochs": 2, "lr": 1e-2, "batch_size": 32, "augment_shift": 0},
        variants=[
            variant("pruned-weights", sparsity=0.7, steps=1, compare=False, min_layer_weights=0),
            variant("pruned-neurons", ratio=0.5, steps=1, final_epochs=0),
            variant("distilled", student="base", width=0.5, epochs=1, compare_labels=False),
            variant("distilled-cnn", "distilled", student="cnn", epochs=1, compare_labels=False),
            variant("int8", calibration_images=32),
            variant("clustered", base="pruned-weights", epochs=1),
            variant("binary", epochs=1),
            variant("low-rank", param_ratio=0.5, min_weights=512, fine_tune_epochs=1),
            variant("depthwise", epochs=1),
            variant("early-exit", exit_after=["layer1", "layer2"], head_pool=4, frozen_epochs=1,
                    joint_epochs=1),
        ])


def images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, 32, 32]: a bright square of the class's colour (red, green, blue) at a random
    place on dark noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(3 * n_per_class) % 3
    x = rng.integers(0, 60, (len(y), 3, 32, 32))
    for i, label in enumerate(y):
        s = rng.integers(8, 14)
        r, c = rng.integers(0, 32 - s, 2)
        x[i, label, r:r + s, c:c + s] = rng.integers(170, 256)
    return x.astype(np.uint8), y


@pytest.fixture(scope="module", name="one_torch_thread")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory, build_cache: Path,
           one_torch_thread: None) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("resnet")
    x, y = images(60, seed=0)
    np.savez(root / "rgb.npz", x=x, y=y)
    t0 = time.perf_counter()
    out = build_family(root, config(root / "rgb.npz"), cache_dir=build_cache)
    return out, time.perf_counter() - t0


def test_every_method_builds_on_a_resnet(family: tuple[Path, float]) -> None:
    root, seconds = family
    fam = load_family(root)  # every sha256 verified
    print(f"ResNet family: {len(fam.variants)} variants built in {seconds:.1f} s")
    assert fam.manifest["skipped"] == []
    assert {v.method for v in fam.variants.values()} == METHODS | {"full"}
    # how to rebuild the base: the factory and its arguments, never a pickle
    spec = fam.variant("full").details["spec"]
    assert spec == {"kind": "user", "factory": FACTORY, "args": {"num_classes": 3, "width": 8},
                    "input": [3, 32, 32], "num_classes": 3}
    assert fam.manifest["build"]["config"]["arch"]["factory"] == FACTORY
    assert type(build_model(spec)).__name__ == "ResNet"
    assert {p.suffix for p in root.rglob("*") if p.is_file()} <= {
        ".json", ".onnx", ".aiw", ".npy", ".md", ".png"}
    x, _ = images(4, seed=1)
    pixels = x.astype(np.float32) / 255
    for name in fam.variants:
        if fam.variant(name).exits is None:
            assert export.run(session(fam.graph(name)), pixels).shape == (12, 3), name

    full, pn = fam.variant("full"), fam.variant("pruned-neurons")
    assert pn.macs < full.macs / 2  # residual-coupled channels went together
    assert fam.variant("distilled").macs < full.macs / 2
    assert fam.variant("low-rank").macs < full.macs
    assert fam.variant("depthwise").macs < full.macs / 2
    assert fam.variant("pruned-weights").details["sparsity"] == pytest.approx(0.7, abs=0.01)
    codecs = {n: {a.codec for a in v.artifacts if a.role == "weights"}
              for n, v in fam.variants.items()}
    assert codecs["binary"] == {"binary"} and codecs["clustered"] == {"kmeans-huffman"}
    ee = fam.variant("early-exit")
    assert ee.exits is not None and len(ee.exits) == 3
    assert [s["exit_after"] for s in ee.details["stages"]] == ["layer1", "layer2", None]
    assert fam.validation() is not None


def test_the_server_answers_with_every_variant(family: tuple[Path, float]) -> None:
    root, _ = family
    fam = load_family(root)
    x, _ = images(2, seed=2)
    pixels = x.astype(np.float32) / 255
    with serve_in_thread(root, options=ServeOptions(threads=1)) as server, \
            AdaptiveClient(server.target) as client:
        for name in fam.variants:
            result = client.infer(pixels, variant=name)
            assert result.variant == name and result.classes.shape == (6,), name
            if fam.variant(name).exits is None:
                local = export.run(session(fam.graph(name)), pixels).argmax(1)
                np.testing.assert_array_equal(result.classes, local, err_msg=name)
    assert json.loads((root / "manifest.json").read_text())["family"] == "resnet"
