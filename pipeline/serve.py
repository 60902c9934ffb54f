"""The serve stage: `python -m pipeline serve` / `make serve` starts the BentoML server over run.dir/export.

It only resolves WHICH exported model to serve and hands the config to `bentoml serve
serving.service:ImageClassifier` through EDGEPIPE_* environment variables (see serving/settings.py);
the service itself lives in serving/service.py. Torch-free: the Bento imports resolve_model() from here.

Model choice (serve.model):
- auto: model.json `recommended[provider]`, provider = cuda when onnxruntime can really use a GPU
  (and run.device is not cpu), else cpu;
- int8 | fp32: that file of model.json `files`;
- a path to an .onnx/.ort file: exactly that file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:ImageClassifier"
MODEL_SUFFIXES = (".onnx", ".ort")


from pipeline.config import ConfigError


def _missing(where: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found in {where}; run `make export` (python -m pipeline export) with the same "
        f"CONFIG/ARGS first, or set serve.model=/path/to/model.onnx")


def provider_for(device: str = "auto") -> str:
    """'cuda' when sessions will run on the GPU, else 'cpu' (the key of model.json `recommended`)."""
    if device == "cpu":
        return "cpu"
    from pipeline.runtime import cuda_usable

    return "cuda" if cuda_usable() else "cpu"


def resolve_model(spec: str | os.PathLike, variant: str = "auto", device: str = "auto") -> tuple[Path, dict]:
    """A model file or an export folder -> (model file, info dict with variant/provider/card path).

    Raises FileNotFoundError (naming `make export`) or ConfigError with a message fit for a person.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix not in MODEL_SUFFIXES:
            raise ConfigError(f"{path} is not an ONNX model (.onnx or .ort)")
        return path.resolve(), {"variant": "file", "provider": provider_for(device), "card": None}
    if not path.is_dir():
        if path.suffix in MODEL_SUFFIXES:
            raise _missing(path.parent, f"model file {path.name}")
        raise _missing(path, "the export folder")
    card_path = path / "model.json"
    if not card_path.exists():
        singles = sorted(p for p in path.iterdir() if p.suffix in MODEL_SUFFIXES)
        if len(singles) == 1:   # a hand-made folder with exactly one model
            return singles[0].resolve(), {"variant": "file", "provider": provider_for(device), "card": None}
        raise _missing(path, "model.json (the exported model card)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{card_path} is unreadable ({e}); rerun `make export ARGS=--force`") from None
    files = card.get("files") or {}
    provider = provider_for(device)
    chosen = variant
    if variant == "auto":
        chosen = (card.get("recommended") or {}).get(provider) or ("int8" if files.get("int8") else "fp32")
    if chosen not in ("int8", "fp32", "fp16") and chosen not in files:
        raise ConfigError(f"serve.model must be auto, int8, fp32 or a path to a model file, got {variant!r}")
    name = files.get(chosen)
    if not name:
        raise _missing(path, f"the {chosen} model (model.json files.{chosen} is empty: export did not "
                             f"write it; use serve.model=fp32 or re-export)")
    file = path / name
    if not file.exists():
        raise _missing(path, f"{name} (listed in model.json)")
    return file.resolve(), {"variant": chosen, "provider": provider, "card": str(card_path.resolve())}


def _resolve_for_cfg(cfg) -> tuple[Path, dict]:
    choice = cfg.serve.model
    if choice in ("auto", "int8", "fp32"):
        return resolve_model(cfg.run_dir / "export", choice, cfg.run.device)
    return resolve_model(choice, "auto", cfg.run.device)


def service_env(cfg, model_file: Path) -> dict[str, str]:
    """EDGEPIPE_* variables carrying the serve section to the service process."""
    env = {f"EDGEPIPE_{k.upper()}": str(v) for k, v in vars(cfg.serve).items()
           if k not in ("model", "stage_for_bento") and v is not None}
    env["EDGEPIPE_MODEL"] = str(model_file)
    env["EDGEPIPE_DEVICE"] = cfg.run.device
    env["EDGEPIPE_HOST"] = cfg.serve.host
    return env


def stage_for_bento(cfg, dest: Path | None = None) -> dict:
    """Copy the export (model.json + its model files) into serving/model/, which bentofile.yaml packs.

    Inside the Bento, EDGEPIPE_MODEL is unset and the service serves serving/model/ with the same
    `recommended` rule (int8 on CPU, fp32 on CUDA), so one Bento works on both kinds of nodes.
    """
    dest = Path(dest) if dest is not None else REPO_ROOT / "serving" / "model"
    model_file, info = _resolve_for_cfg(cfg)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copied = []
    if info["card"]:
        card_path = Path(info["card"])
        card = json.loads(card_path.read_text(encoding="utf-8"))
        for key, name in (card.get("files") or {}).items():
            if name and key in ("fp32", "int8", "fp16") and (card_path.parent / name).exists():
                shutil.copy2(card_path.parent / name, dest / name)
                copied.append(name)
        if cfg.serve.model in ("int8", "fp32"):   # an explicit choice wins over `recommended`
            card["recommended"] = {"cpu": cfg.serve.model, "cuda": cfg.serve.model}
        (dest / "model.json").write_text(json.dumps(card, indent=2, sort_keys=True), encoding="utf-8")
        copied.append("model.json")
    else:
        shutil.copy2(model_file, dest / model_file.name)
        copied.append(model_file.name)
    print(f"[serve] staged {', '.join(copied)} into {dest}; now run `bentoml build` in {REPO_ROOT}")
    return {"staged": str(dest), "files": copied}


def run(cfg, force: bool = False) -> dict:
    """Start `bentoml serve` in the foreground (Ctrl-C / SIGTERM are forwarded) and return when it exits."""
    if getattr(cfg.serve, "stage_for_bento", False):
        return stage_for_bento(cfg)
    model_file, info = _resolve_for_cfg(cfg)
    env = {**os.environ, **service_env(cfg, model_file)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    bentoml_exe = Path(sys.executable).with_name("bentoml")
    cmd = ([str(bentoml_exe)] if bentoml_exe.exists() else [sys.executable, "-m", "bentoml"]) + [
        "serve", SERVICE, "--host", cfg.serve.host, "--port", str(cfg.serve.port),
        "--working-dir", str(REPO_ROOT)]
    print(f"[serve] model {model_file} ({info['variant']}, provider {info['provider']})")
    print(f"[serve] http://{cfg.serve.host}:{cfg.serve.port}  (POST /classify, POST /model_card, "
          f"GET /readyz /livez /metrics); Ctrl-C stops")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT))

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:   # the handler forwards; keep waiting for a clean exit
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc not in (0, -signal.SIGINT, -signal.SIGTERM):
        print(f"error: bentoml serve exited with code {rc} (see the log above)", file=sys.stderr)
        raise SystemExit(rc if rc > 0 else 1)
    return {"model": str(model_file), "variant": info["variant"], "returncode": rc}
