"""The export stage: parity check, metadata round trip, int8 budget and fallbacks, .ort, report, resume.

Upstream artifacts are built here (models.build_model + save_model_artifact, pruned with torch-pruning), so
these tests depend neither on the finetune/compress stages nor on ../shared.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from models import build_model, find_head, load_model_artifact, save_model_artifact
from pipeline import artifacts, export, runtime
from pipeline.config import ConfigError
from pipeline.data import prepare_data, resolve_preprocessing
from pipeline.modelcard import read_card, read_card_from_session

def _prune(model, input_size, ratio=0.3):
    """A really pruned copy (torch-pruning, classifier kept) and its pruning history."""
    import torch_pruning as tp

    model.eval()
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *input_size), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=ratio, ignored_layers=[find_head(model)[1]], round_to=8)
    pruner.step()
    return model, pruner.pruning_history()


def fake_upstream(cfg):
    """finetune/ and compress/ as those stages leave them (teacher, student, one pruning step, metrics,
    manifests), without training."""
    info = prepare_data(cfg)
    torch.manual_seed(0)
    for rel, spec in (("finetune/teacher.pt", cfg.teacher), ("compress/student.pt", cfg.student)):
        model, native = build_model(spec.name, len(info.classes), spec.weights)
        pre = resolve_preprocessing(native, cfg.data)
        (cfg.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        save_model_artifact(cfg.run_dir / rel, model, name=spec.name, classes=info.classes, preprocessing=pre)
    pruned, history = _prune(model, pre["input_size"])
    for name in ("pruned_step1.pt", "pruned.pt"):
        save_model_artifact(cfg.run_dir / "compress" / name, pruned, name=cfg.student.name, classes=info.classes,
                            preprocessing=pre, pruning_history=history)
    artifacts.write_json(cfg.run_dir / "finetune/metrics.json", {"probe": None})
    artifacts.write_json(cfg.run_dir / "compress/metrics.json", {
        "probe": None, "steps": [{"step": 0, "file": "student.pt"}, {"step": 1, "file": "pruned_step1.pt"}]})
    artifacts.write_manifest(cfg.run_dir / "finetune", "finetune", "test", {}, ["teacher.pt", "metrics.json"], {})
    artifacts.write_manifest(cfg.run_dir / "compress", "compress", "test", {},
                             ["student.pt", "pruned_step1.pt", "pruned.pt", "metrics.json"], {})
    return info


def copy_upstream(src_cfg, dst_cfg):
    for stage in ("finetune", "compress"):
        shutil.copytree(src_cfg.run_dir / stage, dst_cfg.run_dir / stage, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data):
    from conftest import tiny_config

    # Random-init models: these tests check mechanics, so every budget is wide open (run.max_accuracy_drop=1).
    cfg = tiny_config(tmp_path_factory.mktemp("export") / "run", tiny_data, "export.max_int8_drop=1.0",
                      "run.max_accuracy_drop=1.0", "export.latency_rounds=1")
    fake_upstream(cfg)
    result = export.run(cfg)
    return cfg, result


def _test_batch(cfg, split="test"):
    info = prepare_data(cfg, write=False)
    model, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned_step1.pt")
    x, y = export.load_images(getattr(info, split), meta["preprocessing"])
    return model, meta, x, y


def test_export_writes_everything_and_the_report(exported):
    cfg, result = exported
    stage = cfg.run_dir / "export"
    for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.ort", "model.json", "manifest.json"):
        assert (stage / name).stat().st_size > 0, name
    onnx.checker.check_model(str(stage / "model.fp32.onnx"), full_check=True)
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "pruned", "onnx_fp32", "onnx_int8"]
    # Which plain recipe is closest to fp32 depends on the CPU's rounding, so only its origin is fixed here.
    assert report["shipped"] == {"candidate": "pruning step 1", "file": "pruned_step1.pt", "precision": "int8",
                                 "row": "onnx_int8", "recipe": report["int8"]["shipped"]}
    assert report["int8"]["shipped"] in {a["name"] for a in report["int8"]["attempts"] if a["ok"]}
    for name, row in report["models"].items():  # intervals and the paired drop on the report split
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi and row["drop_vs_teacher"] == pytest.approx(
            report["models"]["teacher"]["accuracy"] - row["accuracy"], abs=1e-6)
    assert report["splits"]["report"]["images"] == report["test_images"] > 0
    assert report["verdict"]["ok"] is True and report["speedup_vs_teacher_onnx"]["b1"] > 0
    for name, row in report["models"].items():
        for col in export.COLUMNS:
            assert row[col] is not None and row[col] >= 0, (name, col)
    m = report["models"]
    assert m["pruned"]["macs"] < m["student"]["macs"] and m["pruned"]["params"] < m["student"]["params"]
    assert m["onnx_int8"]["size_bytes"] < m["onnx_fp32"]["size_bytes"]
    assert m["onnx_fp32"]["accuracy"] == pytest.approx(m["pruned"]["accuracy"], abs=1e-9)
    assert report["sha256"]["model.int8.onnx"] == artifacts.sha256_file(stage / "model.int8.onnx")
    assert report["threads"]["onnxruntime"] == cfg.export.latency_threads and report["machine"]["cpu_count"]
    md = (cfg.run_dir / "report.md").read_text()
    assert "| onnx_int8 |" in md and "recommended" in md and "Verdict" in md and "drop_vs_teacher" in md
    rec_b1 = report["teacher_onnx"]["latency_ms_b1"] / report["recommended"]["cpu"]["latency_ms_b1"]
    assert f"speed-up vs the teacher's ONNX Runtime fp32: cpu {rec_b1:.2f}x at batch 1" in md
    assert (cfg.run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert {"model.fp32.onnx", "model.int8.onnx", "model.int8.ort", "model.json", "../report.json"} <= set(manifest["outputs"])


def test_int8_runs_and_its_accuracy_drop_is_computed(exported):
    cfg, result = exported
    _, _, x, y = _test_batch(cfg, "val")  # the recipe is chosen on the selection split
    report = json.loads((cfg.run_dir / "report.json").read_text())
    attempts = report["int8"]["attempts"]
    shipped = next(a for a in attempts if a.get("chosen"))
    assert shipped["ok"] and report["int8"]["shipped"] == shipped["name"]
    # export.int8_choice=closest: every plain recipe was tried; of those within the cap, the closest to fp32 ships
    assert [a["name"] for a in attempts] == ["static per-channel minmax", "static per-tensor minmax",
                                             "static per-channel percentile"]
    assert shipped["kl_vs_fp32"] == min(a["kl_vs_fp32"] for a in attempts if a["ok"])
    int8 = export.run_onnx(runtime.make_session(cfg.run_dir / "export" / "model.int8.onnx", "cpu"), x)
    fp32 = export.run_onnx(runtime.make_session(cfg.run_dir / "export" / "model.fp32.onnx", "cpu"), x)
    acc8, acc32 = export.accuracy(int8, y), export.accuracy(fp32, y)
    assert shipped["accuracy"] == pytest.approx(acc8)
    assert shipped["drop"] == pytest.approx(acc32 - acc8)
    assert np.isfinite(int8).all() and np.abs(int8 - fp32).max() < 10  # quantized, not garbage
    sp = report["int8_speedup"]
    assert sp["b1"] > 0
    # recommended.cpu: the fastest (file, runtime) at batch 1 among those that passed their checks
    table, cpu = report["runtimes"], report["recommended"]["cpu"]
    ok = {(rt, row): r["latency_ms_b1"] for rt, e in table.items() for row, r in e.items()
          if isinstance(r, dict) and r.get("ok")}
    assert (cpu["runtime"], f"onnx_{cpu['variant']}") == min(ok, key=ok.get) and cpu["file"] == f"model.{cpu['variant']}.onnx"
    assert table["onnxruntime"]["onnx_int8"]["latency_ms_b1"] == report["models"]["onnx_int8"]["latency_ms_b1"]
    if sp["b1"] < 1.0 or sp["b32"] < 1.0:
        assert any("not faster" in w for w in report["warnings"])


def test_metadata_round_trips_and_dynamic_batch(exported):
    cfg, _ = exported
    stage = cfg.run_dir / "export"
    _, meta = load_model_artifact(cfg.run_dir / "compress" / "pruned_step1.pt")
    sidecar = json.loads((stage / "model.json").read_text())
    # a file can't hold its own hash, nor what was made from it afterwards (phone files, their recommendations)
    def common(card):
        return {k: v for k, v in card.items() if k not in export.SIDECAR_ONLY}

    assert common(read_card(stage / "model.fp32.onnx")) == common(sidecar) == common(read_card(stage / "model.int8.onnx"))
    assert sidecar["sha256"] == {f: artifacts.sha256_file(stage / f)
                                 for f in [*sidecar["files"].values(), *sidecar["mobile"]["files"]]}
    rec = sidecar["recommended"]
    assert rec["android"]["file"] == "model.android.int8.ort" and rec["ios"]["file"].startswith("model.ios.")
    assert {"cpu", "cuda", "server-cpu", "server-cuda", "edge-cpu"} <= set(rec)
    for name in ("model.fp32.onnx", "model.int8.onnx", "model.int8.ort"):
        sess = runtime.make_session(stage / name, "cpu")
        card = read_card_from_session(sess)
        assert common(card) == common(sidecar), name
        assert card["labels"] == meta["classes"] and card["preprocessing"] == meta["preprocessing"]
        assert card["architecture"] == meta["name"] == cfg.student.name and card["pipeline_version"]
        assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
        assert card["recommended"]["cpu"] == sidecar["recommended"]["cpu"] and card["runtimes"] == sidecar["runtimes"]
        for batch in (1, 5):
            out = sess.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0]
            assert out.shape == (batch, 3)
    assert sidecar["files"] == {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx", "ort": "model.int8.ort"}
    assert sidecar["recommended"]["cpu"]["variant"] in ("int8", "fp32") and sidecar["recommended"]["cuda"]["variant"] == "fp32"
    assert all(e["runtime"] in runtime.RUNTIMES for e in rec.values()), rec   # every entry names its runtime
    assert rec["cuda"]["runtime"] == rec["edge-cpu"]["runtime"] == rec["android"]["runtime"] == "onnxruntime"
    assert "export host's CPU" in sidecar["measured_on"] and export._machine()["cpu"] in sidecar["measured_on"]
    checker = sidecar["mobile"]["checker"]["model.android.int8.onnx"]["NNAPI"]
    assert checker["nodes_covered"] == checker["nodes"] and checker["partitions"] == 1  # fixed shapes: all on NNAPI
    assert sidecar["accuracy"]["onnx_int8"] is not None and sidecar["opset"] >= 17


def test_ort_file_loads_and_matches_int8(exported):
    cfg, _ = exported
    stage = cfg.run_dir / "export"
    _, _, x, _ = _test_batch(cfg)
    ort_logits = export.run_onnx(runtime.make_session(stage / "model.int8.ort", "cpu"), x)
    int8_logits = export.run_onnx(runtime.make_session(stage / "model.int8.onnx", "cpu"), x)
    np.testing.assert_allclose(ort_logits, int8_logits, atol=1e-4)  # fused like the desktop session
    mobile = json.loads((cfg.run_dir / "report.json").read_text())["mobile"]
    assert mobile["file"] == "model.int8.ort" and mobile["top1_agreement"] == 1.0


def test_parity_check_fails_on_a_broken_model(exported, tmp_path, monkeypatch):
    cfg0, _ = exported
    from conftest import tiny_config

    model, _, x, _ = _test_batch(cfg0)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    good = export.run_onnx(runtime.make_session(cfg0.run_dir / "export" / "model.fp32.onnx", "cpu"), x)
    assert export.check_parity(ref, good, 1e-3, 0.99)["max_abs_diff"] < 1e-3  # the real export passes

    real_export = export.export_onnx

    def broken_export(model, input_size, path, opset, exporter):  # a deliberately wrong graph
        used = real_export(model, input_size, path, opset, exporter)
        proto = onnx.load(str(path))
        biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        biggest.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(biggest), biggest.name))
        onnx.save(proto, str(path))
        return used

    monkeypatch.setattr(export, "export_onnx", broken_export)
    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "export.exporter=legacy", "export.opset=17")
    copy_upstream(cfg0, cfg)
    with pytest.raises(export.ExportError, match=r"parity failed: max \|logit diff\|"):
        export.run(cfg)
    assert not (cfg.run_dir / "export" / "manifest.json").exists()
    assert not (cfg.run_dir / "export" / "model.fp32.onnx").exists()  # a failed graph is not left behind


def test_int8_fallbacks_are_tried_and_fp32_shipped_when_none_fits(exported, tmp_path):
    cfg0, _ = exported
    from conftest import tiny_config

    # max_int8_drop < 0: no recipe can pass, so the whole fallback chain runs for every candidate and fp32 ships.
    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "export.max_int8_drop=-1.0", "export.latency_rounds=1",
                      "run.max_accuracy_drop=1.0", "export.exporter=legacy", "export.opset=17")
    copy_upstream(cfg0, cfg)
    result = export.run(cfg)
    assert result["int8"] is None and result["recommended"]["cpu"]["variant"] == "fp32"
    report = json.loads((cfg.run_dir / "report.json").read_text())
    names = [a["name"] for a in report["int8"]["attempts"]]
    assert names == ["static per-channel minmax", "static per-tensor minmax", "static per-channel percentile",
                     "static per-channel minmax minus sensitive nodes"]
    assert all("drop" in a and a["ok"] is False for a in report["int8"]["attempts"]), report["int8"]["attempts"]
    excluded = report["int8"]["attempts"][-1]["excluded_nodes"]  # found by comparing fp32/int8 activations
    assert len(excluded) == cfg.export.sensitive_nodes
    fp32_nodes = {n.name for n in onnx.load(str(cfg.run_dir / "export" / "model.fp32.onnx")).graph.node}
    assert set(excluded) <= fp32_nodes
    # int8 of every candidate first (most pruned first), then fp32: the most pruned fp32 fits the open budget
    tried = [(a["candidate"], a["precision"]) for a in report["candidates"]]
    assert tried == [("pruning step 1", "int8"), ("student", "int8"), ("pruning step 1", "fp32")]
    assert any("shipping fp32" in w for w in report["warnings"])
    assert "WARNING" in (cfg.run_dir / "report.md").read_text()
    stage = cfg.run_dir / "export"
    assert not (stage / "model.int8.onnx").exists() and not (stage / "model.int8.ort").exists()
    assert report["models"]["onnx_int8"]["accuracy"] is None and report["models"]["onnx_fp32"]["accuracy"] is not None
    card = json.loads((stage / "model.json").read_text())
    assert card["files"]["int8"] is None and card["files"]["ort"] == "model.fp32.ort"
    assert (card["recommended"]["cpu"]["file"], card["recommended"]["cuda"]["file"]) == ("model.fp32.onnx",) * 2
    assert read_card_from_session(runtime.make_session(stage / "model.fp32.ort", "cpu"))["labels"] == card["labels"]


def test_a_candidate_whose_export_fails_is_skipped_and_the_next_one_reported(exported, tmp_path, monkeypatch):
    """The most pruned candidate's export fails (e.g. parity): the student ships in int8 and the report lists the
    failure and the student's int8 recipes (a failed attempt has none; it used to crash the report)."""
    cfg0, _ = exported
    from conftest import tiny_config

    real_export_fp32 = export.Candidates.export_fp32

    def failing_for_the_pruned_step(self, cand):
        if cand["file"] == "pruned_step1.pt":
            raise export.ExportError("ONNX fp32 vs PyTorch parity failed (scripted)")
        return real_export_fp32(self, cand)

    monkeypatch.setattr(export.Candidates, "export_fp32", failing_for_the_pruned_step)
    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "export.max_int8_drop=1.0", "export.latency_rounds=1",
                      "run.max_accuracy_drop=1.0", "export.exporter=legacy", "export.opset=17")
    copy_upstream(cfg0, cfg)
    result = export.run(cfg)
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert (report["shipped"]["candidate"], report["shipped"]["precision"]) == ("student", "int8")
    assert result["int8"] == report["shipped"]["recipe"]
    first = report["candidates"][0]
    assert (first["candidate"], first["precision"], first["ok"]) == ("pruning step 1", "int8", False)
    assert "parity failed (scripted)" in first["reason"]
    assert [a["name"] for a in report["int8"]["attempts"] if a.get("chosen")] == [report["shipped"]["recipe"]]


def test_int8_choice_ships_the_recipe_closest_to_fp32(tmp_path, monkeypatch):
    """Selection logic alone: three recipes with scripted logits; 'closest' ships the one within the cap whose
    answers are closest to fp32's, 'first' the first within the cap; the sensitive-nodes recipe is not needed."""
    import onnxruntime.quantization as ortq

    from pipeline.config import ExportConfig

    fp32 = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 2.0]])
    y = np.array([0, 1, 0, 1])
    scripted = {"static per-channel minmax": fp32 * 0.5,             # same answers, flatter: KL > 0
                "static per-tensor minmax": fp32[:, ::-1].copy(),     # every answer flipped: over the cap
                "static per-channel percentile": fp32 * 0.9}          # same answers, closest to fp32
    monkeypatch.setattr(ortq, "quant_pre_process", lambda src, dst, **kw: None)
    monkeypatch.setattr(export, "quantize", lambda prep, out, calib, recipe: out.write_text(recipe["name"]))
    monkeypatch.setattr(runtime, "make_session", lambda path, *a, **kw: path.read_text())
    monkeypatch.setattr(export, "run_onnx", lambda name, x: scripted[name])
    for choice, expected in (("closest", "static per-channel percentile"), ("first", "static per-channel minmax")):
        ce = ExportConfig(int8_choice=choice)
        out = tmp_path / f"{choice}.int8.onnx"
        name, logits, attempts = export.quantize_with_budget(ce, tmp_path / "m.onnx", out, tmp_path, None, None, y, fp32)
        assert name == expected and out.read_text() == expected and np.array_equal(logits, scripted[expected])
        assert not any("sensitive" in a["name"] for a in attempts)
        assert [a["ok"] for a in attempts] == ([True, False, True] if choice == "closest" else [True])
    assert export.kl_to_reference(fp32, fp32) == pytest.approx(0.0, abs=1e-12)
    assert 0 < export.kl_to_reference(fp32, fp32 * 0.9) < export.kl_to_reference(fp32, fp32 * 0.5)


def test_int8_cap_is_decided_on_paired_answers_with_one_image_of_slack():
    """export.max_int8_drop follows the end-to-end budget's paired rule: 2 of 180 images lost (0.0111 > 0.01) is one
    image over the cap and indistinguishable from fp32, so it passes; 3 lost (0.0167) does not; 4 lost and 2 gained
    (net 2) passes like 2 lost. A negative cap still refuses everything."""
    from types import SimpleNamespace

    ce = SimpleNamespace(max_int8_drop=0.01)
    fp32 = np.ones(180, dtype=bool)
    fp32[:13] = False                      # 167/180, like the flowers student's 0.9278

    def losing(n, gaining=0):
        int8 = fp32.copy()
        int8[13:13 + n] = False            # images fp32 got right
        int8[:gaining] = True              # images fp32 got wrong
        return int8
    assert export.int8_cap_ok(ce, fp32, losing(1))
    assert export.int8_cap_ok(ce, fp32, losing(2))
    assert not export.int8_cap_ok(ce, fp32, losing(3))
    assert export.int8_cap_ok(ce, fp32, losing(4, gaining=2))
    assert not export.int8_cap_ok(SimpleNamespace(max_int8_drop=-1.0), fp32, fp32)


def test_int8_does_not_ship_a_model_whose_fp32_source_misses_the_budget(tmp_path):
    """The budget decision alone, on 100 scripted selection images: the teacher gets 100 right, the fp32 source 95
    (out of budget), its int8 file 99 (within it, by luck). int8 is refused; with a source within budget it ships."""
    from types import SimpleNamespace

    y = np.zeros(100, dtype=int)
    cfg = SimpleNamespace(export=None, run=SimpleNamespace(max_accuracy_drop=0.01))

    def logits(n_right):
        out = np.zeros((100, 2))
        out[:n_right, 0], out[n_right:, 1] = 1.0, 1.0
        return out

    pool = export.Candidates(cfg, tmp_path, tmp_path, (None, y), np.ones(100, dtype=bool), None, None)
    cand = {"name": "pruning step 1", "file": "pruned_step1.pt"}
    plain = pool.judge(cand, "int8", logits(99), {})
    assert plain["ok"] and "source_fp32" not in plain          # without a source: the int8 answers alone
    refused = pool.judge(cand, "int8", logits(99), {}, source_logits=logits(95))
    assert refused["vs_teacher"]["ok"] and not refused["source_fp32"]["vs_teacher"]["ok"] and not refused["ok"]
    assert "misses the budget" in export._source_note(refused)
    shipped = pool.judge(cand, "int8", logits(99), {}, source_logits=logits(99))
    assert shipped["ok"] and export._source_note(shipped) == ""
    # the int8 file's own gate still applies when the source passes
    assert not pool.judge(cand, "int8", logits(95), {}, source_logits=logits(100))["ok"]
    both_miss = pool.judge(cand, "int8", logits(95), {}, source_logits=logits(95))
    assert not both_miss["ok"] and export._source_note(both_miss) == ""   # refused on its own answers already
    # when nothing ships, the loud fallback ranks an int8 file by at most its source's accuracy
    assert export.credible_accuracy(refused) == 0.95 and export.credible_accuracy(plain) == 0.99
    assert export.credible_accuracy(pool.judge(cand, "int8", logits(93), {}, source_logits=logits(95))) == 0.93


def test_no_candidate_within_the_budget_is_said_loudly(exported, tmp_path, capsys):
    cfg0, _ = exported
    from conftest import tiny_config

    # A negative end-to-end budget: nothing can meet it. The most accurate candidate ships, with the verdict.
    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "run.max_accuracy_drop=-1.0", "export.latency_rounds=1",
                      "export.max_int8_drop=1.0", "export.exporter=legacy", "export.opset=17", "export.mobile=false")
    copy_upstream(cfg0, cfg)
    # and a teacher probe that is right on every report image, as finetune keeps its answers
    labels = [y for _, y in prepare_data(cfg, write=False).test]
    artifacts.write_json(cfg.run_dir / "finetune/metrics.json", {"probe": {
        "C": 1.0, "selection_accuracy": 1.0, "test_accuracy": 1.0, "test_predictions": labels}})
    result = export.run(cfg)
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert result["verdict"]["ok"] is False and "NO STUDENT MEETS THE BUDGET" in report["verdict"]["message"]
    # the probe row is paired with the teacher like the others, and a teacher clearly below it is a warning
    row, teacher = report["models"]["probe_teacher"], report["models"]["teacher"]
    assert row["drop_vs_teacher"] == pytest.approx(teacher["accuracy"] - 1.0, abs=1e-6)
    v = report["teacher_vs_probes"]["probe_teacher"]
    assert v["images"] == len(labels) and v["teacher_images_below"] == round((1 - teacher["accuracy"]) * len(labels))
    assert (v["status"] == "below") == (v["ci95"][1] < 0) == any("below probe_teacher" in w for w in report["warnings"])
    assert "student.name" in report["verdict"]["message"]  # names the options
    assert len(report["candidates"]) == 4 and not any(a["ok"] for a in report["candidates"])
    best = max(report["candidates"], key=export.credible_accuracy)
    assert report["shipped"]["file"] == best["file"] and report["shipped"]["precision"] == best["precision"]
    assert "NO STUDENT MEETS THE BUDGET" in capsys.readouterr().out
    assert "NO STUDENT MEETS THE BUDGET" in (cfg.run_dir / "report.md").read_text()


def test_skip_when_current_rerun_when_inputs_or_config_change(exported, tmp_path):
    cfg, _ = exported
    from conftest import tiny_config
    from pipeline.stage import StageError

    assert export.run(cfg)["skipped"] is True
    stage = cfg.run_dir / "export"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["inputs"]["pruned_step1.pt"] == artifacts.sha256_file(cfg.run_dir / "compress/pruned_step1.pt")
    changed = tiny_config(cfg.run_dir, cfg.data.root, "export.max_int8_drop=1.0", "export.latency_rounds=1",
                          "run.max_accuracy_drop=1.0", "export.calibration_method=entropy")
    assert not artifacts.manifest_is_current(stage, export.config_hash(changed), manifest["inputs"])
    budget = tiny_config(cfg.run_dir, cfg.data.root, "export.max_int8_drop=1.0", "export.latency_rounds=1",
                         "run.max_accuracy_drop=0.5")
    assert export.config_hash(budget) != export.config_hash(cfg)  # the end-to-end budget decides what ships
    # missing or unfinished upstream stages name the make target that writes them
    empty = tiny_config(tmp_path / "empty", cfg.data.root)
    with pytest.raises(StageError, match="make finetune"):
        export.run(empty)
    shutil.copytree(cfg.run_dir / "finetune", empty.run_dir / "finetune")
    with pytest.raises(StageError, match="compress.*make compress"):
        export.run(empty)
    with pytest.raises(ConfigError, match="export.opset"):
        tiny_config(tmp_path / "x", cfg.data.root, "export.opset=13")


def test_dynamic_quantization_option_runs(exported, tmp_path):
    cfg, _ = exported
    _, _, x, _ = _test_batch(cfg)
    out = tmp_path / "dyn.onnx"
    export.quantize(cfg.run_dir / "export" / "model.fp32.onnx", out, x, {"kind": "dynamic", "per_channel": False})
    logits = export.run_onnx(runtime.make_session(out, "cpu"), x)
    assert logits.shape == (len(x), 3) and np.isfinite(logits).all()


def test_stratified_calibration_sample_covers_every_class():
    samples = [(f"{c}_{i}", c) for c in range(4) for i in range(10 + 5 * c)]
    picked = export.stratified_sample(samples, 8, seed=0)
    assert len(picked) == 8 and sorted({label for _, label in picked}) == [0, 1, 2, 3]
    assert len(export.stratified_sample(samples, 1000, seed=0)) == len(samples)


def test_fp16_option_writes_a_budgeted_fp16_file(exported, tmp_path):
    cfg0, _ = exported
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", cfg0.data.root, "export.quantization=fp16", "run.max_accuracy_drop=1.0",
                      "export.latency_rounds=1", "export.exporter=legacy", "export.opset=17", "export.mobile=false")
    copy_upstream(cfg0, cfg)
    export.run(cfg)
    report = json.loads((cfg.run_dir / "report.json").read_text())
    f16 = report["models"]["fp16"]
    assert f16["file"] == "model.fp16.onnx" and 0 <= f16["accuracy"] <= 1 and "ok" in f16["vs_teacher_selection"]
    stage = cfg.run_dir / "export"
    assert (stage / "model.fp16.onnx").stat().st_size < (stage / "model.fp32.onnx").stat().st_size
    manifest = json.loads((stage / "manifest.json").read_text())
    assert "model.fp16.onnx" in manifest["outputs"] and report["shipped"]["precision"] == "fp32"
