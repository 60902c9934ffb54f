"""Real-photo acceptance check: run the pipeline as a user would and print what the report says.

    .venv/bin/python benchmarks/real_photos.py --data ../shared/datasets/flowers --size 224 --run runs/flowers224
    .venv/bin/python benchmarks/real_photos.py --run runs/flowers224 --no-run      # only read an existing report

The run is the user's command (`python -m pipeline {finetune,compress,export} data.root=... [data.image_size=224]`,
nothing else changed). The checks are the ones the real-photo issue sets, on the report split (which no
decision touched): the teacher at or above both frozen-feature probes, the shipped model within
run.max_accuracy_drop of the teacher, at least 3x faster than the teacher's fp32 ONNX Runtime latency at batch 1
(same export run), and a file at most 1/6 of the teacher's. Accuracy differences are printed with what one image
is worth, because small splits cannot resolve less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(data: str, size: int | None, run_dir: str) -> dict:
    args = [f"data.root={data}", f"run.dir={run_dir}", "run.progress=false"]
    if size:
        args.append(f"data.image_size={size}")
    seconds = {}
    for stage in ("finetune", "compress", "export"):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", stage, *args], cwd=ROOT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds[stage] = time.perf_counter() - t
    return seconds


def checks(report: dict) -> list[tuple[str, bool, str]]:
    m, v = report["models"], report["verdict"]
    shipped = m[report["shipped"]["row"]]
    n = report["splits"]["report"]["images"]
    teacher = m["teacher"]["accuracy"]
    probes = {k: m[k]["accuracy"] for k in ("probe_teacher", "probe_student") if m.get(k)}
    out = [(f"teacher {teacher:.4f} >= probes {', '.join(f'{k} {a:.4f}' for k, a in probes.items())}",
            all(teacher >= a - 1e-9 for a in probes.values()), ""),
           (f"shipped ({report['shipped']['candidate']}, {report['shipped']['precision']}) {shipped['accuracy']:.4f}: "
            f"drop vs teacher {shipped['drop_vs_teacher']:+.4f} <= {v['max_accuracy_drop']}",
            shipped["drop_vs_teacher"] <= v["max_accuracy_drop"] + 1e-9,
            f"95% interval of the drop {shipped['drop_vs_teacher_ci95']}, one image = {1 / n:.4f}"),
           (f"speed-up vs teacher fp32 ORT at batch 1: {report['speedup_vs_teacher_onnx']['b1']:.2f}x >= 3",
            report["speedup_vs_teacher_onnx"]["b1"] >= 3.0, f"batch 32: {report['speedup_vs_teacher_onnx']['b32']:.2f}x"),
           (f"file {report['size_ratio_vs_teacher']:.3f} of the teacher's <= 1/6", report["size_ratio_vs_teacher"] <= 1 / 6, "")]
    rec = recommended_cpu(report, teacher)
    if rec is not None:  # the runtime `make serve` uses when it is not ONNX Runtime: its own speed and accuracy
        out.append(rec)
    return out


def recommended_cpu(report: dict, teacher_accuracy: float) -> tuple[str, bool, str] | None:
    """The same speed and budget checks for export's recommended CPU runtime, when that is not ONNX Runtime."""
    rec = report.get("recommended", {}).get("cpu", {})
    runtime, variant = rec.get("runtime"), rec.get("variant")
    row = report.get("runtimes", {}).get(runtime or "", {}).get(f"onnx_{variant}")
    if runtime in (None, "onnxruntime") or not row or not report.get("teacher_onnx"):
        return None
    speedup = report["teacher_onnx"]["latency_ms_b1"] / row["latency_ms_b1"]
    drop = teacher_accuracy - row["accuracy"]
    budget = report["verdict"]["max_accuracy_drop"]
    return (f"recommended {runtime} {variant}: speed-up vs teacher fp32 ORT at batch 1 {speedup:.2f}x >= 3, "
            f"accuracy {row['accuracy']:.4f} (drop {drop:+.4f} <= {budget})", speedup >= 3.0 and drop <= budget + 1e-9,
            f"batch 32: {report['teacher_onnx']['latency_ms_b32'] / row['latency_ms_b32']:.2f}x, same export run")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an ImageFolder (train/val[/test] or one folder per class)")
    ap.add_argument("--size", type=int, default=None, help="data.image_size (default: the models' native sizes)")
    ap.add_argument("--run", required=True, help="run.dir")
    ap.add_argument("--no-run", action="store_true", help="only read run.dir/report.json")
    args = ap.parse_args()
    if not args.no_run:
        if not args.data:
            ap.error("--data is needed unless --no-run")
        seconds = run_pipeline(args.data, args.size, args.run)
        print("wall time: " + ", ".join(f"{k} {s / 60:.1f} min" for k, s in seconds.items()))
    report = json.loads((Path(args.run) / "report.json").read_text())
    from pipeline.export import report_table

    print(report_table(report))
    print(f"\nreport split: {report['splits']['report']}, selection split: {report['splits']['selection']}")
    print("verdict: " + report["verdict"]["message"])
    for text, ok, note in checks(report):
        print(f"[{'PASS' if ok else 'FAIL'}] {text}" + (f"  ({note})" if note else ""))
    print("stage minutes: " + ", ".join(f"{k} {s / 60:.1f}" for k, s in report["stage_seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
