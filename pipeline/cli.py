"""Command line: python -m pipeline <stage> [--config FILE] [--force] [section.key=value ...]"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = {
    "finetune": "fine-tune an ImageNet-pretrained teacher on data.root",
    "compress": "distil the teacher into the student and prune it (torch-pruning)",
    "export": "ONNX + int8 + .ort, parity/accuracy checks, latency, run.dir/report.{json,md}",
    "serve": "start the BentoML inference server over run.dir/export",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Edge-deployment pipeline: finetune -> compress -> export -> serve. Each stage reads the "
                    "resolved config and the previous stage's artifacts under run.dir, resumes after a crash, "
                    "and is skipped when its config and inputs are unchanged.",
        epilog="Overrides: section.key=value (YAML value), e.g. data.root=/photos finetune.epochs=5 run.dir=runs/x. "
               "Unknown keys are errors. Multi-process: torchrun --nproc_per_node=N -m pipeline finetune ...")
    parser.add_argument("stage", choices=list(STAGES), help="; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    parser.add_argument("--config", "-c", help="YAML config (default: configs/default.yaml when it exists)")
    parser.add_argument("--force", action="store_true", help="rerun even if the stage is up to date")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after --config

    from models.build import WeightsUnavailable
    from pipeline.config import ConfigError, load_config
    from pipeline.data import DataError
    from pipeline.stage import StageError

    config = args.config
    if config is None and os.path.exists("configs/default.yaml"):
        config = "configs/default.yaml"
    try:
        cfg = load_config(config, args.overrides)
        module = importlib.import_module(f"pipeline.{args.stage}")
        module.run(cfg, force=args.force)
    except (ConfigError, DataError, WeightsUnavailable, FileNotFoundError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
