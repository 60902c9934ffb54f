"""On-device predictor: onnxruntime + numpy + Pillow only (no torch), for a Raspberry Pi or a phone build.

    python -m pipeline.predict runs/default/export/model.int8.onnx photo.jpg [more.jpg ...] [--top-k 3] [--json]

Imports only pipeline.preprocess, pipeline.modelcard and pipeline.runtime (all torch-free; pipeline/__init__
holds just the version string): pipeline/{__init__,preprocess,modelcard,runtime,predict}.py next to an
.onnx/.ort file are a complete client.
Exit status: 0 all images classified, 1 some image unreadable (reported on stderr), 2 unusable model.

Labels and preprocessing come from the model's own metadata (written by the export stage), so its
answers are the server's answers for the same files. Works with .onnx and .ort files.

Runtime (--runtime auto | onnxruntime | openvino): auto uses what model.json next to the file recommends for
it (`recommended.cpu.runtime`, measured by the export stage), else ONNX Runtime; OpenVINO needs
`pip install openvino` and falls back to ONNX Runtime with one log line when it is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.modelcard import read_card_from_session, recommended_runtime, sidecar_card
from pipeline.preprocess import BadImageError, preprocess, softmax, top_k
from pipeline.runtime import RUNTIMES, make_session, session_runtime


class Predictor:
    def __init__(self, model_path, device: str = "cpu", threads: int = 0, runtime: str = "auto"):
        if runtime == "auto":
            runtime = recommended_runtime(sidecar_card(model_path), Path(model_path).name, ("cpu", "edge-cpu"))
        self.session = make_session(model_path, device, threads, runtime=runtime)
        self.runtime = session_runtime(self.session)
        self.card = read_card_from_session(self.session)
        self.labels = self.card["labels"]
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def logits(self, images) -> np.ndarray:
        """images: paths, bytes or PIL images -> [N, C] logits (one image per call for fixed batch-1 phone files)."""
        x = np.stack([preprocess(im, self.card["preprocessing"]) for im in images]).astype(np.float32)
        if self.fixed_batch == 1:
            return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))])
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, images, k: int = 5) -> list[list[dict]]:
        return [top_k(p, self.labels, k) for p in softmax(self.logits(images))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model.int8.onnx, model.fp32.onnx or model.int8.ort from run.dir/export")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per image")
    ap.add_argument("--runtime", default="auto", choices=("auto", *RUNTIMES),
                    help="auto: what model.json next to the model recommends for it (else onnxruntime)")
    args = ap.parse_args(argv)
    try:
        predictor = Predictor(args.model, "cpu", args.threads, args.runtime)
    except Exception as e:  # noqa: BLE001 - missing file, not an ONNX model, no labels/preprocessing metadata
        print(f"error: cannot use {args.model} as a model: {e}", file=sys.stderr)
        return 2
    k = max(1, min(args.top_k, len(predictor.labels)))
    status = 0
    for path in args.images:
        try:
            preds = predictor.predict([path], k)[0]
        except (BadImageError, OSError) as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps({"image": path, "predictions": preds}))
        else:
            print(f"{path}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in preds))
    return status


if __name__ == "__main__":
    sys.exit(main())
