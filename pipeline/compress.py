"""The compress stage: distil the fine-tuned teacher into a small student, then prune it structurally.

Reads run.dir/finetune/teacher.pt; writes under run.dir/compress:
  student.pt          the distilled, unpruned student (model artifact)
  pruned.pt           the pruned student: state_dict + torch-pruning's pruning history (model artifact;
                      models.load_model_artifact rebuilds it from the model name + history, no pickle)
  metrics.json        teacher / student / pruned: val and test accuracy, params, MACs, CPU latency at
                      batch 1 and 32; the distillation curve, the per-pruning-step curve and the budget
  pruning_curve.png   val accuracy vs MACs across the pruning steps
  config.json, manifest.json (written last)
  checkpoint.pt       training state while the stage runs (removed once the manifest is written)
  teacher_logits.pt   compress.cache_teacher_logits only: the teacher's logits per training image

Recipe:
  1. Hinton knowledge distillation (DistillationTask): alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
     + (1 - alpha) * CE(s, y), teacher frozen in eval mode under no_grad. Teacher and student each get
     their own preprocessing (size, mean/std, interpolation) of the same augmented crop.
  2. compress.pruning_steps rounds of structured channel pruning with torch-pruning's BasePruner
     (dependency graph, real channel removal, classifier ignored, channels rounded to round_to). Step k
     aims at base * target ** (k / steps) of the unpruned student's MACs (or params): the channel
     ratio that gets there is found by bisection on trial copies, measured with torch-pruning's counter,
     so the target is really reached. After each step: compress.recovery_epochs of KD fine-tuning, then
     the accuracy budget (compress.max_accuracy_drop vs the distilled student on val): a step that
     breaks it is discarded, pruning stops, and the last model within budget is kept (and reported).
  3. Every state change is checkpointed (mid-epoch too with compress.checkpoint_every_steps), so a run
     killed at any point resumes and, on CPU, ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import build_model, find_head, load_model_artifact, plain_history, rebuild_pruned, save_model_artifact
from pipeline import artifacts, engine, latency, probe
from pipeline.config import ConfigError
from pipeline.data import (eval_loaders, is_augmented, make_loader, prepare_data_all_ranks, resolve_preprocessing,
                           steps_per_epoch, summary)
from pipeline.finetune import selection_score, train_mode_keeping_frozen_bn
from pipeline.stage import Stage

STAGE = "compress"
PRE_KEYS = ("input_size", "resize_size", "crop_size", "interpolation", "mean", "std")
RELOAD_ATOL = 1e-5


# ----------------------------------------------------------------------------- knowledge distillation

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(student, labels).

    KL is averaged over the batch (batchmean); the T^2 factor keeps the soft-target gradients on the
    same scale as the hard-label ones when T changes. Computed in float32 (also under autocast).
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if alpha == 0:
        return ce
    t = teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce


class DistillationTask:
    """The KD objective as a `compute_loss(model, batch) -> (loss, logits, labels)` for engine.train_one_epoch
    (in the spirit of timm.task.LogitDistillationTask).

    Batches are (x_student, labels), or (x_student, x_teacher, labels) when the two models preprocess
    differently (make_loader(..., extra_pre=teacher_pre): same crop/flip, each model's own size and
    normalisation). With `cached_logits` [N, C] the teacher is not run: labels then carry the sample
    index (label + index * num_classes, see `index_labels`) to look the logits up.
    """

    def __init__(self, teacher: nn.Module | None, temperature: float, alpha: float, num_classes: int,
                 two_views: bool = False, cached_logits: torch.Tensor | None = None):
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.temperature, self.alpha, self.num_classes = temperature, alpha, num_classes
        self.two_views = two_views
        self.cached_logits = cached_logits

    def teacher_logits(self, x_teacher: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
        if self.alpha == 0:
            return None  # plain cross-entropy: the teacher is not needed
        if self.cached_logits is not None:
            return self.cached_logits[index.cpu()].to(x_teacher.device)
        self.teacher.eval()  # frozen: dropout off, BatchNorm running statistics untouched
        with torch.no_grad():
            return self.teacher(x_teacher)

    def __call__(self, model, batch):
        if self.two_views:
            x, x_teacher, labels = batch
        else:
            (x, labels), x_teacher = batch, batch[0]
        index = None
        if self.cached_logits is not None:
            index, labels = labels // self.num_classes, labels % self.num_classes
        t = self.teacher_logits(x_teacher, index)
        logits = model(x)
        return kd_loss(logits, t, labels, self.temperature, self.alpha), logits, labels


def index_labels(samples, num_classes: int):
    """(path, label) -> (path, label + i * num_classes): the loaders then also yield each sample's index."""
    return [(p, y + i * num_classes) for i, (p, y) in enumerate(samples)]


# ----------------------------------------------------------------------------- pruning

def make_importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise ConfigError(f"compress.importance must be magnitude, taylor or bn_scale, got {name!r}")


def prune_copy(model: nn.Module, ratio: float, input_size, cfg_c, grads: list | None = None):
    """A pruned deep copy of `model` (channel ratio `ratio` removed per layer, or globally) and its history."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    if grads is not None:  # Taylor importance reads .grad
        for p, g in zip(m.parameters(), grads):
            p.grad = None if g is None else g.clone()
    m.eval()
    device = next(m.parameters()).device
    head = find_head(m)[1]
    pruner = tp.pruner.BasePruner(
        m, torch.zeros(1, *input_size, device=device), importance=make_importance(cfg_c.importance),
        global_pruning=cfg_c.global_pruning, pruning_ratio=ratio, max_pruning_ratio=cfg_c.max_layer_pruning_ratio,
        pruning_ratio_dict=None if cfg_c.global_pruning else nearest_round_ratios(m, head, ratio, cfg_c),
        iterative_steps=1, ignored_layers=[head], round_to=cfg_c.round_to or None)
    if ratio > 0:
        pruner.step()
    m.zero_grad(set_to_none=True)
    return m, plain_history(pruner.pruning_history())


def nearest_round_ratios(model: nn.Module, head: nn.Module, ratio: float, cfg_c) -> dict | None:
    """Per-layer ratios that keep round(C * (1 - ratio) / round_to) * round_to channels (at least round_to).

    torch-pruning's round_to rounds the kept channels *down*: any pruning of a 16-channel layer leaves 8,
    of a 24-channel one 16, so small early layers lose far more than asked (measured on EfficientNet-Lite0,
    digits, one step to 0.79 MACs with BN recalibration: 0.914 val accuracy with round-down, 0.967 with
    this). The ratios are exact multiples, so torch-pruning's own rounding leaves them unchanged.

    Layers with as many output channels as a depthwise convolution has groups (its producer, whose channels are
    tied to it, and the depthwise conv itself) keep multiples of compress.depthwise_round_to too (see
    `channel_multiple`): issue #13, ONNX Runtime's int8 depthwise kernel wants multiples of 16.
    """
    if ratio <= 0 or max(cfg_c.round_to, cfg_c.depthwise_round_to) <= 1:
        return None
    dw = depthwise_channels(model)
    out = {}
    for mod in model.modules():
        if mod is head or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        c = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        rt = channel_multiple(cfg_c, c in dw)
        keep = max(rt, int(round(c * (1 - ratio) / rt)) * rt,
                   int(math.ceil(c * (1 - cfg_c.max_layer_pruning_ratio) / rt)) * rt)
        out[mod] = max(0.0, 1.0 - (keep + 0.01) / c) if keep < c else 0.0
    return out


def depthwise_channels(model: nn.Module) -> set[int]:
    """Channel counts of the depthwise convolutions (groups == in == out channels > 1)."""
    return {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels}


def channel_multiple(cfg_c, depthwise: bool) -> int:
    """Kept channels are multiples of compress.round_to, and of compress.depthwise_round_to when tied to a depthwise
    convolution (their least common multiple). ONNX Runtime's x86 int8 convolutions (MLAS, symmetric S8 weights as
    export quantizes them) take the fast VNNI/AVX2 depthwise kernel only for a multiple of 16 channels; any other
    count runs a generic kernel plus a separate requantization. A 3x3 depthwise block at 56x56 ran int8 at 0.88-1.12x
    its fp32 speed with 24/40/56/72/120 channels vs 1.17-2.08x with 32/48/64/.../192 (no further gain at multiples
    of 64); a lite0 pruned to 0.5 MACs kept 0.63 of the unpruned model's int8/fp32 ratio at batch 1 with round_to 8
    alone, 0.79 with this (docs/compress.md, benchmarks/int8_pruning.py). Pointwise convs need only multiples of 4
    (AVX-512) or 8 (AVX2): round_to 8 stays for them."""
    rt, dw = max(1, cfg_c.round_to), max(1, cfg_c.depthwise_round_to)
    return math.lcm(rt, dw) if depthwise else rt


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int, device) -> None:
    """Re-estimate BatchNorm running statistics after pruning (cumulative average over `batches` batches).

    Removing input channels of a convolution shifts its output distribution: without this the pruned
    EfficientNet-Lite0 sat at chance accuracy until recovery training. Only BN layers are in train mode
    (dropout stays off), so it draws nothing from the global RNG and is the same on every DDP rank.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        model(batch[0].to(device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.eval()


def recalibrates_bn(cc) -> bool:
    """Whether BatchNorm statistics are re-estimated after a pruning step: only when distillation and recovery train
    with batch statistics (compress.freeze_bn_stats off, the digits preset), so that the running statistics are the
    data's anyway. With frozen statistics (the photo default) every layer was trained against the pretrained running
    statistics, and replacing them with the data's moves every layer at once: the unpruned distilled student fell from
    0.980 to 0.740 on the cats selection split (150 images) and from 0.917 to 0.672 on flowers (180), and a step to
    0.83 MACs started its recovery at 0.767 / 0.617 instead of 0.933 / 0.811 (docs/compress.md)."""
    return cc.bn_recalibration_batches > 0 and not cc.freeze_bn_stats


def measure_size(model: nn.Module, input_size, by: str) -> int:
    return engine.count_params(model) if by == "params" else engine.count_macs(model, input_size)


def prune_to(model: nn.Module, target: float, input_size, cfg_c, by: str = "macs", grads=None,
             iterations: int = 12):
    """Prune a copy of `model` to at most `target` MACs (or params): the smallest channel ratio that gets
    there, by bisection (MACs fall monotonically, in steps because of round_to). -> (model, history, info)."""
    current = measure_size(model, input_size, by)
    info = {"target": int(target), "before": current}
    if current <= target:
        info.update(ratio=0.0, after=current, reached=True)
        return model, [], info
    lo, hi = 0.0, cfg_c.max_layer_pruning_ratio
    best, best_hist = prune_copy(model, hi, input_size, cfg_c, grads)
    best_size = measure_size(best, input_size, by)
    if best_size > target:
        info.update(ratio=hi, after=best_size, reached=False)
        return best, best_hist, info
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m, hist = prune_copy(model, mid, input_size, cfg_c, grads)
        size = measure_size(m, input_size, by)
        if size <= target:
            hi, best, best_hist, best_size = mid, m, hist, size
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    info.update(ratio=hi, after=best_size, reached=True)
    return best, best_hist, info


def check_same_on_ranks(history: list, what: str) -> None:
    """Raise on every DDP rank when any rank's pruning history differs from rank 0's. engine.agree makes the ranks
    decide together: a rank raising alone would leave the others waiting in their next collective until the
    process-group timeout (NCCL: 10 minutes), with the real error buried in one rank's log."""
    mine = artifacts.sha256_json(history)
    if not engine.agree(engine.broadcast_object(mine) == mine):
        raise RuntimeError(f"{what} differs between DDP ranks (the pruned models are not the same on every rank)")


def rebuild(name: str, num_classes: int, history: list, input_size, state_dict=None) -> nn.Module:
    """Fresh unpruned architecture + pruning history replayed (+ weights): how pruned.pt is loaded."""
    model, _ = build_model(name, num_classes, "none")
    if history:
        rebuild_pruned(model, history, input_size)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def check_same_shapes(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    bad = [k for k in sa if k not in sb or sa[k].shape != sb[k].shape] + [k for k in sb if k not in sa]
    if bad:
        raise RuntimeError(f"{what}: the model rebuilt from the pruning history differs in {bad[:5]}")


def check_reload(path, model: nn.Module, input_size, what: str) -> float:
    """Reload an artifact (weights_only, rebuilt from name + history) and compare outputs with `model`."""
    reloaded, _ = load_model_artifact(path)
    # channels_last (the CUDA default) reorders the arithmetic: compare like with like, in contiguous layout
    m = engine.cpu_copy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *input_size, generator=g)
    with torch.no_grad():
        diff = (m(x) - reloaded(x)).abs().max().item()
    if not diff <= RELOAD_ATOL:
        raise RuntimeError(f"{what}: reloaded {path} gives outputs {diff:.3g} away from the in-memory model")
    return diff


# ----------------------------------------------------------------------------- the student's start

def fit_student_probe(stage: Stage, model: nn.Module, pre: dict, data, tmeta: dict) -> dict:
    """The student's own frozen-feature probe becomes its head (every rank extracts the features of its shard, rank 0
    fits, every rank gets the same: probe.fit_sharded), and is saved as probe_student.pt: a valid model to ship, and
    the floor the student must not fall below."""
    info = probe.fit_sharded(model, {s: getattr(data, s) for s in ("train", "val", "test")},
                             eval_loaders(pre, stage.cfg, stage.device), stage.device, len(data.classes),
                             stage.cfg.run.seed)
    probe.set_head(engine.unwrap(model), info)
    if stage.is_main:
        save_model_artifact(stage.dir / "probe_student.pt", model, name=stage.cfg.student.name, classes=data.classes,
                            preprocessing=pre, extra={"probe": True, "C": info["C"],
                                                      "val_accuracy": info["selection_accuracy"]})
    stage.log(f"student probe (frozen pretrained features, C={info['C']:g}): selection accuracy "
              f"{info['selection_accuracy']:.4f}, report-split accuracy {info['test_accuracy']:.4f} "
              f"({info['seconds']:.0f}s); it is the student's starting head")
    return {k: v for k, v in info.items() if k not in ("weight", "bias")}


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float) -> list[dict]:
    """The head at `lr`, the pretrained backbone at lr * backbone_lr_mult (one group when the mult is 1)."""
    head_name, _ = find_head(model)
    head = [p for n, p in model.named_parameters() if n.startswith(head_name + ".")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head_name + ".")]
    if backbone_lr_mult == 1.0:
        return [{"params": head + backbone, "lr": lr}]
    return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_mult}]


# ----------------------------------------------------------------------------- helpers

def config_hash(cfg) -> str:
    return artifacts.sha256_json({"sections": cfg.section_hash("data", "teacher", "student", "compress"),
                                  "seed": cfg.run.seed})


def check_config(cfg) -> None:
    if cfg.compress.cache_teacher_logits and is_augmented(cfg.data):
        raise ConfigError(
            "compress.cache_teacher_logits=true needs training images without augmentation (the teacher would "
            "see another crop than the student every epoch), but the data config augments: "
            f"scale_min={cfg.data.scale_min}, hflip={cfg.data.hflip}, rotation={cfg.data.rotation}, "
            f"color_jitter={cfg.data.color_jitter}, auto_augment={cfg.data.auto_augment}. Fix: set "
            "compress.cache_teacher_logits=false, or turn augmentation off (data.scale_min=1.0 data.hflip=false "
            "data.rotation=0 data.color_jitter=0 data.auto_augment=none)")
    if min(cfg.compress.round_to, cfg.compress.depthwise_round_to, cfg.compress.recovery_epochs,
           cfg.compress.max_steps_per_epoch) < 0:
        raise ConfigError("compress.round_to, compress.depthwise_round_to, compress.recovery_epochs and "
                          "compress.max_steps_per_epoch must be >= 0")
    if (message := latency.check(cfg.compress)) is not None:
        raise ConfigError(message)
    if not 0 < cfg.compress.max_layer_pruning_ratio < 1:
        raise ConfigError(f"compress.max_layer_pruning_ratio must be in (0, 1), "
                          f"got {cfg.compress.max_layer_pruning_ratio}")


def same_preprocessing(a: dict, b: dict) -> bool:
    return all(list(a[k]) == list(b[k]) if isinstance(a[k], (list, tuple)) else a[k] == b[k] for k in PRE_KEYS)


def _val_metrics(model, samples, make_loader, device, num_classes, amp=None) -> dict:
    """Accuracy and (calibrated) loss on the selection split, the work split over the DDP ranks (every rank calls it
    and gets the same value: engine.evaluate_sharded). Patched in tests."""
    return engine.evaluate_sharded(model, samples, make_loader, device, num_classes, amp=amp)


def _val_accuracy(model, samples, make_loader, device, num_classes, amp=None) -> float:
    """Top-1 on the selection split (_val_metrics). Patched in tests."""
    return _val_metrics(model, samples, make_loader, device, num_classes, amp)["accuracy"]


def _teacher_accuracy(teacher, samples, make_loader, device, num_classes, amp=None) -> float:
    """The teacher's top-1 on the selection split (its own preprocessing). Patched in tests."""
    return engine.evaluate_sharded(teacher, samples, make_loader, device, num_classes, amp=amp)["accuracy"]


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in engine.unwrap(model).state_dict().items()}


def _plot(curve: list[dict], student_val: float, max_drop: float, teacher_val: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted(curve, key=lambda c: -c["macs"])  # a back-off step is milder than the failed step before it
    measured = any("latency_ms_b1" in c for c in curve)  # + MACs vs measured latency (pipeline/latency.py)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(13, 4.2) if measured else (6.5, 4.2))
    ax = axes[0] if measured else axes
    if measured:
        latency.plot_panel(axes[1], curve)
    xs = [c["macs"] / 1e6 for c in curve]
    after = [c["val_accuracy_after_recovery"] for c in curve]
    ax.plot(xs, after, "o-", color="tab:blue", label="after KD recovery")
    before = [(c["macs"] / 1e6, c["val_accuracy_before_recovery"]) for c in curve[1:]]
    if before:
        ax.plot(*zip(*before), "x", color="tab:red", label="right after pruning")
    for c in curve:
        ax.annotate(f"step {c['step']}", (c["macs"] / 1e6, c["val_accuracy_after_recovery"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(student_val - max_drop, ls="--", color="gray", label=f"budget (student - {max_drop:g})")
    if teacher_val is not None:
        ax.axhline(teacher_val, ls=":", color="green", label="teacher")
    ax.set(xlabel="MACs per image (M)", ylabel="val top-1 accuracy", title="pruning: accuracy vs MACs")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    artifacts.save_figure(fig, path)
    plt.close(fig)


def _table(rows: dict) -> str:
    head = f"{'model':<10} {'params':>10} {'MACs':>12} {'selection':>9} {'report':>8}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r['params'] / 1e6:>9.3f}M {r['macs'] / 1e6:>11.2f}M {r['val_accuracy']:>9.4f} "
                     f"{r['test_accuracy']:>8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage

def run(cfg, force: bool = False) -> dict:
    check_config(cfg)
    stage = Stage.open(cfg, STAGE)
    teacher_sha = stage.require("finetune", ["teacher.pt"])["teacher.pt"]
    data = prepare_data_all_ranks(cfg, stage.is_main)
    chash, inputs = config_hash(cfg), {"teacher.pt": teacher_sha, "data": data.fingerprint}
    if stage.up_to_date(chash, inputs, force):
        return stage.skipped()
    stage.log(f"data: {summary(data)}")
    ckpt = stage.resume_checkpoint(
        lambda c: (c.get("config_hash"), c.get("teacher"), c.get("data"), c.get("world_size"))
        == (chash, teacher_sha, data.fingerprint, stage.dist.world_size), cfg.compress.amp)
    stage.start(resuming=ckpt is not None)

    job = Compression(stage, data, ckpt, chash, teacher_sha)
    if job.st["phase"] == "distill":
        job.distil()
    job.prune()
    result = job.finish(inputs)  # every rank: the report rows are evaluated sharded, rank 0 writes
    engine.barrier()
    return {"skipped": False, "stage_dir": str(stage.dir), **result}


def _phase(state: dict) -> tuple:
    """Which training phase a compress state is in: distillation, or the recovery after one pruning step."""
    return state["phase"], state["prune_step"], state["recovering"]


class Compression:
    """One compress run. `st` is the plain state the checkpoint saves (with the model, optimizer, scheduler,
    scaler and RNG): phase, epoch/step within it, pruning step, curves, the last model within budget."""

    def __init__(self, stage: Stage, data, ckpt: dict | None, chash: str, teacher_sha: str):
        cfg, cc, device = stage.cfg, stage.cfg.compress, stage.device
        self.stage, self.cfg, self.cc, self.data, self.device = stage, cfg, cc, data, device
        self.chash, self.teacher_sha, self.num_classes = chash, teacher_sha, len(data.classes)
        torch.manual_seed(cfg.run.seed)
        self.load_models()
        self.amp = engine.amp_dtype(cc.amp, device)
        self.channels_last = engine.use_channels_last(cc.channels_last, device)
        self.layout(self.teacher)  # the frozen teacher's forward is a third of each distillation step
        self.layout(self.model)  # before the student probe's feature pass, 1.25x faster in NHWC on the CPU
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.steps = steps_per_epoch(len(data.train), cfg.data.batch_size, stage.dist.world_size, cc.max_steps_per_epoch)
        self.make_task()
        self.make_eval = eval_loaders(self.pre, cfg, device)  # the selection split's loader(s), kept across epochs
        student_probe = fit_student_probe(stage, self.model, self.pre, data, self.tmeta) \
            if ckpt is None and cc.probe_init and probe.supported(self.model) else None
        self.st = {"phase": "distill", "epoch": 0, "step": 0, "prune_step": 0, "recovering": False, "history": [],
                   "distill_history": [], "curve": [], "student_val": None, "base": None, "good": None,
                   "stopped": None, "train_seconds": 0.0, "probe": student_probe, "student_source": "distilled",
                   "student_epoch": None}
        self.opt = self.sched = None
        self.resume_optimizer = ckpt if ckpt is not None and ckpt.get("optimizer") is not None else None
        if ckpt is not None:
            self.resume(ckpt)

    # ------------------------------------------------------------------ setup
    def load_models(self) -> None:
        cfg, device = self.cfg, self.device
        teacher_path = cfg.run_dir / "finetune" / "teacher.pt"
        self.teacher, self.tmeta = load_model_artifact(teacher_path, device)
        if list(self.tmeta["classes"]) != list(self.data.classes):
            raise ConfigError(f"{teacher_path} was trained on classes {self.tmeta['classes']}, the data has "
                              f"{self.data.classes}. Fix: rerun `make finetune` with this data")
        self.teacher_pre = self.tmeta["preprocessing"]
        self.model, native = build_model(cfg.student.name, self.num_classes, cfg.student.weights)
        self.pre = resolve_preprocessing(native, cfg.data)
        self.input_size = self.pre["input_size"]
        self.two_views = not same_preprocessing(self.pre, self.teacher_pre)
        self.stage.log(f"teacher {self.tmeta['name']} ({engine.count_params(self.teacher) / 1e6:.2f}M params, input "
                       f"{self.teacher_pre['input_size']}, mean {self.teacher_pre['mean']}) -> student {cfg.student.name} "
                       f"({engine.count_params(self.model) / 1e6:.2f}M params, input {self.input_size}, mean "
                       f"{self.pre['mean']}); " + ("each model gets its own preprocessing of the same crops"
                                                   if self.two_views else "same preprocessing"))
        self.model.to(device)

    def make_task(self) -> None:
        """The KD objective; with compress.cache_teacher_logits (no augmentation only) the teacher runs once."""
        cc, data, stage = self.cc, self.data, self.stage
        self.cached, self.train_samples = None, data.train
        if cc.cache_teacher_logits and cc.alpha > 0:
            self.cached = self.teacher_logit_cache()
            self.train_samples = index_labels(data.train, self.num_classes)
        self.task = DistillationTask(self.teacher, cc.temperature, cc.alpha, self.num_classes,
                                     self.two_views and self.cached is None, self.cached)

    def teacher_logit_cache(self) -> torch.Tensor:
        """The teacher's logits per training image [N, C]: from teacher_logits.pt when its key matches (rank 0 reads,
        every rank gets rank 0's copy), else computed with the work split over the DDP ranks (every rank gets all
        logits: engine.predict_sharded) and saved by rank 0. No rank waits while another runs the whole set."""
        data, stage = self.data, self.stage
        cache_path = stage.dir / "teacher_logits.pt"
        key = artifacts.sha256_json({"teacher": self.teacher_sha, "data": data.fingerprint, "pre": self.teacher_pre,
                                     "n": len(data.train), "samples": [p for p, _ in data.train]})
        blob = None
        if stage.is_main and cache_path.exists():
            blob = artifacts.torch_load(cache_path)
            blob = blob if isinstance(blob, dict) and blob.get("key") == key else None
        blob = engine.broadcast_state_dict(blob)
        if blob is not None:
            return blob["logits"]
        t0 = time.perf_counter()
        make_eval = eval_loaders(self.teacher_pre, self.cfg, self.device)
        logits, _ = engine.predict_sharded(self.teacher, data.train, make_eval, self.device, self.num_classes, self.amp)
        if stage.is_main:
            artifacts.torch_save({"key": key, "logits": logits}, cache_path)
        stage.log(f"cached the teacher's logits for {len(logits)} training images ({time.perf_counter() - t0:.1f}s) "
                  f"in {cache_path}")
        return logits

    def resume(self, ckpt: dict) -> None:
        st = self.st
        st.update(ckpt["state"])
        if st["history"]:
            self.model = rebuild(self.cfg.student.name, self.num_classes, st["history"], self.input_size)
        self.model.load_state_dict(ckpt["model"])
        self.layout(self.model.to(self.device))
        where = (f"distillation epoch {st['epoch'] + 1}, step {st['step']}" if st["phase"] == "distill" else
                 f"pruning step {st['prune_step'] + 1}, recovery epoch {st['epoch'] + 1} step {st['step']}"
                 if st["recovering"] else f"the end of pruning step {st['prune_step']}")
        self.stage.log(f"resuming at {where}")
        # the RNG state of the interrupted run, right where it was saved (dropout etc.)
        engine.set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------ plumbing
    def train_loader(self, epoch: int, start_step: int = 0, rank=None, world_size=None, augment=None):
        dist = self.stage.dist
        return make_loader(self.train_samples, self.pre, self.cfg, train=True, epoch=epoch, start_step=start_step,
                           rank=dist.rank if rank is None else rank,
                           world_size=dist.world_size if world_size is None else world_size,
                           extra_pre=self.teacher_pre if self.task.two_views else None, augment=augment,
                           device=self.device)

    def val_acc(self, model) -> float:
        return _val_accuracy(model, self.data.val, self.make_eval, self.device, self.num_classes, self.amp)

    def new_optimizer(self, lr: float, epochs: int, warmup_epochs: float, backbone_lr_mult: float = 1.0) -> None:
        run, world = self.cfg.run, self.stage.dist.world_size
        lr = engine.scaled_lr(lr, self.cfg.data.batch_size * world * run.grad_accum_steps,
                              base_batch=self.cfg.data.batch_size, rule=run.lr_scaling, optimizer="adamw")
        self.opt = torch.optim.AdamW(param_groups(engine.unwrap(self.model), lr, backbone_lr_mult), lr=lr,
                                     weight_decay=self.cc.weight_decay)
        opt_steps = max(1, self.steps // run.grad_accum_steps)  # optimizer steps per epoch
        fn = engine.warmup_decay_lambda(max(1, epochs) * opt_steps, int(round(warmup_epochs * opt_steps)), "cosine")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, fn)
        if self.resume_optimizer is not None:  # only the training phase the checkpoint was taken in
            if _phase(self.resume_optimizer["state"]) == _phase(self.st):
                self.opt.load_state_dict(self.resume_optimizer["optimizer"])
                self.sched.load_state_dict(self.resume_optimizer["scheduler"])
                engine.restore_scaler(self.scaler, self.resume_optimizer.get("scaler"))
            # A checkpoint from the end of a recovery (its last epoch saved, not yet judged) resumes without training
            # that phase: its optimizer (the step before's shapes) must not reach the next step's recovery.
            self.resume_optimizer = None

    def save_ckpt(self) -> None:
        self.stage.save_checkpoint(
            self.amp, model=engine.unwrap(self.model).state_dict(), state=self.st,
            optimizer=self.opt.state_dict() if self.opt is not None else None,
            scheduler=self.sched.state_dict() if self.sched is not None else None,
            scaler=self.scaler.state_dict(), config_hash=self.chash, teacher=self.teacher_sha,
            data=self.data.fingerprint, world_size=self.stage.dist.world_size)

    def layout(self, model: nn.Module) -> nn.Module:
        """`model` in the run's memory format (the teacher too). A resumed, reloaded or freshly pruned student must
        compute exactly like the uninterrupted one, and NHWC and NCHW kernels differ in the last bits, so every (re)built model gets it
        before it runs (pruning's index_select gives the pruned tensors the default format)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def wrap(self):
        m = self.layout(engine.unwrap(self.model))
        return engine.wrap_for_training(m, self.stage.dist, self.device, compile=self.cfg.run.compile)

    def train_epochs(self, total: int, desc: str):
        """Run epochs st['epoch'] .. total-1 (resuming mid-epoch at st['step']); yields each epoch's record."""
        st, ddp_model, every = self.st, self.wrap(), self.cc.checkpoint_every_steps
        while st["epoch"] < total:
            epoch = st["epoch"]

            def on_step(s):
                if every > 0 and s % every == 0 and s < self.steps:
                    st["step"] = s
                    self.save_ckpt()
            # Each phase has its own data order: recovery after step k uses epochs 1000*k + e.
            data_epoch = epoch + 1000 * (st["prune_step"] + 1 if st["phase"] == "prune" else 0)
            start = st["step"]
            r = engine.train_one_epoch(
                ddp_model, self.train_loader(data_epoch, start), self.opt, self.sched, self.task, self.device,
                amp=self.amp, scaler=self.scaler, grad_clip=self.cc.grad_clip, channels_last=self.channels_last,
                start_step=start, max_steps=self.steps, on_step=on_step, accum_steps=self.cfg.run.grad_accum_steps,
                progress=self.cfg.run.progress and self.stage.is_main, desc=f"{desc} epoch {epoch + 1}/{total}",
                train_mode=lambda m: train_mode_keeping_frozen_bn(m, self.cc.freeze_bn_stats))
            st["train_seconds"] += r["seconds"]
            rec = {"epoch": epoch, "train_loss": r["loss"], "train_accuracy": r["accuracy"],
                   "images_per_s": r["images_per_s"] * self.stage.dist.world_size, "resumed_mid_epoch": start > 0}
            st.update(epoch=epoch + 1, step=0)
            yield rec

    # ------------------------------------------------------------------ 1. distillation
    def distil(self) -> None:
        cc, st, log = self.cc, self.st, self.stage.log
        self.new_optimizer(cc.lr, cc.epochs, cc.warmup_epochs, cc.backbone_lr_mult)
        log(f"distillation: {cc.epochs} epoch(s) x {self.steps} steps, T={cc.temperature:g}, alpha={cc.alpha:g}, "
            f"lr head {cc.lr:g}, backbone {cc.lr * cc.backbone_lr_mult:g}, warmup {cc.warmup_epochs:g} epoch"
            + (", teacher logits cached" if self.cached is not None else ""))
        for rec in self.train_epochs(cc.epochs, "distil"):
            val = _val_metrics(self.model, self.data.val, self.make_eval, self.device, self.num_classes, self.amp)
            rec.update(val_accuracy=val["accuracy"], val_calibrated_loss=val["calibrated_loss"],
                       val_temperature=val["temperature"], val_loss=val["loss"])
            st["distill_history"].append(rec)
            score = selection_score(val, cc.select_by)
            if cc.keep_best_epoch and score <= st.get("distil_best", {}).get("score", math.inf):  # ties: the later
                st["distil_best"] = {"epoch": rec["epoch"], "val_accuracy": rec["val_accuracy"], "score": score,
                                     "model": _snapshot(self.model)}
            log(f"distil epoch {rec['epoch'] + 1}/{cc.epochs}: train loss {rec['train_loss']:.4f} acc "
                f"{rec['train_accuracy']:.4f} | selection acc {rec['val_accuracy']:.4f} (calibrated loss "
                f"{rec['val_calibrated_loss']:.4f}) | {rec['images_per_s']:.0f} img/s")
            self.save_ckpt()
        self.keep_best_epoch()
        st["student_val"] = self.val_acc(self.model)
        if st["probe"] is not None and st["probe"]["selection_accuracy"] > st["student_val"]:
            # The distilled student fell below its own frozen-feature probe: the pretrained backbone with the
            # probe's head is a valid model, and the better one.
            log(f"the distilled student ({st['student_val']:.4f} on the selection split) is below its probe "
                f"({st['probe']['selection_accuracy']:.4f}): the student is the probe (pretrained backbone + "
                "logistic-regression head)")
            probe_model, _ = self.stage.load_artifact("probe_student.pt")  # rank 0 wrote it: no shared disk needed
            self.model.load_state_dict(probe_model.state_dict())
            st["student_val"], st["student_source"] = self.val_acc(self.model), "probe"
            st["student_epoch"] = None
        if self.stage.is_main:
            save_model_artifact(self.stage.dir / "student.pt", self.model, name=self.cfg.student.name,
                                classes=self.data.classes, preprocessing=self.pre,
                                extra={"distilled_from": self.tmeta["name"], "val_accuracy": st["student_val"],
                                       "source": st["student_source"], "epoch": st["student_epoch"]})
            check_reload(self.stage.dir / "student.pt", self.model, self.input_size, "student.pt")
        m = engine.unwrap(self.model)
        st["base"] = {"macs": engine.count_macs(m, self.input_size), "params": engine.count_params(m)}
        st["curve"] = [{"step": 0, "channel_ratio": 0.0, **st["base"], "macs_ratio": 1.0, "params_ratio": 1.0,
                        "val_accuracy_before_recovery": st["student_val"],
                        "val_accuracy_after_recovery": st["student_val"], "within_budget": True}]
        st["good"] = {"step": 0, "history": [], "model": _snapshot(self.model)}
        st.update(phase="prune", epoch=0, step=0)
        self.opt = self.sched = None
        log(f"student: selection accuracy {st['student_val']:.4f}, {st['base']['params'] / 1e6:.3f}M params, "
            f"{st['base']['macs'] / 1e6:.2f}M MACs")
        self.save_ckpt()

    def keep_best_epoch(self) -> None:
        """The distilled student is its best epoch on the selection split by compress.select_by, as finetune keeps its
        best checkpoint: on both photo sets at 224 px the selection accuracy peaked at epoch 2 of 4 and then fell
        while train accuracy rose (flowers 0.922 -> 0.894, cats 0.993 -> 0.987). Ties go to the later epoch."""
        best = self.st.pop("distil_best", None)
        if best is None:
            return
        self.st["student_epoch"] = best["epoch"]
        if best["epoch"] != self.st["distill_history"][-1]["epoch"]:
            self.stage.log(f"distilled student: epoch {best['epoch'] + 1} (selection accuracy "
                           f"{best['val_accuracy']:.4f}, {self.cc.select_by} {abs(best['score']):.4f}) is kept, not "
                           f"the last one ({self.st['distill_history'][-1]['val_accuracy']:.4f})")
            engine.unwrap(self.model).load_state_dict(best["model"])

    # ------------------------------------------------------------------ 2. pruning, recovery, budget
    def target(self) -> tuple[str, float, int]:
        cc = self.cc
        by = "params" if cc.target_params_ratio is not None else "macs"
        ratio = cc.target_params_ratio if by == "params" else cc.target_macs_ratio
        if latency.wanted(cc):  # measured ms (pipeline/latency.py): a ratio of the student's measured latency
            by, ratio = "latency", latency.target_ratio(cc, self.st["base"]["latency"])
        return by, ratio, cc.pruning_steps if ratio < 1 else 0

    def step_ratio(self, k: int) -> float:
        """Step k's target as a fraction of the student's MACs (params, latency): ratio ** (k / steps) on the
        schedule, or the back-off step's own ratio. Step 0 is the student (1.0)."""
        back = self.st.get("backoff")
        if back is not None and back["step"] == k:
            return back["ratio"]
        _, ratio, n_steps = self.target()
        return ratio ** (k / n_steps) if n_steps else 1.0

    def prune(self) -> None:
        """compress.pruning_steps rounds of prune -> recover -> budget (+ one back-off step after a failed one),
        resuming wherever the checkpoint was."""
        st = self.st
        latency.ensure_base(self)  # the student's measured latency (compress.step_latency or a latency target)
        _, _, n_steps = self.target()
        while st["stopped"] is None and st["prune_step"] < (st["backoff"]["step"] if st.get("backoff") else n_steps):
            k = st["prune_step"] + 1
            if not st["recovering"]:
                self.prune_step(k)
            self.recover(k)
            self.judge(k)
            self.back_off(k)
            st.update(prune_step=k, recovering=False, epoch=0, step=0)
            self.opt = self.sched = None
            self.save_ckpt()

    def prune_step(self, k: int) -> None:
        """Prune to this step's MACs (or params) target, check the result, recalibrate BatchNorm."""
        cc, st, device, input_size = self.cc, self.st, self.device, self.input_size
        by, ratio, n_steps = self.target()
        back = st.get("backoff")
        if back is not None and back["step"] == k:  # the milder step starts from the step before the failed one
            name = "student.pt" if back["from_step"] == 0 else f"pruned_step{back['from_step']}.pt"
            self.model, meta = self.stage.load_artifact(name)
            self.layout(self.model)
            st["history"] = list(meta.get("pruning_history") or [])
        target = st["base"][by] * self.step_ratio(k)
        grads = taylor_grads(self.model, self.task, self.train_loader, cc, device) if cc.importance == "taylor" else None
        t0 = time.perf_counter()
        pruned, hist, info = latency.prune_step_model(self, k, target, by, grads)  # prune_to, or to a latency
        self.model = self.layout(pruned.to(device))
        for p in self.model.parameters():
            p.requires_grad_(True)
        st["history"] = st["history"] + hist
        # every transformation ends with a check: the head and the replayable history
        with torch.no_grad():
            out = self.model.eval()(torch.zeros(1, *input_size, device=device))
        if out.shape != (1, self.num_classes):
            raise RuntimeError(f"pruning step {k}: the model now gives {tuple(out.shape)} outputs")
        check_same_shapes(self.model, rebuild(self.cfg.student.name, self.num_classes, st["history"], input_size),
                          f"pruning step {k}")
        recalibrated = recalibrates_bn(cc)
        if recalibrated:
            recalibrate_bn(self.model, self.train_loader(0, rank=0, world_size=1, augment=False),
                           cc.bn_recalibration_batches, device)
        check_same_on_ranks(st["history"], f"pruning step {k}")
        macs, params = engine.count_macs(self.model, input_size), engine.count_params(self.model)
        before = self.val_acc(self.model)  # after any BN recalibration, before any training
        st["curve"].append({"step": k, "channel_ratio": round(info["ratio"], 5), "macs": macs, "params": params,
                            "macs_ratio": macs / st["base"]["macs"], "params_ratio": params / st["base"]["params"],
                            "target_ratio": self.step_ratio(k), "backoff": back is not None and back["step"] == k,
                            "target_reached": info["reached"], "bn_recalibrated": recalibrated,
                            "val_accuracy_before_recovery": before, "prune_seconds": time.perf_counter() - t0,
                            **latency.curve_fields(info)})
        self.stage.log(f"pruning step {k}/{n_steps} ({cc.importance}): channel ratio {info['ratio']:.3f} -> "
                       f"{macs / 1e6:.2f}M MACs ({macs / st['base']['macs']:.3f}), {params / 1e6:.3f}M params "
                       f"({params / st['base']['params']:.3f}); selection acc before recovery {before:.4f} "
                       f"({'BN statistics recalibrated' if recalibrated else 'BN statistics as trained'})")
        if not info["reached"]:
            self.stage.log(f"warning: step {k} could not reach its {by} target {info['target']} even at "
                           f"compress.max_layer_pruning_ratio={cc.max_layer_pruning_ratio}")
        st.update(recovering=True, epoch=0, step=0)
        self.opt = self.sched = None
        self.save_ckpt()

    def recover(self, k: int) -> None:
        """KD fine-tuning after a pruning step, one LR for the whole network: compress.recovery_lr, else twice the
        distillation's backbone LR (pruned layers must re-learn, but a large LR distorts the pretrained features;
        digits, 3 steps to 0.5 MACs: selection 0.952 after step 2 at lr 0.002 vs 0.967 at 0.0005).

        Always the whole schedule, compress.recovery_epochs with the LR annealed to 0, and the step is judged once, on
        the final weights. Photos need several epochs (flowers 224 px, Taylor step to 0.78 MACs: 0.689 -> 0.878 after
        2 epochs, train accuracy still climbing). Stopping at the first epoch whose selection accuracy was back at the
        student's let a lucky epoch decide, then judged the step on that same lucky figure, with weights not yet
        annealed: flowers at native size, step 1 stopped at epoch 4 of 6 on 0.917 (180 selection images, above the
        student's 0.906) and was 0.858 on the report split, 13 images below the student (fp32); every step that ran
        all 6 epochs (cats and flowers, 224 px and native) ended 0-5 report images below it. The per-epoch selection
        accuracy is only logged."""
        cc, st, n_steps = self.cc, self.st, self.target()[2]
        recovery = st["curve"][-1].setdefault("recovery", [])
        lr = cc.recovery_lr if cc.recovery_lr is not None else 2 * cc.lr * cc.backbone_lr_mult
        self.new_optimizer(lr, cc.recovery_epochs, 0.0)
        for rec in self.train_epochs(cc.recovery_epochs, f"recover {k}/{n_steps}"):
            rec["val_accuracy"] = self.val_acc(self.model)
            recovery.append(rec)
            self.stage.log(f"recovery {k}/{n_steps} epoch {rec['epoch'] + 1}/{cc.recovery_epochs}: train loss "
                           f"{rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f} | selection acc "
                           f"{rec['val_accuracy']:.4f} (the student's {st['student_val']:.4f})")
            self.save_ckpt()

    def judge(self, k: int) -> None:
        """compress.max_accuracy_drop vs the student: a step that breaks it stops pruning. Every step's model is
        saved either way, because export judges them against the teacher (run.max_accuracy_drop)."""
        cc, st, stage = self.cc, self.st, self.stage
        after = self.val_acc(self.model)
        drop = st["student_val"] - after
        ok = drop <= cc.max_accuracy_drop + 1e-9
        st["curve"][-1].update(val_accuracy_after_recovery=after, within_budget=ok)
        if stage.is_main:
            save_model_artifact(stage.dir / f"pruned_step{k}.pt", self.model, name=self.cfg.student.name,
                                classes=self.data.classes, preprocessing=self.pre, pruning_history=st["history"],
                                extra={"distilled_from": self.tmeta["name"], "pruning_step": k,
                                       "macs_ratio": st["curve"][-1]["macs_ratio"], "val_accuracy": after})
        if ok:
            st["good"] = {"step": k, "history": st["history"], "model": _snapshot(self.model)}
            stage.log(f"step {k}: selection accuracy {after:.4f} after recovery (drop {drop:+.4f}, budget "
                      f"{cc.max_accuracy_drop:g})")
            self.stop_if_out_of_reach(k, after)
            return
        by, ratio, _ = self.target()
        good = st["curve"][st["good"]["step"]]
        st["stopped"] = (f"pruning step {k} broke the accuracy budget: selection accuracy {after:.4f} after recovery "
                         f"is {drop:.4f} below the student's {st['student_val']:.4f} (max_accuracy_drop "
                         f"{cc.max_accuracy_drop:g}). Pruning stopped; keeping the model of step {good['step']} "
                         f"({good['macs_ratio']:.3f} of the student's MACs, {good['params_ratio']:.3f} of its params; "
                         f"target {by} ratio {ratio:g})")
        stage.warn(f"BUDGET: {st['stopped']}")

    def back_off(self, k: int) -> None:
        """After the first failed step (compress budget broken, or out of reach of the teacher), one milder step:
        from the step before it, to the geometric mean of the two steps' targets. The schedule is coarse (3 steps to
        0.5 MACs: 0.79 first): on cats 224 px, step 1 ended 4 images below the teacher on the 150-image selection split,
        where 2.5 are allowed, so nothing smaller than the student could ship. Export ships the most pruned step of all
        that meets the end-to-end budget; pruning ends after the back-off step, whatever it gives."""
        st, cc = self.st, self.cc
        if not cc.backoff or latency.wanted(cc):
            return
        by, back = self.target()[0], st.get("backoff")
        if back is not None and back["step"] == k:  # pruning ends after the back-off step
            outcome = f"failed too: {st['stopped']}" if st["stopped"] else "is kept"
            st["stopped"] = (f"{back['after']}. Then one milder back-off step {k} ({back['ratio']:.3f} of the "
                             f"student's {by}, from step {back['from_step']}): {outcome}")
            return
        # halfway (geometrically) between what steps k-1 and k reached: a step that could not reach its target
        # (compress.max_layer_pruning_ratio) is larger than planned
        if st["stopped"] is None:
            return
        before, failed = st["curve"][k - 1][f"{by}_ratio"], st["curve"][k][f"{by}_ratio"]
        if failed > 0.98 * before:  # no milder step left between them
            return
        if st["curve"][k - 1]["val_accuracy_after_recovery"] < self.reach_floor() - 1e-9:
            # the step before is out of reach itself (the student can be: flowers 224 px, 3 images below a teacher of
            # 168/180): a milder step from it cannot ship either
            return
        ratio = math.sqrt(before * failed)
        st["backoff"] = {"step": k + 1, "from_step": k - 1, "ratio": ratio, "after": st["stopped"]}
        st["stopped"] = None
        self.stage.log(f"back-off: one milder pruning step {k + 1}, from step {k - 1} to {ratio:.3f} of the student's "
                       f"{by} (step {k} failed)")

    def stop_if_out_of_reach(self, k: int, after: float) -> None:
        """Stop pruning once a step is more than run.max_accuracy_drop plus one image below the teacher on the
        selection split: export's paired rule can never ship it, and smaller models only lose more (flowers 224 px:
        steps 2 and 3 cost 22 minutes of recovery after step 1 had already missed the teacher by 3 images)."""
        st = self.st
        if after >= self.reach_floor() - 1e-9:
            return
        st["stopped"] = (f"pruning step {k} is {st['teacher_val'] - after:.4f} below the teacher's selection accuracy "
                         f"{st['teacher_val']:.4f}, more than run.max_accuracy_drop={self.cfg.run.max_accuracy_drop:g} "
                         f"plus one image: export cannot ship it, and further steps would only lose more. Pruning "
                         f"stopped after step {k}")
        self.stage.warn(f"BUDGET: {st['stopped']}")

    def reach_floor(self) -> float:
        """The lowest selection accuracy export's paired rule could still ship: the teacher's, less
        run.max_accuracy_drop and one image (the teacher is evaluated once, on first use)."""
        st = self.st
        if st.get("teacher_val") is None:
            st["teacher_val"] = _teacher_accuracy(self.teacher, self.data.val, eval_loaders(self.teacher_pre, self.cfg,
                                                  self.device), self.device, self.num_classes, self.amp)
        return st["teacher_val"] - self.cfg.run.max_accuracy_drop - 1 / max(1, len(self.data.val))

    def kept_model(self) -> tuple[nn.Module, list]:
        """The last model within the budget (rebuilt from its history and weights when a later step broke it)."""
        st = self.st
        if st["good"] is not None and st["good"]["step"] != st["curve"][-1]["step"]:
            model = rebuild(self.cfg.student.name, self.num_classes, st["good"]["history"], self.input_size,
                            st["good"]["model"]).to(self.device)
            return model, st["good"]["history"]
        return self.model, st["history"]

    # ------------------------------------------------------------------ 3. report rows (every rank), artifacts (rank 0)
    def finish(self, inputs: dict) -> dict:
        """pruned.pt (rank 0), the report rows (every rank evaluates its share: measure_rows), then metrics, plot and
        manifest (rank 0). Every rank calls it. -> the stage's result on rank 0, {} on the others."""
        model, history = self.kept_model()
        if self.stage.is_main:
            self.save_pruned(model, history)
        rows, full = self.measure_rows()
        return self.write_outputs(history, rows, full, inputs) if self.stage.is_main else {}

    def kept_step(self) -> int:
        """The pruning step of the model that is kept (the last within the budget; 0 = the unpruned student)."""
        return self.st["good"]["step"] if self.st["good"] else 0

    def save_pruned(self, model: nn.Module, history: list) -> None:
        """pruned.pt, checked by reloading it (rank 0)."""
        cc, stage, good_step = self.cc, self.stage, self.kept_step()
        final = self.st["curve"][good_step]
        save_model_artifact(stage.dir / "pruned.pt", model, name=self.cfg.student.name, classes=self.data.classes,
                            preprocessing=self.pre, pruning_history=history,
                            extra={"distilled_from": self.tmeta["name"], "pruning_step": good_step,
                                   "macs_ratio": final["macs_ratio"], "params_ratio": final["params_ratio"],
                                   "importance": cc.importance, "round_to": cc.round_to})
        diff = check_reload(stage.dir / "pruned.pt", model, self.input_size, "pruned.pt")
        stage.log(f"pruned.pt reloads from name + pruning history ({len(history)} entries) with outputs within {diff:.1e}")

    def write_outputs(self, history: list, rows: dict, full: dict, inputs: dict) -> dict:
        """metrics.json, pruning_curve.png and the manifest, from the report rows (rank 0)."""
        cc, st, stage, good_step = self.cc, self.st, self.stage, self.kept_step()
        by, ratio, n_steps = self.target()
        achieved = {"macs_ratio": rows["pruned"]["macs"] / rows["student"]["macs"],
                    "params_ratio": rows["pruned"]["params"] / rows["student"]["params"],
                    **latency.achieved(st["curve"], good_step, cc)}
        reached = achieved[f"{by}_ratio"] <= ratio + 1e-9
        stage.log(f"params / MACs before -> after pruning: {rows['student']['params'] / 1e6:.3f}M -> "
                  f"{rows['pruned']['params'] / 1e6:.3f}M params ({achieved['params_ratio']:.3f}), "
                  f"{rows['student']['macs'] / 1e6:.2f}M -> {rows['pruned']['macs'] / 1e6:.2f}M MACs "
                  f"({achieved['macs_ratio']:.3f}; target {by} ratio {ratio:g}{'' if reached else ' NOT reached'})\n"
                  + _table(rows))
        if st["stopped"]:
            stage.log(f"BUDGET: {st['stopped']}")
        step_files = [f"pruned_step{c['step']}.pt" for c in st["curve"][1:]]
        metrics = {
            **rows,
            "achieved": {**achieved, "target_by": by, "target_ratio": ratio, "target_reached": reached},
            "budget": {"max_accuracy_drop": cc.max_accuracy_drop, "student_val_accuracy": st["student_val"],
                       "kept_step": good_step, "stopped": st["stopped"] is not None, "message": st["stopped"]},
            "pruning_curve": st["curve"], "distill_history": st["distill_history"],
            "kd": {"temperature": cc.temperature, "alpha": cc.alpha, "epochs": cc.epochs,
                   "recovery_epochs": cc.recovery_epochs, "teacher_logits_cached": self.cached is not None,
                   "separate_teacher_preprocessing": self.two_views},
            "pruning": {"importance": cc.importance, "steps": n_steps, "round_to": cc.round_to,
                        "global_pruning": cc.global_pruning, "history_entries": len(history)},
            "probe": st["probe"], "student_source": st["student_source"],
            "student_epoch": st["student_epoch"],
            "steps": [{"step": 0, "file": "student.pt", "macs_ratio": 1.0, "val_accuracy": st["student_val"]}] + [
                {"step": c["step"], "file": f"pruned_step{c['step']}.pt", "macs_ratio": c["macs_ratio"],
                 "params_ratio": c["params_ratio"], "val_accuracy": c.get("val_accuracy_after_recovery"),
                 "within_compress_budget": c.get("within_budget"), "backoff": c.get("backoff", False)}
                for c in st["curve"][1:]],
            "classes": self.data.classes, "splits": self.data.counts(), "split_roles": self.data.describe(),
            "test_is_val": self.data.test_is_val, "preprocessing": {"teacher": self.teacher_pre, "student": self.pre},
            "evaluation": full, "device": str(self.device), "world_size": stage.dist.world_size,
            "amp": str(self.amp) if self.amp else "off", "train_seconds": st["train_seconds"],
        }
        artifacts.write_json(stage.dir / "metrics.json", metrics)
        _plot(st["curve"], st["student_val"], cc.max_accuracy_drop, rows["teacher"]["val_accuracy"],
              stage.dir / "pruning_curve.png")
        extra_files = step_files + (["probe_student.pt"] if (stage.dir / "probe_student.pt").exists() else [])
        stage.finish(["student.pt", "pruned.pt", "metrics.json", "pruning_curve.png", *extra_files],
                     {"train_seconds": st["train_seconds"]}, {"budget_stopped": st["stopped"] is not None},
                     config_hash=self.chash, inputs=inputs)
        (stage.dir / "checkpoint.pt").unlink(missing_ok=True)
        stage.log(f"wrote {stage.dir}/student.pt, pruned.pt, {', '.join(extra_files)}, metrics.json, pruning_curve.png")
        return {"student_val_accuracy": rows["student"]["val_accuracy"],
                "pruned_val_accuracy": rows["pruned"]["val_accuracy"],
                "pruned_test_accuracy": rows["pruned"]["test_accuracy"], "macs_ratio": achieved["macs_ratio"],
                "params_ratio": achieved["params_ratio"], "budget_stopped": st["stopped"] is not None}

    def measure_rows(self) -> tuple[dict, dict]:
        """teacher / student / pruned: accuracy on both splits, params, MACs (latency is measured once, by export).

        Every rank calls it and gets the same rows: student.pt and pruned.pt come from rank 0 (stage.load_artifact),
        and each rank evaluates its share of each split (engine.evaluate_sharded). Rank 0 alone made the others wait
        in a collective through six evaluation passes (issue #15 #3)."""
        rows, full, cfg, data = {}, {}, self.cfg, self.data
        makers = {"teacher": eval_loaders(self.teacher_pre, cfg, self.device)}
        makers["student"] = makers["pruned"] = self.make_eval  # the student's loaders, already running
        for role in ("teacher", "student", "pruned"):
            m = self.teacher if role == "teacher" else self.stage.load_artifact(f"{role}.pt")[0]
            p = self.teacher_pre if role == "teacher" else self.pre
            val, test = (engine.evaluate_sharded(m, split, makers[role], self.device, self.num_classes, data.classes,
                                                 self.amp) for split in (data.val, data.test))
            rows[role] = {"name": self.tmeta["name"] if role == "teacher" else cfg.student.name,
                          "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
                          "params": engine.count_params(m), "macs": engine.count_macs(m, p["input_size"]),
                          "input_size": p["input_size"]}
            full[role] = {"val": val, "test": test}
        return rows, full


def taylor_grads(model: nn.Module, task: DistillationTask, train_loader, cc, device) -> list:
    """Gradients of the KD loss over the first compress.taylor_batches training batches, for Taylor importance.

    Eval mode (no dropout, running BN statistics) and un-augmented, unsharded batches: the same on every
    DDP rank and on a resumed run, and it draws nothing from the global RNG.
    """
    m = engine.unwrap(model)
    m.eval()
    m.zero_grad(set_to_none=True)
    loader = train_loader(0, rank=0, world_size=1, augment=False)
    for i, batch in enumerate(loader):
        if i >= max(1, cc.taylor_batches):
            break
        batch = [b.to(device) for b in batch]
        loss, _, _ = task(m, batch)
        loss.backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    # cuDNN is not deterministic: average over ranks so every rank ranks the channels from the same numbers
    return engine.all_reduce_mean(grads)
