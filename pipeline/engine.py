"""Training plumbing shared by the stages: devices, DDP, one epoch of training, evaluation, checkpoints.

Plain functions that take what they use (torchvision's reference train.py style). The stages
(finetune, compress) own their recipes; this module owns nothing stage-specific.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline import artifacts


# ----------------------------------------------------------------------------- devices and DDP

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda:<local_rank> when a GPU is usable, else cpu. An explicit cuda without a GPU is an error."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={spec} but torch sees no usable GPU; use run.device=auto or cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_spec: str = "auto") -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun (WORLD_SIZE>1): NCCL on GPUs, gloo on CPU."""
    info = dist_info()
    device = resolve_device(device_spec, info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        info = dist_info()
    return info, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value on every rank (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def amp_dtype(amp: str, device: torch.device):
    """Mixed precision only on CUDA (CPU autocast is slower than fp32 for these convnets)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def use_channels_last(setting: str, device: torch.device) -> bool:
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def set_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- schedules

def warmup_decay_lambda(total_steps: int, warmup_steps: int, kind: str, step_size_steps: int = 0,
                        gamma: float = 0.1):
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "step" and step_size_steps > 0:
            return gamma ** ((step - warmup_steps) // step_size_steps)
        return 1.0
    return fn


# ----------------------------------------------------------------------------- train / evaluate

def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kw)


def train_one_epoch(model, loader, optimizer, scheduler, compute_loss, device, *, amp=None, scaler=None,
                    grad_clip: float = 0.0, channels_last: bool = False, start_step: int = 0,
                    max_steps: int = 0, on_step=None, progress: bool = True, desc: str = "train",
                    train_mode=None) -> dict:
    """One pass over `loader` (which already starts at `start_step`).

    compute_loss(model, batch) -> (loss, logits, labels), with batch already on `device`.
    on_step(step) is called after each optimizer step (global step within the epoch, 1-based), e.g. to
    checkpoint every N steps. `train_mode(model)` puts the model in training mode (default
    model.train(); the finetune stage keeps frozen BatchNorm layers in eval mode).
    """
    (train_mode or (lambda m: m.train()))(model)
    non_blocking = device.type == "cuda"
    total_loss, correct, seen, step = 0.0, 0, 0, start_step
    t0 = time.perf_counter()
    bar = _progress(loader, progress, desc=desc, total=(max_steps - start_step) if max_steps else None)
    for batch in bar:
        if max_steps and step >= max_steps:
            break
        batch = [b.to(device, non_blocking=non_blocking) for b in batch]
        if channels_last:
            batch = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b for b in batch]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, logits, labels = compute_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate "
                                     f"or set grad_clip (finetune.grad_clip / compress.lr)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        step += 1
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if on_step is not None:
            on_step(step)
    seconds = time.perf_counter() - t0
    return {"loss": total_loss / max(1, seen), "accuracy": correct / max(1, seen), "images": seen,
            "steps": step - start_step, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def predict(model, loader, device, amp=None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits float32 [N, C], labels [N]) over the whole loader, model in eval mode."""
    model.eval()
    outs, labels = [], []
    for batch in loader:
        x, y = batch[0].to(device), batch[-1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outs.append(model(x).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           classes: list[str] | None = None) -> dict:
    """Accuracy, CE loss, confusion matrix (rows = true class) and per-class precision/recall/F1."""
    pred = logits.argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    names = classes or [str(i) for i in range(num_classes)]
    return {
        "accuracy": (pred == labels).double().mean().item() if len(labels) else 0.0,
        "loss": nn.functional.cross_entropy(logits, labels).item() if len(labels) else 0.0,
        "n": int(len(labels)),
        "confusion": confusion.tolist(),
        "per_class": {names[i]: {"precision": round(precision[i].item(), 6), "recall": round(recall[i].item(), 6),
                                 "f1": round(f1[i].item(), 6), "support": int(confusion[i].sum())}
                      for i in range(num_classes)},
    }


def evaluate(model, loader, device, num_classes: int, classes: list[str] | None = None, amp=None,
             channels_last: bool = False) -> dict:
    logits, labels = predict(unwrap(model), loader, device, amp, channels_last)
    return classification_metrics(logits, labels, num_classes, classes)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state) -> None:
    """Atomic; tensors and plain values only, so it loads with weights_only=True."""
    artifacts.torch_save({**state, "rng": rng_state()}, path)


def load_checkpoint(path) -> dict | None:
    """The checkpoint, or None if missing or unreadable (a torn file can't happen: writes are atomic)."""
    if not os.path.exists(path):
        return None
    try:
        return artifacts.torch_load(path)
    except Exception as e:  # e.g. written by an incompatible version: start over rather than crash
        print(f"[checkpoint] ignoring unreadable {path}: {e}")
        return None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())


def count_macs(model: nn.Module, input_size) -> int:
    """MACs of one image through the model (torch-pruning's counter)."""
    import torch_pruning as tp

    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = next(m.parameters()).device
    macs, _ = tp.utils.count_ops_and_params(m, torch.zeros(1, *input_size, device=device))
    m.train(was_training)
    return int(macs)


@torch.no_grad()
def measure_latency_ms(model: nn.Module, input_size, batch: int, runs: int = 10, warmup: int = 2,
                       device: torch.device | str = "cpu") -> float:
    """Median wall time (ms) of one forward pass at `batch` images, eval mode, fp32."""
    m = unwrap(model).eval()
    x = torch.randn(batch, *input_size, device=device)
    for _ in range(warmup):
        m(x)
    times = []
    for _ in range(runs):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m(x)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000.0)
    times.sort()
    return times[len(times) // 2]
