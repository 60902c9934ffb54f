"""GPU smoke test and speed table: run it once on a machine with an NVIDIA GPU (`make gpu-check`).

  .venv/bin/python benchmarks/gpu_check.py                  # a few minutes
  .venv/bin/python benchmarks/gpu_check.py --model timm:resnet18 --size 160 --batch 64

Checks, each with PASS / WARN / FAIL / SKIP, then one table:
  - the environment: GPU, compute capability, native bf16, torch's CUDA, one ONNX Runtime build installed;
  - training images/s (engine.train_one_epoch, synthetic batches): CPU vs GPU, AMP off vs auto,
    channels_last off vs on; every run must keep a finite loss;
  - a 2-process DDP step over NCCL when two GPUs are visible (the weights must end equal on both ranks;
    sharded evaluation and the resume agreement run over NCCL too);
  - ONNX Runtime: the model exported to ONNX, CUDA vs CPU provider latency at batch 1 and 32, logit parity,
    warm-up time for every batch size the server's adaptive batching can form.
On a machine without a usable GPU it says so and exits 0. Exit status 1 when a check FAILs.
`--cpu-smoke` runs every section on the CPU at a tiny size (gloo for DDP): a test of this script itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import engine, runtime  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []   # (check, status, result, detail)


def row(check: str, status: str, result: str = "", detail: str = "") -> None:
    ROWS.append((check, status, result, detail))
    print(f"[gpu-check] {status:<4} {check}: {result} {detail}".rstrip(), flush=True)


def guarded(name: str):
    """Run a section; an exception becomes a FAIL row instead of ending the script."""
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001
                row(name, "FAIL", f"{type(e).__name__}: {str(e)[:160]}")
                traceback.print_exc(limit=3)
        return run
    return wrap


def build(args, num_classes: int = 10) -> nn.Module:
    from models import build_model

    torch.manual_seed(0)
    model, _ = build_model(args.model, num_classes, "none")
    return model


# ----------------------------------------------------------------------------- environment

def environment(args, device: torch.device) -> None:
    row("torch", "INFO", torch.__version__, f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            native = p.major >= 8
            row(f"GPU {i}", "INFO", p.name, f"compute {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                f"bf16 {'native' if native else 'emulated (amp auto -> fp16)'}")
        amp = engine.amp_dtype("auto", device)
        row("amp auto", "PASS" if (amp == torch.bfloat16) == engine.bf16_native(device) else "FAIL",
            str(amp).replace("torch.", ""))
    import onnxruntime as ort

    builds = runtime.ort_builds_installed()
    row("onnxruntime build", "FAIL" if len(builds) > 1 else "PASS", ", ".join(builds) + f" {ort.__version__}",
        runtime.check_single_ort_build() or "")


# ----------------------------------------------------------------------------- training speed

def train_speed(args, device: torch.device, amp: str, channels_last: bool, steps: int, batch: int) -> dict:
    model = build(args).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = engine.amp_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16) if device.type == "cuda" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    batches = [(x, y)] * steps

    def compute_loss(m, b):
        logits = m(b[0])
        return loss_fn(logits, b[1]), logits, b[1]
    warm = max(1, min(3, steps // 4))
    engine.train_one_epoch(model, batches[:warm], opt, None, compute_loss, device, amp=dtype, scaler=scaler,
                           channels_last=channels_last, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    r = engine.train_one_epoch(model, batches, opt, None, compute_loss, device, amp=dtype, scaler=scaler,
                               channels_last=channels_last, progress=False)
    return {"images_per_s": r["images_per_s"], "loss": r["loss"], "amp": str(dtype).replace("torch.", "") if dtype else "off"}


@guarded("training")
def training(args, device: torch.device) -> None:
    cpu_steps = 3 if not args.cpu_smoke else 2
    cpu = train_speed(args, torch.device("cpu"), "off", False, cpu_steps, args.batch)
    row("train CPU fp32", "INFO", f"{cpu['images_per_s']:.1f} img/s", f"{cpu_steps} steps of {args.batch}")
    if device.type != "cuda" and not args.cpu_smoke:
        return
    runs = {}
    for name, amp, cl in (("fp32", "off", False), ("fp32 channels_last", "off", True),
                          ("amp auto", "auto", False), ("amp auto channels_last", "auto", True)):
        r = train_speed(args, device, amp, cl, args.steps, args.batch)
        runs[name] = r
        finite = np.isfinite(r["loss"])
        row(f"train GPU {name}", "PASS" if finite else "FAIL", f"{r['images_per_s']:.1f} img/s",
            f"amp {r['amp']}, loss {r['loss']:.3f}")
    base = runs["fp32"]["images_per_s"]
    ratio = lambda a, b: runs[a]["images_per_s"] / max(runs[b]["images_per_s"], 1e-9)  # noqa: E731
    gpu_vs_cpu = base / max(cpu["images_per_s"], 1e-9)
    row("GPU vs CPU (fp32)", "PASS" if gpu_vs_cpu > 1 or args.cpu_smoke else "WARN", f"{gpu_vs_cpu:.1f}x")
    for label, a, b in (("AMP auto vs fp32", "amp auto", "fp32"),
                        ("channels_last vs NCHW (fp32)", "fp32 channels_last", "fp32"),
                        ("channels_last vs NCHW (AMP)", "amp auto channels_last", "amp auto")):
        r = ratio(a, b)
        row(label, "PASS" if r >= 0.95 or args.cpu_smoke else "WARN", f"{r:.2f}x",
            "" if r >= 0.95 else "slower: consider turning it off for this model/GPU")
    del base


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(rank: int, port: int, args, out: str, backend_device: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info, device = engine.init_distributed(backend_device, timeout_s=120)
    model = build(args).to(device)
    ddp = engine.wrap_for_training(model, info, device, sync_bn=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    size = args.size
    batches = [(torch.randn(args.batch, 3, size, size, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
               for _ in range(4)]

    def compute_loss(m, b):
        logits = m(b[0])
        return nn.functional.cross_entropy(logits, b[1]), logits, b[1]
    dtype = engine.amp_dtype("auto", device)
    r = engine.train_one_epoch(ddp, batches, opt, None, compute_loss, device, amp=dtype, progress=False, accum_steps=2)
    w = torch.cat([p.detach().float().flatten() for p in engine.unwrap(ddp).parameters()])
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    samples = list(range(10))
    xs = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(5))
    loader = lambda sub: [(xs[torch.tensor(sub)], torch.tensor(sub) % 10)]  # noqa: E731
    ev = engine.evaluate_sharded(ddp, samples, loader, device, 10)
    agree = engine.agree_on_resume(rank == 0)
    result = {"equal": torch.equal(both[0], both[1]), "img_s": r["images_per_s"] * 2, "loss": r["loss"],
              "eval_n": ev["n"], "agree": agree, "backend": dist.get_backend()}
    torch.save(result, Path(out) / f"ddp-{rank}.pt")
    dist.destroy_process_group()


@guarded("DDP 2 processes")
def ddp(args, device: torch.device) -> None:
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2 and not args.cpu_smoke:
        row("DDP 2 processes", "SKIP", f"{n} GPU visible", "needs 2 GPUs")
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        mp.spawn(_ddp_worker, args=(port, args, out, "cpu" if args.cpu_smoke else "auto"), nprocs=2, join=True)
        r0, r1 = (torch.load(Path(out) / f"ddp-{r}.pt", weights_only=False) for r in (0, 1))
    ok = r0["equal"] and r1["equal"] and r0["eval_n"] == r1["eval_n"] == 10 and not r0["agree"] and not r1["agree"]
    row("DDP 2 processes", "PASS" if ok and np.isfinite(r0["loss"]) else "FAIL",
        f"{r0['img_s']:.1f} img/s ({r0['backend']})",
        f"weights equal on both ranks: {r0['equal']}, sharded eval, resume agreement; {time.perf_counter() - t:.0f} s")


# ----------------------------------------------------------------------------- ONNX Runtime

@guarded("onnxruntime CUDA")
def onnxruntime_cuda(args, device: torch.device) -> None:
    runtime._cuda_probe.cache_clear()
    ort_device = "cpu" if args.cpu_smoke else "cuda"  # cpu smoke: the same code, CPU provider on both sides
    if not args.cpu_smoke and not runtime.cuda_usable():
        builds = runtime.ort_builds_installed()
        row("onnxruntime CUDA", "FAIL" if "onnxruntime-gpu" in builds else "SKIP",
            "CUDA provider not usable", "onnxruntime-gpu is installed but its CUDA provider does not load (driver >= "
            "580, CUDA 13 / cuDNN 9 libraries)" if "onnxruntime-gpu" in builds else "CPU build installed: make install GPU=1")
        return
    model = build(args).eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        example = torch.randn(2, 3, args.size, args.size)
        torch.onnx.export(model, (example,), str(fp32), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        paths = {"fp32": fp32}
        try:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            fp16 = Path(tmp) / "model.fp16.onnx"
            onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
            paths["fp16"] = fp16
        except Exception as e:  # noqa: BLE001
            row("onnx fp16 conversion", "WARN", f"{type(e).__name__}: {str(e)[:100]}")
        x = np.random.default_rng(0).standard_normal((32, 3, args.size, args.size)).astype(np.float32)
        for b in (1, 32):
            result = runtime.compare_cuda_cpu(paths, x[:b], runs=args.ort_runs, device=ort_device)
            for variant, r in result["variants"].items():
                parity_ok = r["top1_agreement"] >= 0.99 and (variant != "fp32" or r["max_abs_diff"] <= 1e-3)
                on_cuda = r["on_cuda"] or args.cpu_smoke
                row(f"ORT {variant} b{b} CUDA vs CPU", "PASS" if on_cuda and parity_ok else "FAIL",
                    f"{r['cuda_ms']:.2f} ms vs {r['cpu_ms']:.2f} ms ({r['cpu_ms'] / max(r['cuda_ms'], 1e-9):.1f}x)",
                    f"max |diff| {r['max_abs_diff']:.1e}, top-1 agreement {r['top1_agreement']:.3f}")
            row(f"ORT recommended on CUDA (b{b})", "INFO", str(result["recommended"]))
        sess = runtime.make_session(fp32, ort_device)
        t = time.perf_counter()
        timings = runtime.warm_up(sess, (3, args.size, args.size), max_batch_size=32,
                                  sizes=list(range(1, 33)) if args.cpu_smoke else None)
        worst = max(timings, key=timings.get)
        row("ORT warm-up batch 1..32", "PASS", f"{time.perf_counter() - t:.2f} s",
            f"slowest first run: batch {worst} {timings[worst]:.0f} ms (HEURISTIC conv algorithm search)")


# ----------------------------------------------------------------------------- main

def print_table() -> None:
    width = max(len(r[0]) for r in ROWS)
    print("\n" + f"{'check':<{width}}  status  result")
    print("-" * (width + 40))
    for check, status, result, detail in ROWS:
        print(f"{check:<{width}}  {status:<6}  {result}" + (f"  ({detail})" if detail else ""))
    counts = {s: sum(r[1] == s for r in ROWS) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    print("\n" + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="timm:efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per GPU configuration")
    ap.add_argument("--ort-runs", type=int, default=20)
    ap.add_argument("--only", default="env,train,ddp,ort", help="sections to run (comma-separated)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU at a tiny size")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.size, args.batch, args.steps, args.ort_runs = 32, 4, 2, 2
    t0 = time.perf_counter()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"[gpu-check] no CUDA GPU is visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): nothing to check on this "
              f"machine. On a GPU machine: `make install GPU=1 && make gpu-check` (docs/gpu.md).")
        return 0
    info, device = engine.init_distributed("cpu" if args.cpu_smoke else "auto")
    engine.configure_cuda(device)
    sections = {"env": environment, "train": training, "ddp": ddp, "ort": onnxruntime_cuda}
    for name in args.only.split(","):
        sections[name.strip()](args, device)
    print_table()
    print(f"[gpu-check] {time.perf_counter() - t0:.0f} s")
    return 1 if any(r[1] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
