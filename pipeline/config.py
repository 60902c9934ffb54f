"""Typed configuration: defaults in code, a YAML file on top, `key=value` overrides on top of that.

Unknown sections, unknown keys and wrong types are errors that name the key, so a typo never runs
a silent default. The resolved config is saved with every stage's artifacts.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.artifacts import sha256_json
from serving.settings import ServeSettings, SettingsError


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
    # End-to-end budget: the shipped model may be at most this far below the teacher (top-1, same images,
    # paired decision on the selection split; see pipeline/budget.py).
    max_accuracy_drop: float = 0.01
    # --- GPU and multi-GPU (issue #15); all of them leave a CPU run as it was
    dist_timeout_s: int = 1800           # DDP collective timeout (NCCL's own default is 600 s)
    lr_scaling: str = "auto"             # LR vs global batch (ranks x accumulation): auto | linear | sqrt | none
    grad_accum_steps: int = 1            # micro-batches per optimizer step
    sync_bn: bool = False                # SyncBatchNorm under DDP on GPUs (batch statistics over all ranks)
    cudnn_benchmark: bool = True         # CUDA: let cuDNN pick the fastest conv algorithms (fixed input size)
    tf32: bool = True                    # CUDA (Ampere+): TF32 matmuls and convolutions in fp32 code
    compile: bool = False                # torch.compile the training model


@dataclass
class DataConfig:
    root: str = "builtin:digits"         # an ImageFolder, or builtin:digits (scikit-learn's digits)
    image_size: typing.Optional[int] = None   # None = the model's pretrained input size
    crop_pct: typing.Optional[float] = None   # None = the model's pretrained crop_pct
    interpolation: typing.Optional[str] = None  # None = the model's (bilinear | bicubic | nearest)
    val_fraction: float = 0.15           # used only when data.root has no train/val folders
    # With train/ and val/ but no test/: this fraction of train/ becomes the selection split (best epoch,
    # budgets, int8 recipe) and val/ is kept for reporting only.
    selection_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    min_images_per_class: int = 5
    bad_images: str = "fail"             # fail | skip: unreadable or truncated images
    batch_size: int = 32
    # training augmentation (photo defaults; builtin:digits has its own preset, see DATASET_PRESETS)
    scale_min: float = 0.35              # RandomResizedCrop scale lower bound (1.0 = resize only)
    hflip: bool = True
    color_jitter: float = 0.0            # brightness/contrast/saturation strength, 0 = off
    rotation: float = 0.0                # max degrees of random rotation, 0 = off
    # none | trivial | randaugment. TrivialAugment (torchvision's reference recipe) for photos: the teacher
    # memorised flowers' train split (train acc 0.998, 6 epochs) without it; with it, report accuracy 0.890 vs 0.880
    # (flowers, 400 images) and 0.992 vs 0.990 (cats, 500), both within noise, both the same way (docs/accuracy.md)
    auto_augment: str = "trivial"


@dataclass
class ModelConfig:
    # "timm:<name>", "torchvision:<name>" or a bare name (torchvision first, then timm)
    name: str = "timm:efficientnet_lite0"
    # auto | pypi | pretrained | none | torchvision:<WEIGHTS_ENUM> | /path/to/weights.pth
    weights: str = "auto"


@dataclass
class FinetuneConfig:
    strategy: str = "auto"               # auto | two_phase | linear_probe | partial | full
    # total epochs, head phase included. flowers 224 px, 12 epochs with MixUp/CutMix: report split (400 images) 0.910
    # in one run, 0.8925 in a rerun, vs 0.890 at 6 epochs without; twice the time, and a teacher better on the
    # selection split only, which the student then could not match (docs/accuracy.md). 6 stays.
    epochs: int = 6
    # The teacher's input size. None: data.image_size, but never below the size its weights were trained at. The
    # teacher is never shipped; data.image_size is the shipped model's size. A teacher shown smaller images than it
    # learned on loses accuracy (train-test resolution discrepancy, Touvron et al. 2019), and its student with it:
    # flowers, tf_efficientnet_lite2 fine-tuned at 224 px 0.8725 vs 0.8975 at its 260 px (report split, 400 images;
    # docs/accuracy.md). A number forces a size; 0 = data.image_size exactly (the digits preset: 64 px digits).
    image_size: typing.Optional[int] = None
    head_epochs: int = 2                 # two_phase: epochs with the backbone frozen
    freeze_blocks: int = 2               # partial: how many leading blocks stay frozen
    # Start the new head from the closed-form probe (logistic regression on the frozen pretrained
    # features) instead of random weights: a random head's gradients distort the pretrained base
    # (linear-probe-then-fine-tune, Kumar et al. 2022). The probe is also a candidate for the best model.
    probe_init: bool = True
    ema_decay: float = 0.98              # EMA of the weights, evaluated for the best epoch (0 = off)
    # What picks the best candidate (the probe, then each epoch) on the selection split, lowest first. The highest
    # accuracy is the luckiest of 7 looks at 150-180 images: on flowers native it chose the run's weakest model on
    # the report split, and its optimistic figure then put every student outside the budget. The loss moves with
    # every image's confidence, so its minimum is less lucky; at its best temperature (calibrated_loss) it does not
    # penalise the softness label smoothing trains towards (docs/accuracy.md).
    select_by: str = "calibrated_loss"   # calibrated_loss | loss | accuracy
    optimizer: str = "adamw"             # adamw | sgd
    lr: float = 0.002                    # head LR; batch 32
    backbone_lr_mult: float = 0.05       # backbone LR = lr * this once unfrozen
    weight_decay: float = 0.01
    momentum: float = 0.9                # sgd only
    scheduler: str = "cosine"            # cosine | step | constant
    warmup_epochs: float = 0.5           # linear warmup at the start of each phase
    step_size: int = 3                   # step scheduler: epochs between decays
    gamma: float = 0.1
    label_smoothing: float = 0.1
    # MixUp / CutMix (torchvision.transforms.v2; torchvision's reference recipe uses 0.2 / 1.0): each training batch
    # is mixed with one of them, picked at random, and trained on the soft labels. 0 = off; both 0 = no mixing.
    # Off by default: on flowers 224 px (12 epochs) the report-split gain did not reproduce (see epochs above).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Keep every BatchNorm layer's running statistics frozen (eval mode) even in unfrozen phases.
    # Small or low-resolution datasets give noisy batch statistics; switching BN to batch statistics
    # at the unfreeze then throws the features off the trained head.
    freeze_bn_stats: bool = True
    grad_clip: float = 1.0               # max grad norm, 0 = off
    amp: str = "auto"                    # auto | bf16 | fp16 | off (CUDA only; CPU runs fp32)
    channels_last: str = "auto"          # auto | on | off (auto = on for CUDA and the CPU)
    checkpoint_every_steps: int = 0      # also checkpoint mid-epoch every N steps (0 = per epoch)
    max_steps_per_epoch: int = 0         # cap for quick runs and tests (0 = whole epoch)


@dataclass
class CompressConfig:
    epochs: int = 4                      # distillation epochs before pruning
    lr: float = 0.002                    # head LR of distillation; the backbone gets lr * backbone_lr_mult
    # flowers 224 px: at 0.25 (backbone lr 5e-4) the first distillation epoch took the probe-initialised student
    # from 0.906 to 0.828 on the selection split; the teacher's fine-tune gained at 1e-4
    backbone_lr_mult: float = 0.05
    probe_init: bool = True              # the student's head starts from its own frozen-feature probe
    keep_best_epoch: bool = True         # the distilled student is its best epoch on the selection split
    # What "best" means, as finetune.select_by: the lowest selection loss at its best temperature. The highest accuracy
    # is the luckiest of 4 looks at 150-180 images, and it is the figure compress.max_accuracy_drop measures every
    # pruning step against (cats 224 px: an epoch at 1.000, the others 0.973-0.987, so step 1 failed on 0.960).
    select_by: str = "calibrated_loss"   # calibrated_loss | loss | accuracy
    # BatchNorm running statistics stay as pretrained (eval mode) while distilling and recovering, as in finetune:
    # flowers 224 px, with batch statistics the probe-initialised student fell from 0.906 to 0.800 (selection
    # split) in the first distillation epoch, at a backbone LR of 1e-4 as at 5e-4.
    freeze_bn_stats: bool = True
    weight_decay: float = 0.01
    temperature: float = 4.0
    alpha: float = 0.7                   # weight of the KD term; 1 - alpha on the label CE
    cache_teacher_logits: bool = False   # only valid without augmentation (see README)
    target_macs_ratio: float = 0.5       # pruned MACs / unpruned MACs
    target_params_ratio: typing.Optional[float] = None  # if set, prune to this params ratio instead
    pruning_steps: int = 3
    # KD fine-tuning epochs after each pruning step, always all of them (the LR annealed to 0); the step is judged
    # once, on the final weights (compress.Compression.recover)
    recovery_epochs: int = 6
    # After the first failed step (compress.max_accuracy_drop broken, or out of reach of the teacher): one milder step
    # from the step before, halfway (geometrically) between the sizes the two reached. Not for a latency target. Off by
    # default: cats 224 px, the back-off to 0.89 MACs ended 4 images below the teacher (step 1 at 0.79: 3) and cost
    # 6 recovery epochs, 8 of the run's 43 minutes (docs/accuracy.md)
    backoff: bool = False
    # magnitude | taylor | bn_scale. flowers 224 px, one step to 0.78 MACs, selection accuracy after BN
    # recalibration: taylor 0.689, magnitude 0.578 (0.878 vs 0.861 after 2 recovery epochs); global ranking and
    # sparing the residual trunks were worse (docs/accuracy.md)
    importance: str = "taylor"
    round_to: int = 8
    # channels tied to a depthwise conv: multiples of this too (lcm with round_to; 0 = round_to only). ONNX Runtime's
    # x86 int8 depthwise kernel needs multiples of 16, else a generic kernel as slow as fp32 (issue #13, compress.md)
    depthwise_round_to: int = 16
    max_accuracy_drop: float = 0.03      # vs the unpruned distilled student, on val
    max_steps_per_epoch: int = 0
    checkpoint_every_steps: int = 0
    # --- added by the compress stage (issue #3)
    # LR of the KD recovery after each pruning step; None = 2 x the distillation's backbone LR (lr * backbone_lr_mult)
    recovery_lr: typing.Optional[float] = None
    warmup_epochs: float = 0.5           # linear LR warmup at the start of distillation
    grad_clip: float = 1.0               # max grad norm, 0 = off
    amp: str = "auto"                    # auto | bf16 | fp16 | off (CUDA only; CPU runs fp32)
    channels_last: str = "auto"          # auto | on | off (auto = on for CUDA and the CPU)
    global_pruning: bool = False         # rank channels across layers instead of the same ratio per layer
    max_layer_pruning_ratio: float = 0.9  # at most this fraction of a layer's channels per pruning step
    taylor_batches: int = 4              # importance=taylor: training batches whose gradients score channels
    # after each pruning step: re-estimate BatchNorm statistics (0 = off); only with freeze_bn_stats off, as the
    # frozen statistics are what every layer was trained against (compress.recalibrates_bn)
    bn_recalibration_batches: int = 20
    # Latency-aware pruning (pipeline/latency.py, docs/compress.md): a target in measured ms on ONNX Runtime's CPU
    # EP instead of MACs. target_latency_ms (absolute) or target_latency_ratio (of the distilled student's
    # measured latency); at most one, and not with target_params_ratio. Either one overrides target_macs_ratio.
    target_latency_ms: typing.Optional[float] = None
    target_latency_ratio: typing.Optional[float] = None
    latency_precision: str = "int8"      # int8 (static QDQ, as export ships) | fp32: the ONNX file that is timed
    latency_batch: int = 1               # 1 | 32: the batch size the latency target applies to (both are recorded)
    latency_threads: int = 2             # ONNX Runtime intra-op threads while timing (as export.latency_threads)
    latency_runs: int = 10               # timed runs per measurement at batch 1 (runs // 3 at batch 32)
    step_latency: bool = True            # measure every pruning step's latency (curve + plot) even for MACs targets


@dataclass
class ExportConfig:
    opset: int = 18
    exporter: str = "dynamo"             # dynamo | legacy
    quantization: str = "static"         # static | dynamic | fp16 | none
    calibration_images: int = 128
    calibration_method: str = "minmax"   # minmax | entropy | percentile
    per_channel: bool = True
    max_int8_drop: float = 0.01          # top-1 on the selection split vs the fp32 ONNX
    # closest: try every plain recipe, ship the one within max_int8_drop whose answers are closest to fp32's
    # (mean KL on the selection split); first: ship the first recipe within max_int8_drop (faster export)
    int8_choice: str = "closest"
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
    # CPU runtimes the shipped files are measured and checked on; `recommended` names the fastest that passes:
    # auto = every one installed here (onnxruntime, and openvino when installed); onnxruntime = that one only
    runtimes: str = "auto"


# The server's settings: one typed class shared with the torch-free server (serving/settings.py), so
# `serve.*` keys here and EDGEPIPE_* variables in a container are the same settings with the same checks.
ServeConfig = ServeSettings


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


# Settings that depend on what the data are. Precedence: code defaults < the dataset's preset < the YAML
# file < command-line overrides. Photos (any data.root) use the code defaults: the model's native size
# and crop, flips, RandomResizedCrop, finetune.strategy=auto. The embedded digits (8x8 scans) need
# their own: 64 px, no flips (a mirrored 2 is not a 2), the whole frame, small rotations.
DATASET_PRESETS = {
    "builtin:digits": {
        "data": {"image_size": 64, "crop_pct": 1.0, "hflip": False, "scale_min": 0.7, "rotation": 10.0,
                 "auto_augment": "none"},
        "finetune": {"image_size": 0, "strategy": "two_phase", "epochs": 5, "head_epochs": 1, "lr": 0.003,
                     "backbone_lr_mult": 0.1},
        "compress": {"epochs": 3, "pruning_steps": 3, "recovery_epochs": 2, "importance": "magnitude",
                     "backbone_lr_mult": 1.0,
                     "recovery_lr": 0.0005, "probe_init": False, "freeze_bn_stats": False},
    },
}


CHOICES = {
    ("run", "device"): None,  # free-form, checked when used
    ("run", "lr_scaling"): ("auto", "linear", "sqrt", "none"),
    ("data", "bad_images"): ("fail", "skip"),
    ("data", "auto_augment"): ("none", "trivial", "randaugment"),
    ("data", "interpolation"): (None, "bilinear", "bicubic", "nearest"),
    ("finetune", "strategy"): ("auto", "two_phase", "linear_probe", "partial", "full"),
    ("finetune", "optimizer"): ("adamw", "sgd"),
    ("finetune", "scheduler"): ("cosine", "step", "constant"),
    ("finetune", "select_by"): ("calibrated_loss", "loss", "accuracy"),
    ("finetune", "amp"): ("auto", "bf16", "fp16", "off"),
    ("finetune", "channels_last"): ("auto", "on", "off"),
    ("compress", "select_by"): ("calibrated_loss", "loss", "accuracy"),
    ("compress", "importance"): ("magnitude", "taylor", "bn_scale"),
    ("compress", "amp"): ("auto", "bf16", "fp16", "off"),
    ("compress", "channels_last"): ("auto", "on", "off"),
    ("compress", "latency_precision"): ("int8", "fp32"),
    ("export", "exporter"): ("dynamo", "legacy"),
    ("export", "quantization"): ("static", "dynamic", "fp16", "none"),
    ("export", "calibration_method"): ("minmax", "entropy", "percentile"),
    ("export", "int8_choice"): ("closest", "first"),
    ("export", "runtimes"): ("auto", "onnxruntime"),
}


# YAML 1.1 (PyYAML's default) reads on/off/yes/no/y/n as booleans, so `finetune.amp=off` arrived as False and
# failed "must be str". Config text is read with YAML 1.2's rule instead: only true/false are booleans; a
# boolean key also takes on/off/yes/no (below).
class _ConfigLoader(yaml.SafeLoader):
    pass


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool",
                                                                      "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 floats too: 1e-3 (no dot) is a number, not the string "1e-3"
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))

_TRUE_WORDS = ("true", "on", "yes", "y")
_FALSE_WORDS = ("false", "off", "no", "n")


def yaml_load(text):
    """Config YAML (a string or a file object) with YAML 1.2 booleans: `off` stays the string "off"."""
    return yaml.load(text, Loader=_ConfigLoader)


def _check_type(key: str, value, hint, choices=None):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0], choices)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is str and isinstance(value, bool) and choices and "off" in choices:
        # e.g. a mapping built in code, or YAML 1.1 text parsed elsewhere: false -> "off", true -> "on"
        return "on" if value else "off"
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
            choices = CHOICES.get((section, key))
            value = _check_type(f"{section}.{key}", value, hints[key], choices)
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
        value = yaml_load(raw) if raw.strip() != "" else ""
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
    positive("finetune.mixup_alpha", cfg.finetune.mixup_alpha, allow_zero=True)
    positive("finetune.cutmix_alpha", cfg.finetune.cutmix_alpha, allow_zero=True)
    positive("data.batch_size", cfg.data.batch_size)
    positive("run.workers", cfg.run.workers, allow_zero=True)
    positive("run.grad_accum_steps", cfg.run.grad_accum_steps)
    positive("run.dist_timeout_s", cfg.run.dist_timeout_s)
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
    if cfg.data.val_fraction <= 0 or cfg.data.test_fraction <= 0:
        raise ConfigError("data.val_fraction and data.test_fraction must be > 0: a single-folder dataset needs a "
                          "selection split (every decision) and a report split (every figure)")
    if not 0 <= cfg.data.selection_fraction < 0.5:
        raise ConfigError(f"data.selection_fraction must be in [0, 0.5), got {cfg.data.selection_fraction}")
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
    try:
        cfg.serve.validate()
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    if cfg.finetune.strategy == "two_phase" and cfg.finetune.head_epochs >= cfg.finetune.epochs:
        raise ConfigError(f"finetune.head_epochs ({cfg.finetune.head_epochs}) must be smaller than "
                          f"finetune.epochs ({cfg.finetune.epochs}) for the two_phase strategy")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    layers = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                layers.append((yaml_load(f) or {}, str(path)))
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
    layers += [(parse_override(text), f"override {text!r}") for text in overrides]
    # First pass: where are the data? That picks the dataset preset, which goes under the file and overrides.
    where = Config()
    for data, source in layers:
        _merge(where, data, source)
    cfg = Config()
    # Defaults differ per model role: the teacher is the larger, more accurate network. It is never shipped, so it
    # is the tf_ variant, whose "same" padding is the one its ImageNet weights were trained with: its frozen-feature
    # probe is 6-8 report images better on flowers than the symmetric-padding variant's (docs/accuracy.md).
    cfg.teacher.name = "timm:tf_efficientnet_lite2"
    preset = DATASET_PRESETS.get(where.data.root)
    if preset:
        _merge(cfg, preset, f"preset for data.root={where.data.root}")
    for data, source in layers:
        _merge(cfg, data, source)
    _validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a saved resolved config (config.json of a stage)."""
    cfg = Config()
    _merge(cfg, data, "saved config")
    return cfg
