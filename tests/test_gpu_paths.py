"""GPU and multi-GPU paths (issue 15), checked on the CPU: mocked torch.cuda / ONNX Runtime providers /
CUDA_VISIBLE_DEVICES, two gloo processes, and parses of pyproject, bentofile and the Makefile.

Every test is CPU-only and deterministic; the whole file runs in well under a minute.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import engine, runtime
from pipeline.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- #6 off/on in the config

def test_off_and_on_reach_string_keys_as_words():
    cfg = load_config(None, ["finetune.amp=off", "compress.amp=off", "finetune.channels_last=on",
                             "compress.channels_last=off"])
    assert (cfg.finetune.amp, cfg.compress.amp) == ("off", "off")
    assert (cfg.finetune.channels_last, cfg.compress.channels_last) == ("on", "off")
    assert parse_override("finetune.amp=off") == {"finetune": {"amp": "off"}}
    assert engine.amp_dtype(cfg.finetune.amp, torch.device("cpu")) is None


def test_off_and_on_in_a_yaml_file_and_for_boolean_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("finetune:\n  amp: off\n  channels_last: on\nrun:\n  progress: off\n  sync_bn: yes\n"
                 "data:\n  hflip: no\n")
    cfg = load_config(y, ["run.tf32=off", "finetune.lr=1e-3"])
    assert (cfg.finetune.amp, cfg.finetune.channels_last) == ("off", "on")
    assert (cfg.run.progress, cfg.run.sync_bn, cfg.data.hflip, cfg.run.tf32) == (False, True, False, False)
    assert cfg.finetune.lr == 0.001  # YAML 1.2 float, was the string "1e-3"
    with pytest.raises(ConfigError, match="finetune.amp must be one of"):
        load_config(None, ["finetune.amp=on"])
    with pytest.raises(ConfigError, match="run.progress must be true or false"):
        load_config(None, ["run.progress=maybe"])
    with pytest.raises(ConfigError, match="run.lr_scaling must be one of"):
        load_config(None, ["run.lr_scaling=cubic"])
    with pytest.raises(ConfigError, match="run.grad_accum_steps"):
        load_config(None, ["run.grad_accum_steps=0"])


# ----------------------------------------------------------------------------- #7 AMP auto

@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as seen by a process with `count` visible GPUs of compute capability `cap`."""
    def install(count=1, cap=(8, 0), name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what emulation reports
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return install


@pytest.mark.parametrize("cap, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                           ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_picks_bf16_only_with_native_bf16(fake_gpu, cap, expected):
    fake_gpu(cap=cap)  # V100 7.0, T4 7.5: is_bf16_supported() says True (emulated), auto must still pick fp16
    cuda = torch.device("cuda", 0)
    assert engine.amp_dtype("auto", cuda) == expected
    assert engine.amp_dtype("fp16", cuda) == torch.float16
    assert engine.amp_dtype("off", cuda) is None
    assert engine.amp_dtype("auto", torch.device("cpu")) is None


def test_explicit_bf16_on_emulating_gpu_warns(fake_gpu):
    fake_gpu(cap=(7, 0), name="Tesla V100")
    with pytest.warns(UserWarning, match="emulated"):
        assert engine.amp_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16


# ----------------------------------------------------------------------------- #10 device resolution

def test_one_visible_gpu_per_process_uses_cuda0(fake_gpu, monkeypatch):
    fake_gpu(count=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # SLURM / k8s: this process sees only its own GPU
    assert engine.resolve_device("auto", local_rank=3, world_size=8, local_world_size=4) == torch.device("cuda", 0)
    assert engine.resolve_device("cuda", local_rank=3, world_size=8) == torch.device("cuda", 0)
    assert engine.resolve_device("cuda:0", local_rank=3, world_size=8) == torch.device("cuda", 0)


def test_several_visible_gpus_use_local_rank(fake_gpu, monkeypatch):
    fake_gpu(count=4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engine.resolve_device("auto", local_rank=2, world_size=4) == torch.device("cuda", 2)
    assert engine.resolve_device("cuda:3") == torch.device("cuda", 3)  # one process: an explicit GPU is fine
    with pytest.raises(RuntimeError, match="every rank would train on GPU 0"):
        engine.resolve_device("cuda:0", local_rank=2, world_size=4)  # torchrun + an explicit index
    with pytest.raises(RuntimeError, match="sees 4 GPU"):
        engine.resolve_device("cuda:5")


def test_more_processes_than_gpus_is_an_error(fake_gpu, monkeypatch):
    fake_gpu(count=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match="nproc_per_node=2"):
        engine.resolve_device("auto", local_rank=3, world_size=4)
    fake_gpu(count=1)
    with pytest.raises(RuntimeError, match="2 processes on this node but only 1 GPU"):
        engine.resolve_device("auto", local_rank=1, world_size=2, local_world_size=2)


def test_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.resolve_device("auto", local_rank=1, world_size=2) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no usable GPU"):
        engine.resolve_device("cuda")


def test_init_distributed_single_process_binds_its_gpu(fake_gpu, monkeypatch):
    fake_gpu(count=1)
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info, device = engine.init_distributed("auto", timeout_s=30)
    assert (info.world_size, device, bound) == (1, torch.device("cuda", 0), [torch.device("cuda", 0)])


def test_configure_cuda_leaves_cpu_alone_and_sets_flags_on_cuda():
    assert engine.configure_cuda(torch.device("cpu")) == {}
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision)
    try:
        assert engine.configure_cuda(torch.device("cuda", 0), cudnn_benchmark=True, tf32=True)
        assert (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision) == (True, "tf32", "tf32")
        engine.configure_cuda(torch.device("cuda", 0), cudnn_benchmark=False, tf32=False)
        assert (torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision) == (False, "ieee", "ieee")
    finally:
        torch.backends.cudnn.benchmark, matmul.fp32_precision, conv.fp32_precision = saved


# ----------------------------------------------------------------------------- #8, #9 ONNX Runtime on CUDA

class _FakeSession:
    """An InferenceSession whose CUDA provider did (or did not) load."""
    cuda_loads = False
    created: list = []

    def __init__(self, model, sess_options=None, providers=None):
        self.providers = providers
        _FakeSession.created.append(providers)

    def get_providers(self):
        names = [p[0] if isinstance(p, tuple) else p for p in self.providers]
        return names if self.cuda_loads else [n for n in names if n != runtime.CUDA]

    def get_inputs(self):
        return [type("I", (), {"name": "x"})()]

    def run(self, outputs, feeds):
        return [np.zeros((len(feeds["x"]), 2), np.float32)]


@pytest.fixture
def fake_ort(monkeypatch):
    import onnxruntime as ort

    def install(cuda_loads: bool):
        monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
        monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
        monkeypatch.setattr(runtime, "_driver_sees_gpu", lambda: True)
        monkeypatch.setattr(runtime, "_preload_cuda_libraries", lambda ort: None)
        monkeypatch.setattr(runtime, "_cuda_failed", False)
        monkeypatch.setattr(runtime, "_warned", set())
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(_FakeSession, "cuda_loads", cuda_loads)
        _FakeSession.created = []
        runtime._cuda_probe.cache_clear()
    yield install
    runtime._cuda_probe.cache_clear()


def test_cuda_provider_that_does_not_load_is_not_usable(fake_ort, tmp_path):
    fake_ort(cuda_loads=False)  # onnxruntime-gpu lists CUDA, the session silently falls back to the CPU
    assert runtime.cuda_usable() is False
    with pytest.raises(RuntimeError, match="cannot use a GPU"):
        runtime.make_session(tmp_path / "m.onnx", device="cuda")
    assert runtime.providers_for("auto") == [runtime.CPU]


def test_device_cuda_fails_loudly_when_the_session_falls_back(fake_ort, monkeypatch, tmp_path):
    fake_ort(cuda_loads=True)
    assert runtime.cuda_usable() is True
    monkeypatch.setattr(_FakeSession, "cuda_loads", False)  # the probe worked, this model's session did not
    with pytest.raises(RuntimeError, match="device=cuda: onnxruntime fell back"):
        runtime.make_session(tmp_path / "m.onnx", device="cuda")
    with pytest.warns(RuntimeWarning, match="serving on the CPU"):
        sess = runtime.make_session(tmp_path / "m.onnx", device="auto")
    assert runtime.session_device(sess) == "cpu"
    assert runtime.cuda_usable() is False  # auto stops asking for CUDA in this process


def test_cuda_sessions_get_provider_options_for_adaptive_batching(fake_ort, tmp_path):
    fake_ort(cuda_loads=True)
    sess = runtime.make_session(tmp_path / "m.onnx", device="cuda:1")
    name, options = sess.providers[0]
    assert name == runtime.CUDA and sess.providers[1] == runtime.CPU
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"  # not EXHAUSTIVE: no per-shape benchmark stall
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["device_id"] == "1"
    assert runtime.session_device(sess) == "cuda"
    assert runtime.warm_up_sizes(8, on_cuda=True) == list(range(1, 9))  # every size batching can form
    assert sorted(runtime.warm_up(sess, (3, 4, 4), max_batch_size=8)) == list(range(1, 9))
    with pytest.raises(ValueError):
        runtime.cuda_provider_options(conv_algo_search="FAST")


def test_real_onnxruntime_here_has_no_cuda_and_warm_up_runs_on_cpu(tmp_path):
    runtime._cuda_probe.cache_clear()
    assert runtime.cuda_usable() is False  # this machine has no GPU
    with pytest.raises(RuntimeError):
        runtime.make_session(tmp_path / "missing.onnx", device="cuda")
    model = tmp_path / "probe.onnx"
    model.write_bytes(runtime._PROBE_MODEL)
    sess = runtime.make_session(model, device="auto")
    assert runtime.session_device(sess) == "cpu"
    assert sorted(runtime.warm_up(sess, (), max_batch_size=16)) == [1, 2, 16]


def test_both_onnxruntime_builds_installed_is_reported(monkeypatch):
    from importlib import metadata

    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: object() if name in ("onnxruntime", "onnxruntime-gpu") else real(name))
    assert "overwrite each other" in runtime.check_single_ort_build()
    monkeypatch.setattr(metadata, "distribution", real)
    assert runtime.check_single_ort_build() is None  # this venv: the CPU build only


# ----------------------------------------------------------------------------- #4 packaging, #5 Makefile

def _requirement_names(reqs) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras_never_require_both_onnxruntime_builds():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, "the base install must not pick an ONNX Runtime build"
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    assert not extras["dev"] & {"onnxruntime", "onnxruntime-gpu"}


def _make_n(*args, venv) -> str:
    out = subprocess.run(["make", "-n", *args, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_makefile_installs_one_build_and_switches_cleanly(tmp_path):
    cpu = _make_n("install", venv=tmp_path / "venv")
    assert '".[cpu,dev,openvino]"' in cpu and '".[gpu' not in cpu   # OpenVINO by default (docs/speed.md)
    assert '".[cpu,dev]"' in _make_n("install", "OPENVINO=0", venv=tmp_path / "venv")
    gpu = _make_n("install", "GPU=1", venv=tmp_path / "venv")
    assert '".[gpu,dev,openvino]"' in gpu
    assert "pip show -q onnxruntime " in gpu and "uninstall -y -q onnxruntime onnxruntime-gpu" in gpu
    # sticky: a venv installed with GPU=1 keeps the GPU build on a plain `make`
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed-gpu").touch()
    os.utime(tmp_path / "venv" / ".installed-gpu", (time.time() + 3600,) * 2)
    assert "[make] setting up" not in _make_n("test", venv=tmp_path / "venv")


def test_export_runs_once_under_nproc_training_stages_under_torchrun(tmp_path):
    venv = tmp_path / "venv"
    assert "torchrun" not in _make_n("export", "NPROC=2", venv=venv)
    assert "-m pipeline export" in _make_n("export", "NPROC=2", venv=venv)
    assert "torchrun --standalone --nproc_per_node=2 -m pipeline finetune" in _make_n("finetune", "NPROC=2", venv=venv)
    multi = _make_n("compress", "NPROC=8", "NNODES=2", "RDZV_ENDPOINT=node1:29400", venv=venv)
    assert "--nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=node1:29400" in multi
    assert "torchrun" not in _make_n("finetune", venv=venv)


def test_bentofile_ships_exactly_one_onnxruntime_build():
    import yaml

    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    names = _requirement_names(packages)
    assert len(names & {"onnxruntime", "onnxruntime-gpu"}) == 1


@pytest.mark.skipif(os.environ.get("EDGEPIPE_PIP_DRY_RUN") != "1",
                    reason="resolves every dependency with pip (minutes, network); EDGEPIPE_PIP_DRY_RUN=1 to run")
@pytest.mark.parametrize("extra, wanted, unwanted", [("gpu", "onnxruntime-gpu", "onnxruntime"),
                                                     ("cpu", "onnxruntime", "onnxruntime-gpu")])
def test_pip_resolution_of_each_extra(tmp_path, extra, wanted, unwanted):
    import json

    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report",
                    str(report), f".[{extra},dev]"], cwd=ROOT, check=True, capture_output=True, timeout=1500)
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert wanted in names and unwanted not in names


# ----------------------------------------------------------------------------- #15 fewer syncs, same results

def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _loss(m, batch):
    x, y = batch
    logits = m(x)
    return nn.functional.cross_entropy(logits, y), logits, y


def _old_train_one_epoch(model, loader, optimizer, scheduler, compute_loss, grad_clip):
    """The loop as it was before issue 15 (three GPU->CPU syncs per step), as the reference."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in loader:
        loss, logits, labels = compute_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@pytest.mark.parametrize("sync_every", [None, 4])  # None: the CPU default (every step); 4: the GPU path
def test_train_one_epoch_is_bit_identical_to_the_old_loop(sync_every):
    x, y = _data(40)
    results = []
    for new in (False, True):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_decay_lambda(10, 2, "cosine"))
        torch.manual_seed(1)
        if new:
            r = engine.train_one_epoch(model, _batches(x, y, 4), opt, sched, _loss, torch.device("cpu"), grad_clip=1.0,
                                       progress=False, sync_every=sync_every)
        else:
            r = _old_train_one_epoch(model, _batches(x, y, 4), opt, sched, _loss, 1.0)
        results.append((model.state_dict(), r))
    (old_w, old_r), (new_w, new_r) = results
    assert all(torch.equal(old_w[k], new_w[k]) for k in old_w)
    assert (new_r["loss"], new_r["accuracy"]) == (old_r["loss"], old_r["accuracy"])


def test_gpu_path_reads_the_device_only_every_n_steps(monkeypatch):
    x, y = _data(80)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = {"n": 0}
    real_item, real_bool = torch.Tensor.item, torch.Tensor.__bool__

    def item(self):
        calls["n"] += 1
        return real_item(self)

    def as_bool(self):
        calls["n"] += 1
        return real_bool(self)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "__bool__", as_bool)
    r = engine.train_one_epoch(model, _batches(x, y, 4), opt, None, _loss, torch.device("cpu"), progress=False,
                               sync_every=50)
    assert r["steps"] == 20
    assert calls["n"] <= 4  # one finiteness read at step 20... and at the end, loss and accuracy: not 3 x 20


def test_nonfinite_loss_on_the_gpu_path_names_the_step_and_no_bad_checkpoint_is_written(tmp_path):
    x, y = _data(40)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "checkpoint.pt"

    def loss_nan_at_2(m, batch, state={"i": 0}):
        loss, logits, labels = _loss(m, batch)
        state["i"] += 1
        return (loss * float("nan") if state["i"] == 3 else loss), logits, labels
    with pytest.raises(FloatingPointError, match="at step 2"):  # read at the end (sync_every 50 > 10 steps)
        engine.train_one_epoch(model, _batches(x, y, 4), opt, None, loss_nan_at_2, torch.device("cpu"),
                               progress=False, sync_every=50)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(FloatingPointError, match="non-finite weights"):  # a checkpoint every step (on_step)
        engine.train_one_epoch(model, _batches(x, y, 4), opt, None,
                               lambda m, b, s={"i": 0}: loss_nan_at_2(m, b, s), torch.device("cpu"), progress=False,
                               sync_every=50, on_step=lambda step: engine.save_checkpoint(
                                   path, model=model.state_dict(), step=step))
    ckpt = engine.load_checkpoint(path)
    assert ckpt["step"] == 2 and engine._all_finite(ckpt["model"])  # the last good state


def test_gradient_accumulation_matches_the_large_batch_and_checkpoints_at_boundaries():
    x, y = _data(16)
    big, small = _model(), _model()
    small.load_state_dict(big.state_dict())
    for m in (big, small):
        m.eval()  # no dropout: the two runs see the same function
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1)
    opt_small = torch.optim.SGD(small.parameters(), lr=0.1)
    engine.train_one_epoch(big, _batches(x, y, 8), opt_big, None, _loss, torch.device("cpu"), progress=False,
                           train_mode=lambda m: None)
    boundaries = []
    r = engine.train_one_epoch(small, _batches(x, y, 4), opt_small, None, _loss, torch.device("cpu"), progress=False,
                               train_mode=lambda m: None, accum_steps=2, on_step=boundaries.append)
    assert boundaries == [2, 4] and r["steps"] == 4
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a last, shorter window still steps the optimizer and is scaled by its own size
    odd, m = [], _model()
    engine.train_one_epoch(m, _batches(*_data(20), 4), torch.optim.SGD(m.parameters(), lr=0.1), None,
                           _loss, torch.device("cpu"), progress=False, accum_steps=2, on_step=odd.append)
    assert odd == [2, 4, 5]


# ----------------------------------------------------------------------------- #1 channels_last vs reload

def test_cpu_copy_of_a_channels_last_model_matches_its_contiguous_reload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    model.to(memory_format=torch.channels_last)
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    reloaded.to(memory_format=torch.contiguous_format)  # what load_model_artifact gives
    copy_ = engine.cpu_copy(model)
    assert all(p.is_contiguous() for p in copy_.parameters())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # the original is untouched
    x = torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy_(x), reloaded(x))


def test_unwrap_sees_through_torch_compile():
    model = _model()
    assert engine.unwrap(torch.compile(model)) is model  # lazy: nothing is compiled here


# ----------------------------------------------------------------------------- #13 LR vs world size

def test_scaled_lr_follows_timm():
    assert engine.scaled_lr(0.002, 32, base_batch=32) == 0.002  # one process: unchanged
    assert engine.scaled_lr(0.002, 256, base_batch=32, optimizer="adamw") == pytest.approx(0.002 * 8 ** 0.5)
    assert engine.scaled_lr(0.1, 256, base_batch=32, optimizer="sgd") == pytest.approx(0.8)
    assert engine.scaled_lr(0.1, 256, base_batch=32, rule="none") == 0.1
    assert engine.scaled_lr(0.1, 64, base_batch=32, rule="sqrt", optimizer="sgd") == pytest.approx(0.1 * 2 ** 0.5)


# ----------------------------------------------------------------------------- #14 loaders

def test_normalize_on_device_equals_to_tensor_and_normalize():
    from torchvision.transforms import v2

    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(img))
    out = engine.normalize_on_device(img, mean, std, torch.device("cpu"))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert engine.loader_settings(torch.device("cuda"), 8) == {"pin_memory": True, "persistent_workers": True,
                                                               "prefetch_factor": 4}
    assert engine.loader_settings(torch.device("cpu"), 0)["persistent_workers"] is False


# ----------------------------------------------------------------------------- #16 resume across devices

def test_scaler_state_from_a_cpu_or_bf16_run_resumes_under_fp16():
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # CPU / bf16 / fp32 runs save {}
    assert saved == {}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        fp16.load_state_dict(saved)  # the defect
    assert engine.restore_scaler(fp16, saved) is False  # a fresh scale instead
    state = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0).state_dict()
    assert engine.restore_scaler(torch.amp.GradScaler("cpu", enabled=False), state) is False  # fp16 -> bf16/CPU
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    assert engine.restore_scaler(fresh, state) is True and fresh.get_scale() == 1024.0


def test_checkpoint_from_a_gpu_run_resumes_on_the_cpu(tmp_path, fake_gpu, monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.train_one_epoch(model, _batches(*_data(8), 4), opt, None, _loss, torch.device("cpu"), progress=False)
    path = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(), scaler={},
                           **engine.checkpoint_meta(torch.device("cuda", 0), torch.bfloat16))
    blob = torch.load(path, weights_only=True)
    blob["rng"]["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # as saved by a 2-GPU process
    torch.save(blob, path)
    ckpt = engine.load_checkpoint(path)
    message = engine.resume_change(ckpt, torch.device("cpu"), None)
    assert "written on cuda (amp bfloat16), resuming on cpu (amp off)" in message
    assert engine.resume_change(ckpt, torch.device("cuda", 1), torch.bfloat16) is None
    resumed = _model(seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    assert engine.restore_scaler(torch.amp.GradScaler("cpu", enabled=False), ckpt["scaler"]) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine.set_rng_state(ckpt["rng"])  # CUDA states ignored without CUDA
    fake_gpu(count=1)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append(i))
    engine.set_rng_state(ckpt["rng"])  # 2 saved GPU states, 1 GPU here: only that one
    assert restored == [0]


def test_load_checkpoint_missing_incompatible_and_io_errors(tmp_path, monkeypatch, capsys):
    assert engine.load_checkpoint(tmp_path / "nope.pt") is None
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert engine.load_checkpoint(junk) is None
    assert "not readable by this version" in capsys.readouterr().out
    newer = tmp_path / "newer.pt"
    torch.save({"format": engine.CHECKPOINT_FORMAT + 1, "model": {}}, newer)
    assert engine.load_checkpoint(newer) is None
    assert "format" in capsys.readouterr().out
    ok = tmp_path / "ok.pt"
    engine.save_checkpoint(ok, epoch=3)
    assert engine.load_checkpoint(ok)["epoch"] == 3

    def eio(path, map_location="cpu"):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(engine.artifacts, "torch_load", eio)
    with pytest.raises(OSError, match="Input/output"):
        engine.load_checkpoint(ok)  # transient: do not throw the run's progress away


# ----------------------------------------------------------------------------- #2, #3, #11, #12: two gloo ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(fn, args=(port, *args), nprocs=2, join=True)


def _init_rank(rank: int, port: int, timeout_s: float, out_dir: str):
    # a stuck collective must fail this test, not hang it
    threading.Timer(60, os._exit, [3]).start()
    # start both ranks together, so a short process-group timeout measures the collectives, not the imports
    Path(out_dir, f"up-{rank}").touch()
    while not Path(out_dir, f"up-{1 - rank}").exists():
        time.sleep(0.01)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return engine.init_distributed("cpu", timeout_s=timeout_s)


def _ranks_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    out = Path(out_dir)
    info, device = _init_rank(rank, port, 60, out_dir)
    results = {}
    # #11: the ranks disagree about their checkpoint -> nobody resumes; all agree -> everybody does
    results["disagree"] = engine.agree_on_resume(rank == 0)
    results["agree"] = engine.agree_on_resume(True)
    # #11 at the root: rank 0 decides and sends its checkpoint; rank 1 has no file (no shared disk)
    path = out / f"ckpt-rank{rank}.pt"
    if rank == 0:
        engine.save_checkpoint(path, model=OrderedDict(w=torch.arange(6.).view(2, 3), mask=torch.tensor([True, False])),
                               epoch=2, history=[{"loss": 0.5}], config_hash="abc")
    ckpt = engine.resume_checkpoint(path, is_valid=lambda c: c["config_hash"] == "abc")
    results["resumed"] = (ckpt["epoch"], ckpt["model"]["w"].tolist(), ckpt["model"]["mask"].tolist(),
                          type(ckpt["model"]).__name__, ckpt["history"])
    results["rejected"] = engine.resume_checkpoint(path, is_valid=lambda c: False)
    # #12: per-rank gradients made equal on every rank
    grads = [torch.full((3,), float(rank)), None]
    engine.all_reduce_mean(grads)
    results["grads"] = grads[0].tolist()
    # #2: work split over ranks, every rank gets the full, ordered result
    results["shard_map"] = engine.shard_map(lambda v: v * v, list(range(7)))
    # #3: sharded evaluation == single-process evaluation, on every rank
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(11, 6, generator=torch.Generator().manual_seed(3)), torch.arange(11) % 3
    samples = list(range(11))

    def make_loader(subset):
        idx = torch.tensor(subset)
        return [(x[idx[i:i + 4]], y[idx[i:i + 4]]) for i in range(0, len(idx), 4)]
    sharded = engine.evaluate_sharded(model, samples, make_loader, device, 3)
    single = engine.evaluate(model, make_loader(samples), device, 3)
    results["eval_equal"] = (sharded["confusion"] == single["confusion"] and sharded["n"] == 11
                             and abs(sharded["loss"] - single["loss"]) < 1e-6)
    # DDP training with gradient accumulation (no_sync between boundaries): ranks end identical
    m = engine.wrap_for_training(_model(), info, device, sync_bn=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    xb, yb = _data(16, seed=rank)
    engine.train_one_epoch(m, _batches(xb, yb, 4), opt, None, _loss, device, progress=False, accum_steps=2)
    w = torch.cat([p.detach().flatten() for p in engine.unwrap(m).parameters()])
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    results["ddp_equal"] = torch.equal(both[0], both[1])
    torch.save(results, out / f"ranks-{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # the watchdog timer thread would keep the process alive


def test_two_gloo_ranks_agree_share_and_evaluate_sharded(tmp_path):
    _spawn(_ranks_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"ranks-{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert r["disagree"] is False and r["agree"] is True
        assert r["resumed"] == (2, [[0., 1., 2.], [3., 4., 5.]], [True, False], "OrderedDict", [{"loss": 0.5}])
        assert r["rejected"] is None
        assert r["grads"] == [0.5, 0.5, 0.5]
        assert r["shard_map"] == [v * v for v in range(7)]
        assert r["eval_equal"] and r["ddp_equal"]


def _slow_rank0_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    info, _ = _init_rank(rank, port, 2.0, out_dir)  # run.dist_timeout_s=2 stands for NCCL's 10 minutes
    dist.barrier()
    items = list(range(16))
    decode = lambda i: (time.sleep(0.25), i)[1]  # noqa: E731 - "decode one image": 4 s for all 16
    t = time.perf_counter()
    results = {"sharded": engine.shard_map(decode, items) == items, "sharded_s": time.perf_counter() - t}
    try:  # the old pattern: rank 0 checks every image while rank 1 waits at a barrier
        if rank == 0:
            [decode(i) for i in items]
        dist.barrier()
        results["rank0_alone"] = "ok"
    except Exception as e:  # noqa: BLE001
        results["rank0_alone"] = type(e).__name__ + ": " + str(e)[:200]
    torch.save(results, Path(out_dir) / f"slow-{rank}.pt")
    os._exit(0)


def test_slow_rank0_hits_the_timeout_sharded_work_does_not(tmp_path):
    _spawn(_slow_rank0_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"slow-{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["sharded"] and r1["sharded"]  # 2 s of work per rank, nobody waits long
    assert "Timed out" in r1["rank0_alone"], r1["rank0_alone"]  # rank 1 gave up waiting for rank 0 after 2 s


def _stage_resume_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    from pipeline.compress import check_same_on_ranks
    from pipeline.stage import Stage

    info, device = _init_rank(rank, port, 10, out_dir)
    results = {}
    # #11 in the stage: rank 0 alone writes and reads checkpoint.pt; rank 1's folder stays empty (no shared disk)
    stage = Stage(name="finetune", cfg=None, dir=Path(out_dir, f"stage-rank{rank}"), dist=info, device=device)
    stage.dir.mkdir()
    stage.save_checkpoint(None, model=OrderedDict(w=torch.arange(4.)), config_hash="abc", epoch=3)
    results["files"] = sorted(p.name for p in stage.dir.iterdir())
    ckpt = stage.resume_checkpoint(lambda c: c["config_hash"] == "abc", "off")
    results["resumed"] = (ckpt["epoch"], ckpt["model"]["w"].tolist(), ckpt["device_type"], ckpt["amp"])
    results["rejected"] = stage.resume_checkpoint(lambda c: False, "off")
    # #12: the pruning check passes together, and fails together (rank 1 pruned other channels)
    check_same_on_ranks([{"layer": "conv", "idxs": [1, 2]}], "pruning step 1")
    try:
        check_same_on_ranks([{"layer": "conv", "idxs": [1, 2 + rank]}], "pruning step 2")
        results["differs"] = None
    except RuntimeError as e:
        results["differs"] = str(e)
    dist.barrier()  # still in step after the error: no rank was left behind in a collective
    torch.save(results, Path(out_dir, f"stage-{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)


def test_stage_resume_is_rank0s_checkpoint_and_a_pruning_mismatch_fails_every_rank(tmp_path):
    _spawn(_stage_resume_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"stage-{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["files"] == ["checkpoint.pt"] and r1["files"] == []
    for r in (r0, r1):
        assert r["resumed"] == (3, [0., 1., 2., 3.], "cpu", "off")  # rank 1 got rank 0's copy
        assert r["rejected"] is None
        assert r["differs"] is not None and "pruning step 2 differs between DDP ranks" in r["differs"]


# ----------------------------------------------------------------------------- #15 defect 2: data prep on every rank

PREP_TIMEOUT_S, DECODE_S, PREP_IMAGES = 5.0, 0.3, 25  # 3 classes x 8 images + one empty file


def _info_dict(info) -> dict:
    return {"classes": info.classes, "train": info.train, "val": info.val, "test": info.test,
            "skipped": info.skipped, "fingerprint": info.fingerprint, "split_names": info.split_names}


def _prepare_data_worker(rank: int, port: int, out_dir: str, data_root: str, run_dir: str):
    import torch.distributed as dist
    from conftest import tiny_config

    from pipeline import artifacts, data

    cfg = tiny_config(run_dir, data_root, "data.bad_images=skip")
    decoded, hashed, written = [], [], []
    real_open, real_sha, real_write = data.open_image, artifacts.sha256_file, artifacts.write_json

    def slow_open(path):  # "decoding one image" takes DECODE_S: all of them on one rank outlast the timeout
        decoded.append(path)
        time.sleep(DECODE_S)
        return real_open(path)

    def counted_sha(path, *args):
        hashed.append(str(path))
        return real_sha(path, *args)

    def counted_write(path, obj):
        written.append(Path(path).name)
        real_write(path, obj)
    data.open_image, artifacts.sha256_file, artifacts.write_json = slow_open, counted_sha, counted_write
    _init_rank(rank, port, PREP_TIMEOUT_S, out_dir)  # run.dist_timeout_s=5 stands for NCCL's 10 minutes
    calls = []
    for _ in range(2):  # the second call finds the caches rank 0 wrote in the first
        t = time.perf_counter()
        info = data.prepare_data_all_ranks(cfg, is_main=rank == 0)
        calls.append({"info": _info_dict(info), "seconds": time.perf_counter() - t, "decoded": list(decoded),
                      "hashed": list(hashed), "written": list(written)})
        for seen in (decoded, hashed, written):
            seen.clear()
    listing = data._list_class_folder

    def one_image_less(folder):
        classes, files = listing(folder)
        return classes, {**files, classes[0]: files[classes[0]][1:]}
    if rank == 1:  # this rank lists one image less than rank 0: both must fail, neither may hang
        data._list_class_folder = one_image_less
    try:
        data.prepare_data_all_ranks(cfg, is_main=rank == 0)
        mismatch = "no error"
    except data.DataError as e:
        mismatch = str(e)
    Path(out_dir, f"prep-{rank}.json").write_text(json.dumps({"calls": calls, "mismatch": mismatch}))
    dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def prepared_on_two_ranks(tmp_path_factory):
    """Two gloo ranks run prepare_data_all_ranks twice (then once with listings that differ), shared run.dir."""
    from conftest import make_imagefolder

    tmp = tmp_path_factory.mktemp("prep_ranks")
    root = make_imagefolder(tmp / "data", per_class=8, size=16)
    (root / "circle" / "zz_empty.png").write_bytes(b"")  # a bad image: its verdict must reach both ranks
    _spawn(_prepare_data_worker, str(tmp), str(root), str(tmp / "run"))
    return tmp, root, [json.loads((tmp / f"prep-{r}.json").read_text()) for r in (0, 1)]


def test_prepare_data_on_two_gloo_ranks_shares_the_decode_within_a_short_timeout(prepared_on_two_ranks):
    from conftest import tiny_config

    from pipeline.data import prepare_data

    tmp, root, (r0, r1) = prepared_on_two_ranks
    # the test's own premise: one rank decoding everything would outlast the timeout, half of it would not
    assert PREP_IMAGES * DECODE_S > PREP_TIMEOUT_S > (PREP_IMAGES + 1) // 2 * DECODE_S
    first0, first1 = r0["calls"][0], r1["calls"][0]
    assert len(first0["decoded"]) == 13 and len(first1["decoded"]) == 12  # every rank decoded its half ...
    assert sorted(first0["decoded"] + first1["decoded"]) == sorted(str(p) for p in root.rglob("*.png"))  # once
    assert first0["info"] == first1["info"]  # identical splits, fingerprint and skipped list on both ranks
    single = prepare_data(tiny_config(tmp / "single", root, "data.bad_images=skip"))  # the one-process path
    assert json.loads(json.dumps(_info_dict(single))) == first0["info"]
    assert first0["info"]["skipped"] == [str(root / "circle" / "zz_empty.png")]


def test_prepare_data_second_call_with_caches_decodes_and_hashes_nothing_on_any_rank(prepared_on_two_ranks):
    _, _, (r0, r1) = prepared_on_two_ranks
    assert r0["calls"][0]["hashed"] and r1["calls"][0]["hashed"]  # the first call split the hashing too
    for r in (r0, r1):
        second = r["calls"][1]
        assert second["decoded"] == [] and second["hashed"] == [], second
        assert second["info"] == r0["calls"][0]["info"]


def test_prepare_data_only_rank0_writes_the_caches(prepared_on_two_ranks):
    tmp, _, (r0, r1) = prepared_on_two_ranks
    assert sorted(r0["calls"][0]["written"]) == ["data_check.json", "file_hashes.json", "splits.json"]
    assert r1["calls"][0]["written"] == [] and r1["calls"][1]["written"] == []
    assert r0["calls"][1]["written"] == []  # up to date: a rerun rewrites nothing
    assert {p.name for p in (tmp / "run").iterdir()} == {"data_check.json", "file_hashes.json", "splits.json"}


def test_prepare_data_ranks_listing_different_images_fail_together(prepared_on_two_ranks):
    _, _, (r0, r1) = prepared_on_two_ranks
    for r in (r0, r1):  # an error on every rank instead of mismatched shards or one rank left in a collective
        assert "list different images" in r["mismatch"], r["mismatch"]


def test_prepare_data_write_false_reads_the_caches_and_writes_nothing(make_config, monkeypatch):
    from pipeline import artifacts, data

    cfg = make_config()
    before = data.prepare_data(cfg)  # writes file_hashes.json, data_check.json, splits.json
    monkeypatch.setattr(data, "open_image", lambda path: pytest.fail(f"decoded {path} despite data_check.json"))
    monkeypatch.setattr(artifacts, "sha256_file", lambda path, *a: pytest.fail(f"hashed {path} despite the cache"))
    monkeypatch.setattr(artifacts, "write_json", lambda path, obj: pytest.fail(f"wrote {path}"))
    after = data.prepare_data(cfg, write=False)
    assert _info_dict(after) == _info_dict(before)


# ----------------------------------------------------------------------------- #3 wired in: probe, teacher logits

def _tensor_loader(x, y, bs=4):
    """make_loader(subset of indices) over in-memory tensors (the stages pass data.eval_loaders)."""
    def make(subset):
        idx = torch.tensor([int(i) for i in subset], dtype=torch.long)
        return [(x[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, len(idx), bs)]
    return make


def test_sharded_probe_in_one_process_is_the_old_probe_bit_for_bit():
    from pipeline import probe

    model, (x, y) = _model().eval(), _data(23, seed=5)
    make = _tensor_loader(x, y)
    samples = list(range(23))
    f_old, l_old = probe.pooled_features(model, make(samples), torch.device("cpu"))
    f_new, l_new = probe.pooled_features_sharded(model, samples, make, torch.device("cpu"))
    assert np.array_equal(f_old, f_new) and np.array_equal(l_old, l_new) and f_new.dtype == np.float32
    splits = {"train": samples[:13], "val": samples[13:19], "test": samples[19:]}
    fitted = probe.fit_sharded(model, splits, make, torch.device("cpu"), 3, seed=0)
    loaders = {s: make(v) for s, v in splits.items()}
    old, feats = probe.probe_model(copy.deepcopy(model), loaders, torch.device("cpu"), 3)
    assert np.array_equal(fitted["weight"], old["weight"]) and np.array_equal(fitted["bias"], old["bias"])
    assert (fitted["C"], fitted["selection_accuracy"]) == (old["C"], old["selection_accuracy"])
    test_logits = probe.probe_logits(old, feats["test"][0])
    assert fitted["test_accuracy"] == float((test_logits.argmax(1) == feats["test"][1]).mean())
    assert torch.equal(model[-1].weight, _model()[-1].weight)  # fit_sharded leaves the head to set_head


def _fake_compression(model, out_dir, rank, x, y, device):
    from types import SimpleNamespace

    data = SimpleNamespace(train=[(f"img{i}", int(y[i])) for i in range(len(y))], fingerprint="fp")
    stage = SimpleNamespace(dir=Path(out_dir), is_main=rank == 0, log=lambda message: None)
    return SimpleNamespace(data=data, stage=stage, teacher_sha="sha", teacher_pre={"size": 1}, teacher=model,
                           cfg=None, device=device, num_classes=3, amp=None)


def _sharded_stage_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    from pipeline import compress, probe

    info, device = _init_rank(rank, port, 60, out_dir)
    model, (x, y) = _model().eval(), _data(23, seed=5)
    make = _tensor_loader(x, y)
    samples = list(range(23))
    results = {"features": probe.pooled_features_sharded(model, samples, make, device)}
    splits = {"train": samples[:13], "val": samples[13:19], "test": samples[19:]}
    fitted = probe.fit_sharded(model, splits, make, device, 3, seed=0)
    results["probe"] = {k: fitted[k] for k in ("weight", "bias", "C", "selection_accuracy", "test_accuracy")}
    # the teacher-logit cache: computed sharded (rank 0 saves), then read back by rank 0 and sent to rank 1
    by_path = _tensor_loader(x, y)
    compress.eval_loaders = lambda pre, cfg, device: (lambda subset: by_path([p[3:] for p, _ in subset]))
    job = _fake_compression(model, out_dir, rank, x, y, device)
    results["cache_computed"] = compress.Compression.teacher_logit_cache(job)
    dist.barrier()
    if rank == 1:  # rank 1 must not need the file: it gets rank 0's copy
        compress.artifacts.torch_load = None
    results["cache_read"] = compress.Compression.teacher_logit_cache(job)
    torch.save(results, Path(out_dir) / f"sharded-{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


def test_two_gloo_ranks_share_the_probe_pass_and_the_teacher_logit_cache(tmp_path):
    from pipeline import probe

    _spawn(_sharded_stage_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"sharded-{r}.pt", weights_only=False) for r in (0, 1))
    model, (x, y) = _model().eval(), _data(23, seed=5)
    feats, labels = probe.pooled_features(model, _tensor_loader(x, y)(range(23)), torch.device("cpu"))
    with torch.no_grad():
        logits = model(x)
    for r in (r0, r1):
        np.testing.assert_allclose(r["features"][0], feats, rtol=0, atol=1e-6)  # every rank has every image, in order
        assert np.array_equal(r["features"][1], labels)
        torch.testing.assert_close(r["cache_computed"], logits, rtol=0, atol=1e-6)
        assert torch.equal(r["cache_read"], r0["cache_computed"])
    for k in ("weight", "bias"):  # rank 0 fitted, rank 1 got exactly that
        assert np.array_equal(r0["probe"][k], r1["probe"][k])
    assert r0["probe"]["C"] == r1["probe"]["C"] and r0["probe"]["test_accuracy"] == r1["probe"]["test_accuracy"]
    saved = torch.load(tmp_path / "teacher_logits.pt", weights_only=True)
    assert torch.equal(saved["logits"], r0["cache_computed"])


# ----------------------------------------------------------------------------- #15 defect 3: the report rows

REPORT_TIMEOUT_S = 5.0  # run.dist_timeout_s, standing for NCCL's 10 minutes
REPORT_OVERRIDES = ("data.batch_size=1", "finetune.probe_init=false", "student.weights=none", "compress.epochs=0",
                    "compress.pruning_steps=0", "compress.probe_init=false")


@pytest.fixture(scope="module")
def report_data(tmp_path_factory):
    from conftest import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("report_data"), per_class=8, size=16)  # 6 val, 6 test images


def _slow_predict(passes: list, batch_s: float) -> None:
    """engine.predict with every batch `batch_s` slower (a big model on real data); `passes` gets the number of
    images of each evaluation pass this rank runs."""
    real = engine.predict

    def slow(model, loader, *args, **kwargs):
        seen = []

        def batches():
            for batch in loader:
                time.sleep(batch_s)
                seen.append(len(batch[-1]))
                yield batch
        out = real(model, batches(), *args, **kwargs)
        passes.append(sum(seen))
        return out
    engine.predict = slow


def _trained(stage, model, pre, data, phases, state, ckpt, chash):
    """finetune.train without the epochs: rank 0 keeps the model as best.pt (as consider_best does), one epoch of
    history (so the plots are drawn too)."""
    from models import save_model_artifact

    if stage.is_main:
        save_model_artifact(stage.dir / "best.pt", model, name=stage.cfg.teacher.name, classes=data.classes,
                            preprocessing=pre, extra={"epoch": 0, "selected": "epoch", "val_accuracy": 0.5})
    record = {"epoch": 0, "phase": "full", "lr": 0.01, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0,
              "val_accuracy": 0.5, "images_per_s": 1.0, "resumed_mid_epoch": False}
    return {**state, "epoch": 1, "best_accuracy": 0.5, "best_epoch": 0, "history": [record]}


def _report_rows_worker(rank: int, port: int, out_dir: str, data_root: str, run_dir: str, stage: str, batch_s: float):
    import matplotlib
    from conftest import tiny_config

    from pipeline import artifacts, compress, finetune

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported before the timeout starts: the imports are not what is measured
    cfg = tiny_config(run_dir, data_root, *REPORT_OVERRIDES)
    passes, written, real_write = [], [], artifacts.write_json
    _slow_predict(passes, batch_s)
    artifacts.write_json = lambda path, obj: (written.append(Path(path).name), real_write(path, obj))[1]
    finetune.train = _trained
    _init_rank(rank, port, REPORT_TIMEOUT_S, out_dir)
    try:
        (finetune if stage == "finetune" else compress).run(cfg)
        error = None
    except Exception as e:  # noqa: BLE001 - the old code: rank 1 timed out waiting for rank 0's evaluation
        error = f"{type(e).__name__}: {str(e)[:300]}"
    Path(out_dir, f"{stage}-{rank}.json").write_text(json.dumps({"error": error, "passes": passes, "written": written}))
    os._exit(0)


def _run_report_rows(tmp_path, data_root, stage: str, batch_s: float):
    """Both ranks run the stage with a slow model; -> (rank 0's and rank 1's record, cfg, data)."""
    from conftest import tiny_config

    from pipeline.data import prepare_data

    cfg = tiny_config(tmp_path / "run", data_root, *REPORT_OVERRIDES)
    data = prepare_data(cfg)  # the data caches: the ranks do not decode (tested above)
    if stage == "compress":  # a finished finetune stage: teacher.pt and its manifest
        from models import build_model, save_model_artifact
        from pipeline import artifacts
        from pipeline.data import resolve_preprocessing

        teacher, pretrained = build_model(cfg.teacher.name, len(data.classes), "none")
        save_model_artifact(cfg.run_dir / "finetune" / "teacher.pt", teacher, name=cfg.teacher.name,
                            classes=data.classes, preprocessing=resolve_preprocessing(pretrained, cfg.data))
        artifacts.write_manifest(cfg.run_dir / "finetune", "finetune", "test", {}, ["teacher.pt"], {})
    _spawn(_report_rows_worker, str(tmp_path), str(data_root), str(cfg.run_dir), stage, batch_s)
    r0, r1 = (json.loads((tmp_path / f"{stage}-{r}.json").read_text()) for r in (0, 1))
    return r0, r1, cfg, data


def _one_process_figures(model, pre, cfg, samples, classes) -> dict:
    """The figures as one process computes them (the old rank-0 code), through JSON like metrics.json."""
    from pipeline.data import make_loader

    loader = make_loader(samples, pre, cfg, train=False)
    return json.loads(json.dumps(engine.evaluate(model, loader, torch.device("cpu"), len(classes), classes)))


def _assert_same_figures(sharded: dict, single: dict) -> None:
    # the logits of a shard's batches differ from one process's in the last bits, so the losses match to 1e-6 and
    # the best temperature to one step of calibrated_loss's grid (a near-tie between two grid points can flip)
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert sharded["calibrated_loss"] == pytest.approx(single["calibrated_loss"], abs=1e-6)
    grid_step = math.log10(engine.TEMPERATURES[1] / engine.TEMPERATURES[0])
    assert abs(math.log10(sharded["temperature"] / single["temperature"])) <= grid_step + 1e-9
    inexact = {"loss": None, "calibrated_loss": None, "temperature": None}
    assert {**sharded, **inexact} == {**single, **inexact}  # accuracy, n, confusion matrix, per-class


def test_finetune_report_figures_are_shared_by_two_gloo_ranks_within_a_short_timeout(tmp_path, report_data):
    from models import load_model_artifact

    batch_s = 0.6
    r0, r1, cfg, data = _run_report_rows(tmp_path, report_data, "finetune", batch_s)
    n_val, n_test = len(data.val), len(data.test)
    # the test's premise: the best checkpoint on both splits, evaluated by one rank, outlasts the timeout
    assert (n_val + n_test) * batch_s > REPORT_TIMEOUT_S
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["passes"] == [(n_val + 1) // 2, (n_test + 1) // 2] and r1["passes"] == [n_val // 2, n_test // 2]
    assert r1["written"] == [] and "metrics.json" in r0["written"]  # rank 0 alone writes
    metrics = json.loads((cfg.run_dir / "finetune" / "metrics.json").read_text())
    teacher, meta = load_model_artifact(cfg.run_dir / "finetune" / "teacher.pt")
    for split, samples in (("val", data.val), ("test", data.test)):
        _assert_same_figures(metrics[split], _one_process_figures(teacher, meta["preprocessing"], cfg, samples,
                                                                  data.classes))
    assert (metrics["val_accuracy"], metrics["test_accuracy"]) == (metrics["val"]["accuracy"],
                                                                   metrics["test"]["accuracy"])


def test_compress_report_rows_are_shared_by_two_gloo_ranks_within_a_short_timeout(tmp_path, report_data):
    from models import load_model_artifact

    batch_s = 0.2
    r0, r1, cfg, data = _run_report_rows(tmp_path, report_data, "compress", batch_s)
    n_val, n_test = len(data.val), len(data.test)
    # the premise: teacher, student and pruned on both splits, evaluated by one rank, outlast the timeout
    assert 3 * (n_val + n_test) * batch_s > REPORT_TIMEOUT_S
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    passes = [n_val] + [n_val, n_test] * 3  # the student's selection accuracy after distillation, then the rows
    assert r0["passes"] == [(n + 1) // 2 for n in passes] and r1["passes"] == [n // 2 for n in passes]
    assert r1["written"] == [] and "metrics.json" in r0["written"]
    metrics = json.loads((cfg.run_dir / "compress" / "metrics.json").read_text())
    for role, path in (("teacher", cfg.run_dir / "finetune" / "teacher.pt"),
                       ("student", cfg.run_dir / "compress" / "student.pt"),
                       ("pruned", cfg.run_dir / "compress" / "pruned.pt")):
        model, meta = load_model_artifact(path)
        for split, samples in (("val", data.val), ("test", data.test)):
            _assert_same_figures(metrics["evaluation"][role][split],
                                 _one_process_figures(model, meta["preprocessing"], cfg, samples, data.classes))
        assert metrics[role]["test_accuracy"] == metrics["evaluation"][role]["test"]["accuracy"]


# ----------------------------------------------------------------------------- #14 wired in: loaders

def test_loaders_pin_and_persist_only_where_it_helps_and_uint8_batches_are_bit_identical(make_config):
    from torch.utils.data import DataLoader

    from pipeline.data import DeviceBatches, eval_loaders, make_loader, prepare_data
    from pipeline.preprocess import make_preprocessing

    cfg = make_config()
    info = prepare_data(cfg)
    pre = make_preprocessing(32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "bilinear", 1.0)
    pre2 = make_preprocessing(40, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], "bicubic", 0.875)
    # uint8 through the loader + normalize on the device == ToTensor + Normalize in the workers, bit for bit
    for kw in ({"train": True, "epoch": 1, "extra_pre": pre2}, {"train": False}):
        ref = list(make_loader(info.train, pre, cfg, **kw))
        dev = make_loader(info.train, pre, cfg, uint8=True, **kw)
        assert isinstance(dev, DeviceBatches) and len(dev) == len(ref)
        got = list(dev)
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert len(a) == len(b) and all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b))
    # CPU (the default): plain loaders, no pinned memory, data order as before
    cpu_train = make_loader(info.train, pre, cfg, train=True)
    assert isinstance(cpu_train, DataLoader) and not cpu_train.pin_memory and not cpu_train.persistent_workers
    # CUDA: pinned memory, uint8 + DeviceBatches; workers persist for the eval loaders only (built once, reused)
    cfg.run.workers = 2
    cuda = torch.device("cuda", 0)
    train = make_loader(info.train, pre, cfg, train=True, device=cuda)
    assert isinstance(train, DeviceBatches) and train.loader.pin_memory and not train.loader.persistent_workers
    assert train.device == cuda
    make_eval = eval_loaders(pre, cfg, cuda)
    val = make_eval(info.val)
    assert val.loader.pin_memory and val.loader.persistent_workers and val.loader.prefetch_factor == 4
    assert make_eval(list(info.val)) is val and make_eval(info.test) is not val
    cpu_val = eval_loaders(pre, cfg)(info.val)
    assert isinstance(cpu_val, DataLoader) and cpu_val.persistent_workers and not cpu_val.pin_memory


# ----------------------------------------------------------------------------- export: recommended.cuda

def _cuda_pool(tmp_path, max_int8_drop=1.0):
    from types import SimpleNamespace

    from pipeline import export

    from serve_utils import SIZE, make_tiny_export

    export_dir = make_tiny_export(tmp_path / "export")
    x = np.random.default_rng(0).normal(0, 1, (40, 3, SIZE, SIZE)).astype(np.float32)
    sess = runtime.make_session(export_dir / "model.fp32.onnx", "cpu")
    y = sess.run(None, {"input": x})[0].argmax(1)
    ce = SimpleNamespace(latency_runs=2, latency_threads=1, parity_atol=1e-3, min_top1_agreement=0.5,
                         max_int8_drop=max_int8_drop)
    pool = SimpleNamespace(x=x, y=y, teacher_correct=np.ones(len(y), dtype=bool), probe_correct=None, ce=ce,
                           cfg=SimpleNamespace(run=SimpleNamespace(max_accuracy_drop=1.0)))
    pool.end_to_end = lambda correct: export.Candidates.end_to_end(pool, correct)  # the real gates, on this stand-in
    return export_dir, pool


@pytest.fixture
def fake_cuda_ep(monkeypatch):
    """ONNX Runtime as if its CUDA provider worked: 'cuda' sessions are CPU sessions; latencies scripted."""
    real = runtime.make_session
    monkeypatch.setattr(runtime, "cuda_usable", lambda: True)
    monkeypatch.setattr(runtime, "make_session",
                        lambda path, device="auto", threads=0, **kw: real(path, "cpu", threads, **kw))

    def script(int8_ms: float, fp32_ms: float, fail: bool = False):
        def compare(paths, batch, runs=20, threads=0, parity_atol=1e-3, device="cuda"):
            if fail:
                raise RuntimeError("CUDA failure: out of memory")
            row = lambda ms: {"cpu_ms": 9.0, "cuda_ms": ms, "max_abs_diff": 0.0, "top1_agreement": 1.0,  # noqa: E731
                              "on_cuda": True}
            return {"variants": {"int8": row(int8_ms), "fp32": row(fp32_ms)}, "recommended": None}
        monkeypatch.setattr(runtime, "compare_cuda_cpu", compare)
    return script


def test_recommended_cuda_is_fp32_by_rule_without_a_usable_cuda_ep(tmp_path, monkeypatch):
    from pipeline import export

    export_dir, pool = _cuda_pool(tmp_path)
    monkeypatch.setattr(runtime, "cuda_usable", lambda: False)
    files = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
    rec = export.recommend_cuda(export_dir, pool, files)
    assert rec["cuda"] == rec["server-cuda"]
    assert rec["cuda"]["variant"] == "fp32" and rec["cuda"]["file"] == "model.fp32.onnx"
    assert "not measured" in rec["cuda"]["why"] and rec["cuda"]["measured"] is None
    assert rec["cuda"]["execution_provider"] == "CUDA" and rec["cuda"]["runtime"] == runtime.ONNXRUNTIME
    only_fp32 = export.recommend_cuda(export_dir, pool, {"fp32": "model.fp32.onnx", "int8": None})["cuda"]
    assert only_fp32["variant"] == "fp32"


def test_recommended_cuda_is_the_faster_file_that_passes_the_gates(tmp_path, fake_cuda_ep):
    from pipeline import export

    export_dir, pool = _cuda_pool(tmp_path)
    files = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
    fake_cuda_ep(int8_ms=1.0, fp32_ms=2.0)
    rec = export.recommend_cuda(export_dir, pool, files)["server-cuda"]
    assert rec["variant"] == "int8" and rec["file"] == "model.int8.onnx", rec["why"]
    assert rec["measured"]["int8"]["ok"] and rec["measured"]["int8"]["cuda_ms_b1"] == 1.0
    assert "measured on CUDA" in rec["why"] and "passes the accuracy gates" in rec["why"]
    assert "gates" in json.dumps(rec)  # model.json holds it as is
    fake_cuda_ep(int8_ms=3.0, fp32_ms=2.0)  # int8 slower on this GPU
    assert export.recommend_cuda(export_dir, pool, files)["cuda"]["variant"] == "fp32"
    fake_cuda_ep(int8_ms=1.0, fp32_ms=2.0, fail=True)  # a broken CUDA setup does not fail the export
    rec = export.recommend_cuda(export_dir, pool, files)["cuda"]
    assert rec["variant"] == "fp32" and "measurement failed" in rec["why"] and "out of memory" in rec["why"]
    export_dir2, strict = _cuda_pool(tmp_path / "strict", max_int8_drop=-1.0)  # int8 fails its accuracy gate
    fake_cuda_ep(int8_ms=1.0, fp32_ms=2.0)
    rec = export.recommend_cuda(export_dir2, strict, files)["cuda"]
    assert rec["variant"] == "fp32" and "fails export.max_int8_drop vs fp32" in rec["why"]


# ----------------------------------------------------------------------------- serving: BentoML resources

def test_service_requests_a_gpu_only_when_it_serves_on_one(tmp_path):
    from serving.settings import service_resources

    assert service_resources("cuda") == service_resources("CUDA:0", threads=4) == {"gpu": 1}
    assert service_resources("cpu") == {} and service_resources("cpu", threads=4) == {"cpu": "4"}
    assert service_resources("auto", gpu_present=lambda: True) == {"gpu": 1}
    assert service_resources("auto", 2, gpu_present=lambda: False) == {"cpu": "2"}
    asked = []
    assert service_resources("cpu", gpu_present=lambda: asked.append(1) or True) == {} and asked == []
    assert service_resources("cuda:1") == {}  # BentoML's allocator would renumber the GPUs under cuda:1
    # the decorator reads it at import (no session is created then), torch-free
    code = "import json, serving.service as s; print(json.dumps(s.ImageClassifier.config.get('resources')))"
    for device, expected in (("cuda", {"gpu": 1}), ("auto", {})):  # auto: this machine has no GPU
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPIPE_DEVICE": device,
               "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
        env.pop("EDGEPIPE_THREADS", None)
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


# ----------------------------------------------------------------------------- #16 checkpoints record their device

def test_checkpoint_records_its_device_and_a_resume_on_another_says_not_bit_identical(make_config, monkeypatch,
                                                                                       capsys):
    from pipeline import artifacts, finetune

    cfg = make_config("finetune.max_steps_per_epoch=1")

    def interrupted(*args, **kwargs):  # killed after the last epoch's checkpoint, before the artifacts
        raise KeyboardInterrupt
    real_finish = finetune.finish
    monkeypatch.setattr(finetune, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg)
    path = cfg.run_dir / "finetune" / "checkpoint.pt"
    ckpt = engine.load_checkpoint(path)
    assert (ckpt["device_type"], ckpt["amp"]) == ("cpu", "off")
    artifacts.torch_save({**ckpt, "device_type": "cuda", "amp": "bfloat16"}, path)  # as if a GPU had written it
    monkeypatch.setattr(finetune, "finish", real_finish)
    capsys.readouterr()
    assert finetune.run(cfg)["skipped"] is False
    out = capsys.readouterr().out
    assert "checkpoint written on cuda (amp bfloat16), resuming on cpu (amp off)" in out
    assert "not bit-identical to an uninterrupted run" in out and "resuming at epoch" in out


# ----------------------------------------------------------------------------- #5 export and serve under torchrun

def test_export_and_serve_run_once_on_rank_0_under_torchrun(make_config, monkeypatch, capsys):
    import torch.distributed as dist

    from pipeline import export, serve
    from pipeline.stage import StageError

    cfg = make_config()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert export.run(cfg)["skipped"] is True and serve.run(cfg)["skipped"] is True
    out = capsys.readouterr().out
    assert "[export] rank 1 of 2: export runs in one process (rank 0); this rank exits" in out
    assert "[serve] rank 1 of 2: serve runs in one process (rank 0); this rank exits" in out
    assert not (cfg.run_dir / "export").exists() and not (cfg.run_dir / ".lock").exists()
    monkeypatch.setenv("RANK", "0")  # rank 0 runs the stage itself: here it stops at the missing upstream stages
    with pytest.raises(StageError, match="has not finished"):
        export.run(cfg)
    with pytest.raises(FileNotFoundError, match="make export"):
        serve.run(cfg)
    assert not dist.is_initialized()
    assert "export runs once, on rank 0, without a process group" in capsys.readouterr().out


# ----------------------------------------------------------------------------- #15 one physical GPU per rank

def test_shared_gpu_error_names_the_ranks_that_share_and_the_fix():
    assert engine.shared_gpu_error([("n1", "uuid A"), ("n1", "uuid B")]) is None
    assert engine.shared_gpu_error([("n1", "uuid A"), ("n2", "uuid A")]) is None  # two machines: two GPUs
    assert engine.shared_gpu_error([("n1", "uuid A")]) is None
    # what _store_all_gather returns (JSON: lists); rank 3 on another host with the same name is not sharing
    msg = engine.shared_gpu_error([["n1", "uuid A"], ["n1", "uuid B"], ["n1", "uuid A"], ["n2", "uuid A"]])
    assert "ranks 0, 2 on n1 share one GPU (uuid A)" in msg and "n2" not in msg
    assert "Unset CUDA_VISIBLE_DEVICES" in msg and "its own GPU" in msg and "--nproc_per_node" in msg


def test_gpu_identity_is_the_uuid_then_the_pci_address_then_the_physical_index(monkeypatch):
    from types import SimpleNamespace

    props = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    props[0] = SimpleNamespace(uuid="GPU-8a1f", pci_bus_id=0x3B, pci_domain_id=0, pci_device_id=0)
    assert engine._gpu_identity(0) == "uuid GPU-8a1f"
    props[0] = SimpleNamespace(uuid="00000000-0000-0000-0000-000000000000", pci_bus_id=0x3B, pci_domain_id=0,
                               pci_device_id=0)  # an all-zero UUID names no GPU
    assert engine._gpu_identity(0) == "pci 0000:3b:00"
    props[1] = SimpleNamespace(uuid=None)  # neither: the physical index behind visible index 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert engine._gpu_identity(1) == "index 5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert engine._gpu_identity(1) == "index 1"


def _shared_gpu_worker(rank: int, port: int, out_dir: str, port2: int):
    """One rank of torchrun on a host where each rank sees one GPU as cuda:0 (mocked torch.cuda, no NCCL)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    threading.Timer(60, os._exit, [3]).start()  # a rank left waiting must fail the test, not hang it
    calls = []
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    dist.init_process_group = lambda **kw: calls.append(kw)  # stands for NCCL: records what it would get
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="0")
    results = {}
    # shared: CUDA_VISIBLE_DEVICES=0 exported to both ranks; own: the launcher gave each rank its own GPU 0
    for case, p, uuid in (("shared", port, "GPU-same"), ("own", port2, f"GPU-rank{rank}")):
        torch.cuda.get_device_properties = lambda i, u=uuid: SimpleNamespace(uuid=u)
        os.environ["MASTER_PORT"] = str(p)
        calls.clear()
        try:
            _, device = engine.init_distributed("auto", timeout_s=20)
            kw = calls[0]
            results[case] = ["ok", str(device), kw["backend"], str(kw["device_id"]), kw["rank"], kw["world_size"],
                             type(kw["store"]).__name__]
        except RuntimeError as e:
            results[case] = ["error", str(e), len(calls)]
        # rank 0 hosts the store: it stays until rank 1 is done with it (the mocked NCCL init does not wait)
        Path(out_dir, f"{case}-done-{rank}").touch()
        while rank == 0 and not Path(out_dir, f"{case}-done-1").exists():
            time.sleep(0.01)
    Path(out_dir, f"shared-gpu-{rank}.json").write_text(json.dumps(results))
    os._exit(0)


def test_two_ranks_on_one_physical_gpu_both_raise_before_nccl_starts(tmp_path):
    _spawn(_shared_gpu_worker, str(tmp_path), _free_port())
    host = socket.gethostname()
    for rank in (0, 1):
        r = json.loads((tmp_path / f"shared-gpu-{rank}.json").read_text())
        status, msg, nccl_calls = r["shared"]
        assert status == "error" and nccl_calls == 0, r["shared"]  # every rank raised, none reached NCCL
        assert f"ranks 0, 1 on {host} share one GPU (uuid GPU-same)" in msg and "--nproc_per_node" in msg
        assert r["own"] == ["ok", "cuda:0", "nccl", "cuda:0", rank, 2, "PrefixStore"], r["own"]


# ----------------------------------------------------------------------------- #15 make gpu-check without a GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check (minutes)")
def test_gpu_check_on_a_machine_without_a_gpu_says_so_and_exits_0():
    python = ROOT / ".venv" / "bin" / "python"
    python = str(python) if python.exists() else sys.executable
    t = time.perf_counter()
    # what `make gpu-check` runs; without a GPU the plain command stops after one line (2-3 s), --cpu-smoke not needed
    out = subprocess.run([python, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA GPU is visible" in out.stdout and "nothing to check on this machine" in out.stdout
    assert time.perf_counter() - t < 60
