"""Data: the embedded default set, splits, dataset checks, transforms and loaders.

- `data.root` is an ImageFolder (one subfolder per class). With `train/` and `val/` (and optionally
  `test/`) subfolders those are the splits; otherwise a stratified split with `data.split_seed` is
  made once and saved to `run.dir/splits.json`, so every stage and every rerun sees the same.
- `builtin:digits` materializes scikit-learn's digits (1,797 real 8x8 scans of handwritten digits,
  shipped inside the scikit-learn wheel, so it works offline on any OS) as an ImageFolder.
- Augmentation is seeded per (seed, epoch, sample index): a resumed run, a run with another number of
  DataLoader workers and a DDP run see exactly the same augmented images.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import artifacts, engine
from pipeline.preprocess import DECODER_VERSION, BadImageError, make_preprocessing, open_image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """The dataset can't be used as it is; the message names the fix."""


@dataclass
class DataInfo:
    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    test_is_val: bool
    fingerprint: str
    skipped: list[str] = field(default_factory=list)
    # What each split is, for reports: val is the selection split (every decision), test the report
    # split (every reported figure); they never share an image.
    split_names: dict = field(default_factory=dict)

    def counts(self) -> dict:
        return {s: len(getattr(self, s)) for s in ("train", "val", "test")}

    def describe(self) -> dict:
        """{"selection": {"split", "images"}, "report": {...}} for metrics.json and report.md."""
        return {"selection": {"split": self.split_names.get("val", "val"), "images": len(self.val)},
                "report": {"split": self.split_names.get("test", "test"), "images": len(self.test)}}


# ----------------------------------------------------------------------------- embedded default data

def data_home() -> Path:
    return Path(os.environ.get("EDGEPIPE_DATA_HOME", Path.home() / ".cache" / "edgepipe"))


def materialize_digits(target: Path | None = None) -> Path:
    """scikit-learn's digits -> ImageFolder of 8x8 grayscale PNGs (written once, atomically)."""
    target = Path(target or data_home() / "digits")
    if (target / ".complete").exists():
        return target
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits.", dir=target.parent))
    try:
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            pixels = (img * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(folder / f"digit_{i:04d}.png")
        (tmp / ".complete").write_text("scikit-learn digits (BSD-3-Clause), 8x8 grayscale\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_root(root: str) -> Path:
    if root == "builtin:digits":
        return materialize_digits()
    if root.startswith("builtin:"):
        raise DataError(f"data.root={root!r}: the only builtin dataset is builtin:digits")
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise DataError(f"data.root={root!r} is not a folder. Fix: point data.root at an ImageFolder "
                        f"(one subfolder of images per class), e.g. ARGS=\"data.root=/path/to/photos\"")
    return path


# ----------------------------------------------------------------------------- listing and checks

def _list_class_folder(folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {}
    for c in classes:
        files[c] = sorted(str(p) for p in (folder / c).rglob("*")
                          if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    return classes, files


def _check_classes(where: Path, classes: list[str], files: dict[str, list[str]]) -> None:
    if len(classes) < 2:
        raise DataError(f"{where} has {len(classes)} class folder(s); a classifier needs at least 2. "
                        f"Fix: put each class's images in its own subfolder, e.g. {where}/cat/*.jpg, "
                        f"{where}/dog/*.jpg")
    empty = [c for c in classes if not files[c]]
    if empty:
        raise DataError(f"{where}: class folder(s) {empty} contain no images "
                        f"({', '.join(IMG_EXTENSIONS)}). Fix: add images or remove the folder(s)")


def _decode_error(path: str) -> str | None:
    """None when the image decodes, else why not: small, because under DDP it travels between ranks."""
    try:
        open_image(path)
    except BadImageError as e:
        return str(e)
    return None


def _cached_bad_images(cache_file: Path | None, fingerprint: str) -> list[str] | None:
    """data_check.json's list of bad images when it was made for this dataset and decoder, else None."""
    cached = None
    if cache_file is not None and cache_file.exists():
        try:
            cached = artifacts.read_json(cache_file)
        except (OSError, ValueError):
            cached = None
    if cached and cached.get("fingerprint") == fingerprint and cached.get("decoder") == DECODER_VERSION:
        return cached["bad"]
    return None


def check_images(paths: list[str], policy: str, cache_file: Path | None, fingerprint: str,
                 write: bool = True, sharded: bool = False) -> list[str]:
    """Decode every image once (cached by dataset fingerprint); return the bad ones or raise.

    write=False reads the cache but never writes it. sharded (DDP, every rank calls this with the same paths):
    rank 0 alone reads the cache and sends what it found, so all ranks take the same branch (ranks that disagree
    on running a collective hang); on a miss every rank decodes its share (engine.shard_map), so no rank waits
    for the whole dataset and nobody decodes twice.
    """
    if sharded:
        is_lead = engine.dist_info().is_main
        bad = engine.broadcast_object(_cached_bad_images(cache_file, fingerprint) if is_lead else None)
    else:
        bad = _cached_bad_images(cache_file, fingerprint)
    if bad is None:
        errors = engine.shard_map(_decode_error, paths) if sharded else [_decode_error(p) for p in paths]
        bad = [f"{p}: {e}" for p, e in zip(paths, errors) if e is not None]
        if write and cache_file is not None:
            artifacts.write_json(cache_file, {"fingerprint": fingerprint, "decoder": DECODER_VERSION, "bad": bad})
    if bad and policy == "fail":
        listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} unreadable or truncated image(s):\n  {listing}\n"
                        f"Fix: delete or repair them, or set data.bad_images=skip to leave them out")
    return [b.split(": ", 1)[0] for b in bad]


def _fingerprint(root: Path, cache_file: Path, write: bool, sharded: bool) -> str:
    """artifacts.fingerprint_tree; sharded (DDP): rank 0 stats the tree and picks the files its cache does not
    cover (stat calls only), every rank hashes a share of those, rank 0 combines and sends the result."""
    if not sharded:
        return artifacts.fingerprint_tree(root, cache_file, write_cache=write)
    is_lead = engine.dist_info().is_main
    stamps = artifacts.tree_stamps(root) if is_lead else None
    cache = artifacts.read_hash_cache(cache_file) if is_lead else None
    stale = engine.broadcast_object(artifacts.stale_files(stamps, cache) if is_lead else None)
    digests = engine.shard_map(lambda rel: artifacts.sha256_file(root / rel), stale) if stale else []
    fingerprint = artifacts.fingerprint_from(stamps, cache, dict(zip(stale, digests)),
                                             cache_file if write else None) if is_lead else None
    return engine.broadcast_object(fingerprint)


def _same_on_every_rank(obj) -> bool:
    """True on every rank when `obj` hashes as on rank 0, False on every rank otherwise (so all raise together)."""
    mine = artifacts.sha256_json(obj)
    return engine.agree(engine.broadcast_object(mine) == mine)


def _stratified_split(classes, files, cfg_data, seed) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": []}
    for label, c in enumerate(classes):
        items = list(files[c])
        rng.shuffle(items)
        n = len(items)
        n_val = max(1, round(n * cfg_data.val_fraction)) if cfg_data.val_fraction > 0 else 0
        n_test = max(1, round(n * cfg_data.test_fraction)) if cfg_data.test_fraction > 0 else 0
        if n - n_val - n_test < 1 or n < cfg_data.min_images_per_class:
            raise DataError(
                f"class {c!r} has {n} image(s): too few for a train/val/test split "
                f"(need at least {max(cfg_data.min_images_per_class, n_val + n_test + 1)}). "
                f"Fix: add images to that class, or lower data.val_fraction/data.test_fraction, "
                f"or data.min_images_per_class")
        out["test"] += [(p, label) for p in items[:n_test]]
        out["val"] += [(p, label) for p in items[n_test:n_test + n_val]]
        out["train"] += [(p, label) for p in items[n_test + n_val:]]
    return out


def prepare_data(cfg, write: bool = True, sharded: bool = False) -> DataInfo:
    """Resolve data.root, check it, and return the splits (saved to run.dir/splits.json).

    write=False reads the caches and splits.json but writes nothing. sharded: every DDP rank calls this and the
    per-file work (hashing, decoding) is split over them; see prepare_data_all_ranks.
    """
    root = resolve_root(cfg.data.root)
    run_dir = Path(cfg.run.dir)
    fingerprint = _fingerprint(root, run_dir / "file_hashes.json", write, sharded)
    presplit = (root / "train").is_dir() and (root / "val").is_dir()
    if presplit:
        classes, train_files = _list_class_folder(root / "train")
        _check_classes(root / "train", classes, train_files)
        splits_files = {"train": train_files}
        for split in ("val", "test"):
            if (root / split).is_dir():
                extra_classes, f = _list_class_folder(root / split)
                unknown = sorted(set(extra_classes) - set(classes))
                if unknown:
                    raise DataError(f"{root / split} has class folder(s) {unknown} that train/ lacks. "
                                    f"Fix: use the same class folders in every split")
                splits_files[split] = {c: f.get(c, []) for c in classes}
        all_paths = [p for s in splits_files.values() for c in classes for p in s.get(c, [])]
    else:
        classes, files = _list_class_folder(root)
        _check_classes(root, classes, files)
        all_paths = [p for c in classes for p in files[c]]
    if sharded and not _same_on_every_rank([os.path.relpath(p, root) for p in all_paths]):
        # shard_map would pair one rank's decode results with another rank's files
        raise DataError(f"the DDP ranks list different images under {root}. Fix: give every machine the same "
                        f"data at data.root")

    bad = set(check_images(all_paths, cfg.data.bad_images, run_dir / "data_check.json", fingerprint,
                           write=write, sharded=sharded))
    if bad and (write or not sharded):
        print(f"[data] skipping {len(bad)} unreadable image(s) (data.bad_images=skip); "
              f"see {run_dir / 'data_check.json'}")

    if presplit:
        splits = {s: [(p, i) for i, c in enumerate(classes) for p in fs.get(c, []) if p not in bad]
                  for s, fs in splits_files.items()}
        for s in ("train", "val"):
            if not splits[s]:
                raise DataError(f"{root / s} has no usable images")
        kept_train = {c: [p for p in train_files[c] if p not in bad] for c in classes}
        _check_classes(root / "train", classes, kept_train)
        names = {"train": "train/", "val": "val/", "test": "test/"}
        if not splits.get("test"):
            # No test/: val/ becomes the report split, untouched by any decision, and the decisions
            # (best epoch, budgets, int8 recipe) use a stratified selection split carved from train/.
            splits["train"], selection = _carve_selection(kept_train, classes, cfg.data, cfg.data.split_seed)
            splits["test"], splits["val"] = splits["val"], selection
            names = {"train": "train/ minus selection", "val": f"selection ({cfg.data.selection_fraction:g} of train/)",
                     "test": "val/"}
        test_is_val = False
    else:
        kept = {c: [p for p in files[c] if p not in bad] for c in classes}
        _check_classes(root, classes, kept)
        splits = _saved_split(root, classes, kept, cfg.data, run_dir / "splits.json", fingerprint, bad, write)
        test_is_val = False
        names = {"train": "train", "val": "val (saved split)", "test": "test (saved split)"}
    return DataInfo(root=root, classes=classes, train=splits["train"], val=splits["val"], test=splits["test"],
                    test_is_val=test_is_val, fingerprint=fingerprint, skipped=sorted(bad), split_names=names)


def _saved_split(root: Path, classes, kept, cfg_data, splits_file: Path, fingerprint: str, bad, write: bool) -> dict:
    """The stratified split of a single folder: read from splits.json when made from the same inputs, else made
    (and, with write, saved) now."""
    key = {"root": str(root.resolve()), "fingerprint": fingerprint, "seed": cfg_data.split_seed,
           "val_fraction": cfg_data.val_fraction, "test_fraction": cfg_data.test_fraction,
           "skipped": sorted(bad)}
    saved = None
    if splits_file.exists():
        try:
            saved = artifacts.read_json(splits_file)
        except (OSError, ValueError):
            saved = None
    if saved and saved.get("key") == key:
        return {s: [(str(root / p), int(i)) for p, i in saved[s]] for s in ("train", "val", "test")}
    splits = _stratified_split(classes, kept, cfg_data, cfg_data.split_seed)
    if write:
        rel = {s: [[os.path.relpath(p, root), i] for p, i in v] for s, v in splits.items()}
        artifacts.write_json(splits_file, {"key": key, "classes": classes, **rel})
    return splits


def _carve_selection(files: dict[str, list[str]], classes, cfg_data, seed) -> tuple[list, list]:
    """train/ -> (train, selection): a stratified cfg_data.selection_fraction of each class (at least one)."""
    rng = random.Random(seed * 31 + 7)
    train, selection = [], []
    for label, c in enumerate(classes):
        items = sorted(files[c])
        rng.shuffle(items)
        n_sel = max(1, round(len(items) * cfg_data.selection_fraction)) if cfg_data.selection_fraction > 0 else 0
        if len(items) - n_sel < 1:
            raise DataError(f"class {c!r} has {len(items)} training image(s): too few to set "
                            f"{cfg_data.selection_fraction:g} aside for model selection. Fix: add images, add a "
                            f"test/ folder (then val/ is the selection split), or lower data.selection_fraction")
        selection += [(p, label) for p in items[:n_sel]]
        train += [(p, label) for p in items[n_sel:]]
    if not selection:
        raise DataError("data.selection_fraction=0 leaves no selection split: decisions would be taken on the "
                        "images that are reported. Fix: set data.selection_fraction > 0 or add a test/ folder")
    return train, selection


def prepare_data_all_ranks(cfg, is_main: bool) -> DataInfo:
    """prepare_data on every DDP rank (plain prepare_data in one process); only rank 0 (is_main) writes.

    Not rank 0 alone while the others wait in a collective: hashing and decoding a real dataset takes longer than
    NCCL's 10-minute watchdog. Each rank hashes and decodes a share (caches decided by rank 0, so a cache hit
    means no rank decodes anything), then makes the splits from the same inputs; a hash check makes sure they
    are the same on every rank.
    """
    if not engine.distributed_active():
        return prepare_data(cfg)
    info = prepare_data(cfg, write=is_main, sharded=True)
    # relative paths: machines may mount the same data at different places
    rel = {s: [[os.path.relpath(p, info.root), i] for p, i in getattr(info, s)] for s in ("train", "val", "test")}
    if not _same_on_every_rank([info.classes, rel, info.split_names]):
        raise DataError(f"the DDP ranks made different splits of {info.root} (a different splits.json in each "
                        f"run.dir?). Fix: give every rank the same data.root and a shared run.dir")
    return info


# ----------------------------------------------------------------------------- preprocessing + transforms

def resolve_preprocessing(pretrained: dict, cfg_data) -> dict:
    """The model's pretrained preprocessing, with data.image_size / crop_pct / interpolation applied."""
    size = cfg_data.image_size or pretrained["crop_size"]
    crop_pct = cfg_data.crop_pct if cfg_data.crop_pct is not None else \
        pretrained["crop_size"] / pretrained["resize_size"]
    interp = cfg_data.interpolation or pretrained["interpolation"]
    return make_preprocessing(size, pretrained["mean"], pretrained["std"], interp, crop_pct)


def teacher_preprocessing(pretrained: dict, cfg) -> dict:
    """The teacher's preprocessing: resolve_preprocessing at finetune.image_size, which by default (None) is
    data.image_size but never below the size the teacher's weights were trained at (config.FinetuneConfig.image_size
    says why); 0 = data.image_size exactly."""
    size = cfg.finetune.image_size
    if size is None:
        size = max(cfg.data.image_size or 0, pretrained["crop_size"])
    elif size == 0:
        size = cfg.data.image_size
    return resolve_preprocessing(pretrained, replace(cfg.data, image_size=size))


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def _to_tensor(pre: dict, uint8: bool = False) -> list:
    """The last steps of every transform: ToTensor + Normalize (float32, normalized), or with uint8 the image as
    uint8 CHW for DeviceBatches to scale and normalize on the GPU (the same ops, so the same values)."""
    from torchvision import transforms as T

    return [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]


def eval_transform(pre: dict, uint8: bool = False):
    """The torchvision twin of pipeline.preprocess.preprocess (a test checks they agree)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(pre["resize_size"], interpolation=_interp(pre["interpolation"])),
        T.CenterCrop(pre["crop_size"]),
        *_to_tensor(pre, uint8),
    ])


def train_transform(pre: dict, cfg_data, uint8: bool = False):
    from torchvision import transforms as T

    interp = _interp(pre["interpolation"])
    steps = []
    if cfg_data.scale_min < 1.0:
        steps.append(T.RandomResizedCrop(pre["crop_size"], scale=(cfg_data.scale_min, 1.0), interpolation=interp))
    else:
        steps += [T.Resize(pre["resize_size"], interpolation=interp), T.CenterCrop(pre["crop_size"])]
    if cfg_data.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg_data.rotation > 0:
        steps.append(T.RandomRotation(cfg_data.rotation, interpolation=_interp("bilinear")))
    if cfg_data.color_jitter > 0:
        j = cfg_data.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    if cfg_data.auto_augment == "trivial":
        steps.append(T.TrivialAugmentWide(interpolation=_interp("bilinear")))
    elif cfg_data.auto_augment == "randaugment":
        steps.append(T.RandAugment(interpolation=_interp("bilinear")))
    steps += _to_tensor(pre, uint8)
    return T.Compose(steps)


def is_augmented(cfg_data) -> bool:
    return (cfg_data.scale_min < 1.0 or cfg_data.hflip or cfg_data.rotation > 0 or cfg_data.color_jitter > 0
            or cfg_data.auto_augment != "none")


class ImageListDataset(Dataset):
    """(path, label) samples through one or more transforms, augmentation seeded per sample.

    With several transforms (e.g. student and teacher preprocessing) each view is drawn with the
    same seed, so random crops/flips are the same region of the same photo for both models.
    """

    def __init__(self, samples, transforms, seed: int = 0, epoch: int = 0):
        self.samples = samples
        self.transforms = transforms
        self.seed = seed
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = open_image(path)
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2 ** 63)
        views = []
        for t in self.transforms:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                views.append(t(image))
        return (*views, label)


class EpochSampler(Sampler):
    """Deterministic per-epoch order, sharded over DDP ranks, able to start mid-epoch.

    Like DistributedSampler (pads to a multiple of world_size), plus `start`: the number of this
    rank's samples already consumed, so a resumed epoch continues with exactly the same batches.
    """

    def __init__(self, n, shuffle, seed, epoch, rank=0, world_size=1, start=0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = math.ceil(n / world_size)

    def _indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self):
        return max(0, self.per_rank - self.start)


class DeviceBatches:
    """A loader of uint8 images whose batches are moved to `device` and scaled/normalized there
    (engine.normalize_on_device): x / 255, then (x - mean) / std, the ops ToTensor + Normalize do on the CPU, so
    the values are the same, with 4x fewer bytes through the workers' queues, pinned memory and PCIe. Every view
    (student, teacher) gets its own mean/std; labels (the last item) stay on the CPU, as from a plain loader."""

    def __init__(self, loader: DataLoader, device, stats: list[tuple]):
        self.loader, self.device, self.stats = loader, torch.device(device), stats

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        from pipeline.engine import normalize_on_device

        for batch in self.loader:
            views = [normalize_on_device(x, mean, std, self.device) for x, (mean, std) in zip(batch[:-1], self.stats)]
            yield [*views, batch[-1]]


def make_loader(samples, pre: dict, cfg, train: bool, epoch: int = 0, start_step: int = 0,
                rank: int = 0, world_size: int = 1, extra_pre: dict | None = None,
                batch_size: int | None = None, augment: bool | None = None, device=None,
                persistent: bool = False, uint8: bool | None = None):
    """A DataLoader of (x, [x_extra,] label). Train: shuffled per epoch, augmented, drop_last.

    device (where the batches go; None = the CPU): engine.loader_settings, i.e. pinned memory only for CUDA. On
    CUDA (or with uint8=True) the workers send uint8 images and DeviceBatches normalizes them on the device.
    persistent: keep the worker processes between passes; only for a loader that is iterated again (eval_loaders).
    A training loader is built per epoch and never persistent: its epoch (the augmentation seed) lives in the
    dataset, which persistent workers copy once at start-up (they would replay epoch 0's crops), and a resumed
    epoch starts mid-way (start_step). A fresh loader per epoch keeps the data order and the bit-exact resume; the
    price is starting run.workers processes once per epoch.
    """
    from pipeline.engine import loader_settings

    device = torch.device(device or "cpu")
    uint8 = device.type == "cuda" if uint8 is None else uint8
    batch_size = batch_size or cfg.data.batch_size
    augment = train if augment is None else augment
    make_t = (lambda p: train_transform(p, cfg.data, uint8)) if augment else (lambda p: eval_transform(p, uint8))
    views = [pre] + ([extra_pre] if extra_pre is not None else [])
    dataset = ImageListDataset(samples, [make_t(p) for p in views], seed=cfg.run.seed, epoch=epoch)
    drop_last = train and len(samples) // world_size > batch_size
    sampler = EpochSampler(len(samples), shuffle=train, seed=cfg.run.seed, epoch=epoch, rank=rank,
                           world_size=world_size, start=start_step * batch_size)
    settings = loader_settings(device, cfg.run.workers)
    settings["persistent_workers"] = settings["persistent_workers"] and persistent and not train
    # A private generator: creating the iterator must not draw from the global RNG (dropout etc.),
    # or a run resumed mid-epoch would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + epoch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.run.workers,
                        drop_last=drop_last, generator=generator, **settings)
    return DeviceBatches(loader, device, [(p["mean"], p["std"]) for p in views]) if uint8 else loader


def eval_loaders(pre: dict, cfg, device=None, **kw):
    """make(subset) -> an unshuffled, un-augmented loader over that list of samples: the `make_loader` argument of
    engine.predict_sharded / evaluate_sharded and probe.pooled_features_sharded. Loaders are kept per subset for
    the life of `make`, so a split evaluated every epoch reuses its loader and, with run.workers > 0, its worker
    processes (persistent_workers: eval passes have no epoch-dependent state)."""
    cache: dict = {}

    def make(subset):
        key = tuple(subset)
        if key not in cache:
            cache[key] = make_loader(list(subset), pre, cfg, train=False, device=device, persistent=True, **kw)
        return cache[key]
    return make


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int = 1, max_steps: int = 0) -> int:
    per_rank = math.ceil(n_samples / world_size)
    steps = per_rank // batch_size if per_rank > batch_size else math.ceil(per_rank / batch_size)
    return min(steps, max_steps) if max_steps > 0 else steps


def class_counts(samples, num_classes) -> list[int]:
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def summary(info: DataInfo) -> str:
    c = info.counts()
    d = info.describe()
    return (f"{len(info.classes)} classes, train {c['train']} images, selection split {d['selection']['split']} "
            f"{c['val']}, report split {d['report']['split']} {c['test']} from {info.root}")
