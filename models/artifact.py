"""Model artifacts: state_dict + plain values, loaded with weights_only=True; never pickled modules.

A pruned model is saved as its state_dict plus torch-pruning's pruning history, and rebuilt by
building the architecture from its name, replaying the history on torch-pruning's dependency graph,
then loading the state_dict (as in Torch-Pruning's tests/test_load.py).

File format `edgepipe-model/1` (a torch.save'd dict): format, name, classes, num_classes,
preprocessing, pruning_history, extra, state_dict.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = "edgepipe-model/1"


def plain_history(history) -> list:
    """torch-pruning history -> [[layer name, is_out_channel, [indices]]] of plain Python values."""
    out = []
    for name, is_out, idxs in history:
        idxs = idxs.tolist() if hasattr(idxs, "tolist") else [int(i) for i in idxs]
        out.append([str(name), bool(is_out), idxs])
    return out


_plain_history = plain_history  # old private name, kept until every caller uses plain_history


def save_model_artifact(path, model: torch.nn.Module, *, name: str, classes: list[str], preprocessing: dict,
                        pruning_history=None, extra: dict | None = None) -> None:
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_torch_save({
        "format": FORMAT,
        "name": name,
        "classes": list(classes),
        "num_classes": len(classes),
        "preprocessing": preprocessing,
        "pruning_history": plain_history(pruning_history) if pruning_history else None,
        "extra": extra or {},
        "state_dict": state,
    }, path)


def _atomic_torch_save(obj, path) -> None:
    """torch.save to a temp file in the same folder, fsync, os.replace (as timm's CheckpointSaver does):
    a crash, a kill or a full disk leaves the previous file (or none), never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not possible on every OS; the file is already synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rebuild_pruned(model: torch.nn.Module, history: list, input_size) -> torch.nn.Module:
    """Replay a pruning history on a freshly built (unpruned) model of the same architecture."""
    import torch_pruning as tp

    model.eval()
    example = torch.zeros(1, *input_size)
    # torch-pruning traces the graph through autograd: works even when called under no_grad/inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        dg.load_pruning_history([(n, o, list(i)) for n, o, i in history])
    return model


def load_model_artifact(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """-> (model in eval mode on `device`, meta: every field of the file except state_dict)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    return model_from_artifact(blob, device, source=path)


def model_from_artifact(blob, device="cpu", source="this object") -> tuple[torch.nn.Module, dict]:
    """load_model_artifact of an artifact already read (the dict torch.load gave, e.g. one sent by another process)."""
    from models.build import build_model

    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{source} is not a model artifact of this pipeline (format {FORMAT})")
    model, _ = build_model(blob["name"], blob["num_classes"], weights="none")
    if blob.get("pruning_history"):
        rebuild_pruned(model, blob["pruning_history"], blob["preprocessing"]["input_size"])
    model.load_state_dict(blob["state_dict"], strict=True)
    model.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta
