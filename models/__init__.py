"""Building classifiers (torchvision or timm, any weight source) and saving/loading model artifacts."""
from models.artifact import (load_model_artifact, model_from_artifact, plain_history, rebuild_pruned,
                             save_model_artifact)
from models.build import (PYPI_WEIGHTS, WeightsUnavailable, backbone_blocks, build_model, find_head,
                          parse_name, replace_head)

__all__ = ["build_model", "parse_name", "replace_head", "find_head", "backbone_blocks", "PYPI_WEIGHTS",
           "WeightsUnavailable", "save_model_artifact", "load_model_artifact", "model_from_artifact", "rebuild_pruned",
           "plain_history"]
