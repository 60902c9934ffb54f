"""The frozen-feature probe: logistic regression on a pretrained network's pooled features.

It is the field's classic baseline ("the pretrained convolutional base + another classifier") and
three things here: a floor that no shipped model may fall below, the starting point of the new head
(linear probe, then fine-tune: a trained head does not send random gradients into the pretrained
base), and a measure of how close the user's images are to the pretraining domain (finetune's
`auto` strategy).

Features are the input of the model's head (`models.find_head`), taken on un-augmented center crops,
so they are exact and computed once per model and split.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from models import find_head

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)   # inverse L2 strength, picked on the selection split


def supported(model: nn.Module) -> bool:
    """The probe needs a Linear head on pooled features (timm, and torchvision's resnet/efficientnet/mobilenet...)."""
    return isinstance(find_head(model)[1], nn.Linear)


@torch.no_grad()
def pooled_features(model: nn.Module, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """-> (features [N, D] float32, labels [N]): what the head sees, model in eval mode."""
    _, head = find_head(model)
    box = []
    hook = head.register_forward_pre_hook(lambda m, args: box.append(args[0].detach().flatten(1).float().cpu()))
    model.eval()
    labels = []
    try:
        for batch in loader:
            model(batch[0].to(device))
            labels.append(batch[-1])
    finally:
        hook.remove()
    return torch.cat(box).numpy(), torch.cat(labels).numpy()


def fit_probe(x_train, y_train, x_sel, y_sel, num_classes: int, seed: int = 0) -> dict:
    """Standardised multinomial logistic regression; C picked by the selection split's log-loss.

    -> {"weight" [C, D], "bias" [C]} acting on the raw features (the standardisation is folded in), the
    chosen C, and the selection accuracy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xs = (x_train - mean) / std, (x_sel - mean) / std
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xt, y_train)
        proba = _full_proba(clf, xs, num_classes)
        loss = log_loss(y_sel, proba, labels=list(range(num_classes)))
        if best is None or loss < best[0]:
            best = (loss, c, clf)
    _, c, clf = best
    weight, bias = _as_softmax_head(clf, num_classes)
    weight = weight / std
    bias = bias - weight @ mean
    logits = x_sel @ weight.T + bias
    return {"weight": weight.astype(np.float32), "bias": bias.astype(np.float32), "C": c,
            "selection_accuracy": float((logits.argmax(1) == y_sel).mean()) if len(y_sel) else 0.0}


def _full_proba(clf, x, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a class absent from train gets probability 0)."""
    out = np.zeros((len(x), num_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    out = np.clip(out, 1e-12, 1.0)
    return out / out.sum(1, keepdims=True)


def _as_softmax_head(clf, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn coefficients -> a softmax head's weight [C, D] and bias [C] giving the same probabilities."""
    d = clf.coef_.shape[1]
    weight, bias = np.zeros((num_classes, d)), np.full(num_classes, -30.0)  # absent classes: never predicted
    if len(clf.classes_) == 2:  # binary: p1 = sigmoid(z) = softmax([-z/2, z/2])[1]
        w, b = clf.coef_[0] / 2, clf.intercept_[0] / 2
        weight[clf.classes_[0]], bias[clf.classes_[0]] = -w, -b
        weight[clf.classes_[1]], bias[clf.classes_[1]] = w, b
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    return weight, bias


@torch.no_grad()
def set_head(model: nn.Module, probe: dict) -> None:
    """Copy the probe's weights into the model's classifier (Linear, or a 1x1 Conv2d head)."""
    _, head = find_head(model)
    w = torch.from_numpy(probe["weight"]).to(head.weight.dtype).to(head.weight.device)
    if w.shape[0] != head.weight.shape[0] or w.shape[1] != head.weight[0].numel():
        raise RuntimeError(f"probe weights {tuple(w.shape)} do not fit the head {tuple(head.weight.shape)}")
    head.weight.copy_(w.view_as(head.weight))
    if head.bias is not None:
        head.bias.copy_(torch.from_numpy(probe["bias"]).to(head.bias))


def probe_model(model: nn.Module, loaders: dict, device, num_classes: int, seed: int = 0) -> tuple[dict, dict]:
    """Fit the probe on `model`'s frozen features and put it in as the head.

    loaders: {"train", "val", "test"} un-augmented. -> (probe, {"train"/"val"/"test": (features, labels)}).
    The features are returned so that callers can score the probe on other splits without another pass.
    """
    feats = {split: pooled_features(model, loader, device) for split, loader in loaders.items()}
    probe = fit_probe(*feats["train"], *feats["val"], num_classes, seed)
    set_head(model, probe)
    return probe, feats


class _Features(nn.Module):
    """`net` with the pooled features its head sees as the output (instead of the logits), for engine.predict."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._head = (find_head(net)[1],)  # a tuple: not registered as a second child

    def forward(self, x):
        box = []
        hook = self._head[0].register_forward_pre_hook(lambda m, args: box.append(args[0].detach().flatten(1)))
        try:
            self.net(x)
        finally:
            hook.remove()
        return box[0]


def pooled_features_sharded(model: nn.Module, samples, make_loader, device) -> tuple[np.ndarray, np.ndarray]:
    """pooled_features over `samples` with each DDP rank extracting its shard (engine.predict_sharded); every rank
    gets all features and labels, in the order of `samples`. One process: the same numbers as
    pooled_features(model, make_loader(samples), device). make_loader(subset) -> an unshuffled eval loader."""
    from pipeline import engine

    m = engine.unwrap(model)
    dim = find_head(m)[1].weight[0].numel()
    feats, labels = engine.predict_sharded(_Features(m), samples, make_loader, device, dim)
    return feats.numpy(), labels.numpy()


def fit_sharded(model: nn.Module, splits: dict, make_loader, device, num_classes: int, seed: int = 0) -> dict:
    """The probe of `model` for every rank of a DDP job (one process: probe_model's numbers).

    splits: {"train", "val", "test"} -> (path, label) samples. Every rank extracts the features of its shard of
    each split and gets all of them (pooled_features_sharded); rank 0 alone fits the logistic regression (sklearn,
    seconds to minutes) and scores it on "test"; every rank gets rank 0's result. The head is not changed (set_head).
    -> {"weight", "bias", "C", "selection_accuracy", "test_accuracy", "test_predictions", "seconds"}
    """
    from pipeline import engine

    t0 = time.perf_counter()
    feats = {s: pooled_features_sharded(model, samples, make_loader, device) for s, samples in splits.items()}
    info = None
    if engine.dist_info().is_main:
        info = fit_probe(*feats["train"], *feats["val"], num_classes, seed)
        test_logits = probe_logits(info, feats["test"][0])
        info["test_accuracy"] = float((test_logits.argmax(1) == feats["test"][1]).mean())
        # per image, in the report split's order: export pairs them with the teacher's answers (teacher vs probes)
        info["test_predictions"] = test_logits.argmax(1).astype(int).tolist()
        info["seconds"] = round(time.perf_counter() - t0, 2)
    return engine.broadcast_object(info)


def probe_logits(probe: dict, features: np.ndarray) -> np.ndarray:
    return features @ probe["weight"].T + probe["bias"]


def similarity(selection_accuracy: float, num_classes: int) -> float:
    """How well frozen ImageNet features separate the user's classes: 0 = chance, 1 = perfect."""
    chance = 1.0 / num_classes
    return max(0.0, (selection_accuracy - chance) / (1.0 - chance))
