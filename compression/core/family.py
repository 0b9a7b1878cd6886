"""The model-family directory: ``manifest.json`` plus artifacts, written by the build, read by the server.

Layout::

    family/
      manifest.json            schema_version, family, dataset, input, output, variants[]
      full/model.onnx          one folder per variant
      pruned-weights/model.onnx + weights.aiw   graph skeleton + encoded weights (see encoding.py)
      early-exit/stage_0.onnx …                 one graph per stage
      data/val_x.npy, data/val_y.npy            a sample of the validation split

Every artifact carries a sha256; `load_family` verifies all of them and the schema version before
anything is served, and raises one `FamilyError` naming the offending file. Nothing is unpickled:
artifacts are ONNX graphs, our own tensor container (JSON header + raw bytes), plain ``.npy``
arrays (read with ``allow_pickle=False``) and JSON.
This module needs numpy and onnx only, no torch, so the server can load a family cheaply.

The validation sample (manifest ``validation``, `write_validation` / `Family.validation`) lets a
server re-measure each variant's accuracy where it runs (another device, another dtype): up to
`VALIDATION_SAMPLES` images of the build's validation split, uint8 when every pixel is exactly
k/255 (lossless: the loaders divide by 255 in float32, as `Family.validation` does), else float32,
and their int64 labels. A family built before it was recorded has none (None).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

from compression.core import encoding
from compression.core.errors import FamilyError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BATCH_SIZES = (1, 8, 32)

LatencyTable = dict[str, dict[str, float]]  # batch size ("1", "8", "32") → {"p50": ms, "p95": ms}

VALIDATION_SAMPLES = 2000  # at most this many validation images go into the family
VALIDATION_ROLE = "validation"
_PIXEL = np.float32(255)  # uint8 pixel k is k / 255 in float32, as every loader computes it


@dataclass(frozen=True)
class Artifact:
    """One file of a variant. ``role``: ``graph`` (ONNX, possibly a weightless skeleton),
    ``weights`` (encoded tensors that fill the skeleton, decoded by ``codec``), ``stage`` (one
    early-exit stage graph, ``stage`` = its index) or ``extra`` (reports, not needed to serve)."""

    path: str
    sha256: str
    bytes: int
    role: str = "graph"
    codec: str | None = None
    stage: int | None = None


@dataclass(frozen=True)
class Exit:
    """One exit of the early-exit network: run stages 0..index, then answer from this exit.

    Two accuracies per exit, each on the test split (reports) and the validation split (routing,
    calibration): the stand-alone exit (every sample leaves here), and the calibrated exit policy
    capped at this depth (``policy_*``: a sample leaves at the first earlier exit confident enough,
    and every sample still running at ``index`` answers from it) — what the server returns for a
    request routed to ``early-exit@index``. At the last exit the capped policy is the variant's
    own policy. Fields added after the first manifests default to None (older manifests load).
    """

    index: int
    accuracy: float  # test accuracy when every sample leaves here
    latency_ms: LatencyTable  # cumulative: stages 0..index, this exit's head included
    threshold: float  # calibrated max-softmax confidence to leave here (last exit: 0)
    exit_share: float  # share of validation samples that leave here under the thresholds
    criterion: str = "max_prob"  # or "entropy" (BranchyNet); then leave when entropy ≤ threshold
    val_accuracy: float | None = None  # validation accuracy when every sample leaves here
    policy_accuracy: float | None = None  # test accuracy of the policy capped at this exit
    policy_val_accuracy: float | None = None  # validation accuracy of the policy capped here
    # test images the policy capped here gets right: `compression.core.stats.encode_bits`
    test_correct: dict[str, Any] | None = None


@dataclass(frozen=True)
class Variant:
    """One member of the family, with everything the router needs to choose it.

    ``accuracy`` is the test-split accuracy of what the variant serves (reports); ``val_accuracy``
    the validation-split accuracy of the same served graph or exit policy (routing). None in
    manifests written before it was recorded.
    """

    name: str
    method: str
    params: dict[str, Any]
    artifacts: list[Artifact]
    accuracy: float
    params_count: int
    macs: int
    size_bytes: int
    latency_ms: LatencyTable
    base: str | None = None
    exits: list[Exit] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    val_accuracy: float | None = None
    # which test images it gets right (`compression.core.stats.encode_bits`): paired tests vs full
    test_correct: dict[str, Any] | None = None
    # batch size → paired speed-up over full: median over interleaved rounds of the in-round ratio
    speedup: dict[str, float] | None = None

    def p50(self, batch: int = 1) -> float:
        return self.latency_ms[str(batch)]["p50"]

    def p95(self, batch: int = 1) -> float:
        return self.latency_ms[str(batch)]["p95"]

    def artifact(self, role: str) -> Artifact:
        for a in self.artifacts:
            if a.role == role:
                return a
        raise FamilyError(f"variant {self.name!r} has no {role!r} artifact")


@dataclass(frozen=True)
class Family:
    """A loaded, verified family directory."""

    root: Path
    name: str
    manifest: dict[str, Any]
    variants: dict[str, Variant]

    @property
    def input_shape(self) -> list[int]:
        return list(self.manifest["input"]["shape"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["output"]["classes"])

    def variant(self, name: str) -> Variant:
        try:
            return self.variants[name]
        except KeyError:
            raise FamilyError(f"family {self.name!r} has no variant {name!r}; "
                              f"variants: {sorted(self.variants)}") from None

    def fastest(self, batch: int = 1) -> Variant:
        """The variant without early exits whose build-time p50 at ``batch`` is the lowest (what
        the benchmarks pin to measure the serving path rather than a model)."""
        return min((v for v in self.variants.values() if not v.exits), key=lambda v: v.p50(batch))

    def graph(self, name: str) -> onnx.ModelProto:
        """The variant's dense ONNX graph, decoding encoded weights into its skeleton if needed."""
        v = self.variant(name)
        graph = onnx.load_from_string((self.root / v.artifact("graph").path).read_bytes())
        weights = [a for a in v.artifacts if a.role == "weights"]
        for a in weights:
            tensors = encoding.decode((self.root / a.path).read_bytes(), source=a.path)
            fill_initializers(graph, tensors, source=a.path)
        return graph

    def stage_graphs(self, name: str) -> list[onnx.ModelProto]:
        """The early-exit network's stage graphs, in order."""
        stages = sorted((a for a in self.variant(name).artifacts if a.role == "stage"),
                        key=lambda a: a.stage or 0)
        return [onnx.load_from_string((self.root / a.path).read_bytes()) for a in stages]

    def validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The validation sample: images float32 [N, C, H, W] in [0, 1] and labels int64 [N], or
        None for a family built without one. The files are verified again as they are read."""
        rec = self.manifest.get("validation")
        if rec is None:
            return None
        x_art, y_art = (_validation_artifact(self.root / MANIFEST, rec, k) for k in ("x", "y"))
        x, y = (_read_array(self.root, a) for a in (x_art, y_art))
        where = f"{self.root / x_art.path}"
        if x.dtype == np.uint8:
            x = np.divide(x, _PIXEL, dtype=np.float32)
        elif x.dtype != np.float32:
            raise FamilyError(f"{where}: dtype {x.dtype}, expected uint8 or float32 pixels")
        if x.ndim != 4 or list(x.shape[1:]) != self.input_shape:
            raise FamilyError(f"{where}: shape {list(x.shape)}, expected [N, "
                              f"{', '.join(map(str, self.input_shape))}]")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise FamilyError(f"{self.root / y_art.path}: {y.dtype} {list(y.shape)}, expected "
                              f"int64 [{len(x)}] labels")
        return x, y


# --- writing ---------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(root: Path, rel: str, data: bytes, *, role: str = "graph",
                   codec: str | None = None, stage: int | None = None) -> Artifact:
    """Write one artifact under the family root and return its manifest record."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Artifact(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                    role=role, codec=codec, stage=stage)


def write_validation(root: Path, x: np.ndarray, y: np.ndarray, *, seed: int,
                     limit: int = VALIDATION_SAMPLES) -> dict[str, Any]:
    """Write the validation sample (module docstring) under ``root/data/``; its manifest record.

    Past ``limit`` images, a seeded sample of them in their split order (the same on every
    rebuild with the same seed).
    """
    total = len(y)
    if total > limit:
        keep = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
        x, y = x[keep], y[keep]
    pixels = np.rint(x * 255).clip(0, 255).astype(np.uint8)
    exact = bool(np.array_equal(np.divide(pixels, _PIXEL, dtype=np.float32), x))
    stored = pixels if exact else np.ascontiguousarray(x, dtype=np.float32)
    arts = {}
    for key, rel, array in (("x", "data/val_x.npy", stored),
                            ("y", "data/val_y.npy", np.ascontiguousarray(y, dtype=np.int64))):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        a = write_artifact(root, rel, buf.getvalue(), role=VALIDATION_ROLE)
        arts[key] = {k: v for k, v in asdict(a).items() if v is not None}
    return {**arts, "samples": len(y), "of": total, "pixels": str(stored.dtype)}


# Optional fields written only when set, so a manifest without them reads back the same.
_OPTIONAL_VARIANT = ("exits", "val_accuracy", "test_correct", "speedup")
_OPTIONAL_EXIT = ("val_accuracy", "policy_accuracy", "policy_val_accuracy", "test_correct")


def variant_to_json(v: Variant) -> dict[str, Any]:
    """The manifest record of ``v``; `_parse_variant` reads it back to an equal `Variant`."""
    d = asdict(v)
    d["artifacts"] = [{k: val for k, val in a.items() if val is not None} for a in d["artifacts"]]
    if d["exits"] is not None:
        d["exits"] = [{k: val for k, val in e.items() if not (k in _OPTIONAL_EXIT and val is None)}
                      for e in d["exits"]]
    return {k: val for k, val in d.items() if not (k in _OPTIONAL_VARIANT and val is None)}


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    path = root / MANIFEST
    body = dict(manifest)
    body["variants"] = [variant_to_json(v) if isinstance(v, Variant) else v
                        for v in manifest["variants"]]
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    return path


def fill_initializers(graph: onnx.ModelProto, tensors: Mapping[str, Any], *, source: str) -> None:
    """Put decoded arrays into a skeleton graph's initializers, checking names and shapes."""
    inits = {t.name: t for t in graph.graph.initializer}
    for name, array in tensors.items():
        if name not in inits:
            raise FamilyError(f"{source}: tensor {name!r} has no initializer in the graph")
        init = inits[name]
        if list(init.dims) != list(array.shape):
            raise FamilyError(f"{source}: tensor {name!r} has shape {list(array.shape)}, "
                              f"graph expects {list(init.dims)}")
        init.CopyFrom(onnx.numpy_helper.from_array(array.astype("float32", copy=False), name))


# --- loading ---------------------------------------------------------------------------------

def load_family(root: str | Path) -> Family:
    """Read and verify a family directory. Raises `FamilyError` naming the offending file."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FamilyError(f"{manifest_path}: file not found (not a family directory?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FamilyError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise FamilyError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FamilyError(f"{manifest_path}: unknown schema_version {version!r}; "
                          f"this release reads {SCHEMA_VERSION}")
    for key in ("family", "input", "output", "variants"):
        if key not in manifest:
            raise FamilyError(f"{manifest_path}: missing field {key!r}")
    variants: dict[str, Variant] = {}
    for i, raw in enumerate(manifest["variants"]):
        v = _parse_variant(manifest_path, i, raw)
        for a in v.artifacts:
            _verify(root, a)
        variants[v.name] = v
    if not variants:
        raise FamilyError(f"{manifest_path}: the family has no variants")
    if manifest.get("validation") is not None:
        for key in ("x", "y"):
            _verify(root, _validation_artifact(manifest_path, manifest["validation"], key))
    log.info("loaded family %r from %s: %d variants verified", manifest["family"], root, len(variants))
    return Family(root=root, name=str(manifest["family"]), manifest=manifest, variants=variants)


def _parse_variant(manifest_path: Path, i: int, raw: Any) -> Variant:
    try:
        artifacts = [Artifact(**a) for a in raw["artifacts"]]
        exits = [Exit(**e) for e in raw["exits"]] if raw.get("exits") else None
        fields = {k: raw[k] for k in raw if k not in ("artifacts", "exits")}
        return Variant(artifacts=artifacts, exits=exits, **fields)
    except (KeyError, TypeError) as exc:
        raise FamilyError(f"{manifest_path}: variants[{i}] is malformed ({exc})") from exc


def _validation_artifact(manifest_path: Path, rec: Any, key: str) -> Artifact:
    try:
        return Artifact(**rec[key])
    except (KeyError, TypeError) as exc:
        raise FamilyError(f"{manifest_path}: validation.{key} is malformed ({exc})") from exc


def _read_array(root: Path, a: Artifact) -> np.ndarray:
    """One verified ``.npy`` artifact, read without unpickling."""
    data = _verified_bytes(root, a)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FamilyError(f"{root / a.path}: not a plain .npy array ({exc})") from exc


def _verified_bytes(root: Path, a: Artifact) -> bytes:
    _verify(root, a)
    data = (root / a.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != a.sha256:  # changed between the check and the read
        raise FamilyError(f"{root / a.path}: sha256 mismatch (tampered?)")
    return data


def _verify(root: Path, a: Artifact) -> None:
    rel = PurePosixPath(a.path)
    if rel.is_absolute() or ".." in rel.parts:
        raise FamilyError(f"{a.path}: artifact path escapes the family directory")
    path = root / rel
    if not path.is_file():
        raise FamilyError(f"{path}: artifact missing")
    size = path.stat().st_size
    if size != a.bytes:
        raise FamilyError(f"{path}: artifact is {size} bytes, manifest says {a.bytes} (truncated?)")
    digest = sha256_file(path)
    if digest != a.sha256:
        raise FamilyError(f"{path}: sha256 mismatch (tampered?): {digest[:16]}… ≠ {a.sha256[:16]}…")
