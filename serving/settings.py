"""Server settings: ServeConfig defaults, overridden by EDGEPIPE_* environment variables.

`python -m pipeline serve` resolves the config and passes it to `bentoml serve` through these variables;
inside a Bento (container, Kubernetes) the same variables can be set on the deployment.

    EDGEPIPE_MODEL           path of an .onnx/.ort file, or of an export folder holding model.json
                             (unset: serving/model/, the copy `bentoml build` packs into the Bento)
    EDGEPIPE_MODEL_VARIANT   auto | int8 | fp32   (only used when EDGEPIPE_MODEL is a folder)
    EDGEPIPE_DEVICE          auto | cpu | cuda    (auto = CUDA only when onnxruntime can really use it)
    EDGEPIPE_HOST            default bind address when `bentoml serve` gets no --host (127.0.0.1)
    EDGEPIPE_<KEY>           any ServeConfig key in upper case, e.g. EDGEPIPE_MAX_BODY_MB=5

Only numpy-free, torch-free imports here: the service module reads this at import time because the
BentoML decorators (traffic limits, batching) take their values when the class is defined.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

from pipeline.config import ServeConfig

ENV_PREFIX = "EDGEPIPE_"
PACKED_MODEL_DIR = Path(__file__).resolve().parent / "model"   # filled by `serve.stage_for_bento=true`


class SettingsError(ValueError):
    pass


@dataclasses.dataclass
class Settings:
    serve: ServeConfig
    model: str            # file or folder (see module doc); resolved by resolve_model_file()
    variant: str          # auto | int8 | fp32
    device: str           # auto | cpu | cuda


def _parse(name: str, raw: str, hint):
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name}={raw!r} is not a valid {hint.__name__}") from None
    return raw


def load_settings(environ: typing.Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    serve = ServeConfig()
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        name = ENV_PREFIX + f.name.upper()
        if name in env and f.name != "model":
            setattr(serve, f.name, _parse(name, env[name], hints[f.name]))
    for key in ("max_body_mb", "max_pixels", "max_batch_size", "max_latency_ms", "max_concurrency",
                "timeout", "top_k"):
        if getattr(serve, key) <= 0:
            raise SettingsError(f"serve.{key} must be > 0, got {getattr(serve, key)}")
    if serve.max_batch_size < 2:
        raise SettingsError("serve.max_batch_size must be >= 2 (BentoML's adaptive batching needs room)")
    model = env.get(ENV_PREFIX + "MODEL", "") or str(PACKED_MODEL_DIR)
    variant = env.get(ENV_PREFIX + "MODEL_VARIANT", "auto")
    if variant not in ("auto", "int8", "fp32"):
        raise SettingsError(f"{ENV_PREFIX}MODEL_VARIANT must be auto, int8 or fp32, got {variant!r}")
    return Settings(serve=serve, model=model, variant=variant, device=env.get(ENV_PREFIX + "DEVICE", "auto"))
