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

from models import build_model, find_head, load_model_artifact, rebuild_pruned, save_model_artifact
from models.artifact import _plain_history
from pipeline import artifacts, engine
from pipeline.config import ConfigError
from pipeline.data import is_augmented, make_loader, prepare_data, resolve_preprocessing, steps_per_epoch, summary

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
    return m, _plain_history(pruner.pruning_history())


def nearest_round_ratios(model: nn.Module, head: nn.Module, ratio: float, cfg_c) -> dict | None:
    """Per-layer ratios that keep round(C * (1 - ratio) / round_to) * round_to channels (at least round_to).

    torch-pruning's round_to rounds the kept channels *down*: any pruning of a 16-channel layer leaves 8,
    of a 24-channel one 16, so small early layers lose far more than asked (measured on EfficientNet-Lite0,
    digits, one step to 0.79 MACs with BN recalibration: 0.914 val accuracy with round-down, 0.967 with
    this). The ratios are exact multiples, so torch-pruning's own rounding leaves them unchanged.
    """
    rt = cfg_c.round_to
    if rt <= 1 or ratio <= 0:
        return None
    out = {}
    for mod in model.modules():
        if mod is head or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        c = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        keep = max(rt, int(round(c * (1 - ratio) / rt)) * rt,
                   int(math.ceil(c * (1 - cfg_c.max_layer_pruning_ratio) / rt)) * rt)
        out[mod] = max(0.0, 1.0 - (keep + 0.01) / c) if keep < c else 0.0
    return out


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
    m = copy.deepcopy(engine.unwrap(model)).cpu().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *input_size, generator=g)
    with torch.no_grad():
        diff = (m(x) - reloaded(x)).abs().max().item()
    if not diff <= RELOAD_ATOL:
        raise RuntimeError(f"{what}: reloaded {path} gives outputs {diff:.3g} away from the in-memory model")
    return diff


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
    if cfg.compress.round_to < 0 or cfg.compress.recovery_epochs < 0 or cfg.compress.max_steps_per_epoch < 0:
        raise ConfigError("compress.round_to, compress.recovery_epochs and compress.max_steps_per_epoch must be >= 0")
    if not 0 < cfg.compress.max_layer_pruning_ratio < 1:
        raise ConfigError(f"compress.max_layer_pruning_ratio must be in (0, 1), "
                          f"got {cfg.compress.max_layer_pruning_ratio}")


def same_preprocessing(a: dict, b: dict) -> bool:
    return all(list(a[k]) == list(b[k]) if isinstance(a[k], (list, tuple)) else a[k] == b[k] for k in PRE_KEYS)


def _val_accuracy(model, loader, device, num_classes, amp=None) -> float:
    """Top-1 on val (rank 0 measures, every rank gets the value). Patched in tests."""
    acc = engine.evaluate(model, loader, device, num_classes, amp=amp)["accuracy"] if loader is not None else None
    return engine.broadcast_object(acc)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in engine.unwrap(model).state_dict().items()}


def _latency(model: nn.Module, input_size, runs: int) -> dict:
    m = copy.deepcopy(engine.unwrap(model)).cpu().float().eval()
    return {"latency_ms_b1": round(engine.measure_latency_ms(m, input_size, 1, runs), 3),
            "latency_ms_b32": round(engine.measure_latency_ms(m, input_size, 32, max(3, runs // 3)), 3)}


def _plot(curve: list[dict], student_val: float, max_drop: float, teacher_val: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
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
    head = f"{'model':<10} {'params':>10} {'MACs':>12} {'val acc':>8} {'test acc':>8} {'ms b1':>8} {'ms b32':>8}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<10} {r['params'] / 1e6:>9.3f}M {r['macs'] / 1e6:>11.2f}M {r['val_accuracy']:>8.4f} "
                     f"{r['test_accuracy']:>8.4f} {r['latency_ms_b1']:>8.2f} {r['latency_ms_b32']:>8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage

def run(cfg, force: bool = False) -> dict:
    t_start = time.perf_counter()
    check_config(cfg)
    dist, device = engine.init_distributed(cfg.run.device)
    engine.set_threads(cfg.run.threads)
    cc = cfg.compress
    stage_dir = cfg.run_dir / STAGE
    log = print if dist.is_main else (lambda *a, **k: None)
    teacher_path = cfg.run_dir / "finetune" / "teacher.pt"
    if not teacher_path.exists():
        raise FileNotFoundError(f"{teacher_path} does not exist: the compress stage distils the fine-tuned teacher. "
                                f"Run `make finetune` (python -m pipeline finetune, same config) first")
    if not (teacher_path.parent / "manifest.json").exists():
        log(f"[compress] warning: {teacher_path.parent}/manifest.json is missing (finetune unfinished or rerunning?); "
            f"using {teacher_path} as it is")

    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        data = prepare_data(cfg)
    engine.barrier()
    if not dist.is_main:
        data = prepare_data(cfg, write=False)
    teacher_sha = artifacts.sha256_file(teacher_path)
    chash = config_hash(cfg)
    inputs = {"teacher.pt": teacher_sha, "data": data.fingerprint}
    if not force and artifacts.manifest_is_current(stage_dir, chash, inputs):
        log(f"[compress] up to date, skipping ({stage_dir / 'manifest.json'}; use --force to rerun)")
        return {"skipped": True, "stage_dir": str(stage_dir)}
    log(f"[compress] data: {summary(data)}")
    engine.barrier()
    if dist.is_main:
        artifacts.invalidate(stage_dir)

    # ---- models and preprocessing
    num_classes = len(data.classes)
    torch.manual_seed(cfg.run.seed)
    teacher, tmeta = load_model_artifact(teacher_path, device)
    if list(tmeta["classes"]) != list(data.classes):
        raise ConfigError(f"{teacher_path} was trained on classes {tmeta['classes']}, the data has {data.classes}. "
                          f"Fix: rerun `make finetune` with this data")
    teacher_pre = tmeta["preprocessing"]
    model, native = build_model(cfg.student.name, num_classes, cfg.student.weights)
    pre = resolve_preprocessing(native, cfg.data)
    input_size = pre["input_size"]
    two_views = not same_preprocessing(pre, teacher_pre)
    log(f"[compress] teacher {tmeta['name']} ({engine.count_params(teacher) / 1e6:.2f}M params, input "
        f"{teacher_pre['input_size']}, mean {teacher_pre['mean']}) -> student {cfg.student.name} "
        f"({engine.count_params(model) / 1e6:.2f}M params, input {input_size}, mean {pre['mean']}); "
        + ("each model gets its own preprocessing of the same crops" if two_views else "same preprocessing"))

    amp = engine.amp_dtype(cc.amp, device)
    channels_last = engine.use_channels_last(cc.channels_last, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size, dist.world_size, cc.max_steps_per_epoch)
    ckpt_path = stage_dir / "checkpoint.pt"

    # ---- teacher logits cache (no augmentation only: every epoch sees the same pixels)
    cached = None
    train_samples = data.train
    if cc.cache_teacher_logits and cc.alpha > 0:
        cache_path = stage_dir / "teacher_logits.pt"
        key = artifacts.sha256_json({"teacher": teacher_sha, "data": data.fingerprint, "pre": teacher_pre,
                                     "n": len(data.train), "samples": [p for p, _ in data.train]})
        if dist.is_main:
            blob = artifacts.torch_load(cache_path) if cache_path.exists() else None
            if not (isinstance(blob, dict) and blob.get("key") == key):
                t0 = time.perf_counter()
                logits, _ = engine.predict(teacher, make_loader(data.train, teacher_pre, cfg, train=False), device, amp)
                artifacts.torch_save({"key": key, "logits": logits}, cache_path)
                log(f"[compress] cached the teacher's logits for {len(logits)} training images "
                    f"({time.perf_counter() - t0:.1f}s) in {cache_path}")
        engine.barrier()
        cached = artifacts.torch_load(cache_path)["logits"]
        train_samples = index_labels(data.train, num_classes)
    task = DistillationTask(teacher, cc.temperature, cc.alpha, num_classes, two_views and cached is None, cached)

    def train_loader(epoch: int, start_step: int = 0, rank=None, world_size=None, augment=None):
        return make_loader(train_samples, pre, cfg, train=True, epoch=epoch, start_step=start_step,
                           rank=dist.rank if rank is None else rank,
                           world_size=dist.world_size if world_size is None else world_size,
                           extra_pre=teacher_pre if task.two_views else None, augment=augment)

    val_loader = make_loader(data.val, pre, cfg, train=False) if dist.is_main else None

    def val_acc(m) -> float:
        return _val_accuracy(m, val_loader, device, num_classes, amp)

    # ---- resume or start
    st = {"phase": "distill", "epoch": 0, "step": 0, "prune_step": 0, "recovering": False, "history": [],
          "distill_history": [], "curve": [], "student_val": None, "base": None, "good": None, "stopped": None,
          "train_seconds": 0.0}
    ckpt = engine.load_checkpoint(ckpt_path)
    if ckpt is not None and (ckpt.get("config_hash") != chash or ckpt.get("teacher") != teacher_sha
                             or ckpt.get("data") != data.fingerprint or ckpt.get("world_size") != dist.world_size):
        log("[compress] checkpoint is from another config, teacher, data or world size: starting over")
        ckpt = None
    if ckpt is not None:
        st.update(ckpt["state"])
        if st["history"]:
            model = rebuild(cfg.student.name, num_classes, st["history"], input_size)
        model.load_state_dict(ckpt["model"])
        where = (f"distillation epoch {st['epoch'] + 1}, step {st['step']}" if st["phase"] == "distill" else
                 f"pruning step {st['prune_step'] + 1}, recovery epoch {st['epoch'] + 1} step {st['step']}"
                 if st["recovering"] else f"the end of pruning step {st['prune_step']}")
        log(f"[compress] resuming at {where}")
    model.to(device)

    opt = sched = None

    resume_optimizer = ckpt if ckpt is not None and ckpt.get("optimizer") is not None else None

    def new_optimizer(lr: float, epochs: int, warmup_epochs: float):
        nonlocal opt, sched, resume_optimizer
        opt = torch.optim.AdamW(engine.unwrap(model).parameters(), lr=lr, weight_decay=cc.weight_decay)
        fn = engine.warmup_decay_lambda(max(1, epochs) * steps, int(round(warmup_epochs * steps)), "cosine")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        if resume_optimizer is not None:  # only the training phase the checkpoint was taken in
            opt.load_state_dict(resume_optimizer["optimizer"])
            sched.load_state_dict(resume_optimizer["scheduler"])
            if resume_optimizer.get("scaler"):
                scaler.load_state_dict(resume_optimizer["scaler"])
            resume_optimizer = None

    def save_ckpt() -> None:
        if dist.is_main:
            engine.save_checkpoint(
                ckpt_path, model=engine.unwrap(model).state_dict(), state=st,
                optimizer=opt.state_dict() if opt is not None else None,
                scheduler=sched.state_dict() if sched is not None else None, scaler=scaler.state_dict(),
                config_hash=chash, teacher=teacher_sha, data=data.fingerprint, world_size=dist.world_size)

    def wrap():
        m = engine.unwrap(model)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        if dist.distributed:
            return nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)
        return m

    def train_epochs(total: int, desc: str):
        """Run epochs st['epoch'] .. total-1 (resuming mid-epoch at st['step']); checkpoint after each."""
        ddp_model = wrap()
        every = cc.checkpoint_every_steps
        while st["epoch"] < total:
            epoch = st["epoch"]

            def on_step(s, epoch=epoch):
                if every > 0 and s % every == 0 and s < steps:
                    st["step"] = s
                    save_ckpt()
            # Each phase has its own data order: recovery after step k uses epochs 1000*k + e.
            data_epoch = epoch + 1000 * (st["prune_step"] + 1 if st["phase"] == "prune" else 0)
            start = st["step"]
            loader = train_loader(data_epoch, start)
            r = engine.train_one_epoch(
                ddp_model, loader, opt, sched, task, device, amp=amp, scaler=scaler, grad_clip=cc.grad_clip,
                channels_last=channels_last, start_step=start, max_steps=steps, on_step=on_step,
                progress=cfg.run.progress and dist.is_main, desc=f"{desc} epoch {epoch + 1}/{total}")
            st["train_seconds"] += r["seconds"]
            rec = {"epoch": epoch, "train_loss": r["loss"], "train_accuracy": r["accuracy"],
                   "images_per_s": r["images_per_s"] * dist.world_size, "resumed_mid_epoch": start > 0}
            st.update(epoch=epoch + 1, step=0)
            yield rec

    # Resuming restores the RNG state of the interrupted run right where it was saved (dropout etc.).
    if ckpt is not None:
        engine.set_rng_state(ckpt["rng"])

    # ---- 1. distillation
    if st["phase"] == "distill":
        new_optimizer(cc.lr, cc.epochs, cc.warmup_epochs)
        log(f"[compress] distillation: {cc.epochs} epoch(s) x {steps} steps, T={cc.temperature:g}, "
            f"alpha={cc.alpha:g}, lr {cc.lr:g}" + (", teacher logits cached" if cached is not None else ""))
        for rec in train_epochs(cc.epochs, "distil"):
            rec["val_accuracy"] = val_acc(model)
            st["distill_history"].append(rec)
            log(f"[compress] distil epoch {rec['epoch'] + 1}/{cc.epochs}: train loss {rec['train_loss']:.4f} "
                f"acc {rec['train_accuracy']:.4f} | val acc {rec['val_accuracy']:.4f} | {rec['images_per_s']:.0f} img/s")
            save_ckpt()
        st["student_val"] = val_acc(model)
        if dist.is_main:
            save_model_artifact(stage_dir / "student.pt", model, name=cfg.student.name, classes=data.classes,
                                preprocessing=pre, extra={"distilled_from": tmeta["name"], "val_accuracy": st["student_val"]})
            check_reload(stage_dir / "student.pt", model, input_size, "student.pt")
        m = engine.unwrap(model)
        st["base"] = {"macs": engine.count_macs(m, input_size), "params": engine.count_params(m)}
        st["curve"] = [{"step": 0, "channel_ratio": 0.0, **st["base"], "macs_ratio": 1.0, "params_ratio": 1.0,
                        "val_accuracy_before_recovery": st["student_val"],
                        "val_accuracy_after_recovery": st["student_val"], "within_budget": True}]
        st["good"] = {"step": 0, "history": [], "model": _snapshot(model)}
        st.update(phase="prune", epoch=0, step=0)
        opt = sched = None
        log(f"[compress] distilled student: val accuracy {st['student_val']:.4f}, {st['base']['params'] / 1e6:.3f}M "
            f"params, {st['base']['macs'] / 1e6:.2f}M MACs")
        save_ckpt()

    # ---- 2. iterative pruning with KD recovery and the accuracy budget
    by = "params" if cc.target_params_ratio is not None else "macs"
    ratio = cc.target_params_ratio if by == "params" else cc.target_macs_ratio
    n_steps = cc.pruning_steps if ratio < 1 else 0
    # Recovery restarts from a trained model: a quarter of the distillation LR (digits, 3 steps to 0.5 MACs:
    # val 0.952 after step 2 at lr 0.002 vs 0.967 at 0.0005)
    recovery_lr = cc.recovery_lr if cc.recovery_lr is not None else cc.lr / 4
    while st["prune_step"] < n_steps and st["stopped"] is None:
        k = st["prune_step"] + 1
        if not st["recovering"]:
            target = st["base"][by] * ratio ** (k / n_steps)
            grads = taylor_grads(model, task, train_loader, cc, device) if cc.importance == "taylor" else None
            t0 = time.perf_counter()
            pruned, hist, info = prune_to(engine.unwrap(model), target, input_size, cc, by, grads)
            model = pruned.to(device)
            for p in model.parameters():
                p.requires_grad_(True)
            st["history"] = st["history"] + hist
            # every transformation ends with a check: the head and the replayable history
            with torch.no_grad():
                out = model.eval()(torch.zeros(1, *input_size, device=device))
            if out.shape != (1, num_classes):
                raise RuntimeError(f"pruning step {k}: the model now gives {tuple(out.shape)} outputs")
            check_same_shapes(model, rebuild(cfg.student.name, num_classes, st["history"], input_size),
                              f"pruning step {k}")
            recalibrate_bn(model, train_loader(0, rank=0, world_size=1, augment=False), cc.bn_recalibration_batches,
                           device)
            same = engine.broadcast_object(artifacts.sha256_json(st["history"]))
            if same != artifacts.sha256_json(st["history"]):
                raise RuntimeError(f"pruning step {k} differs between DDP ranks")
            macs, params = engine.count_macs(model, input_size), engine.count_params(model)
            before = val_acc(model)  # after BN recalibration, before any training
            st["curve"].append({"step": k, "channel_ratio": round(info["ratio"], 5), "macs": macs, "params": params,
                                "macs_ratio": macs / st["base"]["macs"], "params_ratio": params / st["base"]["params"],
                                "target_ratio": ratio ** (k / n_steps), "target_reached": info["reached"],
                                "val_accuracy_before_recovery": before, "prune_seconds": time.perf_counter() - t0})
            log(f"[compress] pruning step {k}/{n_steps} ({cc.importance}): channel ratio {info['ratio']:.3f} -> "
                f"{macs / 1e6:.2f}M MACs ({macs / st['base']['macs']:.3f}), {params / 1e6:.3f}M params "
                f"({params / st['base']['params']:.3f}); val acc before recovery {before:.4f}")
            if not info["reached"]:
                log(f"[compress] warning: step {k} could not reach its {by} target {info['target']} even at "
                    f"compress.max_layer_pruning_ratio={cc.max_layer_pruning_ratio}")
            st.update(recovering=True, epoch=0, step=0)
            opt = sched = None
            save_ckpt()
        new_optimizer(recovery_lr, cc.recovery_epochs, 0.0)
        recovery = st["curve"][-1].setdefault("recovery", [])
        for rec in train_epochs(cc.recovery_epochs, f"recover {k}/{n_steps}"):
            recovery.append(rec)
            log(f"[compress] recovery {k}/{n_steps} epoch {rec['epoch'] + 1}/{cc.recovery_epochs}: train loss "
                f"{rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}")
            save_ckpt()
        after = val_acc(model)
        drop = st["student_val"] - after
        ok = drop <= cc.max_accuracy_drop + 1e-9
        st["curve"][-1].update(val_accuracy_after_recovery=after, within_budget=ok)
        if ok:
            st["good"] = {"step": k, "history": st["history"], "model": _snapshot(model)}
            log(f"[compress] step {k}: val accuracy {after:.4f} after recovery (drop {drop:+.4f}, budget "
                f"{cc.max_accuracy_drop:g})")
        else:
            good = st["curve"][st["good"]["step"]]
            st["stopped"] = (f"pruning step {k} broke the accuracy budget: val accuracy {after:.4f} after recovery "
                             f"is {drop:.4f} below the distilled student's {st['student_val']:.4f} (max_accuracy_drop "
                             f"{cc.max_accuracy_drop:g}). Pruning stopped; keeping the model of step {good['step']} "
                             f"({good['macs_ratio']:.3f} of the student's MACs, target {cc.target_macs_ratio:g}"
                             + (f" of params {cc.target_params_ratio:g}" if by == "params" else "") + ")")
            log("[compress] " + "!" * 78 + f"\n[compress] BUDGET: {st['stopped']}\n[compress] " + "!" * 78)
        st.update(prune_step=k, recovering=False, epoch=0, step=0)
        opt = sched = None
        save_ckpt()

    # the last model within the budget
    if st["good"] is not None and st["good"]["step"] != st["curve"][-1]["step"]:
        model = rebuild(cfg.student.name, num_classes, st["good"]["history"], input_size,
                        st["good"]["model"]).to(device)
        history = st["good"]["history"]
    else:
        history = st["history"]

    # ---- 3. artifacts, measurements, manifest (rank 0)
    result = {"skipped": False, "stage_dir": str(stage_dir)}
    if dist.is_main:
        good_step = st["good"]["step"] if st["good"] else 0
        final = st["curve"][good_step]
        save_model_artifact(stage_dir / "pruned.pt", model, name=cfg.student.name, classes=data.classes,
                            preprocessing=pre, pruning_history=history,
                            extra={"distilled_from": tmeta["name"], "pruning_step": good_step,
                                   "macs_ratio": final["macs_ratio"], "params_ratio": final["params_ratio"],
                                   "importance": cc.importance, "round_to": cc.round_to})
        diff = check_reload(stage_dir / "pruned.pt", model, input_size, "pruned.pt")
        log(f"[compress] pruned.pt reloads from name + pruning history ({len(history)} entries) with outputs "
            f"within {diff:.1e}")
        rows, full = {}, {}
        loaders = {}
        for role, path_or_model in (("teacher", teacher), ("student", stage_dir / "student.pt"),
                                    ("pruned", stage_dir / "pruned.pt")):
            m = path_or_model if role == "teacher" else load_model_artifact(path_or_model, device)[0]
            p = teacher_pre if role == "teacher" else pre
            key = "t" if role == "teacher" else "s"
            if key not in loaders:
                loaders[key] = (make_loader(data.val, p, cfg, train=False), make_loader(data.test, p, cfg, train=False))
            val = engine.evaluate(m, loaders[key][0], device, num_classes, data.classes, amp)
            test = engine.evaluate(m, loaders[key][1], device, num_classes, data.classes, amp)
            rows[role] = {"name": tmeta["name"] if role == "teacher" else cfg.student.name,
                          "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
                          "params": engine.count_params(m), "macs": engine.count_macs(m, p["input_size"]),
                          "input_size": p["input_size"], **_latency(m, p["input_size"], cc.latency_runs)}
            full[role] = {"val": val, "test": test}
        achieved = {"macs_ratio": rows["pruned"]["macs"] / rows["student"]["macs"],
                    "params_ratio": rows["pruned"]["params"] / rows["student"]["params"]}
        reached = achieved[f"{by}_ratio"] <= ratio + 1e-9
        note = " (no test split: test figures are on val)" if data.test_is_val else ""
        log(f"[compress] params / MACs before -> after pruning: {rows['student']['params'] / 1e6:.3f}M -> "
            f"{rows['pruned']['params'] / 1e6:.3f}M params ({achieved['params_ratio']:.3f}), "
            f"{rows['student']['macs'] / 1e6:.2f}M -> {rows['pruned']['macs'] / 1e6:.2f}M MACs "
            f"({achieved['macs_ratio']:.3f}; target {by} ratio {ratio:g}{'' if reached else ' NOT reached'})")
        log("[compress] PyTorch CPU fp32 latency (median ms)" + note + "\n" + _table(rows))
        if st["stopped"]:
            log(f"[compress] BUDGET: {st['stopped']}")
        metrics = {
            **rows,
            "achieved": {**achieved, "target_by": by, "target_ratio": ratio, "target_reached": reached},
            "budget": {"max_accuracy_drop": cc.max_accuracy_drop, "student_val_accuracy": st["student_val"],
                       "kept_step": good_step, "stopped": st["stopped"] is not None, "message": st["stopped"]},
            "pruning_curve": st["curve"], "distill_history": st["distill_history"],
            "kd": {"temperature": cc.temperature, "alpha": cc.alpha, "epochs": cc.epochs,
                   "recovery_epochs": cc.recovery_epochs, "teacher_logits_cached": cached is not None,
                   "separate_teacher_preprocessing": two_views},
            "pruning": {"importance": cc.importance, "steps": n_steps, "round_to": cc.round_to,
                        "global_pruning": cc.global_pruning, "history_entries": len(history)},
            "classes": data.classes, "splits": data.counts(), "test_is_val": data.test_is_val,
            "preprocessing": {"teacher": teacher_pre, "student": pre}, "evaluation": full,
            "device": str(device), "world_size": dist.world_size, "amp": str(amp) if amp else "off",
            "latency": "PyTorch eager, CPU, fp32, median ms per forward pass at batch 1 / 32",
            "train_seconds": st["train_seconds"],
        }
        artifacts.write_json(stage_dir / "metrics.json", metrics)
        artifacts.write_json(stage_dir / "config.json", cfg.to_dict())
        _plot(st["curve"], st["student_val"], cc.max_accuracy_drop, rows["teacher"]["val_accuracy"],
              stage_dir / "pruning_curve.png")
        artifacts.write_manifest(stage_dir, STAGE, chash, inputs,
                                 ["student.pt", "pruned.pt", "metrics.json", "config.json", "pruning_curve.png"],
                                 {"total_seconds": time.perf_counter() - t_start, "train_seconds": st["train_seconds"]},
                                 extra={"budget_stopped": st["stopped"] is not None})
        ckpt_path.unlink(missing_ok=True)
        log(f"[compress] wrote {stage_dir}/student.pt, pruned.pt, metrics.json, pruning_curve.png")
        result.update(student_val_accuracy=rows["student"]["val_accuracy"],
                      pruned_val_accuracy=rows["pruned"]["val_accuracy"],
                      pruned_test_accuracy=rows["pruned"]["test_accuracy"], macs_ratio=achieved["macs_ratio"],
                      params_ratio=achieved["params_ratio"], budget_stopped=st["stopped"] is not None)
    engine.barrier()
    return result


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
    return grads
