"""The export stage: the pruned student -> ONNX fp32 + int8 (+ .ort), verified, measured, self-describing.

Reads run.dir/compress/{pruned,student}.pt and run.dir/finetune/teacher.pt; writes run.dir/export/:
  model.fp32.onnx   dynamic batch, input `input` [N,3,H,W] float32, output `logits`; labels,
                    preprocessing and the model card in metadata_props
  model.int8.onnx   static QDQ int8 (onnxruntime.quantization), only when it meets export.max_int8_drop
  model.int8.ort    ONNX Runtime Mobile (ORT format) copy of the shipped model (export.mobile); model.fp32.ort
                    instead when no int8 recipe met the budget
  model.fp16.onnx   only with export.quantization=fp16
  model.json        the model card (same content as the metadata), with `files` and `recommended`
  manifest.json     written last
and the run's report: run.dir/report.json, report.md, report.png (every figure measured in this run).

Checks: onnx.checker (full), ONNX Runtime vs PyTorch on the real test images (max |logit diff| and
top-1 agreement, failing thresholds), int8 accuracy vs fp32 on the test split with fallbacks
(per-tensor, another calibration method, excluding the nodes whose activations the int8 model
reproduces worst), latency fp32 vs int8 on the CPU execution provider at batch 1 and 32.

Exporter: `dynamo` (torch.export + onnxscript) by default. Measured here (EfficientNet-Lite0, 224 px): 12 s vs
2.5 s for the legacy TorchScript exporter, same parity (~1e-6) and the same ONNX Runtime fp32/int8 latency,
but a smaller graph (94 vs 160 nodes) from the exporter torch maintains (the legacy one is deprecated). If
dynamo fails on an op, the stage falls back to the legacy exporter and says so; parity is checked either way.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import __version__, artifacts, runtime
from pipeline.modelcard import INPUT_NAME, OUTPUT_NAME, set_onnx_metadata
from pipeline.preprocess import preprocess

STAGE = "export"
ROWS = ("teacher", "student", "pruned", "onnx_fp32", "onnx_int8")
COLUMNS = ("accuracy", "params", "macs", "size_bytes", "latency_ms_b1", "latency_ms_b32")


class ExportError(RuntimeError):
    """An exported model failed a check; the message says which and by how much."""


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


# ----------------------------------------------------------------------------- data as the device sees it

def load_images(samples, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """(path, label) samples -> float32 NCHW batch through the torch-free preprocessing, labels."""
    x = np.stack([preprocess(p, pre) for p, _ in samples]).astype(np.float32)
    y = np.array([label for _, label in samples], dtype=np.int64)
    return x, y


def stratified_sample(samples, n: int, seed: int) -> list:
    """Up to n samples, classes represented in proportion (round-robin over shuffled classes)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    queues = []
    for label in sorted(by_class):
        items = by_class[label]
        queues.append([items[i] for i in rng.permutation(len(items))])
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def run_onnx(session, x: np.ndarray, batch: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- ONNX export + checks

def export_onnx(model, input_size, path: Path, opset: int, exporter: str) -> str:
    """torch -> ONNX with a dynamic batch axis; -> the exporter actually used."""
    import torch

    model = model.eval()
    example = torch.randn(2, *input_size)
    path = Path(path)
    if exporter == "dynamo":
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), external_data=False, verbose=False)
            program.save(str(path))
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - an unsupported op: the legacy exporter usually copes
            log(f"dynamo exporter failed ({type(e).__name__}: {str(e)[:200]}); falling back to the legacy exporter")
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=max(17, min(opset, 20)),
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return "legacy"


def check_parity(reference: np.ndarray, candidate: np.ndarray, atol: float, min_agreement: float,
                 what: str = "ONNX fp32 vs PyTorch") -> dict:
    diff = float(np.abs(reference - candidate).max())
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    result = {"max_abs_diff": diff, "top1_agreement": agreement, "atol": atol, "min_top1_agreement": min_agreement}
    if diff > atol or agreement < min_agreement:
        raise ExportError(f"{what} parity failed: max |logit diff| {diff:.3g} (limit {atol:g}), top-1 agreement "
                          f"{agreement:.4f} (limit {min_agreement:g}). The exported graph does not compute what the "
                          f"PyTorch model does; try export.exporter=legacy or another export.opset")
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


# ----------------------------------------------------------------------------- quantization

class _Reader:
    """onnxruntime CalibrationDataReader over a preprocessed batch, one image at a time."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.i = 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {INPUT_NAME: self.x[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def _calibrater_reader(x):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass
    return Reader(x)


def quantize(prep_path: Path, out_path: Path, calib: np.ndarray, recipe: dict) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    prep_path, out_path = Path(prep_path).resolve(), Path(out_path).resolve()  # cwd changes below
    if recipe["kind"] == "dynamic":
        quantize_dynamic(str(prep_path), str(out_path), per_channel=recipe["per_channel"], weight_type=QuantType.QInt8)
        return
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe["method"]]
    # U8 activations / S8 weights: S8S8 ran 3x slower on this CPU (STACK-NOTES). quantize_static keeps its
    # augmented calibration model in its own temp dir (onnxruntime >= 1.16), so nothing lands in the cwd.
    quantize_static(str(prep_path), str(out_path), _calibrater_reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=recipe["per_channel"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_exclude=recipe.get("exclude") or None,
                    extra_options={"CalibMovingAverage": False})


def sensitive_nodes(fp32_path: Path, int8_path: Path, x: np.ndarray, count: int) -> list[str]:
    """Nodes whose outputs the int8 model reproduces worst (lowest SQNR vs fp32 on a few images)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory() as tmp:
        fa, qa = Path(tmp) / "fp32_aug.onnx", Path(tmp) / "int8_aug.onnx"
        modify_model_output_intermediate_tensors(str(fp32_path), str(fa))
        modify_model_output_intermediate_tensors(str(int8_path), str(qa))
        fp_acts = collect_activations(str(fa), _calibrater_reader(x))
        q_acts = collect_activations(str(qa), _calibrater_reader(x))
    errors = compute_activation_error(create_activation_matching(q_acts, fp_acts))
    producers = {out: node.name for node in onnx.load(str(fp32_path)).graph.node for out in node.output}
    scored = sorted((v.get("qdq_err", np.inf), name) for name, v in errors.items() if name in producers)
    return [producers[name] for _, name in scored[:count]]


def int8_recipes(cfg_e) -> list[dict]:
    """The shipped recipe is the first that meets the budget."""
    if cfg_e.quantization == "dynamic":
        return [{"kind": "dynamic", "per_channel": cfg_e.per_channel, "name": "dynamic"}]
    base = {"kind": "static", "per_channel": cfg_e.per_channel, "method": cfg_e.calibration_method}
    recipes = [{**base, "name": f"static {'per-channel' if base['per_channel'] else 'per-tensor'} {base['method']}"}]
    if base["per_channel"]:
        recipes.append({**base, "per_channel": False, "name": f"static per-tensor {base['method']}"})
    for method in ("percentile", "entropy", "minmax"):
        if method != base["method"]:
            recipes.append({**base, "method": method, "name": f"static per-channel {method}"})
            break
    recipes.append({**base, "exclude": "sensitive", "name": f"static per-channel {base['method']} minus sensitive nodes"})
    return recipes


# ----------------------------------------------------------------------------- ORT format

def write_ort(onnx_path: Path, ort_path: Path) -> None:
    """ORT format for ONNX Runtime Mobile, the way `onnxruntime.tools.convert_onnx_models_to_ort` does by default
    ("Fixed" style): all graph optimizations except the x86-only NCHWc layout, QDQ fused to integer kernels
    with U8 activations (session.qdqisint8allowed=0), saved with session.save_model_format=ORT.

    An ORT-format model is not re-optimized at load time: a copy saved with basic optimizations only kept the
    DequantizeLinear -> float Conv -> QuantizeLinear chains and ran ~5x slower than model.int8.onnx
    (onnxruntime 1.32, EfficientNet-Lite0 at 224 px); this one gives the same logits as model.int8.onnx.
    """
    import onnxruntime as ort

    with artifacts.atomic_path(ort_path, suffix=".ort") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(tmp)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "0")
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])


# ----------------------------------------------------------------------------- latency

def compare_latency(paths: dict, input_size, threads: int, runs: int, rounds: int = 2) -> dict:
    """ORT CPU-EP latency of several model files measured side by side: `rounds` interleaved rounds of
    (model A b1, A b32, model B b1, B b32, ...); per figure the best round's median (the least disturbed
    by other jobs on a shared machine). -> {name: {"latency_ms_b1", "latency_ms_b32"}}"""
    rng = np.random.default_rng(0)
    b1 = rng.standard_normal((1, *input_size)).astype(np.float32)
    b32 = rng.standard_normal((32, *input_size)).astype(np.float32)
    sessions = {name: runtime.make_session(path, "cpu", threads) for name, path in paths.items()}
    best: dict = {name: {} for name in paths}
    for _ in range(max(1, rounds)):
        for name, sess in sessions.items():
            for key, x, n in (("latency_ms_b1", b1, runs), ("latency_ms_b32", b32, max(3, runs // 3))):
                ms = runtime.measure_latency_ms(sess, x, n)
                best[name][key] = round(min(ms, best[name].get(key, ms)), 3)
    return best


# ----------------------------------------------------------------------------- the report

def _torch_row(path: Path, data, cfg, runs: int) -> dict:
    import torch

    from models import load_model_artifact
    from pipeline import engine
    from pipeline.data import make_loader

    model, meta = load_model_artifact(path)
    pre = meta["preprocessing"]
    loader = make_loader(data.test, pre, cfg, train=False)
    with torch.no_grad():
        acc = engine.evaluate(model, loader, torch.device("cpu"), meta["num_classes"], meta["classes"])["accuracy"]
    size = pre["input_size"]
    return {"accuracy": acc, "params": engine.count_params(model), "macs": engine.count_macs(model, size),
            "size_bytes": path.stat().st_size,
            "latency_ms_b1": round(engine.measure_latency_ms(model, size, 1, runs=runs), 3),
            "latency_ms_b32": round(engine.measure_latency_ms(model, size, 32, runs=max(3, runs // 3)), 3),
            "file": str(path), "name": meta["name"], "input_size": size}


def _fmt_row(name: str, r: dict | None) -> str:
    if not r or r.get("accuracy") is None:
        return f"| {name} | — (not shipped) | | | | | |"
    return (f"| {name} | {r['accuracy']:.4f} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
            f"{r['size_bytes'] / 1e6:.2f} MB | {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.2f} |")


def report_table(report: dict) -> str:
    """The markdown table of report.json's rows (also used by benchmarks/export_bench.py)."""
    lines = ["| model | accuracy | params | MACs | size | latency b1 (ms) | latency b32 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [_fmt_row(name, report["models"].get(name)) for name in ROWS])


def write_report(run_dir: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    split = "val split (the data has no test split)" if report["test_is_val"] else "test split"
    th = report["threads"]
    lines = [f"# Report: {run_dir}", "",
             f"Accuracy: top-1 on the {split}, {report['test_images']} images. Latency: median ms per call, best of "
             f"{report['latency_rounds']} interleaved rounds, on this CPU ({report['machine']['cpu']}, "
             f"{report['machine']['cpu_count']} cores): PyTorch eager fp32 ({th['torch']} threads) for the .pt rows, "
             f"ONNX Runtime CPU EP ({th['onnxruntime']} threads) for the ONNX rows. Params/MACs of the ONNX rows are "
             "the pruned model's. All figures measured in this run.", "",
             report_table(report), ""]
    i8 = report["int8"]
    attempts = "; ".join(f"{a['name']}: " + (f"drop {a['drop']:+.4f}" if "drop" in a else "failed")
                         + ("" if a.get("ok") else " ✗") for a in i8["attempts"]) or "none"
    lines += [(f"- int8 ({i8['quantization']}): shipped recipe **{i8['shipped'] or 'none: fp32 shipped'}** "
               f"(budget: drop <= {i8['max_int8_drop']} vs fp32 ONNX); attempts: {attempts}")
              if i8["quantization"] in ("static", "dynamic") else
              f"- int8: not requested (export.quantization={i8['quantization']})",
              f"- parity ONNX fp32 vs PyTorch ({report['exporter']} exporter, opset {report['opset']}): max |logit diff| "
              f"{report['parity']['max_abs_diff']:.2e}, top-1 agreement {report['parity']['top1_agreement']:.4f}"]
    if report.get("int8_speedup"):
        sp = report["int8_speedup"]
        lines.append(f"- int8 speed-up vs fp32 (ORT CPU EP): {sp['b1']:.2f}x at batch 1, {sp['b32']:.2f}x at batch 32")
    if report.get("mobile"):
        mb = report["mobile"]
        lines.append(f"- {mb['file']} (ORT format, from {mb['from']}): test accuracy {mb['accuracy']:.4f}, top-1 "
                     f"agreement {mb['top1_agreement']:.4f}, max |logit diff| {mb['max_abs_diff']:.2e}")
    if report.get("fp16"):
        f16 = report["fp16"]
        lines.append(f"- {f16['file']}: " + (f"test accuracy {f16['accuracy']:.4f}, max |logit diff| vs fp32 "
                                             f"{f16['max_abs_diff_vs_fp32']:.2e} (ONNX Runtime CPU EP)"
                                             if "accuracy" in f16 else f"not runnable on the CPU EP: {f16['error']}"))
    lines.append(f"- recommended: cpu = **{report['recommended']['cpu']}**, cuda = {report['recommended']['cuda']}")
    for w in report["warnings"]:
        lines.append(f"- **WARNING**: {w}")
    lines += ["", "![accuracy vs latency vs size](report.png)", ""]
    artifacts.write_text(run_dir / "report.md", "\n".join(lines))
    artifacts.write_json(run_dir / "report.json", report)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = {n: r for n, r in rows.items() if r and r.get("accuracy") is not None}
    biggest = max(r["size_bytes"] for r in shown.values())
    for i, name in enumerate(ROWS):
        if name not in shown:
            continue
        r = shown[name]
        ax.scatter(r["latency_ms_b1"], r["accuracy"], s=40 + 600 * r["size_bytes"] / biggest, alpha=0.55,
                   marker="s" if name.startswith("onnx") else "o", label=name)
        ax.annotate(f"{name} ({r['size_bytes'] / 1e6:.1f} MB)", (r["latency_ms_b1"], r["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(0, 12 if i % 2 == 0 else -18), ha="center")
    ax.margins(x=0.15, y=0.2)
    ax.set_xscale("log")
    ax.set(xlabel="latency at batch 1, ms (CPU, log scale)", ylabel=f"top-1 accuracy ({split})",
           title="accuracy vs latency (marker area ~ file size)")
    ax.grid(alpha=0.3, which="both")
    artifacts.save_figure(fig, run_dir / "report.png")
    plt.close(fig)
    return [run_dir / "report.json", run_dir / "report.md", run_dir / "report.png"]


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}


# ----------------------------------------------------------------------------- the stage

SOURCES = {"pruned.pt": ("compress", "make compress"), "student.pt": ("compress", "make compress"),
           "teacher.pt": ("finetune", "make finetune")}
OPTIONAL_OUTPUTS = ("model.int8.onnx", "model.int8.ort", "model.fp32.ort", "model.fp16.onnx")


def config_hash(cfg) -> str:
    """The sections export reads (data: splits, batch size; export) plus the seed (calibration sample)."""
    return artifacts.sha256_json({"sections": cfg.section_hash("data", "export"), "seed": cfg.run.seed})


def source_paths(cfg) -> dict:
    paths = {name: cfg.run_dir / sub / name for name, (sub, _) in SOURCES.items()}
    for name, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `{SOURCES[name][1]}` first (same CONFIG/ARGS, "
                                    f"run.dir={cfg.run.dir})")
    return paths


def stage_inputs(sources: dict, data_fingerprint: str) -> dict:
    return {"data": data_fingerprint, **{k: artifacts.sha256_file(p) for k, p in sources.items()}}


def _quantize_with_budget(ce, seed, fp32_path, int8_path, work_dir, train, pre, x_test, y_test, fp32_logits,
                          fp32_acc, warnings_) -> tuple:
    """Try the int8 recipes in order; the first within export.max_int8_drop ships as int8_path.
    -> (shipped recipe name or None, its test logits or None, attempts)"""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    calib_samples = stratified_sample(train, ce.calibration_images, seed)
    x_calib, y_calib = load_images(calib_samples, pre)
    log(f"int8: calibrating on {len(x_calib)} training images ({len(set(y_calib.tolist()))} classes, stratified)")
    prep = Path(work_dir) / "prep.onnx"
    quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
    attempts, first_try = [], None
    for recipe in int8_recipes(ce):
        candidate = Path(work_dir) / f"int8_{len(attempts)}.onnx"
        attempt = {"name": recipe["name"]}
        try:
            if recipe.get("exclude") == "sensitive":
                if first_try is None:
                    raise RuntimeError("no int8 model to compare activations with")
                recipe = {**recipe, "exclude": sensitive_nodes(prep, first_try, x_calib[:8], ce.sensitive_nodes)}
                ops = {n.name: n.op_type for n in onnx.load(str(prep)).graph.node}
                attempt["excluded_nodes"] = recipe["exclude"]
                attempt["excluded_ops"] = [ops.get(n, "?") for n in recipe["exclude"]]
            quantize(prep, candidate, x_calib, recipe)
            logits = run_onnx(runtime.make_session(candidate, "cpu", ce.latency_threads), x_test)
        except Exception as e:  # noqa: BLE001 - a failed recipe is recorded, the next is tried
            attempt.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            attempts.append(attempt)
            log(f"int8 recipe '{attempt['name']}' failed: {attempt['error']}")
            continue
        first_try = first_try or candidate
        acc = accuracy(logits, y_test)
        attempt.update(accuracy=acc, drop=fp32_acc - acc, ok=fp32_acc - acc <= ce.max_int8_drop,
                       agreement_with_fp32=float((logits.argmax(1) == fp32_logits.argmax(1)).mean()))
        attempts.append(attempt)
        log(f"int8 recipe '{attempt['name']}': test accuracy {acc:.4f} (drop {attempt['drop']:+.4f}, "
            f"budget {ce.max_int8_drop}) {'OK' if attempt['ok'] else 'over budget'}")
        if attempt["ok"]:
            os.replace(candidate, int8_path)
            return attempt["name"], logits, attempts
    warnings_.append(f"no int8 recipe met export.max_int8_drop={ce.max_int8_drop} "
                     f"({'; '.join(a['name'] for a in attempts)}): shipping fp32 only, model.int8.onnx not written")
    log("WARNING: " + warnings_[-1])
    return None, None, attempts


def run(cfg, force: bool = False) -> dict:
    import onnx
    import torch

    from models import load_model_artifact
    from pipeline import engine
    from pipeline.data import prepare_data

    t0 = time.perf_counter()
    engine.set_threads(cfg.run.threads)
    stage_dir = cfg.run_dir / STAGE
    sources = source_paths(cfg)
    data = prepare_data(cfg)
    inputs = stage_inputs(sources, data.fingerprint)
    chash = config_hash(cfg)
    if not force and artifacts.manifest_is_current(stage_dir, chash, inputs):
        log(f"up to date, skipping ({stage_dir / 'manifest.json'}; use --force to rerun)")
        return {"skipped": True, "stage_dir": str(stage_dir)}
    stage_dir.mkdir(parents=True, exist_ok=True)
    artifacts.invalidate(stage_dir)
    for name in OPTIONAL_OUTPUTS:  # a previous run's int8/.ort/fp16 must not outlive a run that drops them
        (stage_dir / name).unlink(missing_ok=True)
    ce = cfg.export
    warnings_: list[str] = []
    timings: dict = {}

    model, meta = load_model_artifact(sources["pruned.pt"])
    pre, classes = meta["preprocessing"], meta["classes"]
    log(f"{meta['name']} ({engine.count_params(model) / 1e6:.2f}M params), input {pre['input_size']}, "
        f"{len(classes)} classes; {'val (no test split)' if data.test_is_val else 'test'} split {len(data.test)} images")
    x_test, y_test = load_images(data.test, pre)
    with torch.no_grad():
        torch_logits = torch.cat([model(torch.from_numpy(x_test[i:i + 64])) for i in range(0, len(x_test), 64)]).numpy()

    # ---- fp32 ONNX: export, full check, parity on the real test images
    t = time.perf_counter()
    fp32_path = stage_dir / "model.fp32.onnx"
    with artifacts.atomic_path(fp32_path, suffix=".onnx") as tmp:
        exporter = export_onnx(model, pre["input_size"], Path(tmp), ce.opset, ce.exporter)
        onnx.checker.check_model(str(tmp), full_check=True)
        opset = next(o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        fp32_logits = run_onnx(runtime.make_session(tmp, "cpu", ce.latency_threads), x_test)
        parity = check_parity(torch_logits, fp32_logits, ce.parity_atol, ce.min_top1_agreement)
    timings["export_seconds"] = round(time.perf_counter() - t, 2)
    fp32_acc = accuracy(fp32_logits, y_test)
    log(f"fp32 ONNX ({exporter} exporter, opset {opset}, {timings['export_seconds']:.1f}s): checker ok, max |logit diff| "
        f"{parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}, test accuracy {fp32_acc:.4f}")

    # ---- int8 with an accuracy budget and fallbacks (or fp16 / none)
    t = time.perf_counter()
    int8_path = stage_dir / "model.int8.onnx"
    shipped, int8_logits, attempts, fp16_info = None, None, [], None
    if ce.quantization in ("static", "dynamic"):
        with tempfile.TemporaryDirectory(dir=stage_dir) as tmp:
            shipped, int8_logits, attempts = _quantize_with_budget(
                ce, cfg.run.seed, fp32_path, int8_path, tmp, data.train, pre, x_test, y_test, fp32_logits,
                fp32_acc, warnings_)
    elif ce.quantization == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fp16 = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        with artifacts.atomic_path(stage_dir / "model.fp16.onnx", suffix=".onnx") as tmp:
            onnx.save(fp16, str(tmp))
        try:  # meant for GPUs; the CPU EP may lack fp16 kernels for some ops
            fp16_logits = run_onnx(runtime.make_session(stage_dir / "model.fp16.onnx", "cpu", ce.latency_threads), x_test)
            fp16_info = {"file": "model.fp16.onnx", "accuracy": accuracy(fp16_logits, y_test),
                         "max_abs_diff_vs_fp32": float(np.abs(fp16_logits - fp32_logits).max())}
        except Exception as e:  # noqa: BLE001
            fp16_info = {"file": "model.fp16.onnx", "error": f"{type(e).__name__}: {str(e)[:200]}"}
        log(f"fp16: {fp16_info}")
    timings["quantize_seconds"] = round(time.perf_counter() - t, 2)

    # ---- latency fp32 vs int8 on the CPU execution provider, side by side
    lat_paths = {"onnx_fp32": fp32_path, **({"onnx_int8": int8_path} if shipped else {})}
    lat = compare_latency(lat_paths, pre["input_size"], ce.latency_threads, ce.latency_runs, ce.latency_rounds)
    recommended_cpu, speedup = "fp32", None
    if shipped:
        f, q = lat["onnx_fp32"], lat["onnx_int8"]
        speedup = {"b1": round(f["latency_ms_b1"] / q["latency_ms_b1"], 3),
                   "b32": round(f["latency_ms_b32"] / q["latency_ms_b32"], 3)}
        log(f"latency fp32 {f['latency_ms_b1']:.2f} / {f['latency_ms_b32']:.2f} ms, int8 {q['latency_ms_b1']:.2f} / "
            f"{q['latency_ms_b32']:.2f} ms (b1 / b32, {ce.latency_threads} threads): int8 speed-up "
            f"{speedup['b1']:.2f}x / {speedup['b32']:.2f}x")
        # Batch 1 decides: it is what a device and the server's first request see.
        recommended_cpu = "int8" if speedup["b1"] >= 1.0 else "fp32"
        slow = [f"{speedup[k]:.2f}x at batch {k[1:]}" for k in ("b1", "b32") if speedup[k] < 1.0]
        if slow:
            warnings_.append(f"int8 is not faster than fp32 on this CPU ({', '.join(slow)}); recommended.cpu = "
                             f"{recommended_cpu} (decided at batch 1)")
            log("WARNING: " + warnings_[-1])

    # ---- the card: in the ONNX metadata and as model.json (the same dict); then the mobile copy
    mobile_src = int8_path if shipped else fp32_path
    files = {"fp32": fp32_path.name, "int8": int8_path.name if shipped else None,
             "ort": mobile_src.with_suffix(".ort").name if ce.mobile else None}
    if ce.quantization == "fp16":
        files["fp16"] = "model.fp16.onnx"
    card = {
        "name": f"{meta['name']} (distilled, pruned) for {len(classes)} classes",
        "architecture": meta["name"], "labels": classes, "preprocessing": pre,
        "input": {"name": INPUT_NAME, "shape": ["N", *pre["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(classes)], "meaning": "logits (softmax for probabilities)"},
        "pipeline_version": __version__, "exporter": exporter, "opset": opset,
        "accuracy": {"onnx_fp32": fp32_acc, "onnx_int8": accuracy(int8_logits, y_test) if shipped else None,
                     "pytorch_pruned": accuracy(torch_logits, y_test),
                     "split": "val" if data.test_is_val else "test", "images": int(len(y_test))},
        "quantization": {"kind": ce.quantization, "shipped": shipped, "attempts": attempts,
                         "max_int8_drop": ce.max_int8_drop},
        "latency_ms_cpu": {k: v for k, v in lat.items()}, "latency_threads": ce.latency_threads,
        "files": files, "recommended": {"cpu": recommended_cpu, "cuda": "fp32"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for path in [fp32_path] + ([int8_path] if shipped else []) + \
            ([stage_dir / files["fp16"]] if "fp16" in files else []):
        proto = onnx.load(str(path))
        set_onnx_metadata(proto, card)
        with artifacts.atomic_path(path, suffix=".onnx") as tmp:
            onnx.save(proto, str(tmp))
    outputs = ["model.fp32.onnx", "model.json"] + (["model.int8.onnx"] if shipped else []) + \
        (["model.fp16.onnx"] if ce.quantization == "fp16" else [])
    mobile = None
    if ce.mobile:
        ort_path = stage_dir / files["ort"]
        write_ort(mobile_src, ort_path)
        ort_logits = run_onnx(runtime.make_session(ort_path, "cpu", ce.latency_threads), x_test)
        ref = int8_logits if shipped else fp32_logits
        mobile = {"file": ort_path.name, "from": mobile_src.name, "accuracy": accuracy(ort_logits, y_test),
                  "top1_agreement": float((ort_logits.argmax(1) == ref.argmax(1)).mean()),
                  "max_abs_diff": float(np.abs(ort_logits - ref).max())}
        log(f"{ort_path.name}: test accuracy {mobile['accuracy']:.4f}, top-1 agreement with {mobile_src.name} "
            f"{mobile['top1_agreement']:.4f}, max |logit diff| {mobile['max_abs_diff']:.2e}")
        if mobile["top1_agreement"] < ce.min_top1_agreement:
            raise ExportError(f"{ort_path.name} agrees with {mobile_src.name} on only {mobile['top1_agreement']:.4f} "
                              f"of the test images (limit export.min_top1_agreement={ce.min_top1_agreement})")
        outputs.append(files["ort"])
    artifacts.write_json(stage_dir / "model.json", card)

    # ---- the report: every row measured now
    t = time.perf_counter()
    log("measuring the PyTorch rows (teacher, student, pruned) for the report")
    rows = {name: _torch_row(sources[f"{name}.pt"], data, cfg, ce.latency_runs) for name in ("teacher", "student", "pruned")}
    pruned = rows["pruned"]
    rows["onnx_fp32"] = {"accuracy": fp32_acc, "params": pruned["params"], "macs": pruned["macs"],
                         "size_bytes": fp32_path.stat().st_size, **lat["onnx_fp32"], "file": str(fp32_path)}
    rows["onnx_int8"] = ({"accuracy": card["accuracy"]["onnx_int8"], "params": pruned["params"],
                          "macs": pruned["macs"], "size_bytes": int8_path.stat().st_size, **lat["onnx_int8"],
                          "file": str(int8_path), "recipe": shipped}
                         if shipped else {**{c: None for c in COLUMNS}, "note": "not shipped: see int8.attempts"})
    timings["report_seconds"] = round(time.perf_counter() - t, 2)
    report = {
        "models": rows, "test_images": int(len(y_test)), "test_is_val": data.test_is_val, "classes": classes,
        "exporter": exporter, "opset": opset, "parity": parity,
        "int8": {"quantization": ce.quantization, "shipped": shipped, "attempts": attempts,
                 "max_int8_drop": ce.max_int8_drop, "calibration_images": ce.calibration_images,
                 "calibration_method": ce.calibration_method, "per_channel": ce.per_channel},
        "int8_speedup": speedup, "mobile": mobile, "fp16": fp16_info,
        "recommended": card["recommended"], "warnings": warnings_,
        "threads": {"onnxruntime": ce.latency_threads, "torch": torch.get_num_threads()},
        "latency_runs": ce.latency_runs, "latency_rounds": ce.latency_rounds, "machine": _machine(),
        "paths": {"export_dir": str(stage_dir), **{k: str(v) for k, v in sources.items()},
                  **{k: str(stage_dir / v) for k, v in files.items() if v}},
        "sha256": {**{name: artifacts.sha256_file(stage_dir / name) for name in outputs if name != "model.json"},
                   **{name: inputs[name] for name in SOURCES}},
        "versions": artifacts.package_versions(),
    }
    report_files = write_report(cfg.run_dir, report)
    print(Path(cfg.run_dir / "report.md").read_text(), flush=True)
    timings["total_seconds"] = round(time.perf_counter() - t0, 2)
    artifacts.write_manifest(stage_dir, STAGE, chash, inputs,
                             outputs + [os.path.relpath(p, stage_dir) for p in report_files], timings,
                             {"exporter": exporter, "int8_recipe": shipped, "recommended": card["recommended"]})
    return {"skipped": False, "stage_dir": str(stage_dir), "int8": shipped, "fp32_accuracy": fp32_acc,
            "int8_accuracy": card["accuracy"]["onnx_int8"], "recommended": card["recommended"],
            "warnings": warnings_}
