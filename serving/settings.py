"""Server settings: one typed object (ServeSettings) and one parser, shared by the server and the launcher.

`python -m pipeline serve` parses its config's `serve` section with `from_values` (so a bad value
fails at once, naming `serve.<key>`) and hands the result to `bentoml serve` as EDGEPIPE_* variables
(`to_environ`); the service parses those variables with the same `from_values` (`load_settings`).
Inside a Bento (container, Kubernetes) the same variables can be set on the deployment.

    EDGEPIPE_MODEL           path of an .onnx/.ort file, or of an export folder holding model.json
                             (unset: serving/model/, the copy `bentoml build` packs into the Bento)
    EDGEPIPE_MODEL_VARIANT   auto | int8 | fp32   (only used when EDGEPIPE_MODEL is a folder)
    EDGEPIPE_DEVICE          auto | cpu | cuda    (auto = CUDA only when onnxruntime can really use it)
    EDGEPIPE_RUNTIME         auto | onnxruntime | openvino   (auto = what model.json recommends for the file)
    EDGEPIPE_HOST            default bind address when `bentoml serve` gets no --host (127.0.0.1)
    EDGEPIPE_<KEY>           any ServeSettings key in upper case, e.g. EDGEPIPE_MAX_BODY_MB=5

Standard library only (no pipeline.config, no numpy, no torch): the service module reads this at
import time because the BentoML decorators (timeout, batching) take their values when the class
is defined. pipeline/config.py can use ServeSettings as its `serve` section so that the keys are
defined once.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

ENV_PREFIX = "EDGEPIPE_"
PACKED_MODEL_DIR = Path(__file__).resolve().parent / "model"   # filled by `serve.stage_for_bento=true`


class SettingsError(ValueError):
    pass


@dataclasses.dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 3000
    model: str = "auto"                  # serve stage: auto | int8 | fp32 | /path/to/model.onnx
    max_body_mb: float = 10.0
    max_pixels: int = 40_000_000
    # Peak memory to decode one image (pixels x bytes per pixel of its mode and conversions, see
    # pipeline.preprocess.decode_bytes): a 40 MP RGB photo needs 160 MB, a 40 MP 16-bit PNG 400 MB.
    max_decode_mb: int = 256
    max_aspect_ratio: float = 50.0       # longest / shortest side (pipeline.preprocess says why 50)
    decode_concurrency: int = 0          # decodes at once; 0 = usable cores (more only add memory)
    # Seconds for the whole request body to arrive, else 408. 10 MB at 8 Mbit/s takes 10 s; slower
    # senders should resize first. Must stay under `timeout` (BentoML's 504 for the whole request).
    body_timeout: float = 15.0
    max_buffered_mb: float = 256.0       # request bodies held in memory at once, all requests together
    max_batch_size: int = 32
    # BentoML adaptive batching: requests still queued after this long get 503 (load shedding). 50 ms shed
    # most requests at concurrency 4 on 2 CPU cores (docs/serve.md); 1000 kept all of them at 16.
    max_latency_ms: int = 1000
    max_concurrency: int = 64            # requests past the body read at once (more get 429)
    timeout: int = 30
    top_k: int = 5
    threads: int = 0                     # ORT intra-op threads; 0 = all cores
    # auto: the runtime model.json recommends for the served file (measured by export); onnxruntime | openvino
    # force one (openvino falls back to onnxruntime with one log line when it is not installed)
    runtime: str = "auto"
    # serve stage: copy the resolved export into serving/model/ (packed by bentofile.yaml) and exit
    stage_for_bento: bool = False

    def validate(self, name=lambda key: f"serve.{key}") -> "ServeSettings":
        """Range checks; `name(key)` says where a value came from (serve.x or EDGEPIPE_X)."""
        positive = ("max_body_mb", "max_pixels", "max_decode_mb", "body_timeout", "max_buffered_mb",
                    "max_latency_ms", "max_concurrency", "timeout", "top_k")
        for key in positive:
            if getattr(self, key) <= 0:
                raise SettingsError(f"{name(key)} must be > 0, got {getattr(self, key)}")
        for key in ("decode_concurrency", "threads"):
            if getattr(self, key) < 0:
                raise SettingsError(f"{name(key)} must be >= 0 (0 = automatic), got {getattr(self, key)}")
        if self.runtime not in ("auto", "onnxruntime", "openvino"):
            raise SettingsError(f"{name('runtime')} must be auto, onnxruntime or openvino, got {self.runtime!r}")
        if self.max_aspect_ratio < 1:
            raise SettingsError(f"{name('max_aspect_ratio')} must be >= 1, got {self.max_aspect_ratio}")
        if self.max_batch_size < 2:
            raise SettingsError(f"{name('max_batch_size')} must be >= 2 (BentoML's adaptive batching needs room)")
        if self.body_timeout >= self.timeout:
            raise SettingsError(f"{name('body_timeout')} ({self.body_timeout}) must be below {name('timeout')} "
                                f"({self.timeout}), so a slow upload gets 408 before BentoML's 504")
        if self.max_buffered_mb < self.max_body_mb:
            raise SettingsError(f"{name('max_buffered_mb')} must be >= {name('max_body_mb')}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"{name('port')} must be in 0..65535, got {self.port}")
        return self


@dataclasses.dataclass
class Settings:
    serve: ServeSettings
    model: str            # file or folder (see module doc); resolved by serving.model_files.resolve_model
    variant: str          # auto | int8 | fp32
    device: str           # auto | cpu | cuda


_HINTS = typing.get_type_hints(ServeSettings)


def parse_value(name: str, raw, hint):
    """One value -> its field type. Strings (environment) are parsed; typed values (a loaded config)
    are checked. `name` is how the user set it, for the message."""
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float):
            if isinstance(raw, bool) or (hint is int and isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return hint(int(raw) if hint is int and isinstance(raw, float) else raw)
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={raw!r} is not a valid {hint.__name__}") from None


def from_values(values: typing.Mapping[str, typing.Any], name=lambda key: f"serve.{key}") -> ServeSettings:
    """ServeSettings from a mapping of key -> value (strings or typed); unknown keys are ignored."""
    serve = ServeSettings()
    for f in dataclasses.fields(ServeSettings):
        if f.name in values and values[f.name] is not None:
            setattr(serve, f.name, parse_value(name(f.name), values[f.name], _HINTS[f.name]))
    return serve.validate(name)


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def load_settings(environ: typing.Mapping[str, str] | None = None) -> Settings:
    """The server's settings from EDGEPIPE_* variables (see the module doc)."""
    env = os.environ if environ is None else environ
    values = {f.name: env[_env_name(f.name)] for f in dataclasses.fields(ServeSettings)
              if f.name != "model" and _env_name(f.name) in env}
    serve = from_values(values, _env_name)
    model = env.get(ENV_PREFIX + "MODEL", "") or str(PACKED_MODEL_DIR)
    variant = env.get(ENV_PREFIX + "MODEL_VARIANT", "auto")
    if variant not in ("auto", "int8", "fp32"):
        raise SettingsError(f"{ENV_PREFIX}MODEL_VARIANT must be auto, int8 or fp32, got {variant!r}")
    return Settings(serve=serve, model=model, variant=variant, device=env.get(ENV_PREFIX + "DEVICE", "auto"))


def to_environ(serve: ServeSettings, model_file, device: str) -> dict[str, str]:
    """EDGEPIPE_* variables that make load_settings() give back `serve` for this model file."""
    env = {_env_name(f.name): str(getattr(serve, f.name)) for f in dataclasses.fields(ServeSettings)
           if f.name not in ("model", "stage_for_bento")}
    env[ENV_PREFIX + "MODEL"] = str(model_file)
    env[ENV_PREFIX + "DEVICE"] = device
    return env


def service_resources(device: str, threads: int = 0, gpu_present: typing.Callable[[], bool] | None = None) -> dict:
    """The BentoML service's `resources` (BentoML 1.4, "Work with GPUs": @bentoml.service(resources={"gpu": 1})).

    {"gpu": 1} when the model will run on a GPU: device `cuda` (or `cuda:0`), or `auto` when gpu_present() says
    onnxruntime will find one (only asked for auto). `bentoml serve` then gives the worker its own GPU
    (CUDA_VISIBLE_DEVICES, unless that is already set, or BENTOML_DISABLE_GPU_ALLOCATION is), and a Bento built
    with it asks its deployment for a GPU node. Otherwise CPU only: no GPU requested, plus {"cpu": threads} when
    serve.threads pins the cores. `cuda:N` with N > 0 requests none: BentoML's allocator would renumber the
    visible GPUs and cuda:N would then name another GPU, or none (use CUDA_VISIBLE_DEVICES=N with device cuda).
    """
    device = (device or "auto").strip().lower()
    cpu = {"cpu": str(int(threads))} if threads and threads > 0 else {}
    if device in ("cuda", "cuda:0") or (device == "auto" and gpu_present is not None and gpu_present()):
        return {"gpu": 1}
    return cpu


def decode_limits(serve: ServeSettings):
    """The decoder's limits for these settings (pipeline.preprocess.DecodeLimits)."""
    from pipeline.preprocess import DecodeLimits

    return DecodeLimits(max_pixels=serve.max_pixels, max_decode_bytes=serve.max_decode_mb * 1_000_000,
                        max_aspect_ratio=serve.max_aspect_ratio)
