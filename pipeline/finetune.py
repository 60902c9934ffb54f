"""The finetune stage: an ImageNet-pretrained teacher fine-tuned on the user's photos.

Reads the config and data; writes under run.dir/finetune:
  teacher.pt      best-on-val weights as a model artifact (state_dict + preprocessing + labels)
  metrics.json    per-epoch train/val curves, best epoch, val and test metrics (accuracy, per-class
                  precision/recall/F1, confusion matrix)
  curves.png, confusion.png, config.json, manifest.json (written last)
  checkpoint.pt   training state while the stage runs (removed once the manifest is written)

Strategies (finetune.strategy):
  linear_probe  backbone frozen (BatchNorm statistics too), only the new head trains
  partial       the first finetune.freeze_blocks blocks stay frozen, the rest trains
  full          everything trains, the backbone at lr * backbone_lr_mult
  two_phase     head only for finetune.head_epochs, then everything, backbone at lr * backbone_lr_mult
  auto          by training images per class (median): < 20 linear_probe, > 1000 full, else two_phase
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from models import backbone_blocks, build_model, find_head, load_model_artifact, save_model_artifact
from pipeline import artifacts, engine
from pipeline.data import class_counts, make_loader, prepare_data, resolve_preprocessing, steps_per_epoch, summary

STAGE = "finetune"
AUTO_LINEAR_PROBE_BELOW = 20     # images per class
AUTO_FULL_ABOVE = 1000


def resolve_strategy(strategy: str, train_counts: list[int]) -> str:
    if strategy != "auto":
        return strategy
    per_class = statistics.median(train_counts)
    if per_class < AUTO_LINEAR_PROBE_BELOW:
        return "linear_probe"
    if per_class > AUTO_FULL_ABOVE:
        return "full"
    return "two_phase"


def plan_phases(strategy: str, cfg_ft) -> list[dict]:
    """[{name, epochs, frozen_blocks}] where frozen_blocks is 'all', an int, or 0."""
    if strategy == "linear_probe":
        return [{"name": "head", "epochs": cfg_ft.epochs, "frozen_blocks": "all"}]
    if strategy == "partial":
        return [{"name": "partial", "epochs": cfg_ft.epochs, "frozen_blocks": cfg_ft.freeze_blocks}]
    if strategy == "full":
        return [{"name": "full", "epochs": cfg_ft.epochs, "frozen_blocks": 0}]
    phases = [{"name": "head", "epochs": cfg_ft.head_epochs, "frozen_blocks": "all"},
              {"name": "full", "epochs": cfg_ft.epochs - cfg_ft.head_epochs, "frozen_blocks": 0}]
    return [p for p in phases if p["epochs"] > 0]


def phase_at(phases: list[dict], epoch: int) -> tuple[int, int]:
    """-> (phase index, first epoch of that phase) for a global epoch number."""
    start = 0
    for i, p in enumerate(phases):
        if epoch < start + p["epochs"]:
            return i, start
        start += p["epochs"]
    return len(phases) - 1, start - phases[-1]["epochs"]


def set_trainable(model: nn.Module, frozen_blocks) -> tuple[list, list]:
    """Freeze per the phase; -> (head params, trainable backbone params)."""
    head_name, _ = find_head(model)
    blocks = backbone_blocks(model)
    n_frozen = len(blocks) if frozen_blocks == "all" else min(int(frozen_blocks), len(blocks))
    frozen = {name for block in blocks[:n_frozen] for name in block}
    head, backbone = [], []
    for name, p in model.named_parameters():
        p.requires_grad = name not in frozen
        if name.startswith(head_name + "."):
            head.append(p)
        elif p.requires_grad:
            backbone.append(p)
    return head, backbone


def train_mode_keeping_frozen_bn(model: nn.Module, all_bn: bool = False) -> None:
    """model.train(), except BatchNorm layers whose parameters are frozen (or all, with all_bn) keep
    their running statistics and use them (eval mode)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if all_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()


def make_optimizer(cfg_ft, head: list, backbone: list):
    groups = [{"params": head, "lr": cfg_ft.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg_ft.lr * cfg_ft.backbone_lr_mult})
    if cfg_ft.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg_ft.lr, momentum=cfg_ft.momentum, weight_decay=cfg_ft.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg_ft.lr, weight_decay=cfg_ft.weight_decay)


def make_scheduler(cfg_ft, optimizer, phase_epochs: int, steps: int):
    fn = engine.warmup_decay_lambda(phase_epochs * steps, int(round(cfg_ft.warmup_epochs * steps)),
                                    cfg_ft.scheduler, cfg_ft.step_size * steps, cfg_ft.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _plots(history: list[dict], test: dict, classes: list[str], stage_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    a2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    a2.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for a in (a1, a2):
        a.legend()
        a.grid(alpha=0.3)
    artifacts.save_figure(fig, stage_dir / "curves.png")
    plt.close(fig)

    cm = torch.tensor(test["confusion"], dtype=torch.float)
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"test confusion (accuracy {test['accuracy']:.3f})")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if cm[i, j] > 0:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    artifacts.save_figure(fig, stage_dir / "confusion.png")
    plt.close(fig)
    return ["curves.png", "confusion.png"]


def config_hash(cfg) -> str:
    return artifacts.sha256_json({"sections": cfg.section_hash("data", "teacher", "finetune"), "seed": cfg.run.seed})


def run(cfg, force: bool = False) -> dict:
    t_start = time.perf_counter()
    dist, device = engine.init_distributed(cfg.run.device)
    engine.set_threads(cfg.run.threads)
    stage_dir = cfg.run_dir / STAGE
    log = print if dist.is_main else (lambda *a, **k: None)

    # Rank 0 checks the data and writes splits.json; the others then read the same splits.
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        data = prepare_data(cfg)
    engine.barrier()
    if not dist.is_main:
        data = prepare_data(cfg, write=False)
    chash = config_hash(cfg)
    inputs = {"data": data.fingerprint}
    if not force and artifacts.manifest_is_current(stage_dir, chash, inputs):
        log(f"[finetune] up to date, skipping ({stage_dir / 'manifest.json'}; use --force to rerun)")
        return {"skipped": True, "stage_dir": str(stage_dir)}
    log(f"[finetune] data: {summary(data)}")
    engine.barrier()
    if dist.is_main:
        artifacts.invalidate(stage_dir)

    num_classes = len(data.classes)
    torch.manual_seed(cfg.run.seed)
    model, pretrained = build_model(cfg.teacher.name, num_classes, cfg.teacher.weights)
    pre = resolve_preprocessing(pretrained, cfg.data)
    strategy = resolve_strategy(cfg.finetune.strategy, class_counts(data.train, num_classes))
    phases = plan_phases(strategy, cfg.finetune)
    log(f"[finetune] {cfg.teacher.name} ({engine.count_params(model) / 1e6:.2f}M params) on {device}, "
        f"strategy {strategy}{' (auto)' if cfg.finetune.strategy == 'auto' else ''}: "
        + ", ".join(f"{p['name']} x{p['epochs']}" for p in phases)
        + f", input {pre['input_size']}, {pre['interpolation']}, mean {pre['mean']}")

    amp = engine.amp_dtype(cfg.finetune.amp, device)
    channels_last = engine.use_channels_last(cfg.finetune.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    steps = steps_per_epoch(len(data.train), cfg.data.batch_size, dist.world_size, cfg.finetune.max_steps_per_epoch)
    ckpt_path = stage_dir / "checkpoint.pt"
    best_path = stage_dir / "best.pt"
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.finetune.label_smoothing)

    def compute_loss(m, batch):
        x, y = batch
        logits = m(x)
        return loss_fn(logits, y), logits, y

    # ---- resume or start
    state = {"epoch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1, "history": [], "train_seconds": 0.0}
    ckpt = engine.load_checkpoint(ckpt_path)
    if ckpt is not None and (ckpt.get("config_hash") != chash or ckpt.get("data") != data.fingerprint
                             or ckpt.get("world_size") != dist.world_size):
        log("[finetune] checkpoint is from another config, data or world size: starting over")
        ckpt = None
    if ckpt is not None:
        engine.unwrap(model).load_state_dict(ckpt["model"])
        state.update({k: ckpt[k] for k in state})
        log(f"[finetune] resuming at epoch {state['epoch'] + 1}, step {state['step']} (best val so far "
            f"{state['best_accuracy']:.4f})")

    total_epochs = sum(p["epochs"] for p in phases)
    phase_idx, optimizer, scheduler, ddp_model = None, None, None, model
    val_loader = make_loader(data.val, pre, cfg, train=False) if dist.is_main else None

    def save(epoch: int, step: int) -> None:
        if dist.is_main:
            engine.save_checkpoint(ckpt_path, model=engine.unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                                   scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), phase=phase_idx,
                                   config_hash=chash, data=data.fingerprint, world_size=dist.world_size,
                                   **{**state, "epoch": epoch, "step": step})

    while state["epoch"] < total_epochs:
        epoch = state["epoch"]
        idx, phase_start = phase_at(phases, epoch)
        if idx != phase_idx:  # enter a phase: freeze, new optimizer and schedule, (re)wrap for DDP
            phase_idx = idx
            head, backbone = set_trainable(engine.unwrap(model), phases[idx]["frozen_blocks"])
            optimizer = make_optimizer(cfg.finetune, head, backbone)
            scheduler = make_scheduler(cfg.finetune, optimizer, phases[idx]["epochs"], steps)
            if ckpt is not None:  # resuming: same phase -> its optimizer state; a new phase starts fresh
                if ckpt["phase"] == idx:
                    optimizer.load_state_dict(ckpt["optimizer"])
                    scheduler.load_state_dict(ckpt["scheduler"])
                    scaler.load_state_dict(ckpt["scaler"])
                engine.set_rng_state(ckpt["rng"])
                ckpt = None
            if dist.distributed:
                ddp_model = nn.parallel.DistributedDataParallel(
                    engine.unwrap(model), device_ids=[device.index] if device.type == "cuda" else None)
            n_train = sum(p.numel() for p in engine.unwrap(model).parameters() if p.requires_grad)
            log(f"[finetune] phase {phases[idx]['name']}: {n_train / 1e6:.2f}M trainable params, "
                f"lr head {cfg.finetune.lr:g}" + (f", backbone {cfg.finetune.lr * cfg.finetune.backbone_lr_mult:g}"
                                                   if backbone else ""))

        loader = make_loader(data.train, pre, cfg, train=True, epoch=epoch, start_step=state["step"],
                             rank=dist.rank, world_size=dist.world_size)
        every = cfg.finetune.checkpoint_every_steps
        on_step = (lambda s: save(epoch, s) if s % every == 0 and s < steps else None) if every > 0 else None
        train = engine.train_one_epoch(
            ddp_model, loader, optimizer, scheduler, compute_loss, device, amp=amp, scaler=scaler,
            grad_clip=cfg.finetune.grad_clip, channels_last=channels_last, start_step=state["step"], max_steps=steps,
            on_step=on_step, progress=cfg.run.progress and dist.is_main,
            desc=f"epoch {epoch + 1}/{total_epochs} {phases[idx]['name']}",
            train_mode=lambda m: train_mode_keeping_frozen_bn(m, cfg.finetune.freeze_bn_stats))
        state["train_seconds"] += train["seconds"]

        if dist.is_main:
            val = engine.evaluate(model, val_loader, device, num_classes, data.classes, amp, channels_last)
            record = {"epoch": epoch, "phase": phases[idx]["name"], "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                      "images_per_s": train["images_per_s"] * dist.world_size, "resumed_mid_epoch": state["step"] > 0}
            state["history"].append(record)
            log(f"[finetune] epoch {epoch + 1}/{total_epochs} {phases[idx]['name']}: train loss {train['loss']:.4f} "
                f"acc {train['accuracy']:.4f} | val loss {val['loss']:.4f} acc {val['accuracy']:.4f} | "
                f"{record['images_per_s']:.0f} img/s")
            if val["accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = val["accuracy"], epoch
                save_model_artifact(best_path, model, name=cfg.teacher.name, classes=data.classes,
                                    preprocessing=pre, extra={"epoch": epoch, "val_accuracy": val["accuracy"]})
        state = engine.broadcast_object(state)
        state["epoch"], state["step"] = epoch + 1, 0
        save(epoch + 1, 0)
        engine.barrier()

    # ---- the best checkpoint on the test split
    result = {"skipped": False, "stage_dir": str(stage_dir)}
    if dist.is_main:
        best, _ = load_model_artifact(best_path, device)
        val = engine.evaluate(best, make_loader(data.val, pre, cfg, train=False), device, num_classes, data.classes)
        test = engine.evaluate(best, make_loader(data.test, pre, cfg, train=False), device, num_classes, data.classes)
        note = " (no test split: measured on val)" if data.test_is_val else ""
        log(f"[finetune] best epoch {state['best_epoch'] + 1}: val accuracy {val['accuracy']:.4f}, "
            f"test accuracy {test['accuracy']:.4f}{note}")
        save_model_artifact(stage_dir / "teacher.pt", best, name=cfg.teacher.name, classes=data.classes,
                            preprocessing=pre, extra={"strategy": strategy, "best_epoch": state["best_epoch"],
                                                      "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"]})
        metrics = {
            "model": cfg.teacher.name, "weights": cfg.teacher.weights, "strategy": strategy, "phases": phases,
            "classes": data.classes, "splits": data.counts(), "test_is_val": data.test_is_val,
            "skipped_images": data.skipped, "preprocessing": pre, "params": engine.count_params(best),
            "device": str(device), "world_size": dist.world_size, "amp": str(amp) if amp else "off",
            "history": state["history"], "best_epoch": state["best_epoch"],
            "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "val": val, "test": test,
            "train_seconds": state["train_seconds"],
        }
        artifacts.write_json(stage_dir / "metrics.json", metrics)
        artifacts.write_json(stage_dir / "config.json", cfg.to_dict())
        plots = _plots(state["history"], test, data.classes, stage_dir)
        artifacts.write_manifest(stage_dir, STAGE, chash, inputs,
                                 ["teacher.pt", "metrics.json", "config.json", *plots],
                                 {"total_seconds": time.perf_counter() - t_start,
                                  "train_seconds": state["train_seconds"]})
        for leftover in (ckpt_path, best_path):  # the manifest now marks the stage done
            leftover.unlink(missing_ok=True)
        result.update(test_accuracy=test["accuracy"], val_accuracy=val["accuracy"], strategy=strategy)
        log(f"[finetune] wrote {stage_dir}/teacher.pt, metrics.json, curves.png, confusion.png")
    engine.barrier()
    return result
