"""Memory layout on the CPU: a training step and a forward pass in NCHW (contiguous) vs channels_last (NHWC).

Why `finetune.channels_last` / `compress.channels_last` = auto is on for the CPU as well as CUDA. Per model, the
same weights and batch in both layouts, timed in interleaved rounds (NCHW, NHWC, NCHW, ...) because this machine is
shared and noisy; each figure is its best round's median, and the ratio of the two is printed. Also prints the
largest logit difference between the layouts: the arithmetic is reordered, not changed (fp32 either way).

  .venv/bin/python benchmarks/channels_last.py                                   # the photo defaults at 224 px
  .venv/bin/python benchmarks/channels_last.py --models timm:resnet18 --size 160 --batch 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import build_model  # noqa: E402


def train_step(model, x, y):
    """One AdamW step: forward, cross-entropy, backward, update (the loop compress and finetune run)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def forward(model, x):
    """The frozen teacher's forward while distilling, and every evaluation pass."""
    def run():
        with torch.no_grad():
            model(x)
    return run


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["timm:efficientnet_lite0", "timm:efficientnet_lite2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch,))
    cases = {}  # (model, what) -> {layout: fn}
    for name in args.models:
        base, _ = build_model(name, args.classes, "none")  # random init: the layout's speed does not depend on it
        for what, make, mode in (("train step", train_step, "train"), ("forward", forward, "eval")):
            fns = {}
            for layout in ("NCHW", "NHWC"):
                m, _ = build_model(name, args.classes, "none")
                m.load_state_dict(base.state_dict())
                getattr(m, mode)()
                xx = x
                if layout == "NHWC":
                    m.to(memory_format=torch.channels_last)
                    xx = x.contiguous(memory_format=torch.channels_last)
                fns[layout] = make(m, xx, y) if what == "train step" else make(m, xx)
            cases[(name, what)] = fns
        with torch.no_grad():
            nhwc, _ = build_model(name, args.classes, "none")
            nhwc.load_state_dict(base.state_dict())
            nhwc.eval().to(memory_format=torch.channels_last)
            diff = (base.eval()(x) - nhwc(x.contiguous(memory_format=torch.channels_last))).abs().max().item()
        print(f"{name}: largest logit difference NCHW vs NHWC {diff:.1e}")
    best: dict = {}
    for _ in range(args.rounds):
        for key, fns in cases.items():
            for layout, fn in fns.items():
                ms = median_ms(fn, args.repeats)
                best[key + (layout,)] = min(ms, best.get(key + (layout,), float("inf")))
    print(f"\n{args.threads} threads, batch {args.batch}, {args.size} px, best of {args.rounds} interleaved rounds "
          f"(median of {args.repeats} each), fp32")
    print(f"{'model':28s} {'pass':11s} {'NCHW ms':>9s} {'NHWC ms':>9s} {'NCHW/NHWC':>10s}")
    for (name, what) in cases:
        a, b = best[(name, what, "NCHW")], best[(name, what, "NHWC")]
        print(f"{name:28s} {what:11s} {a:9.0f} {b:9.0f} {a / b:9.2f}x")


if __name__ == "__main__":
    main()
