"""The torch-free on-device predictor (`python -m pipeline.predict`): same answers as PyTorch, no torch needed.

Builds its own tiny model artifact and exports it with the export stage's functions (no full stage run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import build_model, load_model_artifact, save_model_artifact
from pipeline import __version__, export
from pipeline.data import eval_transform, resolve_preprocessing
from pipeline.modelcard import set_onnx_metadata
from pipeline.preprocess import open_image, softmax

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm", "torch_pruning", "onnx")

# Runs `python -m pipeline.predict ARGS` in a fresh interpreter where importing torch (and friends) fails.
SHIM = ("import runpy, sys\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None  # `import torch` now raises ImportError\n"
        "sys.argv = ['pipeline.predict', *sys.argv[1:]]\n"
        "runpy.run_module('pipeline.predict', run_name='__main__', alter_sys=True)\n")


def predict_cli(*args):
    return subprocess.run([sys.executable, "-c", SHIM, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_data):
    """A tiny classifier (32 px): model.pt, model.onnx (with the card metadata) and its ORT-format model.ort."""
    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("predict") / "run", tiny_data)
    out = cfg.run_dir
    out.mkdir(parents=True)
    classes = ["circle", "square", "stripes"]
    torch.manual_seed(0)
    model, native = build_model(cfg.student.name, len(classes), cfg.student.weights)
    pre = resolve_preprocessing(native, cfg.data)
    with torch.no_grad():  # a nearest-class-mean head, so the predictions vary between classes
        t = eval_transform(pre)
        feats = {c: torch.stack([model.forward_head(model.forward_features(t(open_image(p))[None]), pre_logits=True)[0]
                                 for p in sorted((Path(tiny_data) / c).glob("*.png"))[:6]]).mean(0) for c in classes}
        means = torch.stack([feats[c] for c in classes])
        means -= means.mean(0)
        head = model.get_classifier()
        head.weight.copy_(means / means.norm(dim=1, keepdim=True) * 10)
        head.bias.zero_()
    save_model_artifact(out / "model.pt", model, name=cfg.student.name, classes=classes, preprocessing=pre)
    model, meta = load_model_artifact(out / "model.pt")
    export.export_onnx(model, pre["input_size"], out / "model.onnx", 17, "legacy")
    proto = onnx.load(str(out / "model.onnx"))
    set_onnx_metadata(proto, {"name": "test", "architecture": meta["name"], "labels": classes,
                              "preprocessing": pre, "pipeline_version": __version__})
    onnx.save(proto, str(out / "model.onnx"))
    export.write_ort(out / "model.onnx", out / "model.ort")
    images = sorted(str(p) for p in Path(tiny_data).rglob("*.png"))[::5]
    return {"pt": out / "model.pt", "onnx": out / "model.onnx", "ort": out / "model.ort", "images": images,
            "dir": out}


def _torch_probs(model_files):
    """The PyTorch model through the training-side (torchvision) eval transform."""
    model, meta = load_model_artifact(model_files["pt"])
    t = eval_transform(meta["preprocessing"])
    x = torch.stack([t(open_image(p)) for p in model_files["images"]])
    with torch.no_grad():
        return softmax(model(x).numpy()), meta["classes"]


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_predictions_equal_pytorch_without_torch(model_files, fmt):
    probs, classes = _torch_probs(model_files)
    assert len(set(probs.argmax(1).tolist())) > 1  # the comparison is not trivially one class
    out = predict_cli(model_files[fmt], *model_files["images"], "--json", "--top-k", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["image"] for d in lines] == model_files["images"]
    for d, p in zip(lines, probs):
        assert [r["index"] for r in d["predictions"]] == np.argsort(-p)[:3].tolist()
        assert d["predictions"][0]["label"] == classes[int(p.argmax())]
        np.testing.assert_allclose([r["probability"] for r in d["predictions"]], np.sort(p)[::-1][:3], atol=1e-4)


def test_predictor_imports_nothing_heavy():
    code = ("import sys, pipeline.predict\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_text_output_bad_images_and_bad_models(model_files):
    from serve_utils import png_bytes, webp_broken_exif

    bad = model_files["dir"] / "truncated.png"
    bad.write_bytes(Path(model_files["images"][0]).read_bytes()[:60])
    # the decoder crashes (struct.error in EXIF, a 100000x1 PNG) are clear errors here too
    exif = model_files["dir"] / "broken_exif.webp"
    exif.write_bytes(webp_broken_exif())
    strip = model_files["dir"] / "strip.png"
    strip.write_bytes(png_bytes(100_000, 1))
    out = predict_cli(model_files["onnx"], model_files["images"][0], bad, exif, strip, model_files["dir"] / "nope.jpg",
                      "--top-k", "2")
    assert out.returncode == 1
    first = out.stdout.strip().splitlines()
    assert len(first) == 1 and first[0].startswith(model_files["images"][0] + ": ") and first[0].count(",") == 1
    assert "truncated.png: error:" in out.stderr and "Traceback" not in out.stderr
    assert "broken_exif.webp: error: the image could not be decoded" in out.stderr
    assert "strip.png: error: the image is 100000x1, an aspect ratio" in out.stderr
    assert "nope.jpg: error: cannot read" in out.stderr
    # an ONNX file without the export stage's metadata: a clear error, exit 2
    plain = model_files["dir"] / "plain.onnx"
    proto = onnx.load(str(model_files["onnx"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    out = predict_cli(plain, model_files["images"][0])
    assert out.returncode == 2 and "no labels, preprocessing metadata" in out.stderr
