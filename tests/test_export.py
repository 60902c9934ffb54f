"""The export stage: parity check, metadata round trip, int8 budget and fallbacks, .ort, report, predictor."""
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
from pipeline import export, runtime
from pipeline.data import prepare_data, resolve_preprocessing
from pipeline.modelcard import read_card, read_card_from_session

ROOT = Path(__file__).resolve().parents[1]


def _fake_upstream(cfg):
    """teacher.pt, student.pt and a really pruned pruned.pt (torch-pruning history), without training."""
    from pipeline.compress import prune_copy

    info = prepare_data(cfg)
    torch.manual_seed(0)
    teacher, tpre = build_model(cfg.teacher.name, len(info.classes), cfg.teacher.weights)
    (cfg.run_dir / "finetune").mkdir(parents=True, exist_ok=True)
    save_model_artifact(cfg.run_dir / "finetune" / "teacher.pt", teacher, name=cfg.teacher.name, classes=info.classes,
                        preprocessing=resolve_preprocessing(tpre, cfg.data))
    student, spre = build_model(cfg.student.name, len(info.classes), cfg.student.weights)
    pre = resolve_preprocessing(spre, cfg.data)
    (cfg.run_dir / "compress").mkdir(parents=True, exist_ok=True)
    save_model_artifact(cfg.run_dir / "compress" / "student.pt", student, name=cfg.student.name, classes=info.classes,
                        preprocessing=pre)
    pruned, history = prune_copy(student, 0.3, pre["input_size"], cfg.compress)
    save_model_artifact(cfg.run_dir / "compress" / "pruned.pt", pruned, name=cfg.student.name, classes=info.classes,
                        preprocessing=pre, pruning_history=history)
    return info


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("export") / "run", tiny_data, "export.max_int8_drop=1.0")
    _fake_upstream(cfg)
    result = export.run(cfg)
    return cfg, result


def test_export_writes_everything_and_the_report(exported):
    cfg, result = exported
    stage = cfg.run_dir / "export"
    for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.ort", "model.json", "manifest.json"):
        assert (stage / name).stat().st_size > 0, name
    onnx.checker.check_model(str(stage / "model.fp32.onnx"), full_check=True)
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "pruned", "onnx_fp32", "onnx_int8"}
    for row in report["models"].values():
        for col in ("accuracy", "params", "macs", "size_bytes", "latency_ms_b1", "latency_ms_b32"):
            assert row[col] is not None and row[col] >= 0, col
    m = report["models"]
    assert m["pruned"]["macs"] < m["student"]["macs"]  # the pruned model really is smaller
    assert m["onnx_int8"]["size_bytes"] < m["onnx_fp32"]["size_bytes"]
    assert m["onnx_fp32"]["accuracy"] == pytest.approx(m["pruned"]["accuracy"], abs=1e-9)
    assert "onnx_int8" in (cfg.run_dir / "report.md").read_text()
    assert (cfg.run_dir / "report.png").stat().st_size > 0
    assert export.run(cfg)["skipped"] is True


def test_metadata_round_trips_and_dynamic_batch(exported):
    cfg, _ = exported
    stage = cfg.run_dir / "export"
    _, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned.pt")
    sidecar = json.loads((stage / "model.json").read_text())
    for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.ort"):
        sess = runtime.make_session(stage / name, "cpu")
        card = read_card_from_session(sess)
        assert card["labels"] == meta["classes"] == sidecar["labels"]
        assert card["preprocessing"] == meta["preprocessing"]
        assert card["pipeline_version"] and card["architecture"] == meta["name"]
        for batch in (1, 5):
            out = sess.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0]
            assert out.shape == (batch, 3)
    assert read_card(stage / "model.fp32.onnx")["files"]["int8"] == "model.int8.onnx"
    assert sidecar["recommended"]["cpu"] in ("int8", "fp32") and sidecar["accuracy"]["onnx_int8"] is not None


def test_parity_check_fails_on_a_broken_model(exported, tmp_path):
    cfg, _ = exported
    stage = cfg.run_dir / "export"
    proto = onnx.load(str(stage / "model.fp32.onnx"))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(biggest).copy()
    arr *= -1.0  # deliberately break it
    biggest.CopyFrom(onnx.numpy_helper.from_array(arr, biggest.name))
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    info = prepare_data(cfg, write=False)
    model, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned.pt")
    x, _ = export.load_images(info.test, meta["preprocessing"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    good = export.run_onnx(runtime.make_session(stage / "model.fp32.onnx", "cpu"), x)
    export.check_parity(ref, good, 1e-3, 0.99)  # the real export passes
    bad = export.run_onnx(runtime.make_session(tmp_path / "broken.onnx", "cpu"), x)
    with pytest.raises(export.ExportError, match="parity failed"):
        export.check_parity(ref, bad, 1e-3, 0.99)


def test_int8_fallbacks_are_tried_and_fp32_shipped_when_none_fits(exported, tmp_path):
    cfg0, _ = exported
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "export.max_int8_drop=-1.0", "export.mobile=true")
    for sub in ("finetune", "compress"):
        (cfg.run_dir / sub).mkdir(parents=True)
    for name in ("finetune/teacher.pt", "compress/student.pt", "compress/pruned.pt"):
        (cfg.run_dir / name).write_bytes((cfg0.run_dir / name).read_bytes())
    result = export.run(cfg)
    assert result["int8"] is None and result["recommended"]["cpu"] == "fp32"
    report = json.loads((cfg.run_dir / "report.json").read_text())
    names = [a["name"] for a in report["int8"]["attempts"]]
    assert len(names) >= 3 and "per-tensor" in names[1] and "sensitive" in names[-1]
    assert all("drop" in a for a in report["int8"]["attempts"]), report["int8"]["attempts"]
    assert report["int8"]["attempts"][-1]["excluded_nodes"]  # found by comparing fp32/int8 activations
    assert any("shipping fp32" in w for w in report["warnings"])
    assert not (cfg.run_dir / "export" / "model.int8.onnx").exists()
    assert report["models"]["onnx_int8"]["accuracy"] is None
    card = json.loads((cfg.run_dir / "export" / "model.json").read_text())
    assert card["files"]["int8"] is None and card["files"]["ort"] == "model.fp32.ort"
    assert (cfg.run_dir / "export" / "model.fp32.ort").exists()


def test_predictor_without_torch_matches_pytorch(exported):
    cfg, _ = exported
    info = prepare_data(cfg, write=False)
    files = [p for p, _ in info.test]
    model, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned.pt")
    x, _ = export.load_images(info.test, meta["preprocessing"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(1).tolist()
    # A subprocess where importing torch fails: the predictor must not need it.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pipeline.predict import main\n"
            f"sys.exit(main([{str(cfg.run_dir / 'export' / 'model.fp32.onnx')!r}, *{files!r}, '--json', '--top-k', '1']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = [json.loads(line)["predictions"][0]["index"] for line in out.stdout.splitlines()]
    assert got == expected
