"""The finetune stage: artifacts, skip/rerun, resume after interruption and kill -9, strategies, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import load_model_artifact
from pipeline import artifacts, engine, finetune
from pipeline.data import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def _weights(path):
    return artifacts.torch_load(path)["state_dict"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_finetune_writes_artifacts_skips_and_reruns(make_config, tmp_path, capsys):
    cfg = make_config()
    out = finetune.run(cfg)
    stage = cfg.run_dir / "finetune"
    for name in ("teacher.pt", "metrics.json", "config.json", "curves.png", "confusion.png", "manifest.json"):
        assert (stage / name).stat().st_size > 0, name
    assert not (stage / "checkpoint.pt").exists()  # training state is removed once the manifest is written

    m = json.loads((stage / "metrics.json").read_text())
    assert m["test_accuracy"] == out["test_accuracy"]
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert len(m["history"]) == cfg.finetune.epochs
    assert [h["phase"] for h in m["history"]] == ["head", "full"]
    assert set(m["test"]["per_class"]) == set(m["classes"])
    assert sum(map(sum, m["test"]["confusion"])) == m["splits"]["test"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"]["teacher.pt"] == artifacts.sha256_file(stage / "teacher.pt")
    assert manifest["inputs"]["data"] == prepare_data(cfg, write=False).fingerprint

    # The artifact reloads (weights_only) with its preprocessing and labels, and gives the recorded accuracy.
    model, meta = load_model_artifact(stage / "teacher.pt")
    assert meta["classes"] == m["classes"] and meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert meta["extra"]["test_accuracy"] == m["test_accuracy"]

    mtime = (stage / "teacher.pt").stat().st_mtime_ns
    assert finetune.run(cfg)["skipped"] is True
    assert "up to date" in capsys.readouterr().out
    assert (stage / "teacher.pt").stat().st_mtime_ns == mtime

    # A damaged output is not "up to date"; neither is a changed config.
    (stage / "metrics.json").write_text("{}")
    assert finetune.run(cfg)["skipped"] is False
    cfg2 = make_config("finetune.lr=0.001")
    assert finetune.run(cfg2)["skipped"] is False


class Interrupt(Exception):
    pass


def test_resume_mid_epoch_gives_the_same_weights(make_config, tmp_path, monkeypatch):
    """Stop in the middle of an epoch of the second phase, rerun: final weights equal an uninterrupted run's.

    EfficientNet has dropout, so this also proves the RNG state is restored.
    """
    common = ("teacher.name=timm:efficientnet_lite0", "teacher.weights=none", "data.batch_size=4",
              "finetune.checkpoint_every_steps=1", "finetune.epochs=3", "finetune.head_epochs=1",
              "finetune.mixup_alpha=0.2", "finetune.cutmix_alpha=1.0")   # the mixing draws are resumed too
    ref = make_config(*common, run_dir=tmp_path / "ref")
    finetune.run(ref)

    cfg = make_config(*common, run_dir=tmp_path / "resumed")
    real = engine.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kw):  # the 2nd epoch (first of phase 'full') dies after 2 steps
        calls["n"] += 1
        if calls["n"] == 2:
            inner = kw["on_step"]

            def on_step(step):
                inner(step)
                if step == 2:
                    raise Interrupt()
            kw["on_step"] = on_step
        return real(*args, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    with pytest.raises(Interrupt):
        finetune.run(cfg)
    ckpt = engine.load_checkpoint(cfg.run_dir / "finetune" / "checkpoint.pt")
    assert (ckpt["state"]["epoch"], ckpt["state"]["step"]) == (1, 2)
    assert not (cfg.run_dir / "finetune" / "manifest.json").exists()
    monkeypatch.setattr(engine, "train_one_epoch", real)
    finetune.run(cfg)
    _assert_same_weights(_weights(ref.run_dir / "finetune" / "teacher.pt"),
                         _weights(cfg.run_dir / "finetune" / "teacher.pt"))


def _cli(run_dir, data_root, *extra):
    from conftest import FAST

    return [sys.executable, "-m", "pipeline", "finetune", f"run.dir={run_dir}", f"data.root={data_root}",
            *FAST, *extra]


def test_kill_9_then_rerun_completes_with_the_same_weights(tiny_data, tmp_path):
    extra = ("data.batch_size=4", "finetune.checkpoint_every_steps=1", "finetune.epochs=3")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    subprocess.run(_cli(tmp_path / "ref", tiny_data, *extra), check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)

    from conftest import kill_9_during

    run_dir = tmp_path / "killed"
    # somewhere in the middle of training, wherever that is
    if not kill_9_during(_cli(run_dir, tiny_data, *extra), ROOT, env, run_dir / "finetune" / "checkpoint.pt", 0.3):
        pytest.skip("the run finished before it could be killed (machine too fast)")
    assert not (run_dir / "finetune" / "manifest.json").exists()
    subprocess.run(_cli(run_dir, tiny_data, *extra), check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _assert_same_weights(_weights(tmp_path / "ref" / "finetune" / "teacher.pt"),
                         _weights(run_dir / "finetune" / "teacher.pt"))


def test_linear_probe_trains_only_the_head_and_keeps_bn_statistics(make_config):
    cfg = make_config("finetune.strategy=linear_probe", "finetune.epochs=1")
    torch.manual_seed(cfg.run.seed)
    from models import build_model, find_head

    before, _ = build_model(cfg.teacher.name, 3, cfg.teacher.weights)
    finetune.run(cfg)
    after, _ = load_model_artifact(cfg.run_dir / "finetune" / "teacher.pt")
    head, _ = find_head(after)
    a, b = before.state_dict(), after.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.startswith(head + ".") for k in changed), changed  # running stats included


def test_partial_freezes_the_first_blocks():
    from models import backbone_blocks, build_model

    model, _ = build_model("timm:resnet10t", 3, "none")
    blocks = backbone_blocks(model)
    head, backbone = finetune.set_trainable(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for b in blocks[:2] for n in b}
    assert head and backbone
    finetune.train_mode_keeping_frozen_bn(model)
    bns = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not m.training for m in bns) and any(m.training for m in bns)


def test_auto_strategy_follows_data_size_and_similarity():
    assert finetune.resolve_strategy("auto", [10, 12, 15], 0.9)[0] == "linear_probe"
    assert finetune.resolve_strategy("auto", [5000, 4000, 3000], 0.2)[0] == "full"
    similar, regime = finetune.resolve_strategy("auto", [200, 240, 250], 0.95)
    different, regime2 = finetune.resolve_strategy("auto", [200, 240, 250], 0.3)
    assert similar == different == "partial"
    assert regime["domain"] == "similar" and regime["frozen_fraction"] > regime2["frozen_fraction"]  # earlier layers train
    assert "similar" in regime["why"] and "different" in regime2["why"]
    assert finetune.resolve_strategy("partial", [10])[0] == "partial"
    cfg_ft = make_cfg_ft()
    phases = finetune.plan_phases("partial", cfg_ft, regime, n_blocks=9)
    assert phases == [{"name": "partial", "epochs": cfg_ft.epochs, "frozen_blocks": 6}]


def make_cfg_ft():
    from pipeline.config import FinetuneConfig

    return FinetuneConfig()


def test_auto_finetune_starts_from_the_probe_and_records_the_regime(make_config):
    cfg = make_config("finetune.strategy=auto", "finetune.epochs=1")
    out = finetune.run(cfg)
    m = json.loads((cfg.run_dir / "finetune" / "metrics.json").read_text())
    assert m["strategy"] == out["strategy"] and m["regime"]["why"] and m["regime"]["similarity"] is not None
    assert 0 <= m["probe"]["selection_accuracy"] <= 1 and m["probe"]["C"] > 0
    # its answers on the report split are kept, in order, for export's paired teacher-vs-probe comparison
    preds = m["probe"]["test_predictions"]
    assert len(preds) == m["split_roles"]["report"]["images"] and set(preds) <= set(range(len(m["classes"])))
    # the probe is the first candidate, and the teacher is the candidate with the lowest calibrated selection loss
    losses = [m["probe"]["selection_calibrated_loss"]] + [h["val_calibrated_loss"] for h in m["history"]]
    assert m["best_epoch"] == losses.index(min(losses)) - 1
    assert m["val"]["calibrated_loss"] == pytest.approx(min(losses), abs=1e-4)
    assert m["split_roles"]["selection"]["images"] == m["splits"]["val"]


def test_calibrated_loss_ignores_how_sharp_the_logits_are_but_not_how_well_they_separate():
    """Label smoothing trains softer logits: plain CE scores that down, the loss at the best temperature does not.
    10**-0.25 is 10 steps of the temperature grid, so the softened model's best temperature is on the grid too."""
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    logits = torch.randn(60, 3) + 1.5 * nn.functional.one_hot(labels, 3)  # some wrong: an interior temperature
    soft = logits * 10 ** -0.25
    (sharp_loss, sharp_t), (soft_loss, soft_t) = (engine.calibrated_loss(x, labels) for x in (logits, soft))
    assert soft_loss == pytest.approx(sharp_loss, abs=1e-6) and soft_t == pytest.approx(sharp_t * 10 ** -0.25)
    assert nn.functional.cross_entropy(soft, labels) != pytest.approx(nn.functional.cross_entropy(logits, labels))
    worse = logits.clone()
    worse[:10] = worse[:10].roll(1, dims=1)  # 10 images now ranked wrong
    assert engine.calibrated_loss(worse, labels)[0] > sharp_loss
    assert engine.classification_metrics(logits, labels, 3)["calibrated_loss"] == pytest.approx(sharp_loss)


@pytest.mark.parametrize("select_by, kept", [("calibrated_loss", 2), ("loss", 0), ("accuracy", 1)])
def test_the_best_candidate_is_chosen_by_finetune_select_by(make_config, tmp_path, monkeypatch, select_by, kept):
    """Scripted selection figures (loss, accuracy, calibrated loss) for the probe (-1) and epochs 0-2: each rule
    keeps its lowest score (-accuracy for accuracy), the earlier candidate on a tie; best.pt holds the kept one."""
    from types import SimpleNamespace

    figures = [(0.50, 0.80, 0.30), (0.40, 0.70, 0.35), (0.45, 0.90, 0.30), (0.60, 0.90, 0.25)]
    scripted = iter(figures)
    monkeypatch.setattr(engine, "evaluate_sharded",
                        lambda *a, **k: dict(zip(("loss", "accuracy", "calibrated_loss"), next(scripted))))
    cfg = make_config(f"finetune.select_by={select_by}")
    stage = SimpleNamespace(cfg=cfg, is_main=True, dir=tmp_path, device=torch.device("cpu"))
    data = SimpleNamespace(val=None, classes=["a", "b"])
    state = {"best_accuracy": -1.0, "best_score": float("inf"), "best_epoch": -1}
    model = torch.nn.Linear(2, 2)
    for epoch in (-1, 0, 1, 2):
        finetune.consider_best(stage, model, {}, data, state, epoch, "epoch", make_eval=object())
    assert state["best_epoch"] == kept
    extra = artifacts.torch_load(tmp_path / "best.pt")["extra"]
    loss, accuracy, calibrated = figures[kept + 1]
    score = {"calibrated_loss": calibrated, "loss": loss, "accuracy": -accuracy}[select_by]
    assert (extra["epoch"], extra["val_accuracy"], extra["selection_score"]) == (kept, accuracy, score)


def test_mixup_cutmix_train_on_soft_labels_and_count_accuracy_against_the_first_label():
    assert finetune.batch_mixer(3, 0.0, 0.0) is None
    mixer = finetune.batch_mixer(3, 0.2, 1.0)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    torch.manual_seed(1)
    loss, _, labels = finetune._ce(model, (x, y), 0.0, mixer)
    torch.manual_seed(1)   # the same draw: the batch the loss was computed on
    mixed, soft = mixer(x, y)
    assert torch.equal(labels, y) and not torch.equal(mixed, x)
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6)) and (soft.max(1).values < 1).all()
    expected = -(soft * model(mixed).log_softmax(1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain, _, _ = finetune._ce(model, (x, y), 0.0, None)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)


def test_warmup_cosine_schedule_shape():
    fn = engine.warmup_decay_lambda(100, 10, "cosine")
    values = [fn(s) for s in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert all(values[i] >= values[i + 1] for i in range(10, 99))
    assert values[-1] < 0.01
    step = engine.warmup_decay_lambda(100, 0, "step", step_size_steps=30, gamma=0.1)
    assert step(0) == 1.0 and step(30) == pytest.approx(0.1) and step(60) == pytest.approx(0.01)


def test_ddp_two_cpu_processes_with_gloo(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    from conftest import FAST

    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "finetune",
           f"run.dir={tmp_path / 'ddp'}", f"data.root={tiny_data}", *FAST, "data.batch_size=4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "finetune" / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert len(m["history"]) == 2
    model, meta = load_model_artifact(tmp_path / "ddp" / "finetune" / "teacher.pt")
    assert meta["num_classes"] == 3


def test_cli_help_and_config_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert out.returncode == 0 and "finetune" in out.stdout and "section.key=value" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline", "finetune", "finetune.epoch=3"], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and "finetune.epoch" in out.stderr and "epochs" in out.stderr


def test_cli_accepts_overrides_before_and_after_options(tmp_path):
    from pipeline import cli

    seen = {}

    def fake_run(cfg, force=False):
        seen.update(epochs=cfg.finetune.epochs, lr=cfg.finetune.lr, force=force)

    import pipeline.finetune as ft
    original = ft.run
    ft.run = fake_run
    try:
        assert cli.main(["finetune", "finetune.epochs=3", "--config", str(ROOT / "configs" / "default.yaml"),
                         "finetune.lr=0.01", "--force"]) == 0
    finally:
        ft.run = original
    assert seen == {"epochs": 3, "lr": 0.01, "force": True}
