"""Accuracy of teacher vs KD student vs student trained without KD (alpha=0) vs pruned KD student.

Not a test: a measurement on real data (../shared/datasets/cats_vs_dogs when present). It runs the real
stages through their Python entry points, in two run folders:
  <run-dir>        finetune (or a copied teacher.pt) + compress with the config's KD settings and pruning
  <run-dir>_nokd   the same student, epochs and LR with compress.alpha=0 (plain cross-entropy), no pruning
and prints one table (val/test accuracy, params, MACs, PyTorch CPU fp32 latency at batch 1 and 32).

  .venv/bin/python benchmarks/compress_bench.py                                  # cats_vs_dogs, 160 px
  .venv/bin/python benchmarks/compress_bench.py --teacher runs/cats/finetune/teacher.pt   # reuse a teacher
  .venv/bin/python benchmarks/compress_bench.py --data builtin:digits --size 64 \\
      --teacher runs/default/finetune/teacher.pt                                  # the default data
Extra section.key=value arguments go to every stage (e.g. compress.epochs=2 run.workers=1).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import artifacts, compress, finetune  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CATS = ROOT.parent / "shared" / "datasets" / "cats_vs_dogs"


def place_teacher(src: str | None, cfg) -> str:
    """Copy a given teacher.pt (if its input size and classes fit) or fine-tune one; -> how it was obtained."""
    dst = cfg.run_dir / "finetune" / "teacher.pt"
    if src:
        blob = artifacts.torch_load(src)
        size = blob["preprocessing"]["input_size"][-1]
        if cfg.data.image_size not in (None, size):
            raise SystemExit(f"--teacher {src} was trained at {size} px, the benchmark runs at {cfg.data.image_size} "
                             f"px: pass --size {size} or drop --teacher")
        if not dst.exists() or artifacts.sha256_file(dst) != artifacts.sha256_file(src):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return f"copied from {src}"
    finetune.run(cfg)
    return "fine-tuned here (finetune stage)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(CATS) if CATS.is_dir() else "builtin:digits")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--size", type=int, default=160, help="data.image_size for teacher and student")
    ap.add_argument("--run-dir", default=None, help="default runs/bench_compress_<data name>")
    ap.add_argument("--teacher", default=None, help="reuse this teacher.pt instead of fine-tuning one")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    name = Path(args.data).name if not args.data.startswith("builtin:") else args.data.split(":")[1]
    run_dir = Path(args.run_dir or ROOT / "runs" / f"bench_compress_{name}")
    common = [f"data.root={args.data}", f"data.image_size={args.size}", "run.progress=false",
              f"finetune.epochs={args.finetune_epochs}", "finetune.head_epochs=1"]
    if name != "digits":  # photos: the model's own crop margin and flips (the default config is for digits)
        common += ["data.crop_pct=null", "data.hflip=true", "data.rotation=0", "data.scale_min=0.35"]
    common += args.overrides
    cfg = load_config(args.config, [f"run.dir={run_dir}", *common])
    nokd_dir = Path(f"{run_dir}_nokd")
    cfg_nokd = load_config(args.config, [f"run.dir={nokd_dir}", *common, "compress.alpha=0.0",
                                         "compress.pruning_steps=0"])
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/compress_bench.py", *sys.argv[1:]])
    print(f"[bench] {command}")
    print(f"[bench] data {args.data} at {args.size} px; teacher {cfg.teacher.name}, student {cfg.student.name}; "
          f"KD T={cfg.compress.temperature:g} alpha={cfg.compress.alpha:g}, {cfg.compress.epochs} epochs; pruning to "
          f"{cfg.compress.target_macs_ratio:g} MACs in {cfg.compress.pruning_steps} steps x "
          f"{cfg.compress.recovery_epochs} recovery epoch(s), importance {cfg.compress.importance}")

    t0 = time.perf_counter()
    how = place_teacher(args.teacher, cfg)
    t_teacher = time.perf_counter() - t0
    compress.run(cfg)
    t_kd = time.perf_counter() - t0 - t_teacher
    place_teacher(str(cfg.run_dir / "finetune" / "teacher.pt"), cfg_nokd)  # same teacher: only its row is reported
    compress.run(cfg_nokd)
    t_nokd = time.perf_counter() - t0 - t_teacher - t_kd

    kd = json.loads((run_dir / "compress" / "metrics.json").read_text())
    nokd = json.loads((nokd_dir / "compress" / "metrics.json").read_text())
    rows = [("teacher (" + kd["teacher"]["name"].split(":")[-1] + ")", kd["teacher"]),
            ("student, KD", kd["student"]), ("student, no KD (alpha=0)", nokd["student"]),
            ("pruned student, KD", kd["pruned"])]
    note = " (no test split: test = val)" if kd["test_is_val"] else ""
    lines = ["| model | val acc | test acc" + note + " | params | MACs | CPU ms b1 | CPU ms b32 |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['params'] / 1e6:.2f}M | "
                     f"{r['macs'] / 1e6:.1f}M | {r['latency_ms_b1']:.1f} | {r['latency_ms_b32']:.1f} |")
    curve = " -> ".join(f"{c['macs_ratio']:.2f}: {c['val_accuracy_after_recovery']:.3f}" for c in kd["pruning_curve"])
    summary = {
        "command": command, "data": args.data, "image_size": args.size, "teacher": how,
        "splits": kd["splits"], "rows": {label: r for label, r in rows},
        "pruning_curve_macs_ratio_to_val": curve, "budget": kd["budget"], "achieved": kd["achieved"],
        "seconds": {"teacher": round(t_teacher), "compress_kd": round(t_kd), "student_no_kd": round(t_nokd)},
    }
    artifacts.write_json(run_dir / "bench.json", summary)
    print("\n".join(lines))
    print(f"[bench] pruning curve (MACs ratio: val acc after recovery): {curve}")
    if kd["budget"]["stopped"]:
        print(f"[bench] BUDGET: {kd['budget']['message']}")
    print(f"[bench] splits {kd['splits']}; teacher {how}; seconds: teacher {t_teacher:.0f}, KD + pruning {t_kd:.0f}, "
          f"no-KD student {t_nokd:.0f}; summary in {run_dir / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
