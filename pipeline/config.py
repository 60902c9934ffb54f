"""Typed configuration: defaults in code, a YAML file on top, `key=value` overrides on top of that.

Unknown sections, unknown keys and wrong types are errors that name the key, so a typo never runs
a silent default. The resolved config is saved with every stage's artifacts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.artifacts import sha256_json


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = "runs/default"            # every stage writes under run.dir/<stage>
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    workers: int = 2                     # DataLoader worker processes (0 = load in the main process)
    threads: int = 0                     # torch intra-op threads; 0 = torch's default
    progress: bool = True                # tqdm progress bars


@dataclass
class DataConfig:
    root: str = "builtin:digits"         # an ImageFolder, or builtin:digits (scikit-learn's digits)
    image_size: typing.Optional[int] = None   # None = the model's pretrained input size
    crop_pct: typing.Optional[float] = None   # None = the model's pretrained crop_pct
    interpolation: typing.Optional[str] = None  # None = the model's (bilinear | bicubic | nearest)
    val_fraction: float = 0.15           # used only when data.root has no train/val folders
    test_fraction: float = 0.15
    split_seed: int = 0
    min_images_per_class: int = 5
    bad_images: str = "fail"             # fail | skip: unreadable or truncated images
    batch_size: int = 32
    # training augmentation
    scale_min: float = 0.35              # RandomResizedCrop scale lower bound (1.0 = resize only)
    hflip: bool = True
    color_jitter: float = 0.0            # brightness/contrast/saturation strength, 0 = off
    rotation: float = 0.0                # max degrees of random rotation, 0 = off
    auto_augment: str = "none"           # none | trivial | randaugment


@dataclass
class ModelConfig:
    # "timm:<name>", "torchvision:<name>" or a bare name (torchvision first, then timm)
    name: str = "timm:efficientnet_lite0"
    # auto | pypi | pretrained | none | torchvision:<WEIGHTS_ENUM> | /path/to/weights.pth
    weights: str = "auto"


@dataclass
class FinetuneConfig:
    strategy: str = "two_phase"          # auto | two_phase | linear_probe | partial | full
    epochs: int = 6                      # total epochs, head phase included
    head_epochs: int = 2                 # two_phase: epochs with the backbone frozen
    freeze_blocks: int = 2               # partial: how many leading blocks stay frozen
    optimizer: str = "adamw"             # adamw | sgd
    lr: float = 0.002                    # head LR; batch 32
    backbone_lr_mult: float = 0.1        # backbone LR = lr * this once unfrozen
    weight_decay: float = 0.01
    momentum: float = 0.9                # sgd only
    scheduler: str = "cosine"            # cosine | step | constant
    warmup_epochs: float = 0.5           # linear warmup at the start of each phase
    step_size: int = 3                   # step scheduler: epochs between decays
    gamma: float = 0.1
    label_smoothing: float = 0.1
    # Keep every BatchNorm layer's running statistics frozen (eval mode) even in unfrozen phases.
    # Small or low-resolution datasets give noisy batch statistics; switching BN to batch statistics
    # at the unfreeze then throws the features off the trained head.
    freeze_bn_stats: bool = True
    grad_clip: float = 1.0               # max grad norm, 0 = off
    amp: str = "auto"                    # auto | bf16 | fp16 | off (CUDA only; CPU runs fp32)
    channels_last: str = "auto"          # auto | on | off (auto = on for CUDA)
    checkpoint_every_steps: int = 0      # also checkpoint mid-epoch every N steps (0 = per epoch)
    max_steps_per_epoch: int = 0         # cap for quick runs and tests (0 = whole epoch)


@dataclass
class CompressConfig:
    epochs: int = 4                      # distillation epochs before pruning
    lr: float = 0.002
    weight_decay: float = 0.01
    temperature: float = 4.0
    alpha: float = 0.7                   # weight of the KD term; 1 - alpha on the label CE
    cache_teacher_logits: bool = False   # only valid without augmentation (see README)
    target_macs_ratio: float = 0.5       # pruned MACs / unpruned MACs
    target_params_ratio: typing.Optional[float] = None  # if set, prune to this params ratio instead
    pruning_steps: int = 3
    recovery_epochs: int = 1             # KD fine-tuning epochs after each pruning step
    importance: str = "magnitude"        # magnitude | taylor | bn_scale
    round_to: int = 8
    max_accuracy_drop: float = 0.03      # vs the unpruned distilled student, on val
    max_steps_per_epoch: int = 0
    checkpoint_every_steps: int = 0
    # --- added by the compress stage (issue #3)
    recovery_lr: typing.Optional[float] = None  # LR of the KD recovery after each pruning step (None = lr / 4)
    warmup_epochs: float = 0.0           # linear LR warmup at the start of distillation
    grad_clip: float = 1.0               # max grad norm, 0 = off
    amp: str = "auto"                    # auto | bf16 | fp16 | off (CUDA only; CPU runs fp32)
    channels_last: str = "auto"          # auto | on | off (auto = on for CUDA)
    global_pruning: bool = False         # rank channels across layers instead of the same ratio per layer
    max_layer_pruning_ratio: float = 0.9  # at most this fraction of a layer's channels per pruning step
    taylor_batches: int = 4              # importance=taylor: training batches whose gradients score channels
    bn_recalibration_batches: int = 20   # after each pruning step: re-estimate BatchNorm statistics (0 = off)
    latency_runs: int = 10               # timed forward passes per latency figure (median)


@dataclass
class ExportConfig:
    opset: int = 18
    exporter: str = "dynamo"             # dynamo | legacy
    quantization: str = "static"         # static | dynamic | fp16 | none
    calibration_images: int = 128
    calibration_method: str = "minmax"   # minmax | entropy | percentile
    per_channel: bool = True
    max_int8_drop: float = 0.01          # top-1 on test vs the fp32 ONNX
    parity_atol: float = 1e-3            # max |logit diff| ONNX fp32 vs PyTorch
    min_top1_agreement: float = 0.99
    latency_threads: int = 2
    latency_runs: int = 30
    mobile: bool = True                  # also write the .ort copy for ONNX Runtime Mobile
    # --- added by the export stage (issue #4)
    # max_int8_drop < 0 makes every int8 recipe fail the budget: tests use it to force the whole fallback
    # chain and the "ship fp32" path.
    latency_rounds: int = 2              # interleaved fp32/int8 timing rounds; the best median of each is kept
    sensitive_nodes: int = 5             # int8 fallback: nodes with the worst fp32-vs-int8 activation SQNR kept fp32


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    model: str = "auto"                  # auto | int8 | fp32 | /path/to/model.onnx
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000
    max_batch_size: int = 32
    # BentoML adaptive batching: requests still queued after this long get 503 (load shedding). 50 ms shed
    # most requests at concurrency 4 on 2 CPU cores (docs/serve.md); 1000 kept all of them at 16.
    max_latency_ms: int = 1000
    max_concurrency: int = 64
    timeout: int = 30
    top_k: int = 5
    threads: int = 0                     # ORT intra-op threads; 0 = all cores
    # serve stage: copy the resolved export into serving/model/ (packed by bentofile.yaml) and exit
    stage_for_bento: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        d = self.to_dict()
        return sha256_json({s: d[s] for s in sections})

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)


CHOICES = {
    ("run", "device"): None,  # free-form, checked when used
    ("data", "bad_images"): ("fail", "skip"),
    ("data", "auto_augment"): ("none", "trivial", "randaugment"),
    ("data", "interpolation"): (None, "bilinear", "bicubic", "nearest"),
    ("finetune", "strategy"): ("auto", "two_phase", "linear_probe", "partial", "full"),
    ("finetune", "optimizer"): ("adamw", "sgd"),
    ("finetune", "scheduler"): ("cosine", "step", "constant"),
    ("finetune", "amp"): ("auto", "bf16", "fp16", "off"),
    ("finetune", "channels_last"): ("auto", "on", "off"),
    ("compress", "importance"): ("magnitude", "taylor", "bn_scale"),
    ("compress", "amp"): ("auto", "bf16", "fp16", "off"),
    ("compress", "channels_last"): ("auto", "on", "off"),
    ("export", "exporter"): ("dynamo", "legacy"),
    ("export", "quantization"): ("static", "dynamic", "fp16", "none"),
    ("export", "calibration_method"): ("minmax", "entropy", "percentile"),
}


def _check_type(key: str, value, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(cfg: Config, overrides: dict, source: str) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(overrides).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section, values in overrides.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; known: {', '.join(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}; known keys of {section}: "
                                  f"{', '.join(hints)}")
            value = _check_type(f"{section}.{key}", value, hints[key])
            choices = CHOICES.get((section, key))
            if choices and value not in choices:
                raise ConfigError(f"{section}.{key} must be one of {[c for c in choices if c is not None]}, "
                                  f"got {value!r}")
            setattr(obj, key, value)


def parse_override(text: str) -> dict:
    """'finetune.epochs=5' -> {'finetune': {'epochs': 5}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like section.key (e.g. finetune.epochs)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return {parts[0]: {parts[1]: value}}


def _validate(cfg: Config) -> None:
    def positive(key, v, allow_zero=False):
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    positive("finetune.epochs", cfg.finetune.epochs)
    positive("finetune.head_epochs", cfg.finetune.head_epochs, allow_zero=True)
    positive("finetune.lr", cfg.finetune.lr)
    positive("data.batch_size", cfg.data.batch_size)
    positive("run.workers", cfg.run.workers, allow_zero=True)
    positive("compress.epochs", cfg.compress.epochs, allow_zero=True)
    positive("compress.pruning_steps", cfg.compress.pruning_steps, allow_zero=True)
    positive("compress.temperature", cfg.compress.temperature)
    positive("export.calibration_images", cfg.export.calibration_images)
    if cfg.export.opset < 17:
        raise ConfigError(f"export.opset must be >= 17 (opset 17+ is what the exporters and int8 tools are "
                          f"tested with here), got {cfg.export.opset}")
    positive("export.latency_runs", cfg.export.latency_runs)
    positive("export.latency_rounds", cfg.export.latency_rounds)
    positive("export.sensitive_nodes", cfg.export.sensitive_nodes)
    if cfg.data.image_size is not None and cfg.data.image_size < 16:
        raise ConfigError(f"data.image_size must be >= 16 (or null for the model's size), got {cfg.data.image_size}")
    if not 0.0 <= cfg.data.val_fraction < 1 or not 0.0 <= cfg.data.test_fraction < 1 \
            or cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to < 0.9")
    if not 0 < cfg.data.scale_min <= 1:
        raise ConfigError(f"data.scale_min must be in (0, 1], got {cfg.data.scale_min}")
    if not 0 <= cfg.compress.alpha <= 1:
        raise ConfigError(f"compress.alpha must be in [0, 1], got {cfg.compress.alpha}")
    if not 0 < cfg.compress.target_macs_ratio <= 1:
        raise ConfigError(f"compress.target_macs_ratio must be in (0, 1], got {cfg.compress.target_macs_ratio}")
    if cfg.compress.target_params_ratio is not None and not 0 < cfg.compress.target_params_ratio <= 1:
        raise ConfigError(f"compress.target_params_ratio must be in (0, 1], got {cfg.compress.target_params_ratio}")
    if not 1 <= cfg.serve.port <= 65535:
        raise ConfigError(f"serve.port must be in 1..65535, got {cfg.serve.port}")
    if cfg.finetune.strategy == "two_phase" and cfg.finetune.head_epochs >= cfg.finetune.epochs:
        raise ConfigError(f"finetune.head_epochs ({cfg.finetune.head_epochs}) must be smaller than "
                          f"finetune.epochs ({cfg.finetune.epochs}) for the two_phase strategy")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    cfg = Config()
    # Defaults differ per model role: the teacher is the larger, more accurate network.
    cfg.teacher.name = "timm:efficientnet_lite2"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
        _merge(cfg, data, str(path))
    for text in overrides:
        _merge(cfg, parse_override(text), f"override {text!r}")
    _validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a saved resolved config (config.json of a stage)."""
    cfg = Config()
    _merge(cfg, data, "saved config")
    return cfg
