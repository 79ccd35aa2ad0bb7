"""Metrics on hand-made masks with known values, AUC, and evaluation of a real project."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training_backend.learning.metrics import binary_auc, case_metrics, evaluate_project, summarise
from training_backend.project.store import Project


def square(shape, y0, y1, x0, x1, value=1):
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def test_dice_iou_hd95_known_values():
    pred = square((10, 10), 2, 6, 2, 6)  # 16 px
    ref = square((10, 10), 2, 6, 4, 8)  # 16 px, 8 px overlap
    m = case_metrics(pred, ref, 1)
    assert m["dice"][0] == pytest.approx(0.5)  # 2*8 / 32
    assert m["iou"][0] == pytest.approx(1 / 3)  # 8 / 24
    assert m["hd95"][0] == pytest.approx(2.0)  # squares shifted by 2 px
    # single pixels 3-4-5 apart: HD95 = 5
    p, r = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    p[1, 1], r[4, 5] = 1, 1
    assert case_metrics(p, r, 1)["hd95"][0] == pytest.approx(5.0)
    assert case_metrics(ref, ref, 1) == {"dice": [1.0], "iou": [1.0], "hd95": [0.0]}


def test_empty_conventions_per_class():
    ref = square((8, 6), 1, 3, 1, 3, value=1)  # class 1 only
    pred = ref.copy()
    pred[6, 4] = 2  # a false class-2 pixel
    m = case_metrics(pred, ref, 3)  # class 3 absent in both
    assert m["dice"] == [1.0, 0.0, 1.0] and m["iou"] == [1.0, 0.0, 1.0]
    assert m["hd95"] == [0.0, pytest.approx(10.0), 0.0]  # diagonal of 8x6
    miss = case_metrics(np.zeros_like(ref), ref, 1)
    assert miss["dice"] == [0.0] and miss["hd95"] == [pytest.approx(10.0)]
    with pytest.raises(ValueError, match="differs"):
        case_metrics(np.zeros((4, 4)), ref, 1)


def test_binary_auc_known_cases():
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert binary_auc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert binary_auc([0.3, 0.2, 0.1], [0, 1, 1]) == 0.0
    assert binary_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)  # all tied
    assert binary_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)  # one tie across classes
    assert math.isnan(binary_auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.random(200), rng.random(200) < 0.3
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])  # definition
    assert binary_auc(s, y) == pytest.approx(pairs)


def test_evaluate_project(tmp_path):
    proj = Project.create(tmp_path / "p", classes=["lesion"], image_classes=["normal", "benign", "malignant"])
    shape = (12, 10)
    img = np.zeros(shape, np.uint8)
    ref_a = square(shape, 2, 6, 4, 8)
    cases = [  # (reference mask, reference label, predicted mask, presence score, image-class scores)
        (ref_a, "benign", square(shape, 2, 6, 2, 6), 0.9, {"normal": 0.1, "benign": 0.6, "malignant": 0.3}),
        (ref_a, "malignant", ref_a, 0.8, {"normal": 0.1, "benign": 0.3, "malignant": 0.6}),
        (np.zeros(shape, np.uint8), "normal", np.zeros(shape, np.uint8), 0.2, {"normal": 0.8, "benign": 0.1, "malignant": 0.1}),
        (np.zeros(shape, np.uint8), "normal", square(shape, 0, 1, 0, 1), 0.85, {"normal": 0.4, "benign": 0.5, "malignant": 0.1}),
    ]
    for i, (ref, label, pred, pres, img_cls) in enumerate(cases):
        cid = proj.add_case(img, f"case {i}", split="holdout" if i == 3 else "train")
        proj.set_reference(cid, mask=ref, image_label=label)
        prob = np.stack([pred == 0, pred == 1]).astype(np.float32)
        proj.write_outputs(cid, "m1", pred, prob, np.zeros((1, *shape)), np.zeros(shape), {"presence": [pres], "image_class": img_cls,
                                                                          "entropy": [0.6, 0.1, 0.3, 0.2][i]})
    proj.add_case(img, "no outputs")
    proj.set_reference(proj.case_ids()[-1], mask=ref_a)

    r = evaluate_project(proj)
    assert r["n_cases"] == 4 and r["n_without_outputs"] == 1
    assert r["per_class"]["lesion"]["n"] == 2
    assert r["dice"] == pytest.approx(0.75)  # (0.5 + 1) / 2 over lesion cases only
    assert r["iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["hd95"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert r["n_lesion_free"] == 2 and r["empty_rate"] == pytest.approx(0.5)
    assert r["presence_auc"]["lesion"] == pytest.approx(0.75)  # 0.85 negative beats 0.8 positive
    assert r["image_class_auc"]["normal"] == pytest.approx(1.0)
    assert r["image_class_auc"]["benign"] == pytest.approx(1.0)
    assert r["image_class_auc"]["malignant"] == pytest.approx(1.0)
    assert r["per_case"][proj.case_ids()[0]]["dice"]["lesion"] == pytest.approx(0.5)
    # the two lesion cases: entropy 0.6 on Dice 0.5, 0.1 on Dice 1 -> rank correlation 1; no
    # case below Dice 0.5, so no AUROC
    assert r["failure_detection"] == {"entropy": {"spearman": pytest.approx(1.0), "auroc": None, "n": 2}}

    train = evaluate_project(proj, split="train")
    assert train["n_cases"] == 3 and train["empty_rate"] == 1.0
    text = summarise(r)
    assert "0.750" in text and "50.0%" in text and "presence AUC" in text and "macro" in text
    assert "point at failures" in text and "entropy" in text


def test_spearman_and_failure_detection_by_hand():
    from training_backend.learning.metrics import failure_detection, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> r = 0.866
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # four lesion cases; entropy is high exactly on the two failures (Dice < 0.5), bald is
    # reversed, tta_var missing on one case
    rows = [(0.9, {"entropy": 0.1, "bald": 0.9, "tta_var": 0.2}),
            (0.8, {"entropy": 0.2, "bald": 0.8}),
            (0.3, {"entropy": 0.7, "bald": 0.2, "tta_var": 0.1}),
            (0.1, {"entropy": 0.9, "bald": 0.1, "tta_var": 0.3})]
    fd = failure_detection(rows)
    assert fd["entropy"] == {"spearman": pytest.approx(1.0), "auroc": 1.0, "n": 4}
    assert fd["bald"]["spearman"] == pytest.approx(-1.0) and fd["bald"]["auroc"] == 0.0
    # tta_var on 3 cases: Dice 0.9, 0.3, 0.1 -> 1-Dice 0.1, 0.7, 0.9 vs 0.2, 0.1, 0.3: ranks
    # (2, 1, 3) vs (1, 2, 3): r = 0.5; failures (0.1, 0.3) vs success 0.2: AUROC 0.5
    assert fd["tta_variance"]["spearman"] == pytest.approx(0.5)
    assert fd["tta_variance"]["auroc"] == pytest.approx(0.5) and fd["tta_variance"]["n"] == 3
    assert "random" not in fd and "kcenter" not in fd
