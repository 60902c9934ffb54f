"""models/: preprocessing dicts (byte-identical JSON), hash-checked weights_only torchvision weights,
artifact format and atomic saves. No network: weights files are made here, in a temporary TORCH_HOME."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch

import models
from models import build
from models import build_model, load_model_artifact, plain_history, save_model_artifact
from models.build import WeightsUnavailable

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _pre(size, resize, interp, mean, std):
    return {"input_size": [3, size, size], "resize_size": resize, "crop_size": size, "interpolation": interp,
            "mean": mean, "std": std, "channel_order": "RGB", "layout": "NCHW", "value_range": 1.0}


# The dicts the code gave before models/ stopped importing pipeline/ (same JSON, same key order).
@pytest.mark.parametrize("name, weights, expected", [
    ("timm:efficientnet_lite0", "pypi", _pre(224, 256, "bicubic", [0.5] * 3, [0.5] * 3)),
    ("timm:tf_efficientnet_lite2", "pypi", _pre(260, 292, "bicubic", [0.5] * 3, [0.5] * 3)),
    ("timm:efficientnet_lite0", "none", _pre(224, 256, "bicubic", **IMAGENET)),
    ("timm:resnet10t", "none", _pre(176, 201, "bicubic", **IMAGENET)),
    ("timm:mobilevit_xxs", "none", _pre(256, 284, "bicubic", [0.0] * 3, [1.0] * 3)),
    ("torchvision:mobilenet_v3_small", "none", _pre(224, 256, "bilinear", **IMAGENET)),
])
def test_preprocessing_json_is_unchanged(name, weights, expected):
    _, pre = build_model(name, 3, weights)
    assert json.dumps(pre) == json.dumps(expected)


def test_torchvision_enum_preprocessing_is_unchanged():
    import torchvision

    enum = torchvision.models.ResNet50_Weights.IMAGENET1K_V2   # resize 232, crop 224
    assert json.dumps(build._torchvision_preprocessing(enum)) == json.dumps(_pre(224, 232, "bilinear", **IMAGENET))
    enum = torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1
    assert json.dumps(build._torchvision_preprocessing(enum)) == json.dumps(_pre(300, 320, "bicubic", **IMAGENET))


def test_models_and_pipeline_build_the_same_preprocessing_dict():
    """models/ keeps its own copy of the dict builder (it must not import pipeline/): the two must agree."""
    from pipeline.preprocess import make_preprocessing

    for size in (32, 64, 224, 260):
        for crop_pct in (1.0, 0.875, 224 / 232, 0.95):
            for interp in ("bilinear", "bicubic", "nearest"):
                args = (size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interp, crop_pct)
                assert json.dumps(build._preprocessing_dict(*args)) == json.dumps(make_preprocessing(*args))


def test_fixed_size_models_build():
    model, pre = build_model("timm:vit_tiny_patch16_224", 4, "none")   # needs exactly 224 px
    assert pre["input_size"] == [3, 224, 224] and model.get_classifier().out_features == 4


# ----------------------------------------------------------------- torchvision weights: hash + weights_only

def _hashed_file(folder, stem, obj):
    """Save obj as <stem>-<first 8 hex digits of its sha256>.pth (torchvision's naming) -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(obj, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    os.replace(tmp, path)
    return path


@pytest.fixture
def fake_torchvision_weights(tmp_path, monkeypatch):
    """mobilenet_v3_small 'ImageNet' weights made here, cached in a tmp TORCH_HOME under a name with their hash."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(build, "_online", lambda *a, **k: False)   # never the network
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    path = _hashed_file(tmp_path / "torch_home" / "hub" / "checkpoints", "mobilenet_v3_small", state)
    enum = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    monkeypatch.setattr(enum.value, "url", f"https://download.pytorch.org/models/{path.name}")
    return path, state


def test_torchvision_weights_are_hash_checked_and_loaded_weights_only(fake_torchvision_weights, monkeypatch):
    path, state = fake_torchvision_weights
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    model, pre = build_model("torchvision:mobilenet_v3_small", 4, "pretrained")
    assert calls == [True]                                      # one load, weights_only
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert model.classifier[-1].out_features == 4
    assert pre["interpolation"] == "bilinear" and pre["crop_size"] == 224


def test_a_tampered_torchvision_file_is_refused(fake_torchvision_weights):
    path, _ = fake_torchvision_weights
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailable) as e:
        build_model("torchvision:mobilenet_v3_small", 4, "pretrained")
    assert "corrupt or was altered" in str(e.value) and "delete it" in str(e.value)


def test_a_pickled_module_with_a_valid_hash_is_refused(tmp_path):
    import torchvision

    path = _hashed_file(tmp_path, "evil", torchvision.models.mobilenet_v3_small(weights=None))
    with pytest.raises(WeightsUnavailable) as e:
        build.load_hub_state_dict(path)
    assert "weights_only" in str(e.value)
    assert isinstance(build.load_hub_state_dict(_hashed_file(tmp_path, "ok", {"w": torch.ones(2)})), dict)


def test_offline_uncached_torchvision_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(build, "_online", lambda *a, **k: False)
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        build_model("torchvision:resnet18", 3, "torchvision:IMAGENET1K_V1")
    assert time.perf_counter() - t < 10
    assert "hub/checkpoints/resnet18-f37072fd.pth" in str(e.value) and "weights=" in str(e.value)


# ----------------------------------------------------------------------------- artifacts

def test_plain_history_is_public_and_the_old_name_stays():
    assert models.plain_history is plain_history
    from models.artifact import _plain_history

    assert _plain_history is plain_history
    assert plain_history([("a.b", 1, torch.tensor([3, 1]))]) == [["a.b", True, [3, 1]]]


def test_an_artifact_in_the_old_layout_still_loads(tmp_path):
    model, pre = build_model("timm:resnet10t", 3, "none")
    blob = {"format": "edgepipe-model/1", "name": "timm:resnet10t", "classes": ["a", "b", "c"], "num_classes": 3,
            "preprocessing": pre, "pruning_history": None, "extra": {"k": 1},
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(blob, tmp_path / "old.pt")     # what the previous code wrote
    again, meta = load_model_artifact(tmp_path / "old.pt")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), again(x))
    assert meta == {k: v for k, v in blob.items() if k != "state_dict"}


def test_a_crash_while_saving_keeps_the_previous_artifact(tmp_path, monkeypatch):
    model, pre = build_model("timm:resnet10t", 3, "none")
    path = tmp_path / "m.pt"
    save_model_artifact(path, model, name="timm:resnet10t", classes=["a", "b", "c"], preprocessing=pre)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_model_artifact(path, model, name="timm:resnet10t", classes=["x", "y", "z"], preprocessing=pre)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]   # no temp file left behind
