"""Several CPU runtimes behind one session interface (pipeline.runtime.make_session): OpenVINO next to ONNX Runtime.

Runs with and without openvino installed: the tests that need it skip cleanly (pytest.importorskip), the others
check the fallback to ONNX Runtime and that model.json `recommended` entries of every age are read the same way.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import export, modelcard, runtime
from serve_utils import LABELS, encode, make_tiny_export, offline_probs, photo


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return make_tiny_export(tmp_path_factory.mktemp("runtimes") / "export")


def _images(export_dir, n=8):
    card = json.loads((export_dir / "model.json").read_text())
    from pipeline.preprocess import preprocess

    return np.stack([preprocess(encode(photo(size=(48 + i, 40), seed=i), "PNG"), card["preprocessing"])
                     for i in range(n)]).astype(np.float32)


def _recommend(export_dir, rt: str, key="server-cpu", variant="int8"):
    """Rewrite model.json so that `key` recommends `variant` on runtime `rt` (today's entry format)."""
    path = export_dir / "model.json"
    card = json.loads(path.read_text())
    card["recommended"][key] = {"variant": variant, "file": card["files"][variant], "runtime": rt}
    path.write_text(json.dumps(card))


# ----------------------------------------------------------------------------- model.json entries of every age
def test_recommended_entries_old_and_new_forms():
    files = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
    card = {"files": files, "recommended": {
        "cpu": "int8",                                                              # exports before runtimes
        "server-cpu": {"file": "model.int8.onnx", "execution_provider": "CPU"},     # per-platform, no runtime
        "edge-cpu": {"file": "model.int8.ort", "execution_provider": "CPU"},
        "gpu": {"variant": "fp32", "file": "model.fp32.onnx", "runtime": "openvino"}}}
    assert modelcard.recommended_entry(card, "cpu") == {"variant": "int8", "file": "model.int8.onnx",
                                                        "runtime": "onnxruntime"}
    assert modelcard.recommended_entry(card, "server-cpu")["variant"] == "int8"
    assert modelcard.recommended_entry(card, "server-cpu")["runtime"] == "onnxruntime"
    assert modelcard.recommended_entry(card, "edge-cpu")["variant"] is None   # a file no variant names
    assert modelcard.recommended_entry(card, "gpu")["runtime"] == "openvino"
    assert modelcard.recommended_entry(card, "nope") is None and modelcard.recommended_entry({}, "cpu") is None
    assert modelcard.recommended_runtime(card, "model.fp32.onnx", ("cpu", "gpu")) == "openvino"
    assert modelcard.recommended_runtime(card, "model.fp32.onnx", ("cpu",)) == "onnxruntime"
    assert modelcard.recommended_runtime(None, "model.int8.onnx") == "onnxruntime"
    with pytest.raises(ValueError, match="recommended.cpu"):
        modelcard.recommended_entry({"recommended": {"cpu": 3}}, "cpu")


def test_resolve_model_names_the_recommended_runtime(tiny_export, tmp_path):
    from serving.model_files import resolve_model

    path, info = resolve_model(tiny_export, "auto", "cpu")   # the old card: {"cpu": "int8", "cuda": "fp32"}
    assert path.name == "model.int8.onnx" and info["runtime"] == "onnxruntime"
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    _recommend(folder, "openvino", "server-cpu", "fp32")   # the server entry wins over `cpu` for a server
    path, info = resolve_model(folder, "auto", "cpu")
    assert (path.name, info["variant"], info["runtime"]) == ("model.fp32.onnx", "fp32", "openvino")
    assert resolve_model(folder, "int8", "cpu")[1]["runtime"] == "onnxruntime"   # not the recommended file
    # `make serve` hands the server a file: the model.json next to it still names the runtime
    assert resolve_model(folder / "model.fp32.onnx", "auto", "cpu")[1]["runtime"] == "openvino"
    assert resolve_model(folder / "model.int8.onnx", "auto", "cpu")[1]["runtime"] == "onnxruntime"


# ----------------------------------------------------------------------------- fallback without openvino
def test_openvino_missing_falls_back_to_onnxruntime_with_one_log_line(tiny_export, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "runtime_installed", lambda name: name == "onnxruntime")
    monkeypatch.setattr(runtime, "_warned", set())
    x = _images(tiny_export)
    with caplog.at_level(logging.WARNING, logger="edgepipe.runtime"):
        sessions = [runtime.make_session(tiny_export / "model.int8.onnx", "cpu", 1, runtime="openvino")
                    for _ in range(3)]
    assert all(runtime.session_runtime(s) == "onnxruntime" for s in sessions)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgepipe.runtime"]
    assert len(lines) == 1 and "openvino is not installed" in lines[0] and "onnxruntime" in lines[0], lines
    ref = runtime.make_session(tiny_export / "model.int8.onnx", "cpu", 1)
    np.testing.assert_array_equal(sessions[0].run(None, {"input": x})[0], ref.run(None, {"input": x})[0])
    assert runtime.cpu_runtimes() == ["onnxruntime"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime.make_session(tiny_export / "model.int8.onnx", "cpu", runtime="tensorrt")


def test_predictor_falls_back_and_gives_the_same_answers(tiny_export, tmp_path, monkeypatch):
    from pipeline.predict import Predictor

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    _recommend(folder, "openvino", "cpu")
    monkeypatch.setattr(runtime, "runtime_installed", lambda name: name == "onnxruntime")
    images = [encode(photo(seed=s), "PNG") for s in range(4)]
    predictor = Predictor(folder / "model.int8.onnx", "cpu", 1)   # runtime auto -> openvino -> not installed
    assert predictor.runtime == "onnxruntime"
    expected = offline_probs(folder / "model.int8.onnx", images)
    got = [[p["label"] for p in preds] for preds in predictor.predict(images, k=3)]
    assert got == [[LABELS[i] for i in np.argsort(-row, kind="stable")[:3]] for row in expected]


def test_export_measures_only_onnxruntime_without_openvino(tiny_export, monkeypatch):
    monkeypatch.setattr(runtime, "runtime_installed", lambda name: name == "onnxruntime")
    paths = {"onnx_fp32": tiny_export / "model.fp32.onnx", "onnx_int8": tiny_export / "model.int8.onnx"}
    ce = type("CE", (), {"runtimes": "auto"})()
    rts = {k: export.runtime_list(ce) for k in paths}
    assert rts["onnx_int8"] == ["onnxruntime"]
    lat = export.compare_latency(paths, (3, 32, 32), threads=1, runs=3, rounds=1, runtimes=rts)
    assert set(lat["onnx_int8"]["runtimes"]) == {"onnxruntime"}
    assert lat["onnx_int8"]["runtimes"]["onnxruntime"] == {k: lat["onnx_int8"][k] for k in ("latency_ms_b1", "latency_ms_b32")}
    # asked for anyway, a runtime that cannot be had is recorded as an error, not measured as ONNX Runtime
    lat = export.compare_latency(paths, (3, 32, 32), 1, 3, 1, {"onnx_int8": ["onnxruntime", "openvino"]})
    assert "fell back" in lat["onnx_int8"]["runtimes"]["openvino"]["error"]


# ----------------------------------------------------------------------------- choosing per target
def test_recommendations_pick_the_fastest_checked_pair_per_batch():
    files = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
    table = {"onnxruntime": {"version": "1", "onnx_fp32": {"latency_ms_b1": 4.0, "latency_ms_b32": 90.0, "ok": True},
                             "onnx_int8": {"latency_ms_b1": 2.0, "latency_ms_b32": 80.0, "ok": True}},
             "openvino": {"version": "2", "onnx_fp32": {"latency_ms_b1": 1.0, "latency_ms_b32": 85.0, "ok": False},
                          "onnx_int8": {"latency_ms_b1": 2.5, "latency_ms_b32": 55.0, "ok": True}}}
    warnings_: list = []
    rec = export.recommendations(table, files, {"b1": 2.0, "b32": 1.1}, {"cpu": "Test CPU"}, warnings_)
    # openvino fp32 is fastest at batch 1 but failed its checks: never recommended
    assert {k: (v["variant"], v["runtime"], v["file"]) for k, v in rec.items()} == {
        "cpu": ("int8", "onnxruntime", "model.int8.onnx"), "server-cpu": ("int8", "openvino", "model.int8.onnx")}
    assert "Test CPU" in rec["cpu"]["why"] and warnings_ == []
    table["onnxruntime"]["onnx_int8"]["latency_ms_b1"] = 4.0   # a tie: int8, then onnxruntime, wins
    assert export.recommendations(table, files, {"b1": 1.0, "b32": 1.1}, {"cpu": "x"}, [])["cpu"]["variant"] == "int8"
    for speedup, named in (({"b1": 0.9, "b32": 1.2}, "0.90x at batch 1"), ({"b1": 1.2, "b32": 0.8}, "0.80x at batch 32")):
        warnings_ = []   # int8 slower than fp32 at either batch is reported, naming the batch
        export.recommendations(table, files, speedup, {"cpu": "x"}, warnings_)
        assert len(warnings_) == 1 and "not faster" in warnings_[0] and named in warnings_[0]
    only_fp32 = {"onnxruntime": {"onnx_fp32": {"latency_ms_b1": 4.0, "latency_ms_b32": 90.0, "ok": True}}}
    rec = export.recommendations(only_fp32, {"fp32": "model.fp32.onnx", "int8": None}, None, {"cpu": "x"}, [])
    assert rec["cpu"]["file"] == rec["server-cpu"]["file"] == "model.fp32.onnx"


# ----------------------------------------------------------------------------- with openvino installed
@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip("openvino")


def test_openvino_session_matches_onnxruntime(openvino, tiny_export):
    x = _images(tiny_export)
    for variant, atol in (("fp32", 1e-4), ("int8", None)):
        path = tiny_export / f"model.{variant}.onnx"
        ov_sess = runtime.make_session(path, "cpu", 1, runtime="openvino")
        ref = runtime.make_session(path, "cpu", 1)
        assert runtime.session_runtime(ov_sess) == "openvino" and runtime.session_device(ov_sess) == "cpu"
        assert [i.name for i in ov_sess.get_inputs()] == ["input"] and ov_sess.get_outputs()[0].name == "logits"
        assert ov_sess.get_inputs()[0].shape[1:] == [3, 32, 32] and not isinstance(ov_sess.get_inputs()[0].shape[0], int)
        assert modelcard.read_card_from_session(ov_sess) == modelcard.read_card_from_session(ref)   # labels, pre
        for n in (1, 5, 8):   # the dynamic batch axis
            got, want = ov_sess.run(["logits"], {"input": x[:n]})[0], ref.run(None, {"input": x[:n]})[0]
            assert got.shape == want.shape == (n, len(LABELS))
            if atol:
                np.testing.assert_allclose(got, want, atol=atol)   # f32 precision hint: fp32 stays fp32
            else:
                assert np.abs(got - want).max() < 0.5 * (np.abs(want).max() + 1)   # int8 kernels round differently
        assert runtime.measure_latency_ms(ov_sess, x[:1], runs=2, warmup=1) > 0
    assert "openvino" in runtime.cpu_runtimes() and runtime.runtime_version("openvino")
    ort_file = tiny_export / "model.int8.ort"   # ORT-format files stay on ONNX Runtime
    if ort_file.exists():
        assert runtime.session_runtime(runtime.make_session(ort_file, "cpu", runtime="openvino")) == "onnxruntime"


def test_predictor_uses_the_recommended_runtime(openvino, tiny_export, tmp_path):
    from pipeline.predict import Predictor, main

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    _recommend(folder, "openvino", "cpu", "fp32")
    images = [encode(photo(seed=s), "PNG") for s in range(5)]
    ov_pred, ort_pred = Predictor(folder / "model.fp32.onnx"), Predictor(folder / "model.fp32.onnx", runtime="onnxruntime")
    assert (ov_pred.runtime, ort_pred.runtime) == ("openvino", "onnxruntime")
    assert Predictor(folder / "model.int8.onnx").runtime == "onnxruntime"   # not the file `cpu` recommends
    np.testing.assert_allclose(ov_pred.logits(images), ort_pred.logits(images), atol=1e-4)
    img = tmp_path / "a.png"
    img.write_bytes(images[0])
    assert main([str(folder / "model.fp32.onnx"), str(img), "--runtime", "openvino", "--json"]) == 0


def test_service_serves_on_the_recommended_runtime(openvino, tiny_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    _recommend(folder, "openvino", "server-cpu", "int8")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPIPE_MODEL", str(folder))
    mp.setenv("EDGEPIPE_THREADS", "1")
    saved = {name: sys.modules.pop(name, None) for name in ("serving.service", "serving.settings")}
    try:
        module = importlib.import_module("serving.service")
        svc = module.ImageClassifier()
        assert svc.runtime == "openvino" and svc.model_path.name == "model.int8.onnx"
        images = [encode(photo(seed=s), "PNG") for s in range(4)]
        answers = [svc.classify_bytes(im, k=3) for im in images]
        ort_probs = offline_probs(folder / "model.int8.onnx", images)
        assert [a["predictions"][0]["label"] for a in answers] == [LABELS[int(p.argmax())] for p in ort_probs]
        response = svc.classify([module.make_item(images[0], None, svc.pre, len(svc.labels))])[0]
        timing = response.headers["Server-Timing"]
        for step in ("decode", "preprocess", "queue", "inference", "respond"):
            assert f"{step};dur=" in timing, timing
    finally:
        mp.undo()
        for name, mod in saved.items():
            sys.modules.pop(name, None)
            if mod is not None:
                sys.modules[name] = mod


# ----------------------------------------------------------------------------- benchmarks/speed.py's peak
def test_peak_mac_rate_from_cpuinfo(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    speed = importlib.import_module("speed")
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)

    def info(flags, vendor="GenuineIntel", family=6):
        text = (f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: Test CPU\ncpu MHz\t\t: 2000.000\n"
                f"siblings\t: 4\ncpu cores\t: 2\nflags\t\t: {flags}\n\n")
        (tmp_path / "cpuinfo").write_text(text)
        return speed.cpu_info(str(tmp_path / "cpuinfo"))

    amx = info("fma avx2 avx512f avx512_vnni amx_int8")
    assert amx["cores"] == 2   # 4 logical CPUs, 2 per core
    peak = speed.peak_macs(amx)
    assert peak["int8"]["macs_per_s"] == 2 * 2.0e9 * 1024 and peak["int8"]["flag"] == "amx_int8"
    assert peak["fp32"]["macs_per_s"] == 2 * 2.0e9 * 32 and "2 cores x 2.000 GHz x 32" in peak["fp32"]["formula"]
    assert speed.peak_macs(info("fma avx2"))["int8"]["per_cycle_per_core"] == 32
    zen4 = speed.peak_macs(info("fma avx2 avx512f avx512_vnni", "AuthenticAMD", 0x19))
    assert (zen4["int8"]["per_cycle_per_core"], zen4["fp32"]["per_cycle_per_core"]) == (64, 16)
    assert speed.peak_macs(amx, threads=1)["int8"]["macs_per_s"] == 2.0e9 * 1024
    from speed_serve import parse_server_timing

    assert parse_server_timing('receive;dur=0.1, decode;dur=2.5, inference;dur=3, batch;desc="4"') == {
        "receive": 0.1, "decode": 2.5, "inference": 3.0, "batch": 4}
