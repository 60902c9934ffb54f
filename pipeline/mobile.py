"""Mobile deployables (issue 14): fixed-shape files for the phone accelerators, checked with ONNX Runtime's own
mobile usability checker, evaluated, and the reduced-build operator config.

The export stage calls `export_mobile(...)` after it has written model.fp32.onnx / model.int8.onnx (with their
metadata) and model.int8.ort; this module never touches those. It writes into the export folder:

  model.android.int8.onnx   int8 QDQ, input fixed to [1,3,H,W] (NNAPI needs static shapes: with a dynamic batch
                            the checker found only 34% of an EfficientNet-Lite0's nodes usable). fp32 when no
                            int8 model was shipped: model.android.fp32.onnx
  model.android.int8.ort    the same graph in ORT format, "Runtime" optimization style (see write_ort_files)
  model.ios.fp32.onnx       fp32, input fixed to [1,3,H,W], Flatten rewritten as Reshape: CoreML cannot run
                            QuantizeLinear/DequantizeLinear at all, so an int8 QDQ file would stay on the CPU
  model.ios.fp32.ort        the same graph in ORT format (Runtime style)
  model.ios.fp16.onnx       instead of the two above with ios_precision="fp16" (no .ort: see export_ios)
  required_operators.config, required_operators_and_types.config
                            what `convert_onnx_models_to_ort` writes for the .ort files above, for a reduced
                            ONNX Runtime build (build.sh --include_ops_by_config)

NNAPI, XNNPACK and CoreML cannot run on this machine: every accuracy here is measured with the CPU execution
provider, and the accelerator coverage is the checker's estimate (it judges op types and static shapes only).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import artifacts, runtime
from pipeline.modelcard import INPUT_NAME

CHECKED_EPS = (  # (name in results, the checker's op list; None = NNAPI's)
    ("NNAPI", None),
    ("CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops.md"),
    ("CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
)
XNNPACK_NOTE = "not reported: onnxruntime's usability checker covers NNAPI and CoreML only"
CONFIG_FILES = ("required_operators.config", "required_operators_and_types.config")
REPLAY_KEY = "session.enable_saved_runtime_optimizations"  # set it to "1" on the device for the .ort files
MOBILE_OUTPUTS = ("model.android.int8.onnx", "model.android.int8.ort", "model.android.fp32.onnx",
                  "model.android.fp32.ort", "model.ios.fp32.onnx", "model.ios.fp32.ort", "model.ios.fp16.onnx",
                  *CONFIG_FILES)  # every name export_mobile may write (removed first: no stale file outlives a run)


class MobileExportError(RuntimeError):
    """A mobile file failed a check; the message names the file, the figures and the fix."""


def log(msg: str) -> None:
    print(f"[export.mobile] {msg}", flush=True)


# ----------------------------------------------------------------------------- graph edits

def fix_batch(model, input_size) -> None:
    """Input `input` -> [1, *input_size] in place, and every shape derived from the batch dim with it
    (onnxruntime.tools.make_dynamic_shape_fixed's own functions, so the result is what its CLI gives)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    make_input_shape_fixed(model.graph, INPUT_NAME, [1, *input_size])
    fix_output_shapes(model)


def flatten_to_reshape(model) -> int:
    """Flatten(axis=1) -> Reshape to its inferred static shape; -> how many were rewritten.

    The CoreML MLProgram op list has Reshape but not Flatten: a legacy-exported classifier head (timm's
    SelectAdaptivePool2d -> Flatten) split the graph into two MLProgram partitions. With fixed shapes both ops
    compute the same thing. Other Flatten axes are left alone."""
    import onnx
    from onnx import helper, numpy_helper

    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(model.graph.output)}
    count = 0
    for i, node in enumerate(model.graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        out_shape = shapes.get(node.output[0], [])
        if node.op_type != "Flatten" or node.domain not in ("", "ai.onnx") or axis != 1 or \
                len(out_shape) != 2 or not all(d > 0 for d in out_shape):
            continue
        const = f"{node.output[0]}__reshape_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(out_shape, dtype=np.int64), const))
        model.graph.node[i].CopyFrom(helper.make_node("Reshape", [node.input[0], const], list(node.output),
                                                      name=(node.name or node.output[0]) + "_as_reshape"))
        count += 1
    return count


def retag_card(model, card: dict | None, file_name: str, platform: str) -> None:
    """Labels/preprocessing/model_card metadata of a mobile file: `card` when given, else the source's card
    (already in the copied metadata_props) with the batch-1 shapes and the file's platform."""
    from pipeline.modelcard import card_from_metadata, set_onnx_metadata

    if card is None:
        props = {p.key: p.value for p in model.metadata_props}
        if "labels" not in props:
            return  # no card at all: nothing to keep consistent (the predictor will say so when loading it)
        card = card_from_metadata(props)
    card = json.loads(json.dumps(card))  # never mutate the caller's card
    for key in ("input", "output"):
        if isinstance(card.get(key), dict) and card[key].get("shape"):
            card[key]["shape"] = [1, *card[key]["shape"][1:]]
    card["deployable"] = {"file": file_name, "platform": platform, "batch": 1}
    set_onnx_metadata(model, card)


def _save_onnx(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)  # shape fixes must leave a valid, consistently typed graph
    with artifacts.atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


# ----------------------------------------------------------------------------- one function per deployable

def export_android(stage_dir: Path, src: Path, input_size, precision: str = "int8",
                   card: dict | None = None) -> Path:
    """model.android.<precision>.onnx: the shipped model (int8, or fp32 when no int8 was shipped) with its batch
    fixed to 1.

    int8 QDQ is kept as QDQ: NNAPI and XNNPACK take QDQ node groups and run them as integer ops, and the checker
    lists Quantize/DequantizeLinear as NNAPI-supported."""
    import onnx

    if precision not in ("int8", "fp32"):
        raise ValueError(f"android precision must be int8 or fp32, not {precision!r}")
    dest = Path(stage_dir) / f"model.android.{precision}.onnx"
    model = onnx.load(str(src))
    fix_batch(model, input_size)
    retag_card(model, card, dest.name, "android")
    _save_onnx(model, dest)
    return dest


def export_ios(stage_dir: Path, fp32_path: Path, input_size, precision: str = "fp32",
               card: dict | None = None) -> Path:
    """model.ios.<fp32|fp16>.onnx from the fp32 model (CoreML has no QDQ support), batch fixed to 1.

    fp32 is the default: the checker's verdict means the same for both CoreML model formats, and its .ort is
    clean. fp16 (opt-in) runs only as an MLProgram, the checker does not judge which ops the CoreML EP accepts in
    fp16, and an fp16 .ort cannot be made here: the x86 CPU EP that converts it bakes in Cast nodes around every
    op it has no fp16 kernel for (a 12-node Conv/ReLU model became 23 nodes, 11 of them Cast), so no .ort is
    written. The checker optimizes with that same CPU EP first: its fp16 figures describe that Cast-laden graph."""
    import onnx

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"ios precision must be fp32 or fp16, not {precision!r}")
    dest = Path(stage_dir) / f"model.ios.{precision}.onnx"
    model = onnx.load(str(fp32_path))
    fix_batch(model, input_size)
    rewritten = flatten_to_reshape(model)
    if rewritten:
        log(f"{dest.name}: {rewritten} Flatten node(s) rewritten as Reshape (not in CoreML MLProgram's op list)")
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from onnxruntime.transformers.onnx_model import OnnxModel

        # float32 input/output kept: the app feeds the same float buffer as for every other file. The converter
        # appends its input Casts at the end of the node list; onnx's checker requires topological order.
        model = convert_float_to_float16(model, keep_io_types=True)
        OnnxModel(model).topological_sort()
    retag_card(model, card, dest.name, "ios")
    _save_onnx(model, dest)
    return dest


def write_ort_files(stage_dir: Path, onnx_files: list[Path]) -> dict:
    """ORT-format copies + the reduced-build configs, by `convert_onnx_models_to_ort` itself.

    "Runtime" optimization style, as its help advises for NNAPI/CoreML: the .ort keeps the basic-optimized graph
    (ai.onnx ops and QDQ groups that the accelerators can take) and stores the CPU fusions as replayable
    records. The "Fixed" style that model.int8.ort uses bakes in x86 CPU kernels (com.microsoft NHWC
    QLinearConv, NhwcMaxPool, QGemm): NNAPI supports none of those. target_platform "arm": phones are ARM.
    Each file is produced in a temp folder inside stage_dir and moved into place atomically."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    stage_dir = Path(stage_dir)
    written = {}
    with tempfile.TemporaryDirectory(dir=stage_dir, prefix=".mobile-ort.") as tmp:
        for reduce_types, config_name in ((False, CONFIG_FILES[0]), (True, CONFIG_FILES[1])):
            work = Path(tmp) / ("types" if reduce_types else "ops")
            work.mkdir()
            for f in onnx_files:
                shutil.copy2(f, work / Path(f).name)
            with contextlib.redirect_stdout(io.StringIO()), _quiet("ort_format_model.utils"):  # a line per step
                convert_onnx_models_to_ort(work, optimization_styles=[OptimizationStyle.Runtime],
                                           target_platform="arm", enable_type_reduction=reduce_types)
            produced = next(work.glob("required_operators*.config"))
            artifacts.write_text(stage_dir / config_name, _plain_config_comments(produced.read_text()))
            written[config_name] = stage_dir / config_name
            if reduce_types:
                continue
            for f in onnx_files:
                ort = work / (Path(f).stem + ".with_runtime_opt.ort")
                dest = stage_dir / Path(f).with_suffix(".ort").name
                with artifacts.atomic_path(dest, suffix=".ort") as t:
                    os.replace(ort, t)
                written[dest.name] = dest
    return written


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _plain_config_comments(text: str) -> str:
    """The tool lists the (temporary) .ort paths it read in '# - <path>' comments: name the shipped files
    instead, so the config does not depend on where it was made. The Runtime style also reads a second,
    temporary conversion without runtime optimizations (ops the replayed fusions may need)."""
    out = []
    for line in text.splitlines():
        if line.startswith("# - "):
            path = Path(line[4:].strip())
            name = path.name.replace(".with_runtime_opt", "")
            line = f"# - {name}" + ("" if ".with_runtime_opt" in path.name else " (converted without runtime "
                                    "optimizations, for the ops those may need)")
        out.append(line)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- checks

def check_usability(path: Path) -> dict:
    """ONNX Runtime's mobile usability checker on one file, per execution provider.

    The same steps as `python -m onnxruntime.tools.check_onnx_model_mobile_usability` (mobile_helpers.
    usability_checker.analyze_model -> checker): optimize to BASIC level with the CPU EP, infer shapes, estimate
    the partitions per EP with static shapes required. Called step by step because analyze_model only logs
    its figures; its own log lines are kept verbatim in "log". Also returns the op counts of the graph it
    judged ("ops"), to compare with the .ort made from the same file."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    lines: list[str] = []
    logger = logging.getLogger(f"edgepipe.mobile.checker.{Path(path).name}")
    logger.handlers[:] = [_ListHandler(lines)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / Path(path).name
        optimize_model(Path(path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        dynamic_inputs, _ = uc.check_shapes(model.graph, logger)
        result = {"ops": _op_counts(model.graph.node), "dynamic_inputs": [i.name for i in dynamic_inputs]}
        for ep, op_list in CHECKED_EPS:
            info = (uc.check_nnapi_partitions(model, True) if op_list is None
                    else uc.check_coreml_partitions(model, True, op_list))
            info.print_analysis(logger, ep)
            result[ep] = {"verdict": info.suitability().name, "nodes_covered": info.num_supported_nodes,
                          "nodes": info.num_nodes, "partitions": info.num_partitions,
                          "coverage": round(info.num_supported_nodes / max(1, info.num_nodes), 4),
                          "partition_sizes": [len(g) for g in info.supported_groups],
                          "unsupported_ops": sorted(info.unsupported_ops),
                          "unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input}
    result["XNNPACK"] = XNNPACK_NOTE
    result["log"] = lines
    return result


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


def _op_counts(nodes) -> dict:
    return dict(sorted(Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in nodes).items()))


def ort_op_counts(path: Path) -> dict:
    """Op counts of an ORT-format file's main graph, read from its flatbuffer (the way the tool that writes
    required_operators.config reads it)."""
    import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ort_flatbuffers_py on sys.path
    import ort_flatbuffers_py.fbs as fbs

    buf = bytearray(Path(path).read_bytes())
    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph()
    return _op_counts(_FbsNode(graph.Nodes(i)) for i in range(graph.NodesLength()))


class _FbsNode:
    def __init__(self, node):
        self.domain, self.op_type = node.Domain().decode(), node.OpType().decode()


def mobile_session(path: Path, threads: int):
    """A CPU-EP session as the device is told to make it (docs/mobile.md): runtime.make_session, which sets
    session.enable_saved_runtime_optimizations=1, so the CPU fusions stored in a Runtime-style .ort are replayed.
    Without it the CPU EP runs the QDQ groups as float emulation: on an EfficientNet-Lite0 that flipped 1 of 48
    low-confidence top-1s against model.int8.onnx (max |logit diff| 0.26); with it the logits were identical.
    Only for our own files: ONNX Runtime advises replaying only trusted models. (Ignored for .onnx files.)"""
    from pipeline import runtime

    return runtime.make_session(path, "cpu", threads)


def evaluate(path: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray, threads: int) -> dict:
    """CPU-EP logits of a file (one image per call: the fixed files take batch 1 only), its top-1 accuracy and
    its top-1 agreement with `reference` (the logits of the file it was made from)."""
    session = mobile_session(path, threads)
    t = time.perf_counter()
    logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0]
                             for i in range(len(x))]) if len(x) else np.zeros((0, reference.shape[1]), np.float32)
    return {"accuracy": float((logits.argmax(1) == y).mean()) if len(y) else None,
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()) if len(y) else None,
            "max_abs_diff": float(np.abs(logits - reference).max()) if len(y) else None,
            "ms_per_image": round((time.perf_counter() - t) * 1000 / max(1, len(x)), 3),
            "input_shape": list(session.get_inputs()[0].shape), "size_bytes": Path(path).stat().st_size,
            "logits": logits}


FIXES = {  # what to do when a file disagrees with its source: named in the error
    "android": "fixing the batch dim must not change the arithmetic: compare model.android.*.onnx with its source "
               "in Netron, and report the onnxruntime version; pass int8_path=None to ship the fp32 model instead",
    "ort": "the .ort is evaluated with session.enable_saved_runtime_optimizations=1; if it still differs from its "
           ".onnx, its saved runtime optimizations do not reproduce the CPU kernels: ship the .onnx for this "
           "platform (recommended[...]['file']) and report the onnxruntime version",
    "ios": "the batch fix or the Flatten->Reshape rewrite changed the results: check export_ios on this graph",
    "ios-fp16": "fp16 rounds or overflows this model's activations: use ios_precision='fp32' (the default)",
}


def _check_agreement(name: str, source: str, kind: str, ev: dict, limit: float) -> None:
    if ev["top1_agreement"] is not None and ev["top1_agreement"] < limit:
        raise MobileExportError(
            f"{name} agrees with {source} on only {ev['top1_agreement']:.4f} of the eval images (limit "
            f"min_top1_agreement={limit}; max |logit diff| {ev['max_abs_diff']:.3g}). Fix: {FIXES[kind]}")


# ----------------------------------------------------------------------------- choosing and reporting

def platform_verdict(check: dict, eps: tuple[str, ...]) -> tuple[str, dict]:
    """The best of `eps` in a file's checker result: most nodes covered in fewest partitions."""
    ep = max(eps, key=lambda e: (("NO", "MAYBE", "YES").index(check[e]["verdict"]), check[e]["coverage"],
                                 -check[e]["partitions"]))
    return ep, check[ep]


def _why(ep: str, c: dict) -> str:
    return (f"checker: {ep} covers {c['nodes_covered']}/{c['nodes']} nodes ({100 * c['coverage']:.1f}%) in "
            f"{c['partitions']} partition(s), verdict {c['verdict']}")


def recommend(stage_dir: Path, android: dict, ios: dict, edge_src: Path, checks: dict, warnings_: list) -> dict:
    """model.json `recommended` entries for android, ios and edge-cpu, with a warning for each platform whose
    file would (partly) fall back to the CPU."""
    rec = {}
    for platform, entry, eps in (("android", android, ("NNAPI",)),
                                 ("ios", ios, ("CoreML MLProgram", "CoreML NeuralNetwork"))):
        ep, c = platform_verdict(checks[entry["checked"]], eps)
        why = f"fixed batch-1 {entry['precision']}; {_why(ep, c)}"
        if c["verdict"] != "YES":
            warnings_.append(f"{platform}: {entry['file']} would fall back to the CPU: {_why(ep, c)}"
                             + (f"; unsupported ops {', '.join(c['unsupported_ops'])}" if c["unsupported_ops"] else ""))
            log("WARNING: " + warnings_[-1])
        if c["verdict"] == "NO":
            ep, why = "CPU", f"{why}: the accelerator would not help, so the CPU EP is recommended"
        rec[platform] = {"file": entry["file"], "execution_provider": ep, "why": why}
    rec["android"]["fallback_execution_provider"] = "XNNPACK, then CPU"
    edge = edge_src.with_suffix(".ort") if edge_src.with_suffix(".ort").exists() else edge_src
    rec["edge-cpu"] = {"file": edge.name, "execution_provider": "CPU",
                       "why": ("dynamic batch, " + ("int8" if ".int8." in edge.name else "fp32") +
                               (", ORT format with the CPU kernels fused at conversion (smallest runtime)"
                                if edge.suffix == ".ort" else "") + "; no accelerator on a plain edge CPU")}
    return rec


def report_lines(result: dict) -> list[str]:
    """Markdown lines for report.md: one row per mobile file with the checker's figures and the accuracy."""
    lines = ["| file | platform | NNAPI | CoreML NeuralNetwork | CoreML MLProgram | accuracy (CPU EP) | "
             "top-1 agreement with source |", "|---|---|---|---|---|---:|---:|"]
    for name, m in result["models"].items():
        c = result["checker"].get(m.get("checked"), {})
        cells = [f"{c[ep]['nodes_covered']}/{c[ep]['nodes']}, {c[ep]['partitions']} part., {c[ep]['verdict']}"
                 if ep in c else "—" for ep, _ in CHECKED_EPS]
        lines.append(f"| {name} | {m['platform']} | " + " | ".join(cells) +
                     f" | {m['accuracy']:.4f} | {m['top1_agreement']:.4f} vs {m['from']} |")
    lines.append("- Accuracy measured with the CPU execution provider: NNAPI and CoreML cannot run on this machine; "
                 "coverage is onnxruntime's usability checker estimate (.ort rows: the graph of their .onnx). "
                 "XNNPACK is not reported by the checker.")
    return lines


# ----------------------------------------------------------------------------- entry point

def reference_logits_for(sources: dict, given: dict | None, x: np.ndarray, threads: int) -> dict:
    """The dynamic-batch files' logits on x: the export stage's own when it passes them, else computed here."""
    refs = dict(given or {})
    for key, src in sources.items():
        if refs.get(key) is None:
            sess = runtime.make_session(src, "cpu", threads)
            refs[key] = np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return refs


def evaluate_files(made: list[tuple], sources: dict, refs: dict, checks: dict, x: np.ndarray, y: np.ndarray,
                   threads: int, limit: float, warnings_: list, logits: dict | None = None) -> dict:
    """Accuracy and top-1 agreement with its source of every mobile file (made: (onnx file, platform, source key,
    its .ort or None)); raises MobileExportError below `limit`. Each .ort is also compared op by op with the
    graph the checker judged for its .onnx. `logits`, when given, receives each file's logits on x."""
    models = {}
    for onnx_file, platform, key, ort_file in made:
        for f in [onnx_file] + ([ort_file] if ort_file else []):
            ev = evaluate(f, x, y, refs[key], threads)
            if logits is not None:
                logits[f.name] = ev["logits"]
            ev.pop("logits")
            models[f.name] = {"platform": platform, "from": sources[key].name, "checked": onnx_file.name, **ev}
            log(f"{f.name}: accuracy {ev['accuracy']:.4f}, top-1 agreement with {sources[key].name} "
                f"{ev['top1_agreement']:.4f}, max |logit diff| {ev['max_abs_diff']:.2e} (CPU EP, {len(y)} images)")
            kind = "ort" if f is ort_file else "ios-fp16" if ".fp16." in f.name else platform
            _check_agreement(f.name, sources[key].name, kind, ev, limit)
            if f is ort_file:
                same = ort_op_counts(f) == checks[onnx_file.name]["ops"]
                models[f.name]["same_graph_as_checked"] = same
                if not same:
                    warnings_.append(f"{f.name} holds a different graph from the one the checker analysed "
                                     f"({onnx_file.name} at BASIC level): its coverage may differ")
                    log("WARNING: " + warnings_[-1])
    return models


def export_mobile(stage_dir: Path, fp32_path: Path, int8_path: Path | None, x_eval: np.ndarray, y_eval: np.ndarray,
                  reference_logits: dict[str, np.ndarray], input_size: list[int], threads: int,
                  min_top1_agreement: float, ios_precision: str = "fp32", card: dict | None = None,
                  keep_logits: bool = False) -> dict:
    """Writes, checks and evaluates the mobile files; -> {"recommended", "models", "checker", "reduced_build",
    "files", "warnings", "eval", "timings"} (see docs/mobile.md), plus "logits" ({file: array on x_eval}, not
    JSON) with keep_logits, for budget checks of the caller's own. reference_logits: {"fp32": ..., "int8": ...}
    logits of the dynamic-batch files on x_eval (computed here when missing). card: written into every mobile
    file when given, else each keeps its source's metadata. Raises MobileExportError when a file's top-1
    agreement with its source is below min_top1_agreement."""
    t0, stage_dir, warnings_ = time.perf_counter(), Path(stage_dir), []
    for name in MOBILE_OUTPUTS:
        (stage_dir / name).unlink(missing_ok=True)
    sources = {"fp32": Path(fp32_path), **({"int8": Path(int8_path)} if int8_path else {})}
    refs = reference_logits_for(sources, reference_logits, x_eval, threads)
    android_key = "int8" if "int8" in sources else "fp32"
    android = export_android(stage_dir, sources[android_key], input_size, android_key, card)
    ios = export_ios(stage_dir, sources["fp32"], input_size, ios_precision, card)
    to_convert = [android] + ([ios] if ios_precision == "fp32" else [])
    written = write_ort_files(stage_dir, to_convert)
    timings = {"write_seconds": round(time.perf_counter() - t0, 2)}

    t = time.perf_counter()
    checks = {p.name: check_usability(p) for p in (android, ios)}
    for name, c in checks.items():
        log(f"checker {name}: " + "; ".join(f"{ep} {c[ep]['nodes_covered']}/{c[ep]['nodes']} nodes, "
                                             f"{c[ep]['partitions']} partition(s), {c[ep]['verdict']}"
                                             for ep, _ in CHECKED_EPS))
    timings["checker_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    made = [(p, platform, key, p.with_suffix(".ort") if p in to_convert else None)
            for p, platform, key in ((android, "android", android_key), (ios, "ios", "fp32"))]
    logits = {} if keep_logits else None
    models = evaluate_files(made, sources, refs, checks, x_eval, y_eval, threads, min_top1_agreement, warnings_,
                            logits)
    timings["eval_seconds"] = round(time.perf_counter() - t, 2)

    entries = {platform: {"file": (ort or p).name, "checked": p.name, "precision": p.name.split(".")[2]}
               for p, platform, _, ort in made}
    rec = recommend(stage_dir, entries["android"], entries["ios"], sources[android_key], checks, warnings_)
    files = [android.name, ios.name] + [n for n in written if n not in CONFIG_FILES] + list(CONFIG_FILES)
    return {"recommended": rec, "models": models, "checker": checks,
            "reduced_build": {"configs": list(CONFIG_FILES), "from": [p.with_suffix(".ort").name for p in to_convert],
                              "optimization_style": "Runtime", "target_platform": "arm",
                              "session_config": {REPLAY_KEY: "1"}},
            "files": files, "warnings": warnings_,
            "timings": {**timings, "total_seconds": round(time.perf_counter() - t0, 2)},
            "eval": {"images": int(len(y_eval)), "execution_provider": "CPUExecutionProvider",
                     "note": "NNAPI, XNNPACK and CoreML cannot run on this machine; coverage is the checker's "
                             "estimate"}, **({"logits": logits} if keep_logits else {})}
