"""Accuracy-targeted compression: ``max_drop``, the strength knobs, the search and its marks.

The search's logic is tested with a fake method of known accuracy per setting (exact, fast); the
real builds (the quick config's base, cached per session) check that a real back-off, an
impossible target and a per-variant override end up in the manifest, the report and the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from compression import registry
from compression.build import VariantConfig, _search, load_config
from compression.core.errors import ConfigError
from compression.core.family import load_family
from compression.data import Splits, load
from compression.methods import binary, clustered, distilled, low_rank, pruned_weights
from compression.models import build_model
from compression.registry import BuildContext, Built, Knob, MethodOutput
from compression.train import TrainConfig, seed_everything, train
from server.app import within_max_drop
from tests.build_configs import build_family, config_toml, one_torch_thread, variant

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "quick.toml"


def _config(tmp_path: Path, top: str, variants: str) -> Path:
    """The quick config with top-level keys in front (TOML: before any table) and variants."""
    path = tmp_path / "c.toml"
    path.write_text(top + "\n" + QUICK.read_text() + "\n" + variants)
    return path


# --- config ------------------------------------------------------------------------------------

INT8 = "[[variants]]\nname = 'a'\nmethod = 'int8'\n"


@pytest.mark.parametrize("value", ["-0.5", "101", "'1'", "true", "nan", "inf", "[1.0]"])
def test_bad_max_drop_is_a_config_error_naming_field_and_value(tmp_path: Path,
                                                               value: str) -> None:
    for top, variants in ((f"max_drop = {value}", INT8),
                          ("", INT8 + f"max_drop = {value}\n")):
        with pytest.raises(ConfigError) as err:
            load_config(_config(tmp_path, top, variants))
        message = str(err.value)
        assert "max_drop" in message and "[0, 100]" in message
        assert ("variants[0]" in message) == (top == "")  # the override names its variant
        parsed = {"-0.5": "-0.5", "101": "101", "'1'": "'1'", "true": "True", "nan": "nan",
                  "inf": "inf", "[1.0]": "[1.0]"}[value]
        assert f"got {parsed}" in message


def test_per_variant_max_drop_overrides_the_family_wide_value(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "max_drop = 2.5",
                              INT8 + "[[variants]]\nname = 'b'\nmethod = 'int8'\nmax_drop = 0\n"))
    assert cfg.max_drop == 2.5
    assert [(v.name, v.max_drop) for v in cfg.variants] == [("a", 2.5), ("b", 0.0)]
    assert cfg.as_json()["variants"][1]["max_drop"] == 0.0  # recorded in the manifest
    default = load_config(_config(tmp_path, "", INT8))
    assert default.max_drop == 1.0 and default.variants[0].max_drop == 1.0


def test_train_step_floor_is_validated_and_only_lengthens_small_epochs() -> None:
    cfg = TrainConfig(batch_size=64, min_steps_per_epoch=50)
    assert cfg.steps_per_epoch(3500) == 55 and not cfg.floor_binds(3500)  # mnist5k: unchanged
    assert cfg.steps_per_epoch(1257) == 50 and cfg.floor_binds(1257)  # digits: 20 → 50 steps
    with pytest.raises(ValueError, match=r"min_steps_per_epoch.*-1"):
        TrainConfig(min_steps_per_epoch=-1)


def test_an_epoch_makes_the_floors_steps_on_a_small_dataset_and_stays_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    splits = Splits(x, y, x[:8], y[:8], x[:8], y[:8], num_classes=2)
    spec = {"kind": "cnn", "input": [1, 8, 8], "num_classes": 2,
            "stages": [{"channels": 4, "depth": 1}]}

    def run(floor: int) -> tuple[int, list[torch.Tensor]]:
        steps = [0]
        seed_everything(0)
        model = build_model(spec)
        cfg = TrainConfig(epochs=2, batch_size=8, augment_shift=0, min_steps_per_epoch=floor)
        train(model, splits, cfg, seed=0, progress=False,
              after_step=lambda m: steps.__setitem__(0, steps[0] + 1))
        return steps[0], [p.detach().clone() for p in model.parameters()]

    assert run(0)[0] == 2 * 5  # 40 images / 8 per batch: 5 steps an epoch
    n, weights = run(12)
    assert n == 2 * 12  # the floor: 12 steps an epoch (2 shuffled passes, the second cut short)
    for a, b in zip(weights, run(12)[1], strict=True):  # same seed: the same model
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the knobs ---------------------------------------------------------------------------------

def _knob(config: object) -> Knob:
    k = registry.knob(config)
    assert k is not None, config
    return k


def _settings(config: object) -> list[object]:
    k = _knob(config)
    return [k.value(c) for c in k.schedule(config)]


def test_knob_schedule_starts_at_the_configured_setting_and_backs_off() -> None:
    pw = pruned_weights.PrunedWeightsConfig(sparsity=0.9)
    k = _knob(pw)
    assert k.field == "sparsity" and k.continuous
    assert _settings(pw) == [0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    # off the ladder: tried first, then the ladder's milder settings
    assert _settings(pruned_weights.PrunedWeightsConfig(sparsity=0.88)) == [
        0.88, 0.85, 0.8, 0.7, 0.6, 0.5]
    mid = k.between(pw, pruned_weights.PrunedWeightsConfig(sparsity=0.8))
    assert mid is not None and mid.sparsity == 0.85
    # rising ladders (a milder setting is larger) and discrete ones: no bisection
    assert _settings(clustered.ClusteredConfig(bits=4)) == [4, 5, 6, 8]
    assert _knob(clustered.ClusteredConfig()).between(
        clustered.ClusteredConfig(bits=4), clustered.ClusteredConfig(bits=5)) is None
    assert _settings(distilled.DistilledConfig()) == [1.0, 1.5, 2.0, 3.0]
    assert _settings(binary.BinaryConfig()) == ["none", "ends"]
    # the knob follows low-rank's criterion
    assert _knob(low_rank.LowRankConfig()).field == "param_ratio"
    assert _knob(low_rank.LowRankConfig(criterion="energy")).field == "energy"
    # the mildest setting has nothing to back off to
    assert _settings(distilled.DistilledConfig(width=3.0)) == [3.0]


def test_every_registered_method_declares_a_knob() -> None:
    for name in registry.names():
        config = registry.get(name).config_cls()
        k = registry.knob(config)
        assert k is not None, name
        assert k.value(config) is not None and len(k.schedule(config)) >= 1, name


def test_teacher_logits_are_memoised_for_every_try_and_variant_of_the_same_teachers() -> None:
    """A retry (or another variant taught by the same set) never runs the teacher again on a
    batch it has seen; a different teacher set gets its own memo."""
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return x.flatten(1)[:, :3] * 2

    x = torch.rand(4, 1, 2, 2)
    ctx = BuildContext(splits=None, seed=0, train=TrainConfig(), built={})  # type: ignore[arg-type]
    first = distilled.Teachers([Counting()], memo=distilled.teacher_memo(ctx, "full"))(x)
    again = distilled.Teachers([Counting()], memo=distilled.teacher_memo(ctx, "full"))(x)
    torch.testing.assert_close(first, again)
    assert calls == [4]
    distilled.Teachers([Counting()], memo=distilled.teacher_memo(ctx, "full", "pruned"))(x)
    assert calls == [4, 4]


# --- the search, on a fake method of known accuracy ----------------------------------------------

@dataclass(frozen=True)
class FakeConfig:
    strength: ClassVar[Knob] = Knob("level", (0.9, 0.7, 0.5, 0.3), continuous=True)
    level: float = 0.9


def _fake_val(level: float) -> float:
    """Full is at 0.95; every 0.1 of level above 0.4 costs one point."""
    return 0.95 - 0.1 * max(0.0, level - 0.4)


def _fake_apply(ctx: BuildContext, base: Built, config: FakeConfig) -> MethodOutput:
    ctx.memo.setdefault("calls", []).append(config.level)
    return MethodOutput(val_accuracy=_fake_val(config.level), accuracy=0.0,
                        details={"level": config.level})


@pytest.fixture
def fake_ctx(monkeypatch: pytest.MonkeyPatch) -> BuildContext:
    monkeypatch.setitem(registry._METHODS, "fake",
                        registry.Method("fake", FakeConfig, _fake_apply))
    x = np.zeros((4, 1, 4, 4), np.float32)
    y = np.zeros(4, np.int64)
    ctx = BuildContext(splits=Splits(x, y, x, y, x, y, num_classes=2), seed=0,
                       train=TrainConfig(), built={}, progress=False)
    ctx.built["full"] = Built(name="full", model=None, spec=None, graph=None,  # type: ignore[arg-type]
                              accuracy=0.95, val_accuracy=0.95)
    return ctx


@pytest.mark.parametrize("max_drop, tried, chosen", [
    (10.0, [0.9], 0.9),  # the configured setting passes: one try
    (2.5, [0.9, 0.7, 0.5, 0.6], 0.6),  # back off to 0.5, bisect to 0.6 which passes
    (1.5, [0.9, 0.7, 0.5, 0.6], 0.5),  # the bisection fails: 0.5 it is
    (0.0, [0.9, 0.7, 0.5, 0.3, 0.4], 0.4),  # down to 0.3, then 0.4 costs nothing either
])
def test_search_backs_off_to_the_strongest_setting_within_max_drop(
        fake_ctx: BuildContext, max_drop: float, tried: list[float], chosen: float) -> None:
    vc = VariantConfig("v", "fake", "full", FakeConfig(), max_drop)
    out, config, trace = _search(fake_ctx, vc)
    assert fake_ctx.memo["calls"] == tried
    assert [t["setting"] for t in trace] == tried
    assert config.level == chosen and out.details["level"] == chosen
    assert [t["setting"] for t in trace if t.get("chosen")] == [chosen]
    for t in trace:
        assert t["drop_pt"] == pytest.approx(100 * (0.95 - _fake_val(t["setting"])), abs=1e-3)
        assert t["within_max_drop"] == (t["drop_pt"] <= max_drop + 1e-9)


def test_search_that_never_passes_ships_the_most_accurate_try(fake_ctx: BuildContext) -> None:
    vc = VariantConfig("v", "fake", "full", FakeConfig(level=0.9), max_drop=0.0)
    fake_ctx.built["full"].val_accuracy = 0.99  # out of reach at every level
    _, config, trace = _search(fake_ctx, vc)
    assert [t["setting"] for t in trace] == [0.9, 0.7, 0.5, 0.3]
    assert not any(t["within_max_drop"] for t in trace)
    assert config.level == 0.3 and [t.get("chosen", False) for t in trace] == [
        False, False, False, True]


# --- real builds ---------------------------------------------------------------------------------

def real_config(npz: Path) -> str:
    # one 2-channel student at the mildest width (one try), built under max_drop 0 and 100
    tiny_student = {"width": 3.0, "epochs": 1, "compare_labels": False,
                    "student": {"stages": [{"channels": 2, "depth": 1},
                                           {"channels": 2, "depth": 1, "pool": True}]}}
    return config_toml(
        family="target", seed=0, max_drop=0.5,
        data=f"npz:{npz}",
        arch={"kind": "cnn", "stages": [{"channels": 8, "depth": 1},
                                        {"channels": 16, "depth": 1, "pool": True},
                                        {"channels": 16, "depth": 1, "pool": True}]},
        train={"epochs": 3, "lr": 5e-3, "augment_shift": 0},
        variants=[
            # 2 bits: 4 shared values per layer, and no fine-tune: far below full
            variant("clustered", bits=2, epochs=0),
            variant("distilled", max_drop=0.0, **tiny_student),
            variant("distilled-loose", "distilled", max_drop=100, **tiny_student),
        ])


@pytest.fixture(name="one_torch_thread")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_real_build_backs_off_marks_and_the_server_leaves_marked_variants_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    digits = load("mnist5k")  # 1,500 real digits: a small CNN learns them in seconds
    npz = tmp_path / "digits.npz"
    np.savez(npz, x=digits.x[:1500], y=digits.y[:1500])
    with caplog.at_level(logging.WARNING, logger="compression.build"):
        out = build_family(tmp_path, real_config(npz))
    fam = load_family(out)
    full_val = fam.variant("full").val_accuracy
    assert full_val is not None and full_val > 0.7

    # clustered: 2 bits fails, the search backs off to the first bit width within 0.5 pt
    s = fam.variant("clustered").details["search"]
    assert s["knob"] == "bits" and s["max_drop_pt"] == 0.5 and s["within_max_drop"] is True
    settings = [t["setting"] for t in s["trials"]]
    assert settings[0] == 2 and not s["trials"][0]["within_max_drop"]
    assert settings == sorted(settings) and s["chosen"] == settings[-1] > 2
    assert all(not t["within_max_drop"] for t in s["trials"][:-1])
    assert s["trials"][-1]["chosen"] and fam.variant("clustered").params["bits"] == s["chosen"]
    assert fam.variant("clustered").details["bits"] == s["chosen"]  # what was built
    served = fam.variant("clustered").val_accuracy
    assert served is not None and 100 * (full_val - served) <= 0.5 + 1e-9

    # distilled: a 2-channel student cannot match full: marked, with its drop, and logged
    d = fam.variant("distilled").details["search"]
    assert d["within_max_drop"] is False and d["drop_pt"] > 0 and len(d["trials"]) == 1
    assert any("distilled" in r.getMessage() and "within_max_drop=false" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    # the same student under a per-variant max_drop of 100 is within
    loose = fam.variant("distilled-loose").details["search"]
    assert loose["within_max_drop"] is True and loose["max_drop_pt"] == 100
    assert loose["drop_pt"] == d["drop_pt"]

    report = (out / "report.md").read_text()
    assert "## Accuracy target" in report and "not served by default: `distilled`" in report
    assert "### `clustered`: bits, max_drop 0.5 pt, within" in report
    # the server's view: the marked variant is gone, the others stay
    served_family = within_max_drop(fam)
    assert set(served_family.variants) == set(fam.variants) - {"distilled"}
