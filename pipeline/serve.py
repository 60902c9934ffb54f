"""The serve stage: `python -m pipeline serve` / `make serve` starts the BentoML server over run.dir/export.

It only resolves WHICH exported model to serve, parses the `serve` section with the server's own
parser (serving.settings.from_values: a bad value fails here, naming serve.<key>) and hands it to
`bentoml serve serving.service:ImageClassifier` as EDGEPIPE_* variables; the service lives in
serving/service.py and never imports this module (nor pipeline.config).

Model choice (serve.model): auto | int8 | fp32 (from run.dir/export/model.json, see
serving.model_files) or a path to an export folder or an .onnx/.ort file.

The server dies with this process whatever signal ends it (serving.lifetime): SIGINT/SIGTERM/SIGHUP/
SIGQUIT are forwarded, and a SIGKILL of this process (or of its whole group) sends the server SIGTERM
through PR_SET_PDEATHSIG, and its worker SIGKILL.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.stage import one_process_only
from serving import launcher
from serving.model_files import ModelSpecError, resolve_model
from serving.settings import SettingsError, from_values, to_environ

REPO_ROOT = launcher.REPO_ROOT
SERVICE = launcher.SERVICE
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _resolve_for_cfg(cfg) -> tuple[Path, dict]:
    choice = cfg.serve.model
    try:
        if choice in ("auto", "int8", "fp32"):
            return resolve_model(cfg.run_dir / "export", choice, cfg.run.device)
        return resolve_model(choice, "auto", cfg.run.device)
    except ModelSpecError as e:
        raise ConfigError(str(e)) from None


def serve_settings(cfg):
    """cfg.serve through the server's parser and checks (ConfigError naming serve.<key>)."""
    values = dataclasses.asdict(cfg.serve) if dataclasses.is_dataclass(cfg.serve) else dict(vars(cfg.serve))
    try:
        return from_values(values)
    except SettingsError as e:
        raise ConfigError(str(e)) from None


def service_env(cfg, model_file: Path) -> dict[str, str]:
    """EDGEPIPE_* variables carrying the serve section to the service process."""
    return to_environ(serve_settings(cfg), model_file, cfg.run.device)


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
    """Start `bentoml serve` in the foreground (signals are forwarded) and return when it exits."""
    if not one_process_only("serve"):  # under torchrun: one server, on rank 0 (N would fight over the port)
        return {"skipped": True, "reason": "not rank 0"}
    if getattr(cfg.serve, "stage_for_bento", False):
        return stage_for_bento(cfg)
    model_file, info = _resolve_for_cfg(cfg)
    env = service_env(cfg, model_file)
    runtime = cfg.serve.runtime if cfg.serve.runtime != "auto" else info.get("runtime", "onnxruntime")
    print(f"[serve] model {model_file} ({info['variant']}, provider {info['provider']}, runtime {runtime})")
    print(f"[serve] http://{cfg.serve.host}:{cfg.serve.port}  (POST /classify, POST /model_card, "
          f"GET /readyz /livez /metrics); Ctrl-C stops")
    proc = launcher.launch(env, cfg.serve.host, cfg.serve.port)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
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
