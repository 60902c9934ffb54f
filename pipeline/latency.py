"""Latency-aware pruning (issue #13): a torch model's measured ONNX Runtime latency, and pruning to a latency target.

MACs are not latency: an EfficientNet-Lite0 pruned to half its MACs still took ~0.67 of the unpruned model's int8
time on ONNX Runtime's CPU EP (fp32: ~0.53), because pruning shrinks pointwise convolutions (which int8 speeds up
3-3.8x) fastest and leaves the stem and the depthwise convolutions (int8 0.55-1.6x) and per-op costs (docs/
compress.md, "int8 after pruning"). So the compress stage can measure instead of count:

- `measure_model_latency`: export a temporary ONNX of the model with the export stage's own code
  (`export.export_onnx`, then `quant_pre_process` + `export.quantize` with export's first recipe: static QDQ,
  per-channel S8 weights, U8 activations, MinMax) and time it on ONNX Runtime's CPU execution provider through
  `runtime.make_session` (median of `runs`, best of `rounds` interleaved b1/b32 rounds). Calibration uses random
  inputs: the scales it finds do not change how fast the int8 kernels run, only what they compute.
- `prune_to_latency`: prune a copy of a model until its measured latency is at most a target, by predicting the
  MACs that run in the target time from the (MACs, ms) points measured so far (a straight line, least squares),
  pruning to those MACs with `compress.prune_to` (bisection on MACs), measuring, refitting, and trying again.

Config (`compress.*`): `target_latency_ms` / `target_latency_ratio`, `latency_precision` (int8 | fp32),
`latency_batch` (1 | 32), `latency_threads`, `latency_runs`, `step_latency`; see docs/compress.md.
Measurements are noisy on a shared machine: decisions taken on them are not bit-reproducible across reruns
(MACs and params targets are; with them the latency is only recorded).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("int8", "fp32")
BATCHES = (1, 32)
MAX_TRIALS = 4               # measured pruning trials per step (each: prune_to + export + quantize + timing)
CLOSE_ENOUGH = 0.05          # a trial within this fraction below the target is not refined further
WAYPOINT_SLACK = 0.10        # intermediate steps may end this fraction above their own latency waypoint


def wanted(cc) -> bool:
    """Is the pruning target a latency (compress.target_latency_ms or compress.target_latency_ratio)?"""
    return cc.target_latency_ms is not None or cc.target_latency_ratio is not None


def measuring(cc) -> bool:
    """Is each pruning step's latency measured (a latency target, or compress.step_latency for the curve)?"""
    return wanted(cc) or cc.step_latency


def check(cc) -> str | None:
    """The error message for an invalid latency setting, else None (compress.check_config raises it)."""
    if cc.target_latency_ms is not None and cc.target_latency_ratio is not None:
        return "set at most one of compress.target_latency_ms and compress.target_latency_ratio"
    if wanted(cc) and cc.target_params_ratio is not None:
        return "a latency target and compress.target_params_ratio exclude each other: set one pruning target"
    if cc.target_latency_ms is not None and not cc.target_latency_ms > 0:
        return f"compress.target_latency_ms must be > 0, got {cc.target_latency_ms}"
    if cc.target_latency_ratio is not None and not 0 < cc.target_latency_ratio <= 1:
        return f"compress.target_latency_ratio must be in (0, 1], got {cc.target_latency_ratio}"
    if cc.latency_precision not in PRECISIONS:
        return f"compress.latency_precision must be one of {', '.join(PRECISIONS)}, got {cc.latency_precision!r}"
    if cc.latency_batch not in BATCHES:
        return f"compress.latency_batch must be 1 or 32, got {cc.latency_batch}"
    if cc.latency_threads < 1 or cc.latency_runs < 1:
        return "compress.latency_threads and compress.latency_runs must be >= 1"
    return None


def target_ratio(cc, base_ms: float) -> float:
    """The latency target as a fraction of the unpruned student's measured latency (capped at 1: no pruning)."""
    if cc.target_latency_ratio is not None:
        return float(cc.target_latency_ratio)
    return min(1.0, float(cc.target_latency_ms) / base_ms)


def key(cc) -> str:
    """The curve field the target applies to: latency_ms_b1 or latency_ms_b32."""
    return f"latency_ms_b{cc.latency_batch}"


# ----------------------------------------------------------------------------- measuring

def _export(model, input_size, folder: Path, precision: str, opset: int, exporter: str) -> tuple[Path, str]:
    from onnxruntime.quantization import quant_pre_process

    from pipeline import engine, export

    fp32 = folder / "model.fp32.onnx"
    used = export.export_onnx(engine.cpu_copy(model), list(input_size), fp32, opset, exporter)
    if precision == "fp32":
        return fp32, used
    prep, int8 = folder / "model.prep.onnx", folder / "model.int8.onnx"
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    calib = np.random.default_rng(0).standard_normal((4, *input_size)).astype(np.float32)
    export.quantize(prep, int8, calib, {"kind": "static", "per_channel": True, "method": "minmax"})
    return int8, used


def measure_model_latency(model, input_size, precision: str = "int8", threads: int = 2, runs: int = 10,
                          rounds: int = 2, opset: int = 18, exporter: str = "dynamo") -> dict:
    """ONNX Runtime CPU-EP latency of a torch model as the export stage would ship it (fp32, or static QDQ int8).

    -> {"latency_ms_b1", "latency_ms_b32", "latency_precision", "latency_runtime", "latency_threads",
        "latency_seconds"}: median ms of `runs` calls at batch 1 (runs // 3, at least 3, at batch 32), the best of
    `rounds` interleaved rounds (the least disturbed by other jobs on a shared machine).
    """
    import onnxruntime as ort

    from pipeline import export

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepipe-latency-") as tmp:
        path, used = _export(model, input_size, Path(tmp), precision, opset, exporter)
        # export's own protocol (the same inputs, runs and interleaved rounds as the export stage's figures)
        best = export.compare_latency({"model": path}, input_size, threads, runs, rounds)["model"]
    return {**best, "latency_precision": precision,
            "latency_runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider ({used} exporter)",
            "latency_threads": threads, "latency_seconds": round(time.perf_counter() - t0, 2)}


def measure_cc(model, input_size, cc) -> dict:
    """measure_model_latency with the compress config's settings."""
    return measure_model_latency(model, input_size, cc.latency_precision, cc.latency_threads, cc.latency_runs)


# ----------------------------------------------------------------------------- pruning to a latency

def predict_macs(points: list, target_ms: float) -> float:
    """MACs expected to run in `target_ms`, from measured (MACs, ms) points: latency = a + b * MACs by least
    squares (through the origin with a single point, or when the fit is not increasing); a >= 0."""
    pts = np.array(sorted(set((float(m), float(t)) for m, t in points)), dtype=np.float64)
    a, b = 0.0, pts[-1, 1] / pts[-1, 0]
    if len(pts) >= 2 and np.ptp(pts[:, 0]) > 0:
        slope, icpt = np.polyfit(pts[:, 0], pts[:, 1], 1)
        if slope > 0:
            a, b = max(0.0, float(icpt)), float(slope)
            if icpt < 0:  # an intercept < 0 is noise: keep the slope through the data's centre
                b = float(pts[:, 1].mean() / pts[:, 0].mean())
    return max(0.0, (target_ms - a) / b)


def prune_to_latency(model, current_ms: float, target_ms: float, input_size, cc, measure, points: list, grads=None,
                     final: bool = True):
    """Prune a copy of `model` (measured at `current_ms`) until `measure(model)[key(cc)]` is at most target_ms (the
    last step), or at most target_ms * (1 + WAYPOINT_SLACK) (an intermediate step: a waypoint, corrected by the next
    step's measurement).

    `points`: (MACs, ms) measured so far (the unpruned model's, and every step's). -> (model, history, info) as
    compress.prune_to, info with "latency" (the measured dict of the model returned, None when `model` is returned
    unpruned), "target_ms" and "trials" [{macs, ms}]. Of the trials within the limit the least pruned wins, else
    the fastest (info["reached"] False).
    """
    from pipeline import compress, engine

    k = key(cc)
    macs0 = engine.count_macs(model, input_size)
    points = list(points)
    limit = target_ms * (1.0 if final else 1.0 + WAYPOINT_SLACK)
    if current_ms <= limit:
        return model, [], {"ratio": 0.0, "reached": True, "target_ms": target_ms, "trials": [], "latency": None,
                           "target": macs0, "before": macs0, "after": macs0}
    fits, other, trials = [], [], []
    for _ in range(MAX_TRIALS):
        goal = min(predict_macs(points, target_ms), macs0 - 1)
        m, hist, info = compress.prune_to(model, goal, input_size, cc, "macs", grads)
        macs = engine.count_macs(m, input_size)
        if any(t["macs"] == macs for t in trials):
            break  # round_to steps: the same architecture again, nothing new to learn
        lat = measure(m)
        trials.append({"macs": macs, "ms": lat[k]})
        points.append((macs, lat[k]))
        (fits if lat[k] <= limit else other).append((m, hist, info, lat))
        if (target_ms * (1 - CLOSE_ENOUGH) <= lat[k] <= limit) or (lat[k] > limit and not info["reached"]):
            break  # close enough below the limit, or above it with nothing left to prune
    pick = max(fits, key=lambda r: engine.count_macs(r[0], input_size)) if fits else \
        min(other, key=lambda r: r[3][k])
    m, hist, info, lat = pick
    info = {**info, "reached": bool(fits), "target_ms": target_ms, "trials": trials, "latency": lat}
    return m, hist, info


# ----------------------------------------------------------------------------- the compress stage's use of it

def measure_on_rank0(job, model) -> dict | None:
    """Rank 0 measures, every DDP rank gets the same numbers (decisions taken on them stay identical). A failed
    measurement (an export or quantization error) stops the stage when the target is a latency, else it is a
    warning and the step has no latency (-> None): the curve is not worth a failed run. The other ranks wait in the
    broadcast meanwhile: one measurement, seconds, far below run.dist_timeout_s (timing on every rank at once would
    put them on the same cores; docs/gpu.md)."""
    from pipeline import engine

    lat = None
    if job.stage.is_main:
        try:
            lat = measure_cc(engine.unwrap(model), job.input_size, job.cc)
        except Exception as e:  # noqa: BLE001 - decided below, the same way on every rank
            lat = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    lat = engine.broadcast_object(lat)
    if "error" not in lat:
        return lat
    message = f"measuring the latency on ONNX Runtime failed: {lat['error']}"
    if wanted(job.cc):
        raise RuntimeError(message + " (needed for compress.target_latency_ms / target_latency_ratio)")
    job.stage.warn(message + "; this step's latency is not recorded (compress.step_latency)")
    return None


def ensure_base(job) -> None:
    """Measure the unpruned student once, before the first pruning step (st["base"]["latency"], curve step 0)."""
    st, cc = job.st, job.cc
    if not measuring(cc) or st["base"] is None or "latency" in st["base"]:
        return
    model = job.model
    if st["history"]:  # resumed from a checkpoint older than the measurement: the student is on disk
        from models import load_model_artifact

        model = load_model_artifact(job.stage.dir / "student.pt")[0]
    lat = measure_on_rank0(job, model)
    if lat is None:
        return
    st["base"]["latency"] = lat[key(cc)]
    st["curve"][0].update(lat)
    job.stage.log(f"student latency ({lat['latency_runtime']}, {cc.latency_precision}, {cc.latency_threads} threads): "
                  f"{lat['latency_ms_b1']:.3f} ms at batch 1, {lat['latency_ms_b32']:.2f} ms at batch 32 "
                  f"({lat['latency_seconds']:.0f}s to export and time)")


def prune_step_model(job, k: int, target: float, by: str, grads=None):
    """One pruning step's model: compress.prune_to for a MACs or params target, prune_to_latency for a latency
    target (`target` in ms); measured when latencies are (compress.step_latency). -> (model, history, info)."""
    from pipeline import compress, engine

    cc, st, model = job.cc, job.st, engine.unwrap(job.model)
    n_steps = job.target()[2]
    if by == "latency":
        k_ = key(cc)
        points = [(c["macs"], c[k_]) for c in st["curve"] if k_ in c]
        pruned, hist, info = prune_to_latency(model, st["curve"][-1][k_], target, job.input_size, cc,
                                              lambda m: measure_on_rank0(job, m), points, grads, final=k == n_steps)
        if info["latency"] is None:  # fast enough already: the model is unchanged, so is its latency
            info["latency"] = {f: st["curve"][-1][f] for f in LATENCY_FIELDS if f in st["curve"][-1]}
    else:
        pruned, hist, info = compress.prune_to(model, target, job.input_size, cc, by, grads)
        if measuring(cc):
            info["latency"] = measure_on_rank0(job, pruned)
    lat = info.get("latency")
    if lat:
        job.stage.log(f"pruning step {k}/{n_steps}: measured {lat['latency_ms_b1']:.3f} ms at batch 1, "
                      f"{lat['latency_ms_b32']:.2f} ms at batch 32 ({cc.latency_precision}, ONNX Runtime CPU)"
                      + (f"; target {target:.3f} ms at batch {cc.latency_batch} after {len(info['trials'])} measured "
                         f"trial(s){'' if info['reached'] else ' NOT reached'}" if by == "latency" else ""))
    return pruned, hist, info


LATENCY_FIELDS = ("latency_ms_b1", "latency_ms_b32", "latency_precision", "latency_runtime", "latency_threads")


def curve_fields(info: dict) -> dict:
    """The latency fields of a pruning step's curve entry (empty when nothing was measured)."""
    lat = info.get("latency") or {}
    out = {f: lat[f] for f in LATENCY_FIELDS if f in lat}
    if "target_ms" in info:
        out.update(target_latency_ms=info["target_ms"], latency_trials=info["trials"])
    return out


def achieved(curve: list, step: int, cc) -> dict:
    """metrics.json achieved.*: the kept step's measured latency vs the student's (empty when not measured)."""
    k = key(cc)
    if k not in curve[0] or k not in curve[step]:
        return {}
    return {"latency_ratio": curve[step][k] / curve[0][k], "latency_ms": curve[step][k],
            "student_latency_ms": curve[0][k], "latency_batch": cc.latency_batch,
            "latency_precision": cc.latency_precision, "target_latency_ms": cc.target_latency_ms,
            "target_latency_ratio": cc.target_latency_ratio}


def plot_panel(ax, curve: list) -> None:
    """MACs vs measured latency per pruning step (b1 left axis, b32 right axis), with the line latency would
    follow if it were proportional to MACs, and the latency target when there is one."""
    pts = [c for c in curve if "latency_ms_b1" in c]
    macs = [c["macs"] / 1e6 for c in pts]
    ax.plot(macs, [c["latency_ms_b1"] for c in pts], "o-", color="tab:purple", label="batch 1 (ms)")
    ax.plot(macs, [pts[0]["latency_ms_b1"] * m / macs[0] for m in macs], ":", color="tab:purple", alpha=0.5,
            label="batch 1 if latency ∝ MACs")
    for c, m in zip(pts, macs):
        ax.annotate(f"step {c['step']}", (m, c["latency_ms_b1"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    targets = [c["target_latency_ms"] for c in pts if "target_latency_ms" in c]
    if targets:
        ax.axhline(targets[-1], ls="--", color="gray", label=f"last step's target ({targets[-1]:.2f} ms)")
    ax2 = ax.twinx()
    ax2.plot(macs, [c["latency_ms_b32"] for c in pts], "s-", color="tab:orange", label="batch 32 (ms, right)")
    ax2.set_ylabel("ms per batch of 32")
    ax.set(xlabel="MACs per image (M)", ylabel="ms per image (batch 1)",
           title=f"measured latency vs MACs ({pts[0].get('latency_precision', '?')}, ONNX Runtime CPU)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
