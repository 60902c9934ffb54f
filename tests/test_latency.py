"""Latency-aware pruning (pipeline/latency.py): measuring a model's ONNX Runtime latency, pruning to a latency target,
the compress stage's curve, metrics and plot with measured latency."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models import build_model
from pipeline import compress, engine, latency
from pipeline.config import ConfigError

from test_compress import QUICK, make_teacher

SIZE = (3, 32, 32)


def fake_ms(macs: float) -> float:
    """A deterministic 'measurement': 0.2 ms of fixed cost + 1 ms per 10M MACs (not proportional to MACs)."""
    return 0.2 + macs / 1e7


def fake_measure(model, input_size=SIZE, cc=None) -> dict:
    macs = engine.count_macs(model, input_size)
    return {"latency_ms_b1": fake_ms(macs), "latency_ms_b32": 32 * fake_ms(macs), "latency_precision": "int8",
            "latency_runtime": "fake", "latency_threads": 1, "latency_seconds": 0.0}


def test_predict_macs_fits_a_line_with_a_fixed_cost():
    assert latency.predict_macs([(1e7, 2.0)], 1.0) == pytest.approx(5e6)  # one point: through the origin
    pts = [(m, fake_ms(m)) for m in (1e7, 2e7, 4e7)]
    assert latency.predict_macs(pts, fake_ms(3e6)) == pytest.approx(3e6, rel=1e-6)
    assert latency.predict_macs(pts, 0.1) == 0.0  # below the fixed cost: as small as it gets


def test_latency_keys_are_checked(make_config):
    for bad, match in ((("compress.target_latency_ms=2", "compress.target_latency_ratio=0.5"), "at most one"),
                       (("compress.target_latency_ratio=0.5", "compress.target_params_ratio=0.5"), "exclude"),
                       (("compress.target_latency_ratio=1.5",), "in \\(0, 1\\]"),
                       (("compress.target_latency_ms=0",), "> 0"),
                       (("compress.latency_batch=8",), "1 or 32")):
        with pytest.raises(ConfigError, match=match):
            compress.check_config(make_config(*bad))
    with pytest.raises(ConfigError, match="latency_precision"):
        make_config("compress.latency_precision=int4")
    compress.check_config(make_config("compress.target_latency_ms=2.5", "compress.latency_precision=fp32"))


def test_prune_to_latency_reaches_the_target_with_the_least_pruning(make_config):
    cc = make_config("compress.importance=magnitude").compress
    torch.manual_seed(0)
    model, _ = build_model("timm:efficientnet_lite0", 3, "none")
    macs0 = engine.count_macs(model, SIZE)
    target = fake_ms(0.55 * macs0)
    calls = []

    def measure(m):
        calls.append(engine.count_macs(m, SIZE))
        return fake_measure(m)

    pruned, hist, info = latency.prune_to_latency(model, fake_ms(macs0), target, SIZE, cc, measure,
                                                  [(macs0, fake_ms(macs0))])
    ms = fake_ms(engine.count_macs(pruned, SIZE))
    assert info["reached"] and hist and ms <= target
    assert ms >= target * 0.85  # not pruned far beyond what was asked
    assert info["latency"]["latency_ms_b1"] == pytest.approx(ms) and info["target_ms"] == target
    assert len(info["trials"]) == len(calls) <= latency.MAX_TRIALS
    assert engine.count_macs(model, SIZE) == macs0  # the input model is left as it was
    # already fast enough: nothing is pruned and nothing is measured
    n = len(calls)
    same, hist, info = latency.prune_to_latency(model, 0.5, 1.0, SIZE, cc, measure, [(macs0, 0.5)])
    assert same is model and hist == [] and info["reached"] and len(calls) == n


def test_an_unreachable_latency_is_reported_not_reached(make_config):
    cc = make_config("compress.max_layer_pruning_ratio=0.3", "compress.importance=magnitude").compress
    model, _ = build_model("timm:efficientnet_lite0", 3, "none")
    macs0 = engine.count_macs(model, SIZE)
    pruned, _, info = latency.prune_to_latency(model, fake_ms(macs0), 0.21, SIZE, cc, fake_measure,
                                               [(macs0, fake_ms(macs0))])
    assert not info["reached"] and info["trials"]
    assert fake_ms(engine.count_macs(pruned, SIZE)) == min(t["ms"] for t in info["trials"])  # the fastest


def test_a_failed_measurement_warns_for_the_curve_and_stops_a_latency_target(make_config, monkeypatch):
    from types import SimpleNamespace

    def broken(model, input_size, cc):
        raise ValueError("no exporter for this op")

    monkeypatch.setattr(latency, "measure_cc", broken)
    warnings = []
    stage = SimpleNamespace(is_main=True, warn=warnings.append)
    job = SimpleNamespace(stage=stage, input_size=SIZE, cc=make_config("compress.step_latency=true").compress)
    assert latency.measure_on_rank0(job, nn.Linear(2, 2)) is None
    assert "no exporter for this op" in warnings[0] and "step_latency" in warnings[0]
    job.cc = make_config("compress.target_latency_ms=1.0").compress
    with pytest.raises(RuntimeError, match="target_latency_ms"):
        latency.measure_on_rank0(job, nn.Linear(2, 2))


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_measure_model_latency_exports_quantizes_and_times(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    lat = latency.measure_model_latency(model, (3, 16, 16), precision, threads=1, runs=2, rounds=1)
    assert lat["latency_ms_b1"] > 0 and lat["latency_ms_b32"] > 0
    assert lat["latency_precision"] == precision and "onnxruntime" in lat["latency_runtime"]
    assert model.training  # measured on a copy: the caller's model is untouched


def test_compress_records_measured_latency_per_step_and_plots_it(make_config):
    """A MACs target with compress.step_latency=true: every step's int8 latency measured for real (ONNX Runtime)."""
    cfg = make_config(*QUICK, "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0", "compress.step_latency=true",
                      "compress.latency_threads=1")
    make_teacher(cfg)
    compress.run(cfg)
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    curve = m["pruning_curve"]
    assert [c["step"] for c in curve] == [0, 1, 2]
    for c in curve:
        assert c["latency_ms_b1"] > 0 and c["latency_ms_b32"] > 0 and c["latency_precision"] == "int8"
    assert m["achieved"]["latency_ratio"] == pytest.approx(curve[2]["latency_ms_b1"] / curve[0]["latency_ms_b1"])
    assert m["achieved"]["target_by"] == "macs" and m["achieved"]["target_reached"]
    assert (cfg.run_dir / "compress" / "pruning_curve.png").stat().st_size > 0


def test_compress_prunes_to_a_latency_target(make_config, monkeypatch):
    """compress.target_latency_ratio: the stage prunes until the (here simulated, deterministic) measured latency is
    at most the target, records the trials, and says whether it reached it."""
    monkeypatch.setattr(latency, "measure_cc", lambda model, input_size, cc: fake_measure(model, input_size))
    cfg = make_config(*QUICK, "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0", "compress.target_latency_ratio=0.6")
    make_teacher(cfg)
    compress.run(cfg)
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    curve, achieved = m["pruning_curve"], m["achieved"]
    assert achieved["target_by"] == "latency" and achieved["target_reached"]
    assert achieved["latency_ratio"] <= 0.6 + 1e-9 and achieved["latency_ratio"] == pytest.approx(
        curve[-1]["latency_ms_b1"] / curve[0]["latency_ms_b1"])
    assert curve[-1]["target_latency_ms"] == pytest.approx(0.6 * curve[0]["latency_ms_b1"])
    assert all(c["latency_trials"] for c in curve[1:])
    # the pruned model's MACs give the measured latency (the simulated timer is a function of MACs)
    assert curve[-1]["latency_ms_b1"] == pytest.approx(fake_ms(m["pruned"]["macs"]))


# ----------------------------------------------------------------------------- channel alignment for int8 kernels

def test_channel_multiple_is_the_lcm_for_depthwise_layers(make_config):
    cc = make_config().compress
    assert (cc.round_to, cc.depthwise_round_to) == (8, 16)
    assert compress.channel_multiple(cc, depthwise=True) == 16 and compress.channel_multiple(cc, False) == 8
    cc = make_config("compress.round_to=12", "compress.depthwise_round_to=16").compress
    assert compress.channel_multiple(cc, True) == 48 and compress.channel_multiple(cc, False) == 12
    cc = make_config("compress.depthwise_round_to=0").compress
    assert compress.channel_multiple(cc, True) == 8
    with pytest.raises(ConfigError, match="depthwise_round_to"):
        compress.check_config(make_config("compress.depthwise_round_to=-1"))


@pytest.mark.parametrize("dw_round", [16, 0])
def test_pruned_depthwise_channels_are_multiples_of_16(make_config, dw_round):
    """ONNX Runtime's x86 int8 depthwise kernel needs multiples of 16 channels (issue #13): the depthwise convs and
    the layers tied to them get them, every other layer keeps compress.round_to (8); without the key they don't."""
    cc = make_config(f"compress.depthwise_round_to={dw_round}", "compress.importance=magnitude").compress
    torch.manual_seed(0)
    model, _ = build_model("timm:efficientnet_lite0", 3, "none")
    base = engine.count_macs(model, SIZE)
    for k in (1, 2):
        model, _, info = compress.prune_to(model, base * 0.5 ** (k / 2), SIZE, cc)
        assert info["reached"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    dw = [c.out_channels for c in convs if c.groups > 1]
    assert all(c.out_channels % 8 == 0 for c in convs)
    if dw_round:
        assert all(c % 16 == 0 for c in dw), dw
        assert engine.count_macs(model, SIZE) <= 0.5 * base
    else:
        assert any(c % 16 for c in dw), dw  # what the key prevents
