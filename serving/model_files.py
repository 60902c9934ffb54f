"""Which model file to serve, whether it is the file the export wrote, and whether it is still there.

Model choice (EDGEPIPE_MODEL / serve.model):
- an export folder: model.json `recommended["server-<provider>"]` (else `recommended[provider]`) for variant
  auto (provider = cuda when onnxruntime can really use a GPU and the device is not cpu, else cpu), or
  files[int8|fp32];
- a path to an .onnx/.ort file: exactly that file.
Runtime (info["runtime"]): the one the recommended entry names for the chosen file (onnxruntime | openvino,
measured by the export stage; entries without `runtime` and older bare "int8"/"fp32" entries mean
onnxruntime), also for a file path when a model.json next to it recommends that file.

Integrity: model.json `sha256` ({file name: hex digest}, written by the export stage) is checked for
the file the server loads; exports older than that key are served with a log line saying so.
Torch-free, pipeline.config-free: a Bento carries serving/ and the torch-free core only.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.artifacts import sha256_file  # torch-free, like the rest of the core the server imports
from pipeline.modelcard import recommended_entry, recommended_runtime, sidecar_card

logger = logging.getLogger("bentoml.edgepipe")
MODEL_SUFFIXES = (".onnx", ".ort")


class ModelSpecError(ValueError):
    """The model setting names no usable model (a message fit for a person, naming the fix)."""


class ModelIntegrityError(RuntimeError):
    """A model file does not match the sha256 that model.json records for it."""


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


def resolve_model(spec, variant: str = "auto", device: str = "auto") -> tuple[Path, dict]:
    """A model file or an export folder -> (model file, info dict with variant/provider/card path).

    Raises FileNotFoundError (naming `make export`) or ModelSpecError.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix not in MODEL_SUFFIXES:
            raise ModelSpecError(f"{path} is not an ONNX model (.onnx or .ort)")
        provider = provider_for(device)
        runtime = recommended_runtime(sidecar_card(path), path.name, (f"server-{provider}", provider))
        return path.resolve(), {"variant": "file", "provider": provider, "card": None, "runtime": runtime}
    if not path.is_dir():
        if path.suffix in MODEL_SUFFIXES:
            raise _missing(path.parent, f"model file {path.name}")
        raise _missing(path, "the export folder")
    card_path = path / "model.json"
    if not card_path.exists():
        singles = sorted(p for p in path.iterdir() if p.suffix in MODEL_SUFFIXES)
        if len(singles) == 1:   # a hand-made folder with exactly one model
            return singles[0].resolve(), {"variant": "file", "provider": provider_for(device), "card": None,
                                          "runtime": "onnxruntime"}
        raise _missing(path, "model.json (the exported model card)")
    card = read_card_file(card_path)
    files = card.get("files") or {}
    provider = provider_for(device)
    chosen = variant
    if variant == "auto":
        try:
            entry = recommended_entry(card, f"server-{provider}") or recommended_entry(card, provider) or {}
        except ValueError as e:
            raise ModelSpecError(f"{card_path}: {e}; rerun `make export ARGS=--force`") from None
        chosen = entry.get("variant") or ("int8" if files.get("int8") else "fp32")
    if not isinstance(chosen, str) or (chosen not in ("int8", "fp32", "fp16") and chosen not in files):
        raise ModelSpecError(f"serve.model must be auto, int8, fp32 or a path to a model file, got {variant!r}")
    name = files.get(chosen)
    if not name:
        raise _missing(path, f"the {chosen} model (model.json files.{chosen} is empty: export did not "
                             f"write it; use serve.model=fp32 or re-export)")
    file = path / name
    if not file.exists():
        raise _missing(path, f"{name} (listed in model.json)")
    runtime = recommended_runtime(card, name, (f"server-{provider}", provider))
    return file.resolve(), {"variant": chosen, "provider": provider, "card": str(card_path.resolve()),
                            "runtime": runtime}


def read_card_file(card_path: Path) -> dict:
    try:
        card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{card_path} is unreadable ({e}); rerun `make export ARGS=--force`") from None
    if not isinstance(card, dict):
        raise ModelSpecError(f"{card_path} is not a model card (a JSON object); rerun `make export ARGS=--force`")
    return card


def verify_model_file(model_file: Path, card_path) -> str:
    """Check model_file against model.json `sha256`; returns what was checked (for the log)."""
    if not card_path:
        return f"{model_file.name}: no model.json next to it, sha256 not checked"
    recorded = read_card_file(Path(card_path)).get("sha256")
    if recorded is None:
        return (f"{model_file.name}: model.json has no `sha256` (an export older than the integrity check), "
                f"not checked; re-export to add it")
    expected = recorded.get(model_file.name) if isinstance(recorded, dict) else None
    if not expected:
        raise ModelIntegrityError(f"model.json `sha256` lists no digest for {model_file.name}; the export is "
                                  f"incomplete: rerun `make export ARGS=--force`")
    actual = sha256_file(model_file)
    if actual != str(expected).lower():
        raise ModelIntegrityError(f"{model_file} does not match the sha256 in model.json (file {actual[:12]}..., "
                                  f"recorded {str(expected)[:12]}...): it changed after the export; rerun "
                                  f"`make export ARGS=--force` (and `serve.stage_for_bento=true` for a Bento)")
    return f"{model_file.name}: sha256 matches model.json"


class FileWatch:
    """Remembers files' identity (inode, size, mtime) at load time; says when one went away or changed."""

    def __init__(self, *paths):
        self.stamps = {Path(p): self._stamp(Path(p)) for p in paths if p}

    @staticmethod
    def _stamp(path: Path):
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def problem(self) -> str | None:
        for path, stamp in self.stamps.items():
            try:
                now = self._stamp(path)
            except OSError:
                return f"{path} is gone"
            if now != stamp:
                return f"{path} changed after it was loaded"
        return None
