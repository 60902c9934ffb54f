"""The export stage: the pruned student -> ONNX fp32 + int8 (+ .ort), verified, measured, self-describing.

Reads run.dir/compress/{pruned,student}.pt and run.dir/finetune/teacher.pt; writes run.dir/export/:
  model.fp32.onnx   dynamic batch, input `input` [N,3,H,W] float32, output `logits`; labels,
                    preprocessing and the model card in metadata_props
  model.int8.onnx   static QDQ int8 (onnxruntime.quantization), only when it meets export.max_int8_drop
  model.int8.ort    ONNX Runtime Mobile (ORT format) copy of the shipped model (export.mobile)
  model.json        the model card (same content as the metadata), with `files` and `recommended`
  manifest.json     written last
and the run's report: run.dir/report.json, report.md, report.png (every figure measured in this run).

Checks: onnx.checker (full), ONNX Runtime vs PyTorch on the real test images (max |logit diff| and
top-1 agreement, failing thresholds), int8 accuracy vs fp32 on the test split with fallbacks
(per-tensor, another calibration method, excluding the nodes whose activations the int8 model
reproduces worst), latency fp32 vs int8 on the CPU execution provider at batch 1 and 32.
"""
from __future__ import annotations

import os
import platform
import shutil
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
    # U8 activations / S8 weights: S8S8 ran 3x slower on this CPU (STACK-NOTES).
    with tempfile.TemporaryDirectory() as tmp:  # calibration writes an augmented model; keep it out of the run dir
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(str(prep_path), str(out_path), _calibrater_reader(calib), quant_format=QuantFormat.QDQ,
                            per_channel=recipe["per_channel"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method,
                            nodes_to_exclude=recipe.get("exclude") or None,
                            extra_options={"CalibMovingAverage": False})
        finally:
            os.chdir(cwd)


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
    """ORT format for ONNX Runtime Mobile (basic optimizations only: they are portable across hardware)."""
    import onnxruntime as ort

    with artifacts.atomic_path(ort_path, suffix=".ort") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(tmp)
        so.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


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


def write_report(run_dir: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    lines = [f"# Report: {run_dir}", "",
             f"Test split: {report['test_images']} images{' (no test split: val)' if report['test_is_val'] else ''}. "
             f"Latency: median ms per call on this CPU ({report['machine']['cpu_count']} cores, "
             f"{report['latency_threads']} threads), PyTorch eager fp32 for the .pt rows, ONNX Runtime CPU EP for the "
             "ONNX rows. All figures measured in this run.", "",
             "| model | accuracy | params | MACs | size | latency b1 (ms) | latency b32 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ROWS:
        r = rows.get(name)
        if not r or r.get("accuracy") is None:
            lines.append(f"| {name} | — (not shipped) | | | | | |")
            continue
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
                     f"{r['size_bytes'] / 1e6:.2f} MB | {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.2f} |")
    lines += ["", f"- int8 recipe shipped: **{report['int8']['shipped'] or 'none (fp32 shipped)'}**; attempts: "
              + "; ".join(f"{a['name']}: drop {a.get('drop', float('nan')):+.4f}" + ("" if a.get("ok") else " ✗")
                          for a in report["int8"]["attempts"]),
              f"- parity ONNX fp32 vs PyTorch: max |logit diff| {report['parity']['max_abs_diff']:.2e}, "
              f"top-1 agreement {report['parity']['top1_agreement']:.4f}",
              f"- recommended: {report['recommended']}"]
    for w in report["warnings"]:
        lines.append(f"- **WARNING**: {w}")
    lines += ["", "![accuracy vs latency vs size](report.png)", ""]
    artifacts.write_text(run_dir / "report.md", "\n".join(lines))
    artifacts.write_json(run_dir / "report.json", report)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ROWS:
        r = rows.get(name)
        if not r or r.get("accuracy") is None:
            continue
        ax.scatter(r["latency_ms_b1"], r["accuracy"], s=40 + 400 * r["size_bytes"] / max(
            v["size_bytes"] for v in rows.values() if v and v.get("size_bytes")), alpha=0.6)
        ax.annotate(f"{name}\n{r['size_bytes'] / 1e6:.1f} MB", (r["latency_ms_b1"], r["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(6, 4))
    ax.set(xlabel="latency, batch 1 (ms, CPU)", ylabel="test accuracy", title="accuracy vs latency (marker area ~ file size)")
    ax.grid(alpha=0.3)
    artifacts.save_figure(fig, run_dir / "report.png")
    plt.close(fig)
    return [run_dir / "report.json", run_dir / "report.md", run_dir / "report.png"]


# ----------------------------------------------------------------------------- the stage

def config_hash(cfg) -> str:
    return artifacts.sha256_json({"sections": cfg.section_hash("data", "export"), "seed": cfg.run.seed})


def run(cfg, force: bool = False) -> dict:
    import onnx
    import torch

    from models import load_model_artifact
    from pipeline import engine
    from pipeline.data import prepare_data

    t0 = time.perf_counter()
    engine.set_threads(cfg.run.threads)
    stage_dir = cfg.run_dir / STAGE
    compress_dir, finetune_dir = cfg.run_dir / "compress", cfg.run_dir / "finetune"
    sources = {"pruned.pt": compress_dir / "pruned.pt", "student.pt": compress_dir / "student.pt",
               "teacher.pt": finetune_dir / "teacher.pt"}
    for name, path in sources.items():
        if not path.exists():
            stage = "make compress" if path.parent == compress_dir else "make finetune"
            raise FileNotFoundError(f"{path} is missing: run `{stage}` first (same CONFIG/ARGS, run.dir={cfg.run.dir})")
    stage_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg)
    inputs = {"data": data.fingerprint, **{k: artifacts.sha256_file(p) for k, p in sources.items()}}
    chash = config_hash(cfg)
    if not force and artifacts.manifest_is_current(stage_dir, chash, inputs):
        log(f"up to date, skipping ({stage_dir / 'manifest.json'}; use --force to rerun)")
        return {"skipped": True, "stage_dir": str(stage_dir)}
    artifacts.invalidate(stage_dir)
    ce = cfg.export
    warnings_: list[str] = []

    model, meta = load_model_artifact(sources["pruned.pt"])
    pre, classes = meta["preprocessing"], meta["classes"]
    log(f"{meta['name']} ({engine.count_params(model) / 1e6:.2f}M params), input {pre['input_size']}, "
        f"{len(classes)} classes; test split {len(data.test)} images")
    x_test, y_test = load_images(data.test, pre)
    with torch.no_grad():
        torch_logits = torch.cat([model(torch.from_numpy(x_test[i:i + 64])) for i in range(0, len(x_test), 64)]).numpy()

    # ---- fp32 ONNX: export, full check, parity on the real test images
    fp32_path = stage_dir / "model.fp32.onnx"
    with artifacts.atomic_path(fp32_path, suffix=".onnx") as tmp:
        exporter = export_onnx(model, pre["input_size"], Path(tmp), ce.opset, ce.exporter)
    onnx.checker.check_model(str(fp32_path), full_check=True)
    fp32_sess = runtime.make_session(fp32_path, "cpu", ce.latency_threads)
    fp32_logits = run_onnx(fp32_sess, x_test)
    parity = check_parity(torch_logits, fp32_logits, ce.parity_atol, ce.min_top1_agreement)
    fp32_acc = accuracy(fp32_logits, y_test)
    log(f"fp32 ONNX ({exporter} exporter, opset {ce.opset}): checker ok, max |logit diff| {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.4f}, test accuracy {fp32_acc:.4f}")

    # ---- int8 with an accuracy budget and fallbacks
    int8_path = stage_dir / "model.int8.onnx"
    attempts, shipped, int8_logits = [], None, None
    if ce.quantization in ("static", "dynamic"):
        calib_samples = stratified_sample(data.train, ce.calibration_images, cfg.run.seed)
        x_calib, _ = load_images(calib_samples, pre)
        with tempfile.TemporaryDirectory(dir=stage_dir) as tmp:
            prep = Path(tmp) / "prep.onnx"
            from onnxruntime.quantization import quant_pre_process

            quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
            first_try = None
            for recipe in int8_recipes(ce):
                candidate = Path(tmp) / f"int8_{len(attempts)}.onnx"
                attempt = {"name": recipe["name"]}
                try:
                    if recipe.get("exclude") == "sensitive":
                        if first_try is None:
                            raise RuntimeError("no int8 model to compare activations with")
                        recipe = {**recipe, "exclude": sensitive_nodes(prep, first_try, x_calib[:8], 5)}
                        attempt["excluded_nodes"] = recipe["exclude"]
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
                    shipped, int8_logits = attempt["name"], logits
                    os.replace(candidate, int8_path)
                    break
        if shipped is None:
            int8_path.unlink(missing_ok=True)
            warnings_.append(f"no int8 recipe met export.max_int8_drop={ce.max_int8_drop} "
                             f"({', '.join(a['name'] for a in attempts)}): shipping fp32 only")
            log("WARNING: " + warnings_[-1])
    elif ce.quantization == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fp16 = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        with artifacts.atomic_path(stage_dir / "model.fp16.onnx", suffix=".onnx") as tmp:
            onnx.save(fp16, str(tmp))

    # ---- latency fp32 vs int8 on the CPU execution provider
    rng = np.random.default_rng(0)
    b1 = rng.standard_normal((1, *pre["input_size"])).astype(np.float32)
    b32 = rng.standard_normal((32, *pre["input_size"])).astype(np.float32)
    lat = {"onnx_fp32": {"latency_ms_b1": runtime.measure_latency_ms(fp32_sess, b1, ce.latency_runs),
                         "latency_ms_b32": runtime.measure_latency_ms(fp32_sess, b32, max(3, ce.latency_runs // 3))}}
    recommended_cpu = "fp32"
    if shipped:
        int8_sess = runtime.make_session(int8_path, "cpu", ce.latency_threads)
        lat["onnx_int8"] = {"latency_ms_b1": runtime.measure_latency_ms(int8_sess, b1, ce.latency_runs),
                            "latency_ms_b32": runtime.measure_latency_ms(int8_sess, b32, max(3, ce.latency_runs // 3))}
        speedup = lat["onnx_fp32"]["latency_ms_b1"] / lat["onnx_int8"]["latency_ms_b1"]
        speedup32 = lat["onnx_fp32"]["latency_ms_b32"] / lat["onnx_int8"]["latency_ms_b32"]
        log(f"latency fp32 {lat['onnx_fp32']['latency_ms_b1']:.2f} / {lat['onnx_fp32']['latency_ms_b32']:.2f} ms, "
            f"int8 {lat['onnx_int8']['latency_ms_b1']:.2f} / {lat['onnx_int8']['latency_ms_b32']:.2f} ms (b1 / b32): "
            f"int8 speed-up {speedup:.2f}x / {speedup32:.2f}x")
        if speedup >= 1.0:
            recommended_cpu = "int8"
        else:
            warnings_.append(f"int8 is not faster than fp32 on this CPU ({speedup:.2f}x at batch 1): "
                             f"the server will use fp32 on CPU (recommended.cpu=fp32)")
            log("WARNING: " + warnings_[-1])

    # ---- the card, in the ONNX metadata and as model.json; then the mobile copy
    files = {"fp32": fp32_path.name, "int8": int8_path.name if shipped else None, "ort": None}
    if ce.quantization == "fp16":
        files["fp16"] = "model.fp16.onnx"
    card = {
        "name": f"{meta['name']} (distilled, pruned) for {len(classes)} classes",
        "architecture": meta["name"], "labels": classes, "preprocessing": pre,
        "input": {"name": INPUT_NAME, "shape": ["N", *pre["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(classes)], "meaning": "logits (softmax for probabilities)"},
        "pipeline_version": __version__, "exporter": exporter, "opset": ce.opset,
        "accuracy": {"onnx_fp32": fp32_acc, "onnx_int8": accuracy(int8_logits, y_test) if shipped else None,
                     "split": "val" if data.test_is_val else "test", "images": len(y_test)},
        "quantization": {"shipped": shipped, "attempts": attempts},
        "files": files, "recommended": {"cpu": recommended_cpu, "cuda": "fp32"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    mobile_src = int8_path if shipped else fp32_path
    if ce.mobile:
        files["ort"] = mobile_src.with_suffix(".ort").name
    for path in [fp32_path] + ([int8_path] if shipped else []):
        proto = onnx.load(str(path))
        set_onnx_metadata(proto, card)
        with artifacts.atomic_path(path, suffix=".onnx") as tmp:
            onnx.save(proto, str(tmp))
    outputs = ["model.fp32.onnx", "model.json"] + (["model.int8.onnx"] if shipped else []) + \
        (["model.fp16.onnx"] if ce.quantization == "fp16" else [])
    if ce.mobile:
        ort_path = stage_dir / files["ort"]
        write_ort(mobile_src, ort_path)
        # The .ort keeps QDQ nodes (basic optimizations) where the desktop session fuses them into integer
        # kernels, so logits differ slightly; the predictions must not.
        ort_logits = run_onnx(runtime.make_session(ort_path, "cpu", ce.latency_threads), x_test)
        ref = int8_logits if shipped else fp32_logits
        agreement = float((ort_logits.argmax(1) == ref.argmax(1)).mean())
        card["mobile"] = {"file": files["ort"], "from": mobile_src.name, "test_accuracy": accuracy(ort_logits, y_test),
                          "top1_agreement": agreement, "max_abs_diff": float(np.abs(ort_logits - ref).max())}
        log(f"{ort_path.name}: test accuracy {card['mobile']['test_accuracy']:.4f}, top-1 agreement with "
            f"{mobile_src.name} {agreement:.4f}")
        if agreement < ce.min_top1_agreement:
            raise ExportError(f"{ort_path.name} agrees with {mobile_src.name} on only {agreement:.4f} of the test "
                              f"images (limit export.min_top1_agreement={ce.min_top1_agreement})")
        outputs.append(files["ort"])
    artifacts.write_json(stage_dir / "model.json", card)

    # ---- the report: every row measured now
    log("measuring the PyTorch rows (teacher, student, pruned) for the report")
    rows = {name: _torch_row(sources[f"{name}.pt"], data, cfg, ce.latency_runs) for name in ("teacher", "student", "pruned")}
    pruned = rows["pruned"]
    rows["onnx_fp32"] = {"accuracy": fp32_acc, "params": pruned["params"], "macs": pruned["macs"],
                         "size_bytes": fp32_path.stat().st_size, **{k: round(v, 3) for k, v in lat["onnx_fp32"].items()},
                         "file": str(fp32_path)}
    rows["onnx_int8"] = ({"accuracy": card["accuracy"]["onnx_int8"], "params": pruned["params"], "macs": pruned["macs"],
                          "size_bytes": int8_path.stat().st_size,
                          **{k: round(v, 3) for k, v in lat["onnx_int8"].items()}, "file": str(int8_path),
                          "recipe": shipped}
                         if shipped else {c: None for c in COLUMNS})
    report = {
        "models": rows, "test_images": int(len(y_test)), "test_is_val": data.test_is_val, "classes": classes,
        "parity": parity, "int8": {"shipped": shipped, "attempts": attempts, "max_int8_drop": ce.max_int8_drop},
        "recommended": card["recommended"], "warnings": warnings_, "latency_threads": ce.latency_threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "sha256": {name: artifacts.sha256_file(stage_dir / name) for name in outputs if name != "model.json"},
        "versions": artifacts.package_versions(),
    }
    report_files = write_report(cfg.run_dir, report)
    print(Path(cfg.run_dir / "report.md").read_text())
    artifacts.write_manifest(stage_dir, STAGE, chash, inputs,
                             outputs + [os.path.relpath(p, stage_dir) for p in report_files],
                             {"total_seconds": time.perf_counter() - t0}, {"exporter": exporter, "int8_recipe": shipped})
    shutil.rmtree(stage_dir / "__pycache__", ignore_errors=True)
    return {"skipped": False, "stage_dir": str(stage_dir), "int8": shipped, "fp32_accuracy": fp32_acc,
            "recommended": card["recommended"]}
