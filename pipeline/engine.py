"""Training plumbing shared by the stages: devices, DDP, one epoch of training, evaluation, checkpoints.

Plain functions that take what they use (torchvision's reference train.py style). The stages
(finetune, compress) own their recipes; this module owns nothing stage-specific.

GPU and multi-GPU notes (docs/gpu.md): one process per GPU (torchrun), NCCL on GPUs and gloo on the
CPU; every collective helper here is the identity without a process group, so the CPU path of a
single process is exactly what it was.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import socket
import time
import warnings
import zipfile
from dataclasses import dataclass
from datetime import timedelta

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


def _pg_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_active() -> bool:
    """True inside a process group of several ranks: the collectives here are identities otherwise."""
    return _pg_active()


def _local_gpu_index(local_rank: int, n_gpus: int, local_world_size: int | None = None) -> int:
    """The GPU of this process among the n_gpus it can see.

    - one visible GPU (SLURM --gpus-per-task=1, a Kubernetes pod per GPU, CUDA_VISIBLE_DEVICES set per
      process by the launcher): cuda:0, whatever LOCAL_RANK is. cuda:LOCAL_RANK would be "invalid device
      ordinal" on every rank but the first;
    - several visible GPUs: cuda:LOCAL_RANK (torchrun --nproc_per_node=<GPUs per node>);
    - more processes on this node than visible GPUs: an error now, rather than two ranks on one GPU (NCCL
      refuses that with "Duplicate GPU detected" at the first collective, or both run out of memory).
    """
    if n_gpus == 1:
        if (local_world_size or 1) > 1 and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
            raise RuntimeError(
                f"{local_world_size} processes on this node but only 1 GPU is visible and CUDA_VISIBLE_DEVICES "
                f"is not set: every rank would use the same GPU. Start one process per GPU "
                f"(torchrun --nproc_per_node=<number of GPUs>), or give each process its own GPU")
        return 0
    if 0 <= local_rank < n_gpus:
        return local_rank
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this process sees only {n_gpus} GPUs: start at most {n_gpus} processes per "
        f"node (torchrun --nproc_per_node={n_gpus}), or give each process its own GPU with CUDA_VISIBLE_DEVICES")


def resolve_device(spec: str = "auto", local_rank: int = 0, world_size: int = 1,
                   local_world_size: int | None = None) -> torch.device:
    """run.device -> the torch device of this process.

    auto: this process's GPU when torch can use one (see _local_gpu_index), else cpu.
    cuda: like auto, but an error without a usable GPU.
    cuda:N: that GPU in a single process. Under torchrun (world_size > 1) an explicit index is an error
      unless it is the GPU the rank would get anyway: honouring it would put every rank on GPU N, and
      silently replacing it would ignore what was asked. Use run.device=cuda (or auto) there.
    """
    spec = str(spec or "auto").strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    requested = torch.device("cuda" if spec == "auto" else spec)
    if requested.type != "cuda":
        return requested  # e.g. mps: passed through unchanged
    if not torch.cuda.is_available():
        raise RuntimeError(f"run.device={spec} but torch sees no usable GPU; use run.device=auto or cpu")
    n_gpus = torch.cuda.device_count()
    if requested.index is None:
        return torch.device("cuda", _local_gpu_index(local_rank, n_gpus, local_world_size))
    if requested.index >= n_gpus:
        raise RuntimeError(f"run.device={spec} but this process sees {n_gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); valid: cuda:0..cuda:{n_gpus - 1}")
    if world_size > 1:
        mine = _local_gpu_index(local_rank, n_gpus, local_world_size)
        if requested.index != mine:
            raise RuntimeError(
                f"run.device={spec} under torchrun (world size {world_size}): every rank would train on GPU "
                f"{requested.index}. Use run.device=cuda or auto: each rank then takes its own GPU (this one: "
                f"cuda:{mine})")
    return requested


def init_distributed(device_spec: str = "auto", timeout_s: float | None = None) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun (WORLD_SIZE>1): NCCL on GPUs, gloo on CPU.

    timeout_s: how long a collective may wait for the slowest rank before the job fails (run.dist_timeout_s;
    torch's default is 10 min for NCCL). NCCL groups are bound to this process's GPU (device_id), so
    barriers and object collectives use the right device. On CUDA, two ranks of one host on the same physical
    GPU are an error on every rank before NCCL starts (_init_nccl).
    """
    info = dist_info()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None
    device = resolve_device(device_spec, info.local_rank, info.world_size, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.world_size > 1 and not dist.is_initialized():
        kwargs = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s else {}
        if device.type == "cuda":
            _init_nccl(device, kwargs.get("timeout"))
        else:
            dist.init_process_group(backend="gloo", **kwargs)
        info = dist_info()
    return info, device


def _gpu_identity(index: int) -> str:
    """GPU `index` of this process under a name that is the same in every process on the host.

    The visible index is not: CUDA_VISIBLE_DEVICES renumbers the GPUs per process, so cuda:0 in two ranks is
    either two GPUs (one each) or one shared GPU. The UUID (or else the PCI address) tells them apart.
    """
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid.replace("-", "").strip("0"):  # an all-zero UUID (some drivers, emulators) names nothing
        return f"uuid {uuid}"
    if getattr(props, "pci_bus_id", None) is not None:
        return (f"pci {getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:"
                f"{getattr(props, 'pci_device_id', 0):02x}")
    # last resort: the physical index this visible one maps to (exact unless the list holds UUIDs or MIG names)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"index {visible[index] if index < len(visible) else index}"


def shared_gpu_error(gathered) -> str | None:
    """gathered[r] = (hostname, GPU identity) of rank r -> the error when two ranks on one host share a GPU.

    A pure function of what every rank gathered, so every rank reaches the same verdict and raises together.
    """
    owners: dict[tuple[str, str], list[int]] = {}
    for rank, (host, gpu) in enumerate(gathered):
        owners.setdefault((host, gpu), []).append(rank)
    shared = [f"ranks {', '.join(map(str, ranks))} on {host} share one GPU ({gpu})"
              for (host, gpu), ranks in owners.items() if len(ranks) > 1]
    if not shared:
        return None
    return (f"{'; '.join(shared)}: DDP needs one GPU per process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')} here). Unset CUDA_VISIBLE_DEVICES (each rank then "
            f"takes cuda:LOCAL_RANK) or give each rank its own GPU, or start torchrun with "
            f"--nproc_per_node=<number of GPUs on the node>")


def _store_all_gather(store, rank: int, world_size: int, value) -> list:
    """Every rank's JSON-able `value`, in rank order, through the rendezvous store (no process group needed)."""
    box = dist.PrefixStore("edgepipe/gpu_identity", store)
    box.set(str(rank), json.dumps(value))
    return [json.loads(box.get(str(r))) for r in range(world_size)]


def _init_nccl(device: torch.device, timeout: timedelta | None) -> None:
    """The NCCL process group bound to `device`, once no two ranks on one host share a GPU.

    The check runs over the rendezvous store, before NCCL: with device_id, init_process_group forms the NCCL
    communicator at once, and NCCL rejects a shared GPU there with an error that suggests allowing it
    (NCCL_MULTI_RANK_GPU_ENABLE=1, NCCL >= 2.30), with which the ranks would share it silently.
    """
    from torch.distributed.constants import default_pg_nccl_timeout

    timeout = timeout or default_pg_nccl_timeout  # what init_process_group uses for NCCL when given none
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))  # as init_process_group does
    store.set_timeout(timeout)
    gathered = _store_all_gather(store, rank, world_size, [socket.gethostname(), _gpu_identity(device.index)])
    error = shared_gpu_error(gathered)
    if error:
        # without torchrun's agent store, rank 0 hosts the store: it leaves last, so no rank still reading
        # loses the connection and reports that instead of this message
        acks = dist.PrefixStore("edgepipe/gpu_identity_read", store)
        if rank == 0:
            acks.wait([str(r) for r in range(1, world_size)])
        else:
            acks.set(str(rank), "1")
        raise RuntimeError(error)
    dist.init_process_group(backend="nccl", device_id=device, store=dist.PrefixStore("default_pg", store),
                            rank=rank, world_size=world_size, timeout=timeout)


def configure_cuda(device: torch.device, cudnn_benchmark: bool = True, tf32: bool = True) -> dict:
    """cuDNN autotuning and TF32 for a CUDA device (a CPU device is left alone). -> what was set.

    cudnn.benchmark: torchvision's reference scripts turn it on unless deterministic algorithms are asked
    for; the input size is fixed here, so the autotuning cost is paid once per shape. TF32 (Ampere and
    later) runs fp32 matmuls/convolutions on tensor cores with a 10-bit mantissa; AMP code is unaffected.
    """
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the legacy flags must not be mixed in
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    return {"cudnn_benchmark": bool(cudnn_benchmark), "tf32": bool(tf32)}


def setup_run(run_cfg) -> tuple[DistInfo, torch.device]:
    """Everything a stage does first with config.run: process group (with run.dist_timeout_s), device,
    threads, cuDNN/TF32. Replaces `engine.init_distributed(cfg.run.device); engine.set_threads(cfg.run.threads)`."""
    info, device = init_distributed(run_cfg.device, timeout_s=getattr(run_cfg, "dist_timeout_s", None))
    set_threads(run_cfg.threads)
    configure_cuda(device, getattr(run_cfg, "cudnn_benchmark", True), getattr(run_cfg, "tf32", True))
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


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """True on every rank only if it is True on every rank (all_reduce MIN); identity without DDP."""
    if not _pg_active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def agree_on_resume(ckpt_ok: bool) -> bool:
    """Resume on all ranks or on none: a rank whose checkpoint is missing, unreadable or from another config
    makes every rank start over (ranks that resumed different epochs would wait on each other forever)."""
    return agree(ckpt_ok)


@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple
    dtype: torch.dtype


def _strip_tensors(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return type(obj)((k, _strip_tensors(v, tensors)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_strip_tensors(v, tensors) for v in obj)
    return obj


def _fill_tensors(obj, tensors: list):
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return type(obj)((k, _fill_tensors(v, tensors)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_fill_tensors(v, tensors) for v in obj)
    return obj


def broadcast_state_dict(state, src: int = 0):
    """Rank `src`'s (nested) state dict, optimizer state or checkpoint on every rank; identity without DDP.

    The structure and plain values go as one pickled object, every tensor with dist.broadcast (on the GPU
    under NCCL), so a large model does not travel through pickle. Other ranks get CPU tensors, as from
    load_checkpoint(map_location='cpu'); `None` on rank `src` gives None everywhere.
    """
    if not _pg_active():
        return state
    rank = dist.get_rank()
    tensors: list = []
    skeleton = broadcast_object(_strip_tensors(state, tensors) if rank == src else None, src)
    if skeleton is None:
        return None
    slots: list[_TensorSlot] = []

    def collect(o):
        if isinstance(o, _TensorSlot):
            slots.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif type(o) in (list, tuple):
            for v in o:
                collect(v)
    collect(skeleton)
    device = _collective_device()
    received = [None] * len(slots)
    for slot in sorted(slots, key=lambda s: s.index):
        wire_dtype = torch.uint8 if slot.dtype == torch.bool else slot.dtype
        if rank == src:
            buf = tensors[slot.index].detach().to(device=device, dtype=wire_dtype).contiguous()
        else:
            buf = torch.empty(slot.shape, dtype=wire_dtype, device=device)
        dist.broadcast(buf, src)
        received[slot.index] = buf.to("cpu", dtype=slot.dtype)
    return state if rank == src else _fill_tensors(skeleton, received)


def broadcast_tensors(tensors: list, src: int = 0) -> list:
    """In place: rank `src`'s values of a list of tensors (None entries skipped) on every rank."""
    if _pg_active():
        for t in tensors:
            if t is not None:
                buf = t.detach().to(_collective_device())
                dist.broadcast(buf, src)
                t.copy_(buf)
    return tensors


def all_reduce_mean(tensors: list) -> list:
    """In place: the mean over ranks of each tensor (None entries skipped); identity without DDP.

    For Taylor importance under DDP: average the per-rank gradients so every rank ranks the channels
    from the same numbers (the all-reduced result is the same on every rank).
    """
    if _pg_active():
        world = dist.get_world_size()
        for t in tensors:
            if t is not None:
                buf = t.detach().to(_collective_device())
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                t.copy_(buf / world)
    return tensors


def shard(items, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of `items` (every world_size-th item from `rank`): the whole list without DDP."""
    if rank is None or world_size is None:
        info = dist_info() if _pg_active() else DistInfo()
        rank, world_size = info.rank, info.world_size
    return list(items)[rank::world_size]


def shard_map(fn, items) -> list:
    """[fn(x) for x in items], each rank computing its shard; every rank gets the whole list in order.

    For work that rank 0 used to do alone while the others waited at a barrier (checking every image,
    the teacher-logit cache): split it instead, so no rank waits long enough to hit the NCCL timeout.
    Results travel with all_gather_object, so keep them small (a flag, a size, a message).
    """
    items = list(items)
    if not _pg_active():
        return [fn(x) for x in items]
    rank, world = dist.get_rank(), dist.get_world_size()
    local = [fn(x) for x in items[rank::world]]
    parts = [None] * world
    dist.all_gather_object(parts, local)
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None:
            inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def wrap_for_training(model: nn.Module, info: DistInfo, device: torch.device, *, sync_bn: bool = False,
                      compile: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """The module train_one_epoch should drive: SyncBatchNorm (run.sync_bn, GPUs under DDP only), then DDP
    when distributed, then torch.compile (run.compile). Save and evaluate `unwrap(...)` of the result.

    SyncBatchNorm is converted in place (same parameter objects, so an existing optimizer keeps working);
    gloo has no SyncBatchNorm path worth having, so CPU runs keep plain BatchNorm.
    """
    m = unwrap(model)
    if sync_bn and info.distributed and device.type == "cuda":
        m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    wrapped = m
    if info.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            m, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy on the CPU in fp32, contiguous (NCHW) memory format, eval mode: what a reload from disk
    gives. Compare a model with its reloaded artifact through this, not through a channels_last copy
    (channels_last CPU kernels differ from NCHW ones by ~1e-5 on logits of 20-40)."""
    m = copy.deepcopy(unwrap(model)).cpu().float()
    m.to(memory_format=torch.contiguous_format)
    return m.eval()


def bf16_native(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0+ (A100, RTX 30xx, L4, H100...). torch.cuda.is_bf16_supported()
    also says True on V100/T4, where bf16 is emulated: slow, and some cuDNN kernels are missing."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def amp_dtype(amp, device: torch.device):
    """Mixed precision only on CUDA (CPU autocast is slower than fp32 for these convnets).

    auto: bf16 where the GPU has native bf16 (no GradScaler needed), else fp16 with a GradScaler.
    """
    if device.type != "cuda" or amp in ("off", None, False):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        if not bf16_native(device):
            warnings.warn(f"amp=bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                          f"{torch.cuda.get_device_capability(device)}): bf16 is emulated there and slow; "
                          f"amp=fp16 or auto is the fast choice", stacklevel=2)
        return torch.bfloat16
    return torch.bfloat16 if bf16_native(device) else torch.float16


def use_channels_last(setting, device: torch.device) -> bool:
    """auto = on for CUDA (tensor cores) and the CPU: oneDNN's NHWC kernels, depthwise convolutions above all,
    trained EfficientNet-Lite0 1.6x faster per step and ran Lite2's forward 1.45x faster on a 2-core Zen 4
    (224 px, batch 32; benchmarks/channels_last.py, docs/speed.md). The arithmetic is reordered, not changed: fp32 either way."""
    return setting in ("on", True) or (setting == "auto" and device.type in ("cuda", "cpu"))


def set_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


def scaled_lr(lr: float, global_batch: int, base_batch: int = 32, rule: str = "auto",
              optimizer: str = "adamw") -> float:
    """The LR for `global_batch` images per optimizer step, given `lr` tuned at `base_batch`.

    timm's rule (train.py, lr_base / lr_base_size / lr_base_scale): linear for SGD (Goyal et al. 2017,
    "ImageNet in 1 hour": k times the batch -> k times the LR, with warmup), square root for the
    adaptive optimizers ("ada*", "lamb"). rule: auto | linear | sqrt | none (run.lr_scaling).
    Pass base_batch=data.batch_size (the per-process batch the LR was tuned with), so one process without
    gradient accumulation gets exactly `lr` back: the CPU path does not change.
    """
    if rule == "none" or global_batch == base_batch:
        return lr
    if rule == "auto":
        rule = "sqrt" if any(k in optimizer.lower() for k in ("ada", "lamb")) else "linear"
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"LR scaling rule must be auto, linear, sqrt or none, got {rule!r}")
    ratio = global_batch / base_batch
    return lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def loader_settings(device: torch.device, workers: int) -> dict:
    """DataLoader keyword arguments that keep a GPU fed: pinned memory for async copies, workers that live
    across epochs (build the loader once and call its sampler's set_epoch, instead of a new DataLoader and new
    worker processes per epoch), a deeper prefetch queue. Unchanged semantics on the CPU."""
    return {"pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            "prefetch_factor": 4 if workers > 0 else None}


def normalize_on_device(x: torch.Tensor, mean, std, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW batch -> normalized float32 on `device`: 4x fewer bytes through the loader and over PCIe
    than float32 batches. Same ops as ToTensor + Normalize (x / 255, then (x - mean) / std), so the values
    are the same as on the CPU path."""
    x = x.to(device, non_blocking=device.type == "cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.float().div_(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


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


# GPU -> CPU synchronisations in the training loop: on a GPU the finiteness check, the running loss and the
# progress bar are read every SYNC_EVERY steps (and before every on_step callback, i.e. before a checkpoint
# is written); on the CPU every step, exactly as before.
SYNC_EVERY = 50


def _nonfinite_error(value: float, step: int) -> FloatingPointError:
    return FloatingPointError(f"loss is {value} at step {step}; lower the learning rate "
                              f"or set grad_clip (finetune.grad_clip / compress.lr)")


# TRAIN_ONE_EPOCH_NOTES
# accum_steps (run.grad_accum_steps): micro-batches per optimizer step. Steps (start_step, max_steps, the value
# given to on_step, "steps") still count loader batches; the optimizer and the scheduler step once per
# accum_steps batches (build the schedule with steps // accum_steps optimizer steps per epoch), and on_step is
# only called at those boundaries, so a checkpoint never holds half-accumulated gradients. Under DDP the
# micro-batches before a boundary skip the gradient all-reduce (no_sync).
# A non-finite loss raises FloatingPointError. On the CPU it is checked every step before the update; on a GPU
# the check (like the running loss and accuracy, kept on the device) is read every `sync_every` steps (default
# SYNC_EVERY) and at the end, so there is no GPU->CPU sync per step, even with an on_step that runs every step
# (EMA); the error names the first bad step. save_checkpoint refuses to write non-finite weights anyway.

def _last_step(loader, start_step: int, max_steps: int) -> int | None:
    """Where this epoch ends (max_steps, or the loader's length), None when unknown."""
    total = max_steps or None
    if hasattr(loader, "__len__"):
        try:
            n_left = start_step + len(loader)
            total = min(total, n_left) if total else n_left
        except TypeError:
            pass
    return total


def _watch_finite(loss, step: int, sync_every: int, bad_step, bad_loss):
    """Every step on the CPU (raise now); on a GPU remember the first bad step on the device (read later)."""
    finite = torch.isfinite(loss)
    if sync_every == 1:
        if not finite:
            raise _nonfinite_error(loss.item(), step)
        return bad_step, bad_loss
    first = ~finite & (bad_step < 0)
    return (torch.where(first, torch.full_like(bad_step, step), bad_step),
            torch.where(first, loss.detach().float(), bad_loss))


def _optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    """Clip, step (through the GradScaler when there is one), then the scheduler."""
    if scaler is not None:
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


def train_one_epoch(model, loader, optimizer, scheduler, compute_loss, device, *, amp=None, scaler=None,
                    grad_clip: float = 0.0, channels_last: bool = False, start_step: int = 0,
                    max_steps: int = 0, on_step=None, progress: bool = True, desc: str = "train",
                    train_mode=None, accum_steps: int = 1, sync_every: int | None = None) -> dict:
    """One pass over `loader` (which already starts at `start_step`); see TRAIN_ONE_EPOCH_NOTES above.

    compute_loss(model, batch) -> (loss, logits, labels), with batch already on `device`. on_step(step) runs
    after each optimizer step (1-based step within the epoch). `train_mode(model)` puts the model in training
    mode (default model.train(); finetune keeps frozen BatchNorm layers in eval mode).
    """
    (train_mode or (lambda m: m.train()))(model)
    non_blocking = device.type == "cuda"
    accum = max(1, int(accum_steps))
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    sync_every = max(1, int(sync_every))
    use_scaler = scaler is not None and scaler.is_enabled()
    total = _last_step(loader, start_step, max_steps)
    # no_sync is safe only when the last micro-batch of the epoch is known to be a boundary
    can_skip_sync = accum > 1 and total is not None and hasattr(model, "no_sync")

    loss_sum, correct, bad_step, bad_loss = (torch.zeros((), dtype=torch.float64, device=device),
                                             torch.zeros((), dtype=torch.int64, device=device),
                                             torch.full((), -1, dtype=torch.int64, device=device),
                                             torch.zeros((), dtype=torch.float32, device=device))
    seen, step, pending, window = 0, start_step, 0, 1
    t0 = time.perf_counter()
    bar = _progress(loader, progress, desc=desc, total=(max_steps - start_step) if max_steps else None)

    def check_finite() -> None:
        first = int(bad_step.item())
        if first >= 0:
            raise _nonfinite_error(bad_loss.item(), first)

    def optimizer_step() -> None:
        _optimizer_step(model, optimizer, scheduler, scaler if use_scaler else None, grad_clip)
    for batch in bar:
        if max_steps and step >= max_steps:
            break
        batch = [b.to(device, non_blocking=non_blocking) for b in batch]
        if channels_last:
            batch = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b for b in batch]
        if pending == 0:
            window = accum if total is None else max(1, min(accum, total - step))
        boundary = pending + 1 >= window
        skip_sync = can_skip_sync and not boundary
        with (model.no_sync() if skip_sync else contextlib.nullcontext()):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, logits, labels = compute_loss(model, batch)
            bad_step, bad_loss = _watch_finite(loss, step, sync_every, bad_step, bad_loss)
            if pending == 0:
                optimizer.zero_grad(set_to_none=True)
            scaled = loss / window if window > 1 else loss
            (scaler.scale(scaled) if use_scaler else scaled).backward()
        pending += 1
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.argmax(1) == labels).sum()
        seen += n
        step += 1
        stepped = pending >= window
        if stepped:
            optimizer_step()
            pending = 0
        if sync_every == 1 or step % sync_every == 0:
            if sync_every > 1:
                check_finite()
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
        if stepped and on_step is not None:
            on_step(step)
    if pending:  # the loader ended inside an accumulation window (its length was unknown)
        optimizer_step()
        if on_step is not None:
            on_step(step)
    if sync_every > 1:
        check_finite()
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum.item() / max(1, seen), "accuracy": correct.item() / max(1, seen), "images": seen,
            "steps": step - start_step, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def predict(model, loader, device, amp=None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits float32 [N, C], labels [N]) over the whole loader, model in eval mode.

    Logits stay on the device until the end (one GPU->CPU copy instead of one per batch)."""
    model.eval()
    outs, labels = [], []
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=device.type == "cuda"), batch[-1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outs.append(model(x).float())
        labels.append(y)
    return torch.cat(outs).cpu(), torch.cat(labels)


# calibrated_loss's grid: 0.03 .. 31.6, 121 points 10 ** 0.025 (5.9%) apart
TEMPERATURES = torch.logspace(-1.5, 1.5, 121, dtype=torch.float64)


def calibrated_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """-> (the cross-entropy at the temperature that minimises it, that temperature): temperature scaling (Guo et
    al. 2017), on a fixed log grid so that the answer is the same on every machine. Plain CE also scores
    calibration: a model trained with label smoothing is scored down for the softness it was trained towards, and
    a sharp logistic-regression probe up. One scalar per model removes that, so models are compared by how well
    they separate the classes."""
    if not len(labels):
        return 0.0, 1.0
    losses = torch.stack([nn.functional.cross_entropy(logits.double() / t, labels) for t in TEMPERATURES])
    best = int(losses.argmin())
    return losses[best].item(), TEMPERATURES[best].item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           classes: list[str] | None = None) -> dict:
    """Accuracy, CE loss (also at its best temperature: calibrated_loss), confusion matrix (rows = true class) and
    per-class precision/recall/F1."""
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
        **dict(zip(("calibrated_loss", "temperature"), calibrated_loss(logits, labels))),
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


def predict_sharded(model, samples, make_loader, device, num_classes: int, amp=None,
                    channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """predict() over `samples` with every rank doing its shard; every rank gets all logits and labels, in
    the order of `samples`. make_loader(subset) -> an unshuffled eval loader over that list.

    Without DDP this is predict(model, make_loader(samples)). Under DDP rank r takes samples r, r+W, ...
    (shard sizes are known everywhere, so the padded all_gather needs no extra round), and nobody idles in a
    collective while one rank evaluates everything (the 10-minute NCCL watchdog, issue #15 #3).
    """
    m = unwrap(model)
    samples = list(samples)
    if not _pg_active():
        return predict(m, make_loader(samples), device, amp, channels_last)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = samples[rank::world]
    if local:
        logits, labels = predict(m, make_loader(local), device, amp, channels_last)
    else:
        logits, labels = torch.empty(0, num_classes), torch.empty(0, dtype=torch.long)
    n, per = len(samples), math.ceil(len(samples) / world)
    cdev = _collective_device()
    logits_buf = torch.zeros(per, num_classes, dtype=torch.float32, device=cdev)
    labels_buf = torch.full((per,), -1, dtype=torch.long, device=cdev)
    logits_buf[:len(local)] = logits.to(cdev, torch.float32)
    labels_buf[:len(local)] = labels.to(cdev, torch.long)
    all_logits = [torch.empty_like(logits_buf) for _ in range(world)]
    all_labels = [torch.empty_like(labels_buf) for _ in range(world)]
    dist.all_gather(all_logits, logits_buf)
    dist.all_gather(all_labels, labels_buf)
    out_logits = torch.empty(n, num_classes, dtype=torch.float32)
    out_labels = torch.empty(n, dtype=torch.long)
    for r in range(world):
        k = len(range(r, n, world))
        out_logits[r::world] = all_logits[r][:k].cpu()
        out_labels[r::world] = all_labels[r][:k].cpu()
    return out_logits, out_labels


def evaluate_sharded(model, samples, make_loader, device, num_classes: int, classes: list[str] | None = None,
                     amp=None, channels_last: bool = False) -> dict:
    """evaluate() with the work split over the ranks; every rank calls it and gets the same metrics."""
    logits, labels = predict_sharded(model, samples, make_loader, device, num_classes, amp, channels_last)
    return classification_metrics(logits, labels, num_classes, classes)


# ----------------------------------------------------------------------------- checkpoints

# Bumped when a checkpoint written by this version cannot be resumed by older code (or vice versa).
CHECKPOINT_FORMAT = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state(), also across devices: CUDA states are restored for the GPUs both runs have, and
    ignored on a machine without CUDA (a run saved on the CPU has none to restore)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i], i)


def _all_finite(state_dict: dict) -> bool:
    flags = [torch.isfinite(t).all() for t in state_dict.values()
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack([f.cpu() for f in flags]).all()) if flags else True


def save_checkpoint(path, **state) -> None:
    """Atomic; tensors and plain values only, so it loads with weights_only=True.

    Refuses (FloatingPointError) to write a `model` with non-finite weights: on a GPU the training loop checks
    the loss only every SYNC_EVERY steps, and a diverged model must never replace the last good checkpoint."""
    model = state.get("model")
    if isinstance(model, dict) and not _all_finite(model):
        raise FloatingPointError(f"not writing {path}: the model has non-finite weights (the loss diverged); "
                                 f"lower the learning rate or set grad_clip")
    artifacts.torch_save({**state, "format": CHECKPOINT_FORMAT, "rng": rng_state()}, path)


def load_checkpoint(path, map_location="cpu") -> dict | None:
    """The checkpoint (tensors on the CPU, whatever device saved them), or None when there is nothing to resume.

    - no file: None;
    - a file this version cannot use (another format, damaged, not a checkpoint): None, with a message, and
      the stage starts over (writes are atomic, so this is not a torn write);
    - any other OSError (EIO, a stale NFS handle, permissions): raised. It may be transient, and silently
      starting over would throw away the work the checkpoint holds.
    """
    try:
        ckpt = artifacts.torch_load(path, map_location=map_location)
    except FileNotFoundError:
        return None
    except OSError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, KeyError,
            ImportError, IndexError, zipfile.BadZipFile) as e:
        print(f"[checkpoint] ignoring {path}: not readable by this version ({type(e).__name__}: {e}); "
              f"starting over")
        return None
    if not isinstance(ckpt, dict):
        print(f"[checkpoint] ignoring {path}: not a checkpoint ({type(ckpt).__name__}); starting over")
        return None
    fmt = ckpt.get("format", 1)
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        print(f"[checkpoint] ignoring {path}: checkpoint format {fmt!r}, this version reads up to "
              f"{CHECKPOINT_FORMAT}; starting over")
        return None
    return ckpt


def resume_checkpoint(path, is_valid=None) -> dict | None:
    """load_checkpoint for every rank of a DDP job, decided once: rank 0 reads the file and checks it with
    is_valid(ckpt) (config hash, data, world size...), then every rank gets rank 0's checkpoint (broadcast_state_dict)
    or None. Ranks can then never disagree on resuming, and other nodes need no copy of the file.
    Without DDP: load_checkpoint + is_valid."""
    ckpt = None
    if not _pg_active() or dist.get_rank() == 0:
        ckpt = load_checkpoint(path)
        if ckpt is not None and is_valid is not None and not is_valid(ckpt):
            ckpt = None
    return broadcast_state_dict(ckpt)


def checkpoint_meta(device: torch.device, amp) -> dict:
    """What to save with a checkpoint to recognise a resume on another device or precision."""
    return {"device_type": torch.device(device).type, "amp": str(amp).replace("torch.", "") if amp else "off"}


def resume_change(ckpt: dict, device: torch.device, amp) -> str | None:
    """A message when the checkpoint was written on another device type or AMP setting, else None.

    Resuming there is supported (weights and optimizer state are loaded onto the new device, the GradScaler
    starts fresh when the saved one was disabled, see restore_scaler); only bit-exact equality with an
    uninterrupted run is lost."""
    now = checkpoint_meta(device, amp)
    before = {k: ckpt.get(k) for k in now}
    if before["device_type"] is None or before == now:
        return None
    return (f"checkpoint written on {before['device_type']} (amp {before['amp']}), resuming on {now['device_type']} "
            f"(amp {now['amp']}): training continues, but not bit-identical to an uninterrupted run")


def restore_scaler(scaler, state) -> bool:
    """Load a saved GradScaler state when it applies. -> whether it was loaded.

    A scaler saved disabled (CPU, bf16, fp32) has state {}; GradScaler.load_state_dict raises on {} ("The
    source state dict is empty"), so an fp16 run resuming such a checkpoint starts with a fresh scale. A
    state saved by an fp16 run is ignored when this run has no scaler (CPU, bf16)."""
    if scaler is None or not scaler.is_enabled() or not state:
        return False
    scaler.load_state_dict(state)
    return True


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
