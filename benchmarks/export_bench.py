"""ONNX Runtime fp32 vs int8 latency per architecture, measured side by side in one run (CPU EP).

  .venv/bin/python benchmarks/export_bench.py                                   # tf_ vs symmetric EfficientNet-Lite0
  .venv/bin/python benchmarks/export_bench.py --models timm:mobilenetv2_100 --size 160
  .venv/bin/python benchmarks/export_bench.py --report runs/default              # print a run's report table

Uses the export stage's own functions (export_onnx, quant_pre_process, quantize: static QDQ per-channel
U8/S8). Calibration uses random images: latency does not depend on the calibration data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["timm:tf_efficientnet_lite0", "timm:efficientnet_lite0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--report", help="print run.dir/report.md of this run dir and exit")
    args = ap.parse_args()
    if args.report:
        print((Path(args.report) / "report.md").read_text())
        return

    from onnxruntime.quantization import quant_pre_process

    from models import build_model
    from pipeline import export, runtime

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, args.size, args.size)).astype(np.float32)
    b1, b32 = calib[:1], np.concatenate([calib, calib])[:32]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name in args.models:
            model, _ = build_model(name, 1000, "auto")
            fp32 = Path(tmp) / f"{name.replace(':', '_')}.fp32.onnx"
            export.export_onnx(model, [3, args.size, args.size], fp32, 18, "dynamo")
            prep, int8 = fp32.with_suffix(".prep.onnx"), fp32.with_suffix(".int8.onnx")
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
            export.quantize(prep, int8, calib, {"kind": "static", "per_channel": True, "method": "minmax"})
            sessions[name] = {k: runtime.make_session(p, "cpu", args.threads) for k, p in (("fp32", fp32), ("int8", int8))}
        for rnd in range(2):  # two interleaved rounds, report the better (less disturbed) of each
            for name, s in sessions.items():
                m = {f"{k}_b{b}": runtime.measure_latency_ms(sess, x, args.runs if b == 1 else args.runs // 4)
                     for k, sess in s.items() for b, x in ((1, b1), (32, b32))}
                rows.append((rnd, name, m))
    best = {}
    for _, name, m in rows:
        best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in m.items()}
    print(f"ONNX Runtime CPU EP, {args.threads} threads, {args.size} px, median ms (best of 2 interleaved rounds)")
    print("| model | fp32 b1 | int8 b1 | int8 speed-up b1 | fp32 b32 | int8 b32 | int8 speed-up b32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in best.items():
        print(f"| {name} | {m['fp32_b1']:.2f} | {m['int8_b1']:.2f} | {m['fp32_b1'] / m['int8_b1']:.2f}x | "
              f"{m['fp32_b32']:.1f} | {m['int8_b32']:.1f} | {m['fp32_b32'] / m['int8_b32']:.2f}x |")
    names = list(best)
    if len(names) == 2:
        a, b = best[names[0]], best[names[1]]
        print(f"{names[1]} vs {names[0]}: int8 b1 {a['int8_b1'] / b['int8_b1']:.2f}x faster, "
              f"int8 b32 {a['int8_b32'] / b['int8_b32']:.2f}x faster")


if __name__ == "__main__":
    main()
