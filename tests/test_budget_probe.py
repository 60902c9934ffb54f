"""The paired end-to-end budget rule and the frozen-feature probe, on small exact cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import budget, probe


def _pair(n: int, teacher_right: int, candidate_right: int, shared: int):
    """Per-image correctness with `shared` images right for both."""
    t = np.zeros(n, bool)
    c = np.zeros(n, bool)
    t[:teacher_right] = True
    c[:shared] = True
    c[teacher_right:teacher_right + candidate_right - shared] = True
    return t, c


def test_paired_drop_within_budget_passes_and_a_clear_loss_fails():
    t, c = _pair(200, 190, 189, 189)              # one image worse: drop 0.005 <= 0.01
    r = budget.paired_drop(t, c, 0.01)
    assert r["ok"] and r["drop"] == pytest.approx(0.005, abs=1e-6) and r["reason"] == "within the budget"
    assert r["teacher_only_right"] == 1 and r["candidate_only_right"] == 0
    t, c = _pair(200, 190, 170, 170)              # 20 images worse: 0.10, interval far above 0
    r = budget.paired_drop(t, c, 0.01)
    assert not r["ok"] and r["ci95"][0] > 0.01


def test_one_image_of_noise_does_not_decide():
    # 150 images, budget 0.01 = 1.5 images: 3 images lost and 0 gained is 0.02 (> budget + 1 image) -> fails;
    # 3 lost and 1 gained (drop 0.0133, within one image of the budget, interval containing 0) -> ships.
    t, c = _pair(150, 140, 137, 137)
    assert not budget.paired_drop(t, c, 0.01)["ok"]
    t, c = _pair(150, 140, 138, 137)
    r = budget.paired_drop(t, c, 0.01)
    assert r["drop"] == pytest.approx(2 / 150, abs=1e-6) and r["ci95"][0] <= 0 and r["ok"]
    assert "one image" in r["reason"]


def test_budget_is_deterministic_and_rejects_unpaired_inputs():
    t, c = _pair(100, 90, 85, 80)
    assert budget.paired_drop(t, c, 0.0) == budget.paired_drop(t, c, 0.0)
    assert budget.accuracy_ci(c) == budget.accuracy_ci(c) and budget.accuracy_ci(c)[0] < 0.85 < budget.accuracy_ci(c)[1]
    with pytest.raises(ValueError):
        budget.paired_drop(t, c[:50], 0.01)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_probe_head_reproduces_the_logistic_regression(num_classes):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (num_classes, 16))
    y = np.repeat(np.arange(num_classes), 40)
    x = (centers[y] + rng.normal(0, 1, (len(y), 16)) + 5).astype(np.float32)   # offset: standardisation matters
    fitted = probe.fit_probe(x[::2], y[::2], x[1::2], y[1::2], num_classes)
    assert fitted["C"] in probe.C_GRID and fitted["selection_accuracy"] > 0.9
    model = nn.Sequential(nn.Identity(), nn.Linear(16, num_classes))
    probe.set_head(model, fitted)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, probe.probe_logits(fitted, x), rtol=1e-4, atol=1e-4)
    from sklearn.linear_model import LogisticRegression  # same decisions as sklearn's own classifier
    mean, std = x[::2].mean(0), x[::2].std(0) + 1e-6
    clf = LogisticRegression(C=fitted["C"], max_iter=2000).fit((x[::2] - mean) / std, y[::2])
    assert (logits.argmax(1) == clf.predict((x - mean) / std)).all()


def test_pooled_features_are_what_the_head_sees():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(6, 3, 8, 8)
    loader = [(x[:3], torch.tensor([0, 1, 0])), (x[3:], torch.tensor([1, 1, 0]))]
    feats, labels = probe.pooled_features(model, loader, torch.device("cpu"))
    with torch.no_grad():
        expected = model[:3](x).numpy()
    np.testing.assert_allclose(feats, expected, atol=1e-6)
    assert labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert probe.similarity(0.5, 2) == 0.0 and probe.similarity(1.0, 5) == 1.0


def test_teacher_vs_probes_is_paired_and_says_when_the_teacher_is_clearly_below():
    from pipeline import export

    # rows: teacher, then a probe. 200 images.
    t, p = _pair(200, 180, 180, 175)                 # 5 each way: level -> at or above
    t2, p2 = _pair(200, 180, 182, 178)              # the probe 2 images ahead, interval containing 0
    t3, p3 = _pair(200, 150, 180, 150)              # the probe 30 images ahead on the same images
    for teacher, probe_, status, below in ((t, p, "at or above", 0), (t2, p2, "below, not distinguishable", 2),
                                          (t3, p3, "below", 30)):
        v = export.teacher_vs_probes({"teacher": teacher, "probe_student": probe_})["probe_student"]
        assert (v["status"], v["teacher_images_below"], v["images"]) == (status, below, 200)
        assert v["teacher_minus_probe"] == pytest.approx((teacher.sum() - probe_.sum()) / 200, abs=1e-6)
        assert v["ci95"][0] <= v["teacher_minus_probe"] <= v["ci95"][1]
    assert export.teacher_vs_probes({"teacher": t}) == {}   # no probe, no comparison
    assert "below by 30 image(s)" in export.teacher_vs_probes_lines(
        export.teacher_vs_probes({"teacher": t3, "probe_teacher": p3}))[0]


def test_the_teacher_probe_answers_pair_only_with_the_images_they_were_taken_on():
    from pipeline import export

    y = np.array([0, 1, 2, 1])
    kept = {"test_predictions": [0, 1, 0, 1], "test_accuracy": 0.75}
    assert export.teacher_probe_correct(kept, y).tolist() == [True, True, False, True]
    assert export.teacher_probe_correct({"test_accuracy": 0.75}, y) is None           # an older finetune run
    assert export.teacher_probe_correct(kept, y[:3]) is None                          # another split
    assert export.teacher_probe_correct({**kept, "test_accuracy": 0.5}, y) is None    # another order
