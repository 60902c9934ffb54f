"""Training images/s of the finetune stage's loop next to a plain torchvision-reference-style loop.

Same model, same data, same batch size, same machine, same run; rounds are interleaved (ours, ref,
ours, ref, ...) because this machine is shared and noisy, and the ratio of medians is printed.

  .venv/bin/python benchmarks/finetune_bench.py                       # digits, teacher default
  .venv/bin/python benchmarks/finetune_bench.py --data ../shared/datasets/cats_vs_dogs --size 128
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
from torch import nn  # noqa: E402

from models import build_model  # noqa: E402
from pipeline import engine  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import make_loader, prepare_data, resolve_preprocessing  # noqa: E402


def reference_loop(model, samples, pre, batch_size, workers, steps, augment_cfg):
    """torchvision references/classification/train.py style: ImageFolder-like dataset, shuffle=True."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([
        T.RandomResizedCrop(pre["crop_size"], scale=(augment_cfg.scale_min, 1.0),
                            interpolation=T.InterpolationMode(pre["interpolation"])),
        *( [T.RandomHorizontalFlip()] if augment_cfg.hflip else []),
        *( [T.RandomRotation(augment_cfg.rotation)] if augment_cfg.rotation else []),
        T.ToTensor(), T.Normalize(pre["mean"], pre["std"]),
    ])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            p, y = samples[i]
            return tf(Image.open(p).convert("RGB")), y

    loader = torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=torch.cuda.is_available())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def ours(model, samples, pre, cfg, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    def compute_loss(m, batch):
        x, y = batch
        out = m(x)
        return crit(out, y), out, y

    loader = make_loader(samples, pre, cfg, train=True)
    r = engine.train_one_epoch(model, loader, opt, None, compute_loss, torch.device("cpu"), grad_clip=1.0,
                               max_steps=steps, progress=False)
    return r["images_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--model", default="timm:efficientnet_lite2")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    cfg = load_config(None, [f"data.root={args.data}", f"data.image_size={args.size}", f"data.batch_size={args.batch}",
                             f"run.workers={args.workers}", "run.dir=runs/bench_finetune", "data.hflip=false",
                             "data.rotation=10", "data.scale_min=0.7"])
    info = prepare_data(cfg)
    model, pretrained = build_model(args.model, len(info.classes), "auto")
    pre = resolve_preprocessing(pretrained, cfg.data)
    print(f"{args.model} at {pre['input_size']}, batch {args.batch}, workers {args.workers}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds (interleaved)")
    ours(model, info.train, pre, cfg, 3)  # warm-up (allocator, first-iteration costs), not counted
    a, b = [], []
    for r in range(args.rounds):  # alternate which loop goes first: the machine's load drifts
        first_ours = r % 2 == 0
        for is_ours in (first_ours, not first_ours):
            if is_ours:
                a.append(ours(model, info.train, pre, cfg, args.steps))
            else:
                b.append(reference_loop(model, info.train, pre, args.batch, args.workers, args.steps, cfg.data))
        print(f"  round {r + 1}: pipeline {a[-1]:.1f} img/s, reference loop {b[-1]:.1f} img/s")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| loop | train img/s (median) |\n|---|---|\n| pipeline finetune (engine.train_one_epoch) | {ma:.1f} |\n"
          f"| torchvision-reference-style loop | {mb:.1f} |\nratio pipeline/reference: {ma / mb:.2f}x")


if __name__ == "__main__":
    main()
