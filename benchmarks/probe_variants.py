"""Frozen-feature probes of several pretrained models on one photo set: which backbone's features separate it best.

    .venv/bin/python benchmarks/probe_variants.py --data ../shared/datasets/flowers \
        --models timm:efficientnet_lite2 timm:tf_efficientnet_lite2 timm:efficientnet_lite0 timm:tf_efficientnet_lite0

For each model and input size (its native size, and each --sizes value): pooled features of train/ and val/ on
un-augmented center crops (pipeline.probe.pooled_features), the pipeline's logistic regression (pipeline.probe.fit_probe)
with C picked on a seeded 15 % of train/ and the rest to fit, then accuracy on val/. It is the probe the pipeline fits
(probe_teacher / probe_student rows), fitted here on a fixed carve of train/ so that every model sees the same images.
Used to choose the default teacher's variant (docs/accuracy.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import eval_transform, resolve_preprocessing  # noqa: E402
from pipeline.probe import fit_probe, pooled_features, probe_logits  # noqa: E402


def features(model, root: Path, pre: dict) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    out = {}
    for split in ("train", "val"):
        images = ImageFolder(str(root / split), transform=eval_transform(pre))
        out[split] = pooled_features(model, DataLoader(images, batch_size=32, num_workers=1), "cpu")
    return out


def probe_accuracy(feats: dict, num_classes: int, seed: int = 0) -> dict:
    x, y = feats["train"]
    order = np.random.default_rng(seed).permutation(len(y))
    sel, fit = order[:int(0.15 * len(y))], order[int(0.15 * len(y)):]
    probe = fit_probe(x[fit], y[fit], x[sel], y[sel], num_classes, seed)
    xv, yv = feats["val"]
    return {"val": float((probe_logits(probe, xv).argmax(1) == yv).mean()), "n_val": len(yv),
            "selection": probe["selection_accuracy"], "C": probe["C"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="an ImageFolder root with train/ and val/")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--sizes", nargs="*", type=int, default=[224], help="input sizes besides each model's native one")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    num_classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    print("| model | input | probe accuracy on val/ | selection (15 % of train/) | C | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        model, native = build_model(name, num_classes)
        done = set()
        for size in (None, *args.sizes):
            pre = resolve_preprocessing(native, DataConfig(image_size=size))
            if pre["crop_size"] in done:
                continue
            done.add(pre["crop_size"])
            t0 = time.perf_counter()
            r = probe_accuracy(features(model, root, pre), num_classes)
            print(f"| {name} | {pre['crop_size']} px | {r['val']:.4f} ({r['n_val']} images) | {r['selection']:.4f} | "
                  f"{r['C']:g} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
