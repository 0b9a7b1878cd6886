"""`adaptive-inference build`: a TOML config in, a verified family directory out.

Order of work: parse and validate the whole config (so a typo fails in a second, not after
training) → load and split the data → train the base model, or reuse it from the cache keyed by
(base section, data, seed) → the ``full`` variant → each configured variant in order through the
method registry → manifest, report.md and pareto.png.

Accuracy target: every variant must stay within ``max_drop`` points of ``full``'s validation
accuracy (family-wide top-level key, default 1.0; a ``[[variants]]`` table may override it).
`_search` tries the configured setting first and backs off along the method's strength knob
(`compression.registry.Knob`), bisecting once between the last failing and the first passing
setting where the knob is continuous; a dataset on which the configured strength passes pays one
try. Variants built on another variant are judged against ``full`` too. The trace goes into the
variant's ``details["search"]``; a variant that meets the target at no setting ships its most
accurate try marked ``"within_max_drop": false`` there (a warning in the log, a line in the
report), and the server leaves it out.

The base is a built-in architecture (``[base.arch]``) or the user's own (``[base] model =
"package.module:factory"``, called with ``[base] model_args``; `compression.models`, kind
``user``). A method that cannot handle the base (`Unsupported`: a network torch.fx cannot trace,
one torch-pruning cannot prune) leaves its variant out — and every variant built on it — and says
why in the log, the manifest (``skipped``) and report.md; the other variants build as usual.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compression import data as datasets
from compression import export, profile, registry, report
from compression.core import encoding, stats
from compression.core.errors import ConfigError, Unsupported
from compression.core.family import (
    BATCH_SIZES,
    SCHEMA_VERSION,
    Artifact,
    Variant,
    fill_initializers,
    load_family,
    write_artifact,
    write_manifest,
    write_validation,
)
from compression.core.ort import INPUT_NAME, OUTPUT_NAME, session
from compression.models import DEFAULT_CNN, DEFAULT_MLP, Spec, build_model, load_factory, validate
from compression.registry import BuildContext, Built, MethodOutput
from compression.train import TrainConfig, accuracy, seed_everything, train

log = logging.getLogger(__name__)

_TOP_KEYS = {"family", "seed", "max_drop", "data", "base", "variants"}
_DATA_KEYS = {"spec", "val_fraction", "test_fraction"}
_BASE_KEYS = {"arch", "train", "model", "model_args"}
_VARIANT_KEYS = {"name", "method", "base", "max_drop", "params"}

DEFAULT_MAX_DROP = 1.0  # points of validation accuracy a variant may lose against full
BISECT_STEPS = 1  # extra tries between the last failing and first passing continuous setting


@dataclass(frozen=True)
class VariantConfig:
    name: str
    method: str
    base: str
    params: Any  # the method's frozen config dataclass
    max_drop: float = DEFAULT_MAX_DROP  # this variant's target: family-wide value or override


@dataclass(frozen=True)
class BuildConfig:
    family: str
    seed: int
    data_spec: str
    val_fraction: float
    test_fraction: float
    arch: Spec
    train: TrainConfig
    variants: tuple[VariantConfig, ...]
    max_drop: float = DEFAULT_MAX_DROP

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = [{"name": v.name, "method": v.method, "base": v.base,
                          "max_drop": v.max_drop, "params": asdict(v.params)}
                         for v in self.variants]
        return d


def load_config(path: str | Path, *, data_spec: str | None = None,
                seed: int | None = None) -> BuildConfig:
    """Parse and validate a TOML build config; CLI overrides win over the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    _only(raw, _TOP_KEYS, str(path))
    data = raw.get("data", {})
    _only(data, _DATA_KEYS, f"{path} [data]")
    base = raw.get("base", {})
    _only(base, _BASE_KEYS, f"{path} [base]")
    train_cfg = _dataclass_from(TrainConfig, base.get("train", {}), f"{path} [base.train]")
    arch = _base_arch(base, f"{path} [base]")
    max_drop = _max_drop(raw.get("max_drop", DEFAULT_MAX_DROP), f"{path}")

    variants: list[VariantConfig] = []
    seen = {"full"}
    for i, v in enumerate(raw.get("variants", [])):
        where = f"{path} variants[{i}]"
        _only(v, _VARIANT_KEYS, where)
        name, method = v.get("name"), v.get("method")
        if not isinstance(name, str) or not name or name in seen:
            raise ConfigError(f"{where}: name {name!r} must be a unique non-empty string")
        if v.get("base", "full") not in seen:
            raise ConfigError(f"{where}: base {v.get('base')!r} must name an earlier variant; "
                              f"earlier: {sorted(seen)}")
        params = registry.get(str(method)).parse(v.get("params", {}))
        variants.append(VariantConfig(name, str(method), v.get("base", "full"), params,
                                      _max_drop(v.get("max_drop", max_drop), where)))
        seen.add(name)

    val_f, test_f = float(data.get("val_fraction", 0.1)), float(data.get("test_fraction", 0.2))
    if not (0 < val_f < 0.5 and 0 < test_f < 0.5):
        raise ConfigError(f"{path} [data]: fractions must lie in (0, 0.5), got "
                          f"val_fraction={val_f!r}, test_fraction={test_f!r}")
    return BuildConfig(
        family=str(raw.get("family", path.stem)),
        seed=int(seed if seed is not None else raw.get("seed", 0)),
        data_spec=data_spec or str(data.get("spec", "mnist5k")),
        val_fraction=val_f, test_fraction=test_f,
        arch=arch, train=train_cfg, variants=tuple(variants), max_drop=max_drop)


def _base_arch(base: dict[str, Any], where: str) -> Spec:
    """The ``[base]`` table's architecture: a built-in spec, or the user's model (its factory is
    imported now; it is built and checked once the data's shape is known)."""
    if "model" not in base:
        if "model_args" in base:
            raise ConfigError(f"{where}: model_args {base['model_args']!r} needs model = "
                              "'package.module:factory'")
        arch_table = base.get("arch", {})
        defaults = DEFAULT_MLP if arch_table.get("kind") == "mlp" else DEFAULT_CNN
        return validate({**defaults, **arch_table})
    if "arch" in base:
        raise ConfigError(f"{where}: model {base['model']!r} (your network) and [base.arch] (a "
                          "built-in one) exclude each other; keep one")
    load_factory(base["model"], f"{where} model")
    args = base.get("model_args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: model_args must be a table, got {args!r}")
    return {"kind": "user", "factory": base["model"], "args": args}


def _max_drop(value: Any, where: str) -> float:
    """A ``max_drop`` value: accuracy points in [0, 100]; anything else names the bad value."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or not 0 <= value <= 100):
        raise ConfigError(f"{where}: max_drop must be a number of accuracy points in [0, 100] "
                          f"(e.g. 1.0), got {value!r}")
    return float(value)


def build(cfg: BuildConfig, out: str | Path, *, base_checkpoint: str | Path | None = None,
          cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Build the family described by ``cfg`` into ``out`` (replaced if it exists)."""
    t_start = time.perf_counter()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    ds = datasets.load(cfg.data_spec)
    splits = datasets.split(ds, seed=cfg.seed, val_fraction=cfg.val_fraction,
                            test_fraction=cfg.test_fraction)
    arch = _arch_for(cfg.arch, splits)
    model = _base_model(cfg, arch, splits, ds.fingerprint(), base_checkpoint, cache_dir, progress)

    ctx = BuildContext(splits=splits, seed=cfg.seed, train=cfg.train, built={}, progress=progress)
    variants: list[Variant] = []
    sections: list[str] = []
    skipped: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # Eager torch beside ORT for the full model: the report's case for serving on ORT.
    full_out = MethodOutput(model=model, spec=arch, details={
        "spec": arch, "torch_latency_ms": profile.torch_latency(model, splits.input_shape)})
    variants.append(_finish(ctx, tmp, "full", "full", None, {}, full_out, t0))
    for vc in cfg.variants:
        log.info("variant %s: method %s on %s (max_drop %g pt)", vc.name, vc.method, vc.base,
                 vc.max_drop)
        t0 = time.perf_counter()
        try:
            if vc.base not in ctx.built:
                raise Unsupported(f"its base {vc.base!r} was left out")
            result, chosen, trace = _search(ctx, vc)
        except Unsupported as exc:
            log.warning("variant %s left out: method %s cannot build it: %s", vc.name, vc.method,
                        exc)
            skipped.append({"name": vc.name, "method": vc.method, "base": vc.base,
                            "reason": str(exc)})
            continue
        v = _finish(ctx, tmp, vc.name, vc.method, vc.base, asdict(chosen), result, t0)
        variants.append(replace(v, details={**v.details, "search": _judge(ctx, vc, v, trace)}))
        if result.report_md:
            sections.append(f"## {vc.name}\n\n{result.report_md.strip()}\n")
    if skipped:
        sections.append("## Left out\n\n" + "".join(
            f"- `{s['name']}` ({s['method']} of `{s['base']}`): {s['reason']}\n" for s in skipped))

    # One paired latency profile of every variant as served: speed-ups are in-round ratios.
    variants, profiled = profile.profile_variants(tmp, variants, splits.input_shape)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "family": cfg.family,
        "dataset": {"spec": cfg.data_spec, "fingerprint": ds.fingerprint(),
                    "splits": {"train": len(splits.y_train), "val": len(splits.y_val),
                               "test": len(splits.y_test)}},
        "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": list(splits.input_shape),
                  "range": [0.0, 1.0],
                  # a user's model preprocesses by its own code, inside the graph all the same
                  "normalization": ({"in_graph": True, "by": "model"} if arch["kind"] == "user"
                                    else {**splits.normalization(), "in_graph": True})},
        "output": {"name": OUTPUT_NAME, "datatype": "FP32",
                   # folder: datasets name their classes (sorted folder names); others count
                   "classes": list(ds.class_names or (str(i) for i in range(splits.num_classes)))},
        "build": {"seed": cfg.seed, "seconds": round(time.perf_counter() - t_start, 1),
                  "host": _host(), "profile": profiled, "config": cfg.as_json(),
                  "base_checkpoint": _checkpoint_record(base_checkpoint)},
        "variants": variants,
        "skipped": skipped,
        # for a server to re-measure accuracy where it runs (`Family.validation`)
        "validation": write_validation(tmp, splits.x_val, splits.y_val, seed=cfg.seed),
    }
    write_manifest(tmp, manifest)
    report.write(tmp, manifest, variants, sections)
    load_family(tmp)  # verify what we wrote, exactly as the server will
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("family %r written to %s in %.0f s", cfg.family, out, time.perf_counter() - t_start)
    return out


# --- the accuracy target ---------------------------------------------------------------------

def _search(ctx: BuildContext, vc: VariantConfig) -> tuple[MethodOutput, Any, list[dict[str, Any]]]:
    """The strongest setting of the variant's knob whose validation accuracy is within
    ``vc.max_drop`` points of ``full``'s: (its output, its config, the trace of every try).

    Tries the configured setting, then the milder ones in the knob's order; where the knob is
    continuous, `BISECT_STEPS` more tries halve the gap between the last failure and the first
    pass. If no setting passes, the most accurate try is returned (`_judge` marks it).
    """
    method = registry.get(vc.method)
    knob = registry.knob(vc.params)
    full_val = ctx.variant("full").val_accuracy
    trace: list[dict[str, Any]] = []
    tries: list[tuple[Any, MethodOutput, float | None]] = []

    def attempt(config: Any) -> bool:
        t0 = time.perf_counter()
        seed_everything(ctx.seed)
        out = method.apply(ctx, ctx.variant(vc.base), config)
        val = _trial_val_accuracy(ctx, out)
        drop = None if val is None or full_val is None else 100 * (full_val - val)
        within = drop is None or drop <= vc.max_drop + 1e-9
        trace.append({"setting": knob.value(config) if knob else None,
                      "val_accuracy": None if val is None else round(val, 6),
                      "drop_pt": None if drop is None else round(drop, 3),
                      "within_max_drop": within,
                      "seconds": round(time.perf_counter() - t0, 1)})
        tries.append((config, out, val))
        log.info("variant %s: %s = %r → val accuracy %s (Δ %s pt vs full, max_drop %g): %s",
                 vc.name, knob.field if knob else "configured",
                 trace[-1]["setting"], "-" if val is None else f"{val:.4f}",
                 "-" if drop is None else f"{0.0 - drop:+.2f}", vc.max_drop,
                 "within" if within else "too far")
        return within

    passed: Any = None
    failed: Any = None
    for config in (knob.schedule(vc.params) if knob else [vc.params]):
        if attempt(config):
            passed = config
            break
        failed = config
    if knob is not None and passed is not None and failed is not None:
        for _ in range(BISECT_STEPS):
            mid = knob.between(failed, passed)
            if mid is None:
                break
            if attempt(mid):
                passed = mid
            else:
                failed = mid
    if passed is not None:
        i = next(i for i, (c, _, _) in enumerate(tries) if c is passed)
    else:  # nothing within: ship the most accurate try, marked
        i = max(range(len(tries)), key=lambda j: -1.0 if tries[j][2] is None else tries[j][2])
    trace[i]["chosen"] = True
    return tries[i][1], tries[i][0], trace


def _trial_val_accuracy(ctx: BuildContext, out: MethodOutput) -> float | None:
    """Validation accuracy of what a try would serve (the codecs are lossless, so the graph
    before encoding answers as the served one does; `_finish` measures the served one again)."""
    if out.val_accuracy is not None:
        return out.val_accuracy
    if out.stages is not None:
        return None
    graph = out.graph if out.graph is not None else export.to_onnx(out.model, ctx.input_shape)
    return _graph_accuracy(session(graph), ctx.splits.x_val, ctx.splits.y_val)


def _judge(ctx: BuildContext, vc: VariantConfig, v: Variant,
           trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's search record of ``v``: the served variant judged against ``full``."""
    full_val = ctx.variant("full").val_accuracy
    knob = registry.knob(vc.params)
    drop = (None if v.val_accuracy is None or full_val is None
            else round(100 * (full_val - v.val_accuracy), 3))
    within = drop is None or drop <= vc.max_drop + 1e-9
    chosen = next(t for t in trace if t.get("chosen"))
    if not within:
        log.warning("variant %s: no setting of %s meets max_drop %g pt (tried %s); shipping %r "
                    "at %.2f pt below full on validation, marked within_max_drop=false: the "
                    "server will not route to it", vc.name, knob.field if knob else "its method",
                    vc.max_drop, [t["setting"] for t in trace], chosen["setting"], drop)
    return {"knob": knob.field if knob else None, "max_drop_pt": vc.max_drop,
            "full_val_accuracy": full_val, "drop_pt": drop, "within_max_drop": within,
            "chosen": chosen["setting"], "trials": trace}


# --- base model ------------------------------------------------------------------------------

def _arch_for(arch: Spec, splits: datasets.Splits) -> Spec:
    """The config's architecture, fitted to the data's shape, class count and normalisation (a
    user's model normalises by its own code, if at all)."""
    fitted = {**arch, "input": list(splits.input_shape), "num_classes": splits.num_classes}
    if arch["kind"] != "user":
        fitted["normalize"] = splits.normalization()
    return validate(fitted)


def _check_user_model(model: nn.Module, arch: Spec) -> None:
    """A user's model must map [N, C, H, W] pixels to [N, classes] logits and export to ONNX;
    `ConfigError` otherwise, before any training."""
    where = f"[base] model {arch['factory']!r}"
    x = torch.zeros((2, *arch["input"]))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
        export.to_onnx(model, arch["input"])
    except Exception as exc:  # the user's forward, or the exporter on it
        raise ConfigError(f"{where} fails on input {list(x.shape)}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, arch["num_classes"]):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where} returns {got} for input {list(x.shape)}; expected logits "
                          f"[2, {arch['num_classes']}] (the dataset's class count)")


def _source_digest(arch: Spec, model: nn.Module) -> str | None:
    """For a user's model: sha256 of its factory's source file and of the module tree, so an
    edited network is retrained rather than served from the cache."""
    if arch["kind"] != "user":
        return None
    h = hashlib.sha256(repr(model).encode())
    path = inspect.getsourcefile(load_factory(arch["factory"]))
    if path is not None:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def _checkpoint_record(path: str | Path | None) -> dict[str, str] | None:
    """Which --base-checkpoint the family was built from (its file name and sha256)."""
    if path is None:
        return None
    return {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _base_model(cfg: BuildConfig, arch: Spec, splits: datasets.Splits, fingerprint: str,
                checkpoint: str | Path | None, cache_dir: str | Path | None,
                progress: bool) -> nn.Module:
    seed_everything(cfg.seed)
    model = build_model(arch)
    if arch["kind"] == "user":
        _check_user_model(model, arch)
    if checkpoint is not None:
        _load_state(model, Path(checkpoint))
        log.info("base model: loaded %s (test accuracy %.4f)", checkpoint,
                 accuracy(model, splits.x_test, splits.y_test))
        return model.eval()
    train_key = asdict(cfg.train)
    if not cfg.train.floor_binds(len(splits.x_train)):
        del train_key["min_steps_per_epoch"]  # no effect on this data: the same training
    key = hashlib.sha256(json.dumps(
        {"arch": arch, "train": train_key, "data": fingerprint, "seed": cfg.seed,
         "split": [cfg.val_fraction, cfg.test_fraction], "torch": torch.__version__,
         **({"source": digest} if (digest := _source_digest(arch, model)) else {})},
        sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(cache_dir or os.environ.get("ADAPTIVE_CACHE",
                                             Path.home() / ".cache" / "adaptive-inference"))
    cached = cache / f"base-{key}.safetensors"
    if cached.is_file():
        model.load_state_dict(load_file(cached))
        log.info("base model: reused cached %s", cached)
        return model.eval()
    result = train(model, splits, cfg.train, seed=cfg.seed, desc="base", progress=progress)
    log.info("base model: trained %d epochs, val accuracy %.4f", result.epochs_run,
             result.best_val_accuracy)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cached))
    return model.eval()


def _load_state(model: nn.Module, path: Path) -> None:
    """A user's state_dict: safetensors, or a torch file loaded with ``weights_only=True``."""
    if not path.is_file():
        raise ConfigError(f"--base-checkpoint {str(path)!r}: file not found")
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
        model.load_state_dict(state)
    except Exception as exc:  # any loader/shape error becomes one clear message
        raise ConfigError(f"--base-checkpoint {str(path)!r}: does not fit the base "
                          f"architecture ({exc})") from exc


# --- one variant -----------------------------------------------------------------------------

def _finish(ctx: BuildContext, root: Path, name: str, method: str, base: str | None,
            params: dict[str, Any], result: MethodOutput, t0: float) -> Variant:
    """Write a method's output, read it back as the server will, and measure it."""
    shape = ctx.input_shape
    if result.stages is not None:
        artifacts = [write_artifact(root, f"{name}/stage_{i}.onnx", g.SerializeToString(),
                                    role="stage", stage=i) for i, g in enumerate(result.stages)]
        graph = result.stages[-1]
        served = graph
    else:
        if result.graph is None and result.model is None:
            raise ValueError(f"method {method!r} returned neither a model nor a graph")
        graph = result.graph if result.graph is not None else export.to_onnx(result.model, shape)
        if result.graph is None and result.model is not None:
            export.check_against_torch(result.model, graph, shape)
        artifacts = _write_graph(root, name, graph, result)
        served = _read_back(root, artifacts)
    # Test accuracy for reports, validation accuracy for routing: the same served graph (or the
    # method's own measure of what it serves, e.g. the early-exit policy) on both splits.
    # Which test images it gets right (each exit's too), kept for paired tests against full.
    correct, exits = profile.correctness(served, result.stages, result.exits, ctx.splits.x_test,
                                         ctx.splits.y_test)
    acc = result.accuracy if result.accuracy is not None else float(correct.mean())
    sess = None
    if result.val_accuracy is not None:
        val_acc: float | None = result.val_accuracy
    elif result.stages is None:
        val_acc = _graph_accuracy(sess or session(served), ctx.splits.x_val, ctx.splits.y_val)
    else:
        val_acc = None
        log.warning("variant %s: method %s gave no validation accuracy", name, method)
    latency = result.latency_ms or {}  # build() profiles every variant together, paired
    model = result.model
    params_count = result.params_count if result.params_count is not None else (
        profile.count_params(model) if model is not None else 0)
    macs = result.macs if result.macs is not None else (
        profile.count_macs(model, shape) if model is not None else 0)
    ctx.built[name] = Built(name=name, model=model, spec=result.spec, graph=served, accuracy=acc,
                            val_accuracy=val_acc)
    v = Variant(name=name, method=method, params=params, artifacts=artifacts,
                accuracy=round(acc, 6), params_count=int(params_count), macs=int(macs),
                size_bytes=sum(a.bytes for a in artifacts), latency_ms=latency, base=base,
                exits=exits, details=result.details,
                build_seconds=round(time.perf_counter() - t0, 1),
                val_accuracy=None if val_acc is None else round(val_acc, 6),
                test_correct=stats.encode_bits(correct))
    log.info("variant %s: accuracy %.4f (val %s), %d params, %.1f M MACs, %d bytes (%.0f s)",
             name, acc, "-" if val_acc is None else f"{val_acc:.4f}", v.params_count,
             v.macs / 1e6, v.size_bytes, v.build_seconds)
    return v


def _graph_accuracy(sess: onnxruntime.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a served graph's session on one split."""
    return float((export.run(sess, x).argmax(1) == y).mean())


def _write_graph(root: Path, name: str, graph: onnx.ModelProto,
                 result: MethodOutput) -> list[Artifact]:
    if result.weights_codec is None:
        return [write_artifact(root, f"{name}/model.onnx", graph.SerializeToString())]
    # Encode the conv kernels and weight matrices; biases, BN, the normalisation constants and
    # any other constant stay dense in the graph.
    tensors = {k: v for k, v in export.layer_weights(graph).items()
               if result.codec_tensors is None or k in result.codec_tensors}
    blob = encoding.encode(result.weights_codec, tensors, **result.codec_options)
    return [write_artifact(root, f"{name}/model.onnx",
                           export.skeleton(graph, tensors).SerializeToString()),
            write_artifact(root, f"{name}/weights.aiw", blob, role="weights",
                           codec=result.weights_codec)]


def _read_back(root: Path, artifacts: list[Artifact]) -> onnx.ModelProto:
    """The served graph, rebuilt from the written files by the same path the server uses."""
    graph = onnx.load_from_string((root / artifacts[0].path).read_bytes())
    for a in artifacts[1:]:
        fill_initializers(graph, encoding.decode((root / a.path).read_bytes(), source=a.path),
                          source=a.path)
    return graph


# --- helpers ---------------------------------------------------------------------------------

def _only(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(allowed)}")


def _dataclass_from(cls: type, table: dict[str, Any], where: str) -> Any:
    _only(table, {f.name for f in fields(cls)}, where)
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _host() -> dict[str, Any]:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            # training's float sums depend on it: a rebuild matches only at the same count
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "batch_sizes": list(BATCH_SIZES)}
