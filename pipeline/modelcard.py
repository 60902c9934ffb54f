"""The model card: what a device needs to use an exported model, stored inside the ONNX file.

Contract (export writes it, the predictor and the server read it):
- ONNX input `input`: float32 [N, 3, H, W]; output `logits`: float32 [N, num_classes].
- ONNX `metadata_props`: `labels` (JSON list of class names, index order), `preprocessing`
  (JSON dict, see pipeline.preprocess), `model_card` (JSON of the whole card, the same content as
  the sidecar `model.json`).

Needs only the `onnx` package (or nothing, when reading through onnxruntime), never torch.
"""
from __future__ import annotations

import json

CARD_KEYS = ("labels", "preprocessing", "model_card")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def set_onnx_metadata(model_proto, card: dict) -> None:
    """Write labels, preprocessing and the whole card into an onnx.ModelProto (in place)."""
    for key in CARD_KEYS:
        for i in reversed(range(len(model_proto.metadata_props))):
            if model_proto.metadata_props[i].key == key:
                del model_proto.metadata_props[i]
    values = {"labels": card["labels"], "preprocessing": card["preprocessing"], "model_card": card}
    for key in CARD_KEYS:
        entry = model_proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(values[key], sort_keys=True)
    model_proto.doc_string = f"{card.get('name', 'model')}: {len(card['labels'])}-class image classifier"


def card_from_metadata(props: dict) -> dict:
    """metadata_props as a dict (onnx or onnxruntime's custom_metadata_map) -> the card."""
    missing = [k for k in ("labels", "preprocessing") if k not in props]
    if missing:
        raise ValueError(f"the ONNX model has no {', '.join(missing)} metadata; export it with "
                         f"`python -m pipeline export` so labels and preprocessing travel with it")
    card = json.loads(props["model_card"]) if "model_card" in props else {}
    card["labels"] = json.loads(props["labels"])
    card["preprocessing"] = json.loads(props["preprocessing"])
    return card


def read_card_from_session(session) -> dict:
    """The card of an onnxruntime.InferenceSession's model."""
    return card_from_metadata(dict(session.get_modelmeta().custom_metadata_map))


def read_card(path) -> dict:
    """The card of an ONNX file, read with the onnx package (graph not needed)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return card_from_metadata({p.key: p.value for p in model.metadata_props})


# ----------------------------------------------------------------------------- model.json `recommended`
DEFAULT_RUNTIME = "onnxruntime"   # what an entry without `runtime` (older exports) means


def recommended_entry(card: dict, key: str) -> dict | None:
    """model.json `recommended[key]` as a dict with at least `variant` (when known), `file` and `runtime`.

    Accepts every form exports have written: today's {"variant", "file", "runtime", ...}, the per-platform
    {"file", "execution_provider", ...} without `runtime`, and the older bare variant name ("int8"/"fp32").
    A missing `runtime` means ONNX Runtime. None when the card has no such entry."""
    entry = (card.get("recommended") or {}).get(key)
    files = card.get("files") or {}
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = {"variant": entry, "file": files.get(entry)}
    elif not isinstance(entry, dict):
        raise ValueError(f"model.json recommended.{key} must be an object or a variant name, got {entry!r}")
    entry = dict(entry)
    if not entry.get("variant") and entry.get("file"):
        entry["variant"] = next((v for v, f in files.items() if f == entry["file"]), None)
    if not entry.get("file") and entry.get("variant"):
        entry["file"] = files.get(entry["variant"])
    entry["runtime"] = entry.get("runtime") or DEFAULT_RUNTIME
    return entry


def recommended_runtime(card: dict | None, file_name: str, keys=("cpu",)) -> str:
    """The runtime `recommended` names for this file under the first of `keys` that lists it; else ONNX Runtime."""
    for key in keys:
        entry = recommended_entry(card or {}, key)
        if entry and entry.get("file") == file_name:
            return entry["runtime"]
    return DEFAULT_RUNTIME


def sidecar_card(model_path) -> dict | None:
    """model.json next to a model file (the export folder), or None when there is none or it is unreadable."""
    from pathlib import Path

    path = Path(model_path).with_name("model.json")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None
