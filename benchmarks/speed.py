"""How fast the models of an export run are on this CPU, per runtime, against the CPU's own peak MAC rate.

    .venv/bin/python benchmarks/speed.py --run runs/default                 # models x runtimes (b1, b32, img/s, % of peak)
    .venv/bin/python benchmarks/speed.py --run runs/default --serve         # HTTP server vs raw in-process, per-step times

Default mode: teacher fp32 and student fp32 (their .pt exported to ONNX here, in a temp folder) and the shipped
files (export/model.int8.onnx, model.fp32.onnx), each on every CPU runtime installed (ONNX Runtime, OpenVINO),
timed side by side in interleaved rounds (round r: model A on runtime 1 b1, b32, A on runtime 2, ..., model B ...;
per figure the best round's median). Per row: latency at batch 1 and 32, images/s, MACs (report.json) and the
fraction of this CPU's peak MAC rate it reaches: int8 rows against the int8 peak, fp32 rows against the fp32 peak.

Peak = cores x clock x MACs per cycle per core, from /proc/cpuinfo (flags, `cpu MHz`, cores this process may use):
  int8  amx_int8 1024 | avx512_vnni 128 (2 ports x 64 u8*s8 MACs of VPDPBUSD zmm) | avx_vnni 64 | avx2 32 | else 16
  fp32  avx512f 32 (2 FMA ports x 16 lanes) | avx2+fma 16 | else 4
  AMD family 0x19 (Zen 3/4) executes 512-bit ops on 256-bit units: its avx512 figures are halved.
The clock is the nominal `cpu MHz`, or the higher clock a numpy fp32 matrix product proves (its MACs/s over cores x
the MACs/cycle of the BLAS kernel numpy uses): under a VM or with turbo the nominal figure is too low.

--serve: the file `make serve` would serve (model.json `recommended`, its runtime) behind a real `bentoml serve`,
driven at --concurrency (16) with the same image files for --seconds, next to the raw in-process throughput of
those files (decode + preprocess + inference, batches of --concurrency, one process, same threads); and where one
request's time goes, from the server's Server-Timing header (receive, decode, preprocess, queue, inference,
respond) and the client's wall time (the rest: HTTP parsing and writing, BentoML's dispatch, the client).
Writes --json (default <run>/speed.json or <run>/speed_serve.json). Loopback only; bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import runtime  # noqa: E402

INT8_MACS = (("amx_int8", 1024), ("avx512_vnni", 128), ("avx_vnni", 64), ("avx2", 32))
FP32_MACS = (("avx512f", 32), ("fma", 16))


# ----------------------------------------------------------------------------- the CPU's peak
def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """Model name, vendor, family, flags and nominal MHz of the first CPU listed, and the cores usable here."""
    info = {"model": "unknown", "vendor": "", "family": 0, "flags": set(), "mhz": 0.0}
    try:
        text = Path(path).read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key == "cpu family":
            info["family"] = int(value or 0)
        elif key == "flags":
            info["flags"] = set(value.split())
        elif key == "cpu MHz":
            info["mhz"] = float(value or 0)
    siblings = [ln for ln in text.splitlines() if ln.startswith(("siblings", "cpu cores"))]
    per = {ln.split(":")[0].strip(): int(ln.split(":")[1]) for ln in siblings}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    smt = max(1, per.get("siblings", 1) // max(1, per.get("cpu cores", 1)))
    info["cores"] = max(1, usable // smt)
    return info


def peak_macs(info: dict, threads: int | None = None, ghz: float | None = None) -> dict:
    """{'int8', 'fp32'}: peak MACs/s of the cores used, with the per-cycle figure, the flag it came from, the formula.
    `ghz`: the clock to use (default the nominal `cpu MHz`)."""
    cores = min(info["cores"], threads) if threads else info["cores"]
    half = info["vendor"] == "AuthenticAMD" and info["family"] == 0x19   # Zen 3/4: 512-bit ops on 256-bit units
    out = {}
    for kind, table, default in (("int8", INT8_MACS, 16), ("fp32", FP32_MACS, 4)):
        flag, per_cycle = next(((f, m) for f, m in table if f in info["flags"]), ("none", default))
        if half and flag.startswith("avx512"):
            per_cycle //= 2
        ghz = ghz or info["mhz"] / 1000.0
        out[kind] = {"macs_per_s": cores * ghz * 1e9 * per_cycle, "per_cycle_per_core": per_cycle, "flag": flag,
                     "formula": f"{cores} cores x {ghz:.3f} GHz x {per_cycle} {kind} MACs/cycle ({flag})"
                                f" = {cores * ghz * per_cycle:.1f} GMAC/s"}
    return out


def gemm_rate(n: int = 1536, repeats: int = 5) -> float:
    """fp32 MACs/s numpy's BLAS reaches on an n x n matrix product (best of `repeats`): what this CPU really
    sustains on the friendliest fp32 work, next to the formula's peak (turbo clocks make it higher)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return n ** 3 / best


BLAS_FP32_MACS = {"haswell": 16, "zen": 16, "skylakex": 32, "cooperlake": 32, "sapphirerapids": 32}


def gemm_clock(rate: float, cores: int) -> tuple[float | None, str | None]:
    """The clock (GHz) the matrix product implies: its MACs/s over cores x the fp32 MACs/cycle of the BLAS kernel
    numpy picked (threadpoolctl names it: Haswell = AVX2 FMA, 16; SkylakeX = AVX-512, 32). A lower bound: BLAS
    never quite reaches its kernel's peak. (None, arch) when the kernel is not known."""
    try:
        from threadpoolctl import threadpool_info

        arch = next((i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"), None)
    except Exception:  # noqa: BLE001 - threadpoolctl missing or unhappy: no estimate
        return None, None
    per_cycle = BLAS_FP32_MACS.get(str(arch).lower())
    return (rate / (cores * per_cycle) / 1e9 if per_cycle else None), arch


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- the models of a run
def _export_pt(pt: Path, out: Path, exporter: str, opset: int) -> tuple[Path, list]:
    from models import load_model_artifact
    from pipeline.export import export_onnx

    model, meta = load_model_artifact(pt)
    export_onnx(model, meta["preprocessing"]["input_size"], out, opset, exporter)
    return out, meta["preprocessing"]["input_size"]


def run_models(run: Path, work: Path, only: list[str] | None) -> list[dict]:
    """[{name, path, precision, macs, input_size}]: teacher fp32, student fp32, shipped fp32 and int8."""
    report = json.loads((run / "report.json").read_text())
    card = json.loads((run / "export" / "model.json").read_text())
    cfg = json.loads((run / "export" / "config.json").read_text()).get("export", {})
    rows, shipped = report["models"], report["shipped"]
    exporter, opset = cfg.get("exporter", "dynamo"), int(cfg.get("opset", 18))
    size = card["preprocessing"]["input_size"]
    models = []
    for name, pt in (("teacher fp32", run / "finetune" / "teacher.pt"), ("student fp32", run / "compress" / "student.pt")):
        if only and name.split()[0] not in only:
            continue
        if name == "student fp32" and shipped["file"] == "student.pt":   # the shipped fp32 file is the student
            models.append({"name": name + " (= shipped fp32)", "path": run / "export" / card["files"]["fp32"],
                           "precision": "fp32", "macs": rows["student"]["macs"], "input_size": size})
            continue
        print(f"[speed] exporting {pt} to ONNX ({exporter})", flush=True)
        path, isize = _export_pt(pt, work / f"{pt.stem}.fp32.onnx", exporter, opset)
        models.append({"name": name, "path": path, "precision": "fp32", "macs": rows[name.split()[0]]["macs"],
                       "input_size": isize})
    for precision in ("fp32", "int8"):
        row = rows.get(f"onnx_{precision}") or {}
        if card["files"].get(precision) and row.get("macs") and (not only or "shipped" in only):
            if precision == "fp32" and shipped["file"] == "student.pt" and any("= shipped" in m["name"] for m in models):
                continue
            models.append({"name": f"shipped {precision}", "path": run / "export" / card["files"][precision],
                           "precision": precision, "macs": row["macs"], "input_size": size})
    return models


# ----------------------------------------------------------------------------- interleaved timing
def time_all(models: list[dict], runtimes: list[str], threads: int, runs: int, rounds: int) -> list[dict]:
    """Every (model, runtime) pair, interleaved rounds, best round's median per batch size."""
    rng = np.random.default_rng(0)
    pairs = []
    for m in models:
        x = {b: rng.standard_normal((b, *m["input_size"])).astype(np.float32) for b in (1, 32)}
        for rt in runtimes:
            sess = runtime.make_session(m["path"], "cpu", threads, runtime=rt)
            if runtime.session_runtime(sess) != rt:
                continue
            pairs.append({"model": m, "runtime": rt, "session": sess, "x": x, "ms": {}})
    for r in range(rounds):
        for p in pairs:
            for b, n in ((1, runs), (32, max(3, runs // 3))):
                ms = runtime.measure_latency_ms(p["session"], p["x"][b], n)
                p["ms"][b] = min(ms, p["ms"].get(b, ms))
        print(f"[speed] round {r + 1}/{rounds} done", flush=True)
    return pairs


def rows_of(pairs: list[dict], peak: dict) -> list[dict]:
    out = []
    for p in pairs:
        m, ms = p["model"], p["ms"]
        ips = {b: b * 1000.0 / ms[b] for b in (1, 32)}
        rate = peak[m["precision"]]["macs_per_s"]
        out.append({"model": m["name"], "runtime": p["runtime"], "precision": m["precision"], "macs": m["macs"],
                    "input_size": m["input_size"], "file": str(m["path"].name),
                    "latency_ms_b1": round(ms[1], 3), "latency_ms_b32": round(ms[32], 3),
                    "images_per_s_b1": round(ips[1], 1), "images_per_s_b32": round(ips[32], 1),
                    "peak_fraction_b1": m["macs"] * ips[1] / rate if rate else None,
                    "peak_fraction_b32": m["macs"] * ips[32] / rate if rate else None})
    return out


def print_table(rows: list[dict], peak: dict, info: dict, threads: int) -> None:
    print(f"\nCPU: {info['model']} ({info['cores']} cores usable, {threads} threads), flags used: int8 "
          f"{peak['int8']['flag']}, fp32 {peak['fp32']['flag']}")
    print(f"int8 peak: {peak['int8']['formula']}\nfp32 peak: {peak['fp32']['formula']}")
    clock = peak.get("clock_ghz") or {}
    if peak.get("gemm_macs_per_s"):
        print(f"clock: nominal {clock['nominal']:.3f} GHz (/proc/cpuinfo); numpy's fp32 matrix product "
              f"({peak['blas_kernel']} BLAS kernel, {threads} cores) reached {peak['gemm_macs_per_s'] / 1e9:.1f} GMAC/s, "
              + (f"which needs at least {clock['implied_by_gemm']:.2f} GHz" if clock.get("implied_by_gemm") else
                 "kernel unknown") + f"; the peaks above use {clock['used']:.2f} GHz")
    print()
    print("| model | runtime | MACs | b1 (ms) | b32 (ms) | img/s b1 | img/s b32 | % of peak b1 | % of peak b32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "—"  # noqa: E731
        print(f"| {r['model']} | {r['runtime']} | {r['macs'] / 1e6:.0f}M | {r['latency_ms_b1']:.2f} | "
              f"{r['latency_ms_b32']:.2f} | {r['images_per_s_b1']:.0f} | {r['images_per_s_b32']:.0f} | "
              f"{pct(r['peak_fraction_b1'])} | {pct(r['peak_fraction_b32'])} |")


def load_note(before: tuple, info: dict) -> dict:
    """The 1-minute load average before and after: above the core count, other jobs shared the CPU (say so)."""
    after = os.getloadavg()
    note = {"loadavg_1min_before": round(before[0], 2), "loadavg_1min_after": round(after[0], 2)}
    if max(before[0], after[0]) > info["cores"] + 0.5:
        print(f"[speed] NOTE: load average {before[0]:.1f} -> {after[0]:.1f} on {info['cores']} cores: other jobs "
              "shared the CPU; compare rows of this run with each other only", flush=True)
    return note


def speed_mode(args) -> dict:
    info, load = cpu_info(), os.getloadavg()
    rate = gemm_rate()
    cores = min(info["cores"], args.threads)
    implied, arch = gemm_clock(rate, cores)
    ghz = max(info["mhz"] / 1000.0, implied or 0.0)   # the nominal clock, or the higher one the BLAS run proves
    peak = {**peak_macs(info, args.threads, ghz), "gemm_macs_per_s": rate, "blas_kernel": arch,
            "clock_ghz": {"nominal": info["mhz"] / 1000.0, "implied_by_gemm": implied, "used": ghz}}
    rts = [r for r in runtime.cpu_runtimes() if not args.runtimes or r in args.runtimes.split(",")]
    with tempfile.TemporaryDirectory(prefix="speed.") as work:
        models = run_models(Path(args.run), Path(work), args.models.split(",") if args.models else None)
        pairs = time_all(models, rts, args.threads, args.runs, args.rounds)
        rows = rows_of(pairs, peak)
    print_table(rows, peak, info, args.threads)
    return {"cpu": {k: (sorted(v) if isinstance(v, set) else v) for k, v in info.items() if k != "flags"},
            "flags": sorted(f for f in info["flags"] if f.startswith(("avx", "amx", "fma"))), "peak": peak,
            "threads": args.threads, "runs": args.runs, "rounds": args.rounds, **load_note(load, info),
            "versions": {r: runtime.runtime_version(r) for r in rts}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/default", help="an export run folder (report.json, export/, finetune/, compress/)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (export.latency_threads)")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per batch-1 figure (batch 32: a third)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median of each is kept")
    ap.add_argument("--models", default=None, help="comma list of teacher,student,shipped (default all)")
    ap.add_argument("--runtimes", default=None, help="comma list (default every CPU runtime installed); with "
                    "--serve: the one runtime to serve on (default what model.json recommends)")
    ap.add_argument("--json", default=None, help="where to write the numbers (default <run>/speed[_serve].json)")
    ap.add_argument("--serve", action="store_true", help="HTTP server vs raw in-process, and one request's parts")
    ap.add_argument("--images", default=None, help="--serve: a folder of image files (default: generated JPEGs)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20, help="--serve: seconds per measurement")
    args = ap.parse_args(argv)
    if args.serve:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from speed_serve import serve_mode

        result, default_json = serve_mode(args), Path(args.run) / "speed_serve.json"
    else:
        result, default_json = speed_mode(args), Path(args.run) / "speed.json"
    out = Path(args.json) if args.json else default_json
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n[speed] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
