"""Mobile deployables (pipeline/mobile.py, issue 14) on a tiny conv classifier: fixed-shape files, ONNX Runtime's
mobile usability checker, accuracy/agreement, the reduced-build config, and the torch-free predictor.

NNAPI and CoreML cannot run here: accuracies are CPU-EP figures, coverage is the checker's estimate.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from pipeline import __version__, mobile
from pipeline.modelcard import INPUT_NAME, OUTPUT_NAME, read_card, set_onnx_metadata
from pipeline.predict import Predictor
from pipeline.preprocess import make_preprocessing, preprocess

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "stripes"]
SIZE = 32


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _tiny_classifier():
    # Conv/BN/ReLU + pooling + Flatten + Linear: the shape of a real classifier head (Flatten is what
    # CoreML MLProgram lacks, so the iOS rewrite is exercised too)
    return nn.Sequential(_block(3, 8), _block(8, 16, 2), nn.MaxPool2d(2), _block(16, 16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, len(CLASSES)))


class _Reader:
    def __init__(self, x):
        self.x, self.i = x, 0

    def get_next(self):
        self.i += 1
        return {INPUT_NAME: self.x[self.i - 1:self.i]} if self.i <= len(self.x) else None

    def rewind(self):
        self.i = 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data):
    """model.fp32.onnx (dynamic batch, card metadata) and model.int8.onnx (static QDQ, per-channel U8/S8) from a
    tiny classifier trained a few steps on the tiny images, plus the eval batch as the device preprocesses it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = tmp_path_factory.mktemp("mobile")
    pre = make_preprocessing(SIZE, [0.5] * 3, [0.5] * 3)
    paths = sorted(str(p) for p in Path(tiny_data).rglob("*.png"))
    labels = np.array([CLASSES.index(Path(p).parent.name) for p in paths])
    x = np.stack([preprocess(p, pre) for p in paths]).astype(np.float32)
    torch.manual_seed(0)
    model = _tiny_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):  # a few full-batch steps: predictions that differ between classes, not random ties
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        opt.step()
    model.eval()
    fp32 = out / "model.fp32.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(fp32), dynamo=False, opset_version=17,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    card = {"name": "tiny", "architecture": "tiny-conv", "labels": CLASSES, "preprocessing": pre,
            "input": {"name": INPUT_NAME, "shape": ["N", 3, SIZE, SIZE], "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": ["N", len(CLASSES)]}, "pipeline_version": __version__}
    proto = onnx.load(str(fp32))
    set_onnx_metadata(proto, card)
    onnx.save(proto, str(fp32))

    class Reader(_Reader, CalibrationDataReader):
        pass

    int8 = out / "model.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(x[::5]), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    eval_idx = np.arange(1, len(paths), 2)  # every other image (21): the "held-out" split of this test
    return {"dir": out, "fp32": fp32, "int8": int8, "x": x[eval_idx], "y": labels[eval_idx],
            "paths": [paths[i] for i in eval_idx], "card": card}


def _refs(exported):
    from pipeline.runtime import make_session

    return {k: make_session(exported[k], "cpu", 1).run(None, {INPUT_NAME: exported["x"]})[0] for k in ("fp32", "int8")}


@pytest.fixture(scope="module")
def result(exported):
    return mobile.export_mobile(exported["dir"], exported["fp32"], exported["int8"], exported["x"], exported["y"],
                                _refs(exported), [3, SIZE, SIZE], threads=1, min_top1_agreement=0.99, keep_logits=True)


def test_files_and_static_batch_one_shapes(exported, result):
    d = exported["dir"]
    assert set(result["files"]) == {"model.android.int8.onnx", "model.android.int8.ort", "model.ios.fp32.onnx",
                                    "model.ios.fp32.ort", *mobile.CONFIG_FILES}
    for name in result["files"]:
        assert (d / name).is_file(), name
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temp file or folder left behind
    for name in ("model.android.int8.onnx", "model.ios.fp32.onnx"):
        dims = onnx.load(str(d / name)).graph.input[0].type.tensor_type.shape.dim
        assert [dim.dim_value for dim in dims] == [1, 3, SIZE, SIZE] and not any(dim.dim_param for dim in dims)
        card = read_card(d / name)  # the card travels with the file, batch 1 recorded
        assert card["labels"] == CLASSES and card["input"]["shape"][0] == 1
    for name, m in result["models"].items():
        assert m["input_shape"] == [1, 3, SIZE, SIZE], name
    # today's files are untouched (same dynamic batch)
    assert onnx.load(str(exported["int8"])).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = [n.op_type for n in onnx.load(str(d / "model.ios.fp32.onnx")).graph.node]
    assert "Flatten" not in ops and "Reshape" in ops


def test_checker_verdicts_recorded(result):
    android = result["checker"]["model.android.int8.onnx"]
    ios = result["checker"]["model.ios.fp32.onnx"]
    for check in (android, ios):
        for ep in ("NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"):
            c = check[ep]
            assert {"verdict", "nodes_covered", "nodes", "partitions", "coverage"} <= set(c)
            assert 0 <= c["nodes_covered"] <= c["nodes"] and c["verdict"] in ("YES", "MAYBE", "NO")
        assert check["dynamic_inputs"] == [] and check["log"]  # the checker's own words are kept
    # with a static batch every node of the int8 model is NNAPI's, in one partition
    assert android["NNAPI"]["nodes_covered"] == android["NNAPI"]["nodes"] and android["NNAPI"]["partitions"] == 1
    assert ios["CoreML MLProgram"]["nodes_covered"] == ios["CoreML MLProgram"]["nodes"]
    assert ios["CoreML MLProgram"]["partitions"] == 1
    rec = result["recommended"]
    assert rec["android"] == {**rec["android"], "file": "model.android.int8.ort", "execution_provider": "NNAPI"}
    assert rec["ios"]["file"] == "model.ios.fp32.ort" and rec["ios"]["execution_provider"].startswith("CoreML")
    assert rec["edge-cpu"]["execution_provider"] == "CPU" and all(rec[p]["why"] for p in rec)
    assert result["warnings"] == []
    # each .ort holds the graph the checker judged (Runtime style keeps the QDQ groups NNAPI can take)
    assert all(m["same_graph_as_checked"] for n, m in result["models"].items() if n.endswith(".ort"))
    assert "model.ios.fp32.ort" in "\n".join(mobile.report_lines(result))


def test_accuracy_and_agreement(exported, result):
    for name, m in result["models"].items():
        assert m["accuracy"] is not None and m["top1_agreement"] >= 0.99, (name, m)
    assert result["models"]["model.android.int8.onnx"]["from"] == "model.int8.onnx"
    assert result["models"]["model.ios.fp32.ort"]["from"] == "model.fp32.onnx"
    assert result["models"]["model.ios.fp32.onnx"]["accuracy"] > 1 / len(CLASSES)  # it learned something


def test_reduced_build_config(exported, result):
    text = (exported["dir"] / "required_operators.config").read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith("#")]
    ops = {op for line in entries for op in line.split(";")[2].split(",")}
    assert all(len(line.split(";")) == 3 for line in entries)
    assert {"Conv", "DequantizeLinear", "QuantizeLinear", "Gemm"} <= ops
    assert "# - model.android.int8.ort" in text and "/tmp" not in text  # names the shipped files
    typed = (exported["dir"] / "required_operators_and_types.config").read_text()
    assert '{"inputs"' in typed


def test_torch_free_predictor_agrees_with_export_side(exported, result):
    """pipeline/predict.py loads every mobile file (fixed batch 1, .onnx and .ort) and gives the export-side top-1.
    One image per call, as the predictor's CLI does: a fixed-batch file takes batch 1 only."""
    assert set(result["logits"]) == set(result["models"])
    for name in result["models"]:
        path = exported["dir"] / name
        ours = result["logits"][name].argmax(1)  # what the export side measured
        predictor = Predictor(path, "cpu", 1)
        theirs = np.array([predictor.logits([p]).argmax(1)[0] for p in exported["paths"]])
        assert (theirs == ours).all(), name
        assert predictor.labels == CLASSES


def test_predict_cli_without_torch_on_android_ort(exported, result):
    shim = ("import runpy, sys\n"
            "for m in ('torch', 'torchvision', 'timm', 'torch_pruning', 'onnx'): sys.modules[m] = None\n"
            "sys.argv = ['pipeline.predict', *sys.argv[1:]]\n"
            "runpy.run_module('pipeline.predict', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", shim, str(exported["dir"] / "model.android.int8.ort"),
                           *exported["paths"][:2], "--top-k", "1"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2


def test_ios_fp16_option(exported, tmp_path):
    import shutil

    for k in ("fp32", "int8"):
        shutil.copy(exported[k], tmp_path / exported[k].name)
    r = mobile.export_mobile(tmp_path, tmp_path / "model.fp32.onnx", None, exported["x"], exported["y"],
                             {}, [3, SIZE, SIZE], threads=1, min_top1_agreement=0.99, ios_precision="fp16")
    assert r["recommended"]["ios"]["file"] == "model.ios.fp16.onnx"
    assert r["models"]["model.ios.fp16.onnx"]["top1_agreement"] >= 0.99
    assert r["recommended"]["android"]["file"] == "model.android.fp32.ort"  # no int8: the fp32 model, fixed
    assert not (tmp_path / "model.ios.fp32.ort").exists()
    dtype = onnx.load(str(tmp_path / "model.ios.fp16.onnx")).graph.input[0].type.tensor_type.elem_type
    assert dtype == onnx.TensorProto.FLOAT  # float32 in and out: the app code is the same


def test_disagreement_fails_loudly_naming_the_fix(exported, tmp_path):
    import shutil

    for k in ("fp32", "int8"):
        shutil.copy(exported[k], tmp_path / exported[k].name)
    refs = _refs(exported)
    wrong = {"fp32": refs["fp32"], "int8": -refs["int8"]}  # a source whose top-1 the files cannot match
    with pytest.raises(mobile.MobileExportError, match=r"model\.android\.int8\.onnx agrees with model\.int8\.onnx"
                                                      r".*Fix:"):
        mobile.export_mobile(tmp_path, tmp_path / "model.fp32.onnx", tmp_path / "model.int8.onnx", exported["x"],
                             exported["y"], wrong, [3, SIZE, SIZE], threads=1, min_top1_agreement=0.99)
