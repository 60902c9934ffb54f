"""The compress stage: KD loss math, pruning to a target, reload without pickle, resume, budget, skip/rerun."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model, find_head, load_model_artifact, rebuild_pruned, save_model_artifact
from pipeline import artifacts, compress, engine
from pipeline.config import ConfigError
from pipeline.data import prepare_data, teacher_preprocessing
from pipeline.stage import StageError

ROOT = Path(__file__).resolve().parents[1]
# Fast settings for every stage run here: one short distillation epoch, two pruning steps, few timed runs.
QUICK = ("compress.max_steps_per_epoch=2", "compress.latency_runs=2")


def make_teacher(cfg, seed: int = 0) -> Path:
    """A teacher.pt as finetune would write it (random init: the tests check mechanics, not accuracy)."""
    data = prepare_data(cfg)
    torch.manual_seed(seed)
    model, pretrained = build_model(cfg.teacher.name, len(data.classes), "none")
    path = cfg.run_dir / "finetune" / "teacher.pt"
    save_model_artifact(path, model, name=cfg.teacher.name, classes=data.classes,
                        preprocessing=teacher_preprocessing(pretrained, cfg))
    artifacts.write_manifest(path.parent, "finetune", "test", {}, ["teacher.pt"], {})
    return path


def _state(path):
    return artifacts.torch_load(path)["state_dict"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{k} differs"


# ----------------------------------------------------------------------------- KD loss

def test_kd_loss_matches_hand_computed_values():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    # T=1: p_t = (3/4, 1/4), p_s = (1/2, 1/2); KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120; CE = ln 2
    kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl1 == pytest.approx(0.1308120, abs=1e-6)
    assert compress.kd_loss(s, t, y, 1.0, 0.5).item() == pytest.approx(0.5 * kl1 + 0.5 * math.log(2), abs=1e-6)
    assert compress.kd_loss(s, t, y, 1.0, 0.5).item() == pytest.approx(0.4119796, abs=1e-6)
    # T=2: p_t = (sqrt3, 1) / (sqrt3 + 1); KL * T^2 = 4 * 0.0363408; alpha 0.7 -> 0.3096983
    r3 = math.sqrt(3.0)
    pt = (r3 / (r3 + 1), 1 / (r3 + 1))
    kl2 = pt[0] * math.log(2 * pt[0]) + pt[1] * math.log(2 * pt[1])
    assert kl2 == pytest.approx(0.0363408, abs=1e-6)
    expected = 0.7 * 4 * kl2 + 0.3 * math.log(2)
    assert compress.kd_loss(s, t, y, 2.0, 0.7).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.3096983, abs=1e-6)
    # alpha = 0 is plain cross-entropy (no teacher needed); identical logits give a zero KD term
    assert compress.kd_loss(s, None, y, 4.0, 0.0).item() == pytest.approx(math.log(2), abs=1e-7)
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    ce = nn.functional.cross_entropy(logits, labels).item()
    assert compress.kd_loss(logits, logits.clone(), labels, 3.0, 0.6).item() == pytest.approx(0.4 * ce, abs=1e-6)
    # batchmean: the loss of a batch is the mean of the per-sample losses
    two = compress.kd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([y, y]), 2.0, 0.7).item()
    assert two == pytest.approx(expected, abs=1e-6)


def test_distillation_task_keeps_the_teacher_frozen_and_uses_the_cache():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    teacher.train()  # the task must put it in eval mode itself
    stats = teacher[1].running_mean.clone()
    task = compress.DistillationTask(teacher, 2.0, 0.7, 3, two_views=True)
    x_s, x_t, y = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 10, 10), torch.randint(0, 3, (6,))
    loss, logits, labels = task(student, [x_s, x_t, y])
    loss.backward()
    assert not teacher.training and torch.equal(teacher[1].running_mean, stats)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    with torch.no_grad():
        want = compress.kd_loss(student(x_s), teacher(x_t), y, 2.0, 0.7)  # the teacher saw its own view
    assert loss.item() == pytest.approx(want.item(), abs=1e-6) and torch.equal(labels, y)

    # cached logits: labels carry the sample index, the teacher is not run
    cache = torch.randn(10, 3)
    cached = compress.DistillationTask(None, 2.0, 0.7, 3, cached_logits=cache)
    samples = compress.index_labels([(f"img{i}", i % 3) for i in range(10)], 3)
    idx = torch.tensor([7, 2, 9])
    enc = torch.tensor([samples[i][1] for i in idx])
    loss, _, labels = cached(student, [x_s[:3], enc])
    assert torch.equal(labels, idx % 3)
    with torch.no_grad():
        want = compress.kd_loss(student(x_s[:3]), cache[idx], idx % 3, 2.0, 0.7)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)


def test_teacher_logit_cache_needs_unaugmented_data(make_config):
    cfg = make_config("compress.cache_teacher_logits=true")  # conftest data augments (scale_min 0.35, hflip)
    with pytest.raises(ConfigError, match="cache_teacher_logits.*augment"):
        compress.run(cfg)


def test_missing_teacher_names_make_finetune(make_config):
    with pytest.raises(StageError, match="make finetune"):
        compress.run(make_config())


def test_unfinished_or_changed_upstream_is_refused(make_config):
    cfg = make_config()
    path = make_teacher(cfg)
    (path.parent / "manifest.json").unlink()  # finetune killed or rerunning: teacher.pt may be stale
    with pytest.raises(StageError, match="has not finished.*make finetune"):
        compress.run(cfg)
    make_teacher(cfg)
    blob = artifacts.torch_load(path)
    blob["extra"]["edited"] = True  # content changed after finetune wrote it, whatever its mtime says
    artifacts.torch_save(blob, path)
    with pytest.raises(StageError, match="changed after the finetune stage wrote it"):
        compress.run(cfg)


# ----------------------------------------------------------------------------- pruning (unit level)

@pytest.mark.parametrize("importance", ["magnitude", "bn_scale"])
def test_prune_to_target_keeps_head_rounds_channels_and_reloads_exactly(make_config, tmp_path, importance):
    cfg = make_config(f"compress.importance={importance}")
    torch.manual_seed(0)
    model, pre = build_model("timm:efficientnet_lite0", 3, "pypi")
    size = (3, 32, 32)
    base = engine.count_macs(model, size)
    history = []
    for k in (1, 2):  # two steps, like the stage: each one a fresh pruner on the already pruned model
        model, hist, info = compress.prune_to(model, base * 0.5 ** (k / 2), size, cfg.compress)
        assert info["reached"]
        history += hist
    assert engine.count_macs(model, size) <= 0.5 * base
    assert engine.count_macs(model, size) >= 0.3 * base  # the smallest ratio that reaches it, not overshooting
    head = find_head(model)[1]
    assert head.out_features == 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)

    path = tmp_path / "pruned.pt"
    save_model_artifact(path, model, name="timm:efficientnet_lite0", classes=["a", "b", "c"],
                        preprocessing={**pre, "input_size": list(size)}, pruning_history=history)
    blob = artifacts.torch_load(path)  # weights_only=True: plain values and tensors, no pickled modules
    assert blob["pruning_history"] and all(isinstance(h[2], list) for h in blob["pruning_history"])
    reloaded, meta = load_model_artifact(path)
    assert meta["pruning_history"] == blob["pruning_history"]
    _assert_same_weights(model.state_dict(), reloaded.state_dict())
    x = torch.randn(3, *size)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    # and the same by hand: name + history replayed on a fresh model + state_dict
    fresh, _ = build_model("timm:efficientnet_lite0", 3, "none")
    rebuild_pruned(fresh, blob["pruning_history"], size)
    fresh.load_state_dict(blob["state_dict"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), reloaded(x))


def test_prune_to_params_target(make_config):
    cfg = make_config("compress.importance=magnitude")  # taylor needs the gradients prune_step computes
    model, _ = build_model("timm:efficientnet_lite0", 3, "none")
    base = engine.count_params(model)
    pruned, _, info = compress.prune_to(model, 0.6 * base, (3, 32, 32), cfg.compress, by="params")
    assert info["reached"] and engine.count_params(pruned) <= 0.6 * base
    assert engine.count_params(model) == base  # the input model is left as it was


# ----------------------------------------------------------------------------- the stage

def test_compress_writes_artifacts_reaches_target_skips_and_reruns(make_config, capsys):
    # The accuracy budget is open here (random teacher, tiny data): with it, reaching the target is what the
    # code guarantees (bisection on measured MACs), on any machine.
    # the teacher at its own input size (finetune.image_size), the student at data.image_size: each its own view
    cfg = make_config(*QUICK, "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0", "finetune.image_size=40")
    make_teacher(cfg)
    out = compress.run(cfg)
    stage = cfg.run_dir / "compress"
    for name in ("student.pt", "pruned.pt", "metrics.json", "config.json", "pruning_curve.png", "manifest.json"):
        assert (stage / name).stat().st_size > 0, name
    assert not (stage / "checkpoint.pt").exists()
    m = json.loads((stage / "metrics.json").read_text())
    for role in ("teacher", "student", "pruned"):
        for key in ("val_accuracy", "test_accuracy", "params", "macs"):  # latency: measured once, by export
            assert isinstance(m[role][key], (int, float)), (role, key)
    assert m["pruned"]["macs"] <= 0.5 * m["student"]["macs"] and m["achieved"]["target_reached"]
    assert m["achieved"]["macs_ratio"] == pytest.approx(out["macs_ratio"])
    assert [c["step"] for c in m["pruning_curve"]] == [0, 1, 2]
    assert m["pruning_curve"][-1]["macs"] == m["pruned"]["macs"]
    assert all("val_accuracy_before_recovery" in c and "val_accuracy_after_recovery" in c for c in m["pruning_curve"])
    assert m["kd"]["separate_teacher_preprocessing"] is True  # resnet10t (ImageNet mean/std) vs lite0 (0.5)
    assert m["preprocessing"]["teacher"]["input_size"] == [3, 40, 40]
    assert m["preprocessing"]["student"]["input_size"] == [3, 32, 32]
    # every pruning step's model is kept (export may fall back to less pruning), and the student's probe
    assert [c["file"] for c in m["steps"]] == ["student.pt", "pruned_step1.pt", "pruned_step2.pt"]
    assert m["probe"]["C"] > 0 and 0 <= m["probe"]["selection_accuracy"] <= 1
    for name in ("pruned_step1.pt", "pruned_step2.pt", "probe_student.pt"):
        load_model_artifact(stage / name)
    _assert_same_weights(_state(stage / "pruned_step2.pt"), _state(stage / "pruned.pt"))
    # frozen BatchNorm statistics (the photo default) are what every layer was trained against: a pruned model keeps
    # the student's, per layer, for the channels it kept, instead of re-estimating them (compress.recalibrates_bn)
    assert [c.get("bn_recalibrated") for c in m["pruning_curve"]] == [None, False, False]
    student_state = _state(stage / "student.pt")
    for key, stat in _state(stage / "pruned_step2.pt").items():
        if key.endswith(("running_mean", "running_var")):
            assert torch.isin(stat, student_state[key]).all(), key
    assert json.loads((stage / "config.json").read_text())["compress"]["target_macs_ratio"] == 0.5
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["inputs"]["teacher.pt"] == artifacts.sha256_file(cfg.run_dir / "finetune" / "teacher.pt")
    assert manifest["outputs"]["pruned.pt"] == artifacts.sha256_file(stage / "pruned.pt")
    assert {"pruned_step1.pt", "pruned_step2.pt", "probe_student.pt"} <= set(manifest["outputs"])
    printed = capsys.readouterr().out
    assert "params / MACs before -> after" in printed and "selection" in printed

    pruned, meta = load_model_artifact(stage / "pruned.pt")
    assert meta["pruning_history"] and find_head(pruned)[1].out_features == 3
    assert engine.count_macs(pruned, (3, 32, 32)) == m["pruned"]["macs"]
    student, smeta = load_model_artifact(stage / "student.pt")
    assert smeta["pruning_history"] is None and engine.count_params(student) == m["student"]["params"]

    mtime = (stage / "pruned.pt").stat().st_mtime_ns
    assert compress.run(cfg)["skipped"] is True
    assert "up to date" in capsys.readouterr().out
    assert (stage / "pruned.pt").stat().st_mtime_ns == mtime

    make_teacher(cfg, seed=1)  # a new teacher: rerun
    assert compress.run(cfg)["skipped"] is False
    cfg2 = make_config(*QUICK, "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0", "compress.alpha=0.5")  # a changed config: rerun
    assert compress.run(cfg2)["skipped"] is False


class Interrupt(Exception):
    pass


def test_resume_after_interruptions_gives_the_same_weights(make_config, tmp_path, monkeypatch):
    """Interrupted mid-distillation, between pruning steps, and mid-recovery: same final weights.

    EfficientNet-Lite0 has dropout and the data is augmented, so this also checks RNG and data order restore.
    """
    common = ("data.batch_size=4", "compress.checkpoint_every_steps=1", "compress.max_steps_per_epoch=3",
              "compress.latency_runs=2", "run.max_accuracy_drop=1.0",
              "compress.max_accuracy_drop=1.0")  # budgets open: every step runs, whatever the accuracy
    ref = make_config(*common, run_dir=tmp_path / "ref")
    make_teacher(ref)
    compress.run(ref)

    cfg = make_config(*common, run_dir=tmp_path / "resumed")
    make_teacher(cfg)
    ckpt_path = cfg.run_dir / "compress" / "checkpoint.pt"
    real_train, real_prune = engine.train_one_epoch, compress.prune_to

    def train_dying_after(n_call: int, at_step: int):
        calls = {"n": 0}

        def train(*args, **kw):
            calls["n"] += 1
            if calls["n"] == n_call:
                inner = kw["on_step"]

                def on_step(step):
                    inner(step)
                    if step == at_step:
                        raise Interrupt()
                kw["on_step"] = on_step
            return real_train(*args, **kw)
        return train

    # 1. in the middle of the distillation epoch
    monkeypatch.setattr(engine, "train_one_epoch", train_dying_after(1, 2))
    with pytest.raises(Interrupt):
        compress.run(cfg)
    ck = engine.load_checkpoint(ckpt_path)
    assert (ck["state"]["phase"], ck["state"]["epoch"], ck["state"]["step"]) == ("distill", 0, 2)
    monkeypatch.setattr(engine, "train_one_epoch", real_train)

    # 2. between pruning steps: step 1 done and recovered, step 2 not pruned yet
    calls = {"n": 0}

    def prune_dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt()
        return real_prune(*args, **kw)
    monkeypatch.setattr(compress, "prune_to", prune_dying)
    with pytest.raises(Interrupt):
        compress.run(cfg)
    ck = engine.load_checkpoint(ckpt_path)
    assert (ck["state"]["phase"], ck["state"]["prune_step"], ck["state"]["recovering"]) == ("prune", 1, False)
    assert ck["state"]["history"]  # the pruned model travels as state_dict + pruning history
    monkeypatch.setattr(compress, "prune_to", real_prune)

    # 3. in the middle of step 2's recovery epoch (the model in the checkpoint is pruned twice)
    monkeypatch.setattr(engine, "train_one_epoch", train_dying_after(1, 1))
    with pytest.raises(Interrupt):
        compress.run(cfg)
    ck = engine.load_checkpoint(ckpt_path)
    assert (ck["state"]["prune_step"], ck["state"]["recovering"], ck["state"]["step"]) == (1, True, 1)
    assert not (cfg.run_dir / "compress" / "manifest.json").exists()
    monkeypatch.setattr(engine, "train_one_epoch", real_train)

    compress.run(cfg)
    for name in ("student.pt", "pruned.pt"):
        _assert_same_weights(_state(ref.run_dir / "compress" / name), _state(cfg.run_dir / "compress" / name))
    a = json.loads((ref.run_dir / "compress" / "metrics.json").read_text())
    b = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    assert [c["macs"] for c in a["pruning_curve"]] == [c["macs"] for c in b["pruning_curve"]]


def test_resume_after_a_finished_recovery_does_not_reuse_its_optimizer(make_config, tmp_path, monkeypatch):
    """Killed after step 1's last recovery epoch was checkpointed, before its judgement: the rerun has no step-1
    training left, and step 1's optimizer state (other tensor shapes) must not be loaded into step 2's recovery.
    A real kill -9 once landed here ("The size of tensor a (1056) must match the size of tensor b (832)")."""
    common = ("data.batch_size=4", "compress.checkpoint_every_steps=1", "compress.max_steps_per_epoch=3",
              "compress.latency_runs=2", "run.max_accuracy_drop=1.0", "compress.max_accuracy_drop=1.0")
    ref = make_config(*common, run_dir=tmp_path / "ref")
    make_teacher(ref)
    compress.run(ref)

    cfg = make_config(*common, run_dir=tmp_path / "resumed")
    make_teacher(cfg)

    def judge_dying(self, k):
        raise Interrupt()
    real_judge = compress.Compression.judge
    monkeypatch.setattr(compress.Compression, "judge", judge_dying)
    with pytest.raises(Interrupt):
        compress.run(cfg)
    ck = engine.load_checkpoint(cfg.run_dir / "compress" / "checkpoint.pt")
    assert (ck["state"]["prune_step"], ck["state"]["recovering"]) == (0, True) and ck["optimizer"] is not None
    monkeypatch.setattr(compress.Compression, "judge", real_judge)

    compress.run(cfg)
    for name in ("student.pt", "pruned.pt"):
        _assert_same_weights(_state(ref.run_dir / "compress" / name), _state(cfg.run_dir / "compress" / name))


def test_budget_stops_pruning_and_keeps_the_last_good_model(make_config, monkeypatch, capsys):
    """A step that breaks compress.max_accuracy_drop after recovery is discarded and pruning stops.

    Val accuracy is scripted per model size (unpruned 0.90, after step 1 0.89, after step 2 0.50) so the
    decision is deterministic. Also runs the teacher-logit cache (allowed here: augmentation off).
    """
    cfg = make_config(*QUICK, "compress.pruning_steps=3", "compress.max_accuracy_drop=0.02", "compress.backoff=false",
                      "compress.cache_teacher_logits=true", "data.scale_min=1.0", "data.hflip=false",
                      "data.auto_augment=none")
    make_teacher(cfg)
    seen: list[int] = []

    def scripted(model, *args, **kw):  # (model, samples, make_loader, device, num_classes, amp)
        n = engine.count_params(model)
        if n not in seen:
            seen.append(n)
        return [0.90, 0.89, 0.50, 0.40][seen.index(n)]
    monkeypatch.setattr(compress, "_val_accuracy", scripted)
    monkeypatch.setattr(compress, "_teacher_accuracy", lambda *a, **k: 0.90)
    out = compress.run(cfg)
    assert out["budget_stopped"] is True
    printed = capsys.readouterr().out
    assert "BUDGET" in printed and "keeping the model of step 1" in printed
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    assert m["budget"]["stopped"] and m["budget"]["kept_step"] == 1 and "step 2" in m["budget"]["message"]
    assert [c["step"] for c in m["pruning_curve"]] == [0, 1, 2]  # step 3 never ran
    assert [c["within_budget"] for c in m["pruning_curve"]] == [True, True, False]
    assert m["pruned"]["params"] == m["pruning_curve"][1]["params"]
    assert m["achieved"]["target_reached"] is False
    assert m["kd"]["teacher_logits_cached"] is True
    pruned, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned.pt")
    assert engine.count_macs(pruned, (3, 32, 32)) == m["pruning_curve"][1]["macs"]
    assert meta["extra"]["pruning_step"] == 1
    manifest = json.loads((cfg.run_dir / "compress" / "manifest.json").read_text())
    assert manifest["budget_stopped"] is True


def test_ddp_two_cpu_processes_with_gloo(make_config, tiny_data, tmp_path):
    from conftest import FAST

    run_dir = tmp_path / "ddp"
    make_teacher(make_config(run_dir=run_dir))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "compress",
           f"run.dir={run_dir}", f"data.root={tiny_data}", *FAST, "data.batch_size=4", *QUICK,
           "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0"]  # budget open: the test is about the ranks, not accuracy
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((run_dir / "compress" / "metrics.json").read_text())
    # Both ranks pruned the same channels (the stage raises "differs between DDP ranks" otherwise), every
    # step ran, and the artifact rebuilds from name + history with the MACs the metrics report.
    assert m["world_size"] == 2 and [c["step"] for c in m["pruning_curve"]] == [0, 1, 2]
    assert m["achieved"]["target_reached"]
    pruned, _ = load_model_artifact(run_dir / "compress" / "pruned.pt")
    assert engine.count_macs(pruned, (3, 32, 32)) == m["pruned"]["macs"]


def test_kill_9_at_a_random_moment_then_rerun_gives_the_same_weights(make_config, tiny_data, tmp_path):
    """A real SIGKILL somewhere after the first checkpoint (distillation, pruning or recovery), then the same command."""
    import random

    from conftest import FAST

    common = ("data.batch_size=4", "compress.checkpoint_every_steps=1", "compress.max_steps_per_epoch=3",
              "compress.latency_runs=2", "run.max_accuracy_drop=1.0",
              "compress.max_accuracy_drop=1.0")  # budgets open: every step runs, whatever the accuracy
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}

    def command(run_dir):
        make_teacher(make_config(*common, run_dir=run_dir))
        return [sys.executable, "-m", "pipeline", "compress", f"run.dir={run_dir}", f"data.root={tiny_data}", *FAST,
                *common]

    # The reference is the same command, uninterrupted (a fresh process, like the killed one).
    subprocess.run(command(tmp_path / "ref"), cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    from conftest import kill_9_during

    run_dir = tmp_path / "killed"
    cmd = command(run_dir)
    if not kill_9_during(cmd, ROOT, env, run_dir / "compress" / "checkpoint.pt", random.uniform(0.0, 4.0)):
        pytest.skip("the run finished before it could be killed")
    assert not (run_dir / "compress" / "manifest.json").exists()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("student.pt", "pruned.pt"):
        _assert_same_weights(_state(tmp_path / "ref" / "compress" / name), _state(run_dir / "compress" / name))


def test_a_second_run_on_the_same_run_dir_is_refused_and_leftovers_are_cleaned(make_config, tmp_path):
    from pipeline.stage import Stage

    cfg = make_config(*QUICK, "compress.max_accuracy_drop=1.0", "run.max_accuracy_drop=1.0")
    make_teacher(cfg)
    (cfg.run_dir / "compress").mkdir(parents=True, exist_ok=True)
    stale = cfg.run_dir / "compress" / ".pruned.pt.abc123.pt.tmp"  # a write killed before its os.replace
    stale.write_bytes(b"half a checkpoint")
    other = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                              f"fd = os.open({str(cfg.run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match="another pipeline process is using run.dir"):
            Stage.open(cfg, "compress")
    finally:
        other.kill()
        other.wait()
    compress.run(cfg)
    assert not stale.exists()


def test_the_distilled_student_is_its_best_epoch_on_the_selection_split(make_config, monkeypatch, tmp_path):
    """Of the distillation epochs, the one with the lowest selection score by compress.select_by becomes student.pt
    (ties: the later one), not the last. Accuracy and calibrated loss are scripted per epoch and rank the epochs
    differently; a re-evaluation of weights seen before gets their first answer, so the check also proves that the
    kept weights are that epoch's."""
    # (accuracy, calibrated loss) of epochs 1..4, then of a fifth set of weights (never expected)
    scripts = {"accuracy": [(0.50, 0.9), (0.90, 0.3), (0.70, 0.5), (0.90, 0.4), (0.60, 0.9)],
               "calibrated_loss": [(0.50, 0.9), (0.90, 0.2), (0.85, 0.2), (0.95, 0.6), (0.60, 0.9)]}
    seen: list[tuple] = []
    per_epoch = iter(())

    def scripted(model, *args, **kw):
        key = tuple(round(float(v.double().sum()), 6) for v in engine.unwrap(model).state_dict().values()
                    if v.is_floating_point())
        for k, val in seen:
            if k == key:
                return val
        acc, cal = next(per_epoch)
        seen.append((key, {"accuracy": acc, "calibrated_loss": cal, "loss": cal + 0.1, "temperature": 1.0}))
        return seen[-1][1]
    monkeypatch.setattr(compress, "_val_metrics", scripted)
    monkeypatch.setattr(compress, "_teacher_accuracy", lambda *a, **k: 0.90)
    expected = {"accuracy": 3,             # the later of the two 0.90 epochs
                "calibrated_loss": 2}      # the later of the two 0.2 losses, not epoch 4's highest accuracy
    for rule in scripts:
        seen.clear()
        per_epoch = iter(scripts[rule])
        cfg = make_config(*QUICK, "compress.epochs=4", "compress.target_macs_ratio=1.0", "compress.probe_init=false",
                          f"compress.select_by={rule}", run_dir=tmp_path / f"best_{rule}")
        make_teacher(cfg)
        compress.run(cfg)
        m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
        assert [h["val_accuracy"] for h in m["distill_history"]] == [a for a, _ in scripts[rule][:4]]
        assert [h["val_calibrated_loss"] for h in m["distill_history"]] == [c for _, c in scripts[rule][:4]]
        k = expected[rule]
        assert m["student_epoch"] == k and m["steps"][0]["val_accuracy"] == scripts[rule][k][0], rule
        assert len(seen) == 4, rule  # student.pt's weights are the kept epoch's: no fifth set was scored
        student, _ = load_model_artifact(cfg.run_dir / "compress" / "student.pt")
        assert scripted(student)["accuracy"] == scripts[rule][k][0] and len(seen) == 4, rule


def test_recovery_runs_its_whole_schedule_and_the_step_is_judged_on_the_final_weights(make_config, monkeypatch):
    """Recovery always trains compress.recovery_epochs: an epoch that is back at the unpruned student's selection
    accuracy by luck does not end it, and the step is judged on the last epoch's weights. Accuracies are scripted
    per call on the pruned model."""
    cfg = make_config(*QUICK, "compress.pruning_steps=1", "compress.recovery_epochs=4",
                      "run.max_accuracy_drop=1.0", "compress.max_accuracy_drop=0.05")
    make_teacher(cfg)
    sizes: list[int] = []
    # before recovery, epochs 1-4 (epoch 2 above the student's 0.90), then every later call
    pruned_calls = itertools.chain([0.50, 0.85, 0.99, 0.86, 0.87], itertools.repeat(0.87))

    def scripted(model, *args, **kw):
        n = engine.count_params(model)
        if n not in sizes:
            sizes.append(n)
        return 0.90 if sizes.index(n) == 0 else next(pruned_calls)
    monkeypatch.setattr(compress, "_val_accuracy", scripted)
    monkeypatch.setattr(compress, "_teacher_accuracy", lambda *a, **k: 0.90)
    compress.run(cfg)
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    step = m["pruning_curve"][1]
    assert [r["val_accuracy"] for r in step["recovery"]] == [0.85, 0.99, 0.86, 0.87]  # all 4 epochs ran
    assert step["val_accuracy_before_recovery"] == 0.50
    assert step["val_accuracy_after_recovery"] == 0.87 and step["within_budget"]  # the final weights' figure


def test_pruning_stops_once_a_step_is_out_of_reach_of_the_end_to_end_budget(make_config, monkeypatch):
    """A step inside compress.max_accuracy_drop but more than run.max_accuracy_drop plus one image below the teacher
    can never ship (export's paired rule), so no further step is tried; that step's model is still saved."""
    cfg = make_config(*QUICK, "compress.pruning_steps=3", "compress.max_accuracy_drop=1.0", "compress.backoff=false")
    make_teacher(cfg)
    sizes: list[int] = []

    def scripted(model, *args, **kw):
        n = engine.count_params(model)
        if n not in sizes:
            sizes.append(n)
        return 0.95 if sizes.index(n) == 0 else 0.0
    monkeypatch.setattr(compress, "_val_accuracy", scripted)
    monkeypatch.setattr(compress, "_teacher_accuracy", lambda *a, **k: 0.95)
    out = compress.run(cfg)
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    assert [c["step"] for c in m["pruning_curve"]] == [0, 1]  # steps 2 and 3 never ran
    assert m["budget"]["stopped"] and "export cannot ship it" in m["budget"]["message"]
    assert out["budget_stopped"] is True
    assert (cfg.run_dir / "compress" / "pruned_step1.pt").exists()


def test_a_failed_step_is_followed_by_one_milder_back_off_step_that_export_tries_first(make_config, monkeypatch):
    """Step 1 is out of reach of the teacher: one back-off step (step 2) prunes the student to the geometric mean of
    1 and the MACs ratio step 1 reached, then pruning ends. Every step is kept; export orders them by MACs, not by step."""
    from pipeline.export import candidate_list

    cfg = make_config(*QUICK, "compress.pruning_steps=3", "compress.max_accuracy_drop=1.0", "compress.backoff=true")
    make_teacher(cfg)
    sizes: list[int] = []

    def scripted(model, *args, **kw):  # the student and the back-off step are good, step 1 is not
        n = engine.count_params(model)
        if n not in sizes:
            sizes.append(n)
        return [0.95, 0.0, 0.95][sizes.index(n)]
    monkeypatch.setattr(compress, "_val_accuracy", scripted)
    monkeypatch.setattr(compress, "_teacher_accuracy", lambda *a, **k: 0.95)
    out = compress.run(cfg)
    m = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    curve = m["pruning_curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and [c.get("backoff") for c in curve[1:]] == [False, True]
    assert curve[2]["target_ratio"] == pytest.approx(math.sqrt(1.0 * curve[1]["macs_ratio"]))  # between what was reached
    assert [s["backoff"] for s in m["steps"][1:]] == [False, True]
    assert curve[0]["macs"] > curve[2]["macs"] > curve[1]["macs"]  # milder than step 1, pruned from the student
    assert out["budget_stopped"] is True and "back-off step 2" in m["budget"]["message"]
    assert "export cannot ship it" in m["budget"]["message"] and m["budget"]["kept_step"] == 2
    _assert_same_weights(_state(cfg.run_dir / "compress" / "pruned_step2.pt"),
                         _state(cfg.run_dir / "compress" / "pruned.pt"))
    assert [c["file"] for c in candidate_list(m)][:3] == ["pruned_step1.pt", "pruned_step2.pt", "student.pt"]
