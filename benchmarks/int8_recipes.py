"""Every int8 recipe of one model of a finished run: accuracy, top-1 agreement and mean KL vs its fp32 ONNX, on the
selection split (what export decides on) and on the report split (what nobody decided on).

Not a test: the measurement behind `export.int8_choice` (docs/accuracy.md, "int8 recipe choice"). It goes through
the export stage's own code: `export.export_onnx`, `quant_pre_process` + `export.quantize`, `export.run_onnx`,
`export.kl_to_reference`, the run's own splits (`prepare_data`) and calibration sample.

  .venv/bin/python benchmarks/int8_recipes.py --run runs/cats224                       # the unpruned student
  .venv/bin/python benchmarks/int8_recipes.py --run runs/cats224 --artifact pruned_step2.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = [{"kind": "static", "per_channel": pc, "method": m, "name": f"{'per-channel' if pc else 'per-tensor'} {m}"}
           for pc in (True, False) for m in ("minmax", "percentile", "entropy")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run.dir whose finetune and compress stages finished")
    ap.add_argument("--artifact", default="student.pt", help="a model file in <run>/compress")
    args = ap.parse_args()

    from onnxruntime.quantization import quant_pre_process

    from models import load_model_artifact
    from pipeline import export, runtime
    from pipeline.config import config_from_dict
    from pipeline.data import prepare_data

    cfg = config_from_dict(json.loads((args.run / "finetune" / "config.json").read_text()))
    data = prepare_data(cfg)
    model, meta = load_model_artifact(args.run / "compress" / args.artifact)
    pre = meta["preprocessing"]
    x_sel, y_sel = export.load_images(data.val, pre)
    x_rep, y_rep = export.load_images(data.test, pre)
    calib, _ = export.load_images(export.stratified_sample(data.train, cfg.export.calibration_images, cfg.run.seed), pre)
    with tempfile.TemporaryDirectory() as work:
        fp32, prep = Path(work) / "model.fp32.onnx", Path(work) / "model.prep.onnx"
        export.export_onnx(model, pre["input_size"], fp32, cfg.export.opset, cfg.export.exporter)
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        session = runtime.make_session(fp32, "cpu", 2)
        ref = {"selection": (export.run_onnx(session, x_sel), y_sel), "report": (export.run_onnx(session, x_rep), y_rep)}
        print(f"{args.run / 'compress' / args.artifact}: fp32 selection {export.accuracy(*ref['selection']):.4f} "
              f"({len(y_sel)} images), report {export.accuracy(*ref['report']):.4f} ({len(y_rep)} images)")
        print("| recipe | selection acc | agreement | KL vs fp32 | report acc | agreement | KL vs fp32 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for recipe in RECIPES:
            out = Path(work) / "model.int8.onnx"
            export.quantize(prep, out, calib, recipe)
            q = runtime.make_session(out, "cpu", 2)
            cells = []
            for x, split in ((x_sel, "selection"), (x_rep, "report")):
                logits, (fp_logits, y) = export.run_onnx(q, x), ref[split]
                cells += [f"{export.accuracy(logits, y):.4f}", f"{(logits.argmax(1) == fp_logits.argmax(1)).mean():.4f}",
                          f"{export.kl_to_reference(fp_logits, logits):.5f}"]
            print(f"| {recipe['name']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
