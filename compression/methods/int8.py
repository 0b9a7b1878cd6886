"""``int8``: post-training static int8 quantization with ONNX Runtime's tooling (QDQ format).

Starts from any variant's served graph (``base``), so int8 composes with the others (e.g. int8 of
``pruned-neurons``). Steps: ORT's pre-processing (shape inference + graph optimisation), then
calibration on seeded training images to fix the activation ranges, then QuantizeLinear /
DequantizeLinear pairs around every quantizable op, weights int8 per output channel, activations
uint8. At load time ORT fuses each QDQ pattern into an integer kernel (QLinearConv, QGemm), which
is where the speed-up comes from. ``torch.ao.quantization`` is deprecated and torchao int8 on CPU
was slower than fp32 here (see DESIGN.md), hence ORT.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from compression import export, profile
from compression.core.ort import INPUT_NAME, session
from compression.core.stats import format_bits
from compression.registry import BuildContext, Built, Knob, MethodOutput, register

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}


@dataclass(frozen=True)
class Int8Config:
    strength: ClassVar[Knob] = Knob("per_channel", (False, True))  # per tensor, then per channel

    calibration_images: int = 256  # seeded training images that fix the activation ranges
    calibration_batch: int = 32
    calibrate_method: str = "minmax"
    per_channel: bool = True  # one weight scale per output channel (per tensor loses accuracy)
    preprocess: bool = True  # ORT's quant_pre_process before quantizing
    # The first conv sees one input channel: int8 gains nothing there (im2col of a 1-channel
    # image dominates) and its input range is the widest, so it stays fp32 by default.
    skip_first_conv: bool = True

    def __post_init__(self) -> None:
        if self.calibration_images < 1 or self.calibration_batch < 1:
            raise ValueError(f"calibration_images and calibration_batch must be ≥ 1, got "
                             f"{self.calibration_images!r}, {self.calibration_batch!r}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibrate_method must be one of {sorted(CALIBRATION_METHODS)}, "
                             f"got {self.calibrate_method!r}")


class ImageReader(CalibrationDataReader):
    """Feeds calibration images to ORT's calibrator, one batch per `get_next` call."""

    def __init__(self, images: np.ndarray, batch: int, input_name: str = INPUT_NAME):
        self._batches: Iterator[np.ndarray] = iter(
            [images[i:i + batch] for i in range(0, len(images), batch)])
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: np.ascontiguousarray(batch)}


def quantize(graph: onnx.ModelProto, images: np.ndarray, config: Int8Config) -> onnx.ModelProto:
    """A QDQ int8 copy of ``graph`` calibrated on ``images`` [N, C, H, W]."""
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(graph, src)
        if config.preprocess:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        else:
            pre = src
        convs = [n.name for n in onnx.load(pre).graph.node if n.op_type == "Conv"]
        quantize_static(
            str(pre), str(dst), ImageReader(images, config.calibration_batch),
            quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[config.calibrate_method],
            nodes_to_exclude=convs[:1] if config.skip_first_conv else [],
            # symmetric int8 weights: what the x86 integer kernels expect
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        return onnx.load(dst)


def op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in graph.graph.node))


@register("int8", Int8Config)
def apply(ctx: BuildContext, base: Built, config: Int8Config) -> MethodOutput:
    images = ctx.calibration_images(config.calibration_images)
    q = quantize(base.graph, images, config)
    ops = op_counts(q)
    if base.model is not None:
        params = profile.count_params(base.model)
        macs = profile.count_macs(base.model, ctx.input_shape)
    else:  # graph-only base: count the float weights it served; MACs are unknown
        params = sum(int(np.prod(t.dims)) for t in base.graph.graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT)
        macs = 0
        log.warning("int8 of %r: the base has no torch model, MACs are not counted", base.name)
    # agreement with the base on the calibration images: a cheap check that nothing broke
    fp32 = export.run(session(base.graph), images).argmax(1)
    int8 = export.run(session(q), images).argmax(1)
    agree = float((fp32 == int8).mean())
    report = (
        f"Static int8 (QDQ) of `{base.name}` with ONNX Runtime: {config.calibration_images} "
        f"calibration images, {config.calibrate_method} ranges, per-channel weights = "
        f"{config.per_channel}. {ops.get('QuantizeLinear', 0)} QuantizeLinear / "
        f"{ops.get('DequantizeLinear', 0)} DequantizeLinear nodes; top-1 agreement with "
        f"`{base.name}` on the {len(images)} calibration images (a sample of the training split) "
        f"{format_bits(fp32 == int8)} (95% Wilson).")
    return MethodOutput(graph=q, model=None, params_count=params, macs=macs, report_md=report,
                        details={"qdq_nodes": ops.get("QuantizeLinear", 0)
                                 + ops.get("DequantizeLinear", 0),
                                 "calibration_agreement": round(agree, 6)})
