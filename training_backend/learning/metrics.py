"""Segmentation and detection metrics, and evaluation of a project's latest outputs.

Conventions (per case, per lesion class k, on class maps ``pred`` and ``ref``):

* reference has k: Dice, IoU (MONAI ``compute_dice`` / ``compute_iou``) and HD95 (MONAI
  ``compute_hausdorff_distance(percentile=95)``, in pixels). An empty prediction scores Dice 0,
  IoU 0 and HD95 = the image diagonal (the largest possible distance), so a miss is penalised
  rather than silently dropped.
* reference lacks k: Dice 1 / IoU 1 / HD95 0 when the prediction also lacks k, else Dice 0 /
  IoU 0 / HD95 = diagonal. ``evaluate_project`` **excludes** these cases from the per-class
  means (they would inflate them) and reports instead ``empty_rate``: the fraction of lesion-free
  reference cases whose prediction is empty.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from training_backend.errors import ProjectError


def _onehot(mask: np.ndarray, n_classes: int) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask).astype(np.int64))
    return torch.stack([m == c for c in range(n_classes + 1)], 0)[None].float()  # (1, K+1, H, W)


def case_metrics(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> dict[str, list[float]]:
    """Dice, IoU and HD95 per lesion class for one case (conventions: module docstring).

    Args:
        pred: (H, W) predicted class map (0 background, k class k).
        ref: (H, W) reference class map.
        n_classes: K lesion classes.

    Returns:
        ``{"dice": [K], "iou": [K], "hd95": [K]}``.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    p, r = _onehot(pred, n_classes), _onehot(ref, n_classes)
    diagonal = float(math.hypot(*ref.shape))
    dice = compute_dice(p, r, include_background=False, ignore_empty=False)[0].tolist()
    iou = compute_iou(p, r, include_background=False, ignore_empty=False)[0].tolist()
    hd = []
    for k in range(1, n_classes + 1):
        has_p, has_r = bool(p[0, k].any()), bool(r[0, k].any())
        if not has_p and not has_r:
            hd.append(0.0)
        elif has_p != has_r:
            hd.append(diagonal)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MONAI deprecation chatter
                d = compute_hausdorff_distance(p[:, [0, k]], r[:, [0, k]], include_background=False, percentile=95)
            hd.append(float(d.reshape(-1)[0]))
    return {"dice": [float(v) for v in dice], "iou": [float(v) for v in iou], "hd95": hd}


def binary_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """Area under the ROC curve by the rank (Mann–Whitney U) formula, ties counted half.

    Args:
        scores: higher = more likely positive.
        labels: 1/True positive, 0/False negative.

    Returns:
        AUC in [0, 1], or NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their mean rank.

    Args:
        values: 1-D values.
    """
    s = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.arange(1, s.size + 1)
    uniq, inverse = np.unique(s, return_inverse=True)
    if uniq.size < s.size:  # average ranks within ties
        ranks = (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]
    return ranks


def _nanmean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else None


def evaluate_project(project: Any, split: str | None = None) -> dict:
    """Compare every case's latest outputs with its hidden reference.

    Cases need a reference (mask and/or reference labels) and outputs; others are counted in
    ``n_without_outputs`` / skipped.

    Args:
        project: an open ``store.Project``.
        split: only cases of this split ("train" / "holdout"); ``None`` = all.

    Returns:
        A JSON-able dict: ``n_cases`` (cases with outputs and a reference), ``n_without_outputs``,
        ``per_class`` ``{name: {"dice", "iou", "hd95", "n"}}`` (means over cases whose reference
        mask has the class), ``dice`` / ``iou`` / ``hd95`` (macro means over classes),
        ``empty_rate`` and ``n_lesion_free`` (lesion-free reference cases whose prediction is
        empty), ``presence_auc`` ``{name: auc}`` (``scores["presence"]`` vs reference presence),
        ``image_class_auc`` ``{name: auc}`` one-vs-rest and ``image_class_auc_macro`` (when
        reference image labels and image-class scores exist), and ``per_case``
        ``{cid: {"name", "dice": {class: value}, "empty_pred", "lesion_free"}}``.
    """
    classes = list(project.classes)
    k = len(classes)
    per_class: dict[str, dict[str, list[float]]] = {c: {"dice": [], "iou": [], "hd95": []} for c in classes}
    presence_scores: dict[str, list[tuple[float, bool]]] = {c: [] for c in classes}
    img_scores: list[tuple[dict, str]] = []
    per_case: dict[str, dict] = {}
    failure_rows: list[tuple[float, dict]] = []  # (case Dice, stored scores) of lesion cases
    n_cases = n_missing = n_free = n_free_empty = 0
    for cid in project.case_ids():
        rec = project.case(cid)
        if split is not None and rec.split != split:
            continue
        ref = project.read_reference(cid)
        if ref is None and rec.reference_label is None and not rec.reference_presence:
            continue
        out = project.read_outputs(cid)
        if out is None:
            n_missing += 1
            continue
        n_cases += 1
        pred = np.asarray(out.pred)
        # reference presence per class: from the mask, else from the reference labels
        if ref is not None:
            ref_present = [bool(np.any(ref == i + 1)) for i in range(k)]
        elif rec.reference_presence:
            ref_present = [rec.reference_presence.get(c) for c in classes]
        elif project.is_negative(rec.reference_label):
            ref_present = [False] * k
        else:
            ref_present = [None] * k
        entry: dict[str, Any] = {"name": rec.name, "empty_pred": not bool(np.any(pred > 0))}
        if ref is not None:
            if pred.shape != ref.shape:
                raise ProjectError(f"{project.path}: case {cid} ({rec.name}) prediction {pred.shape} differs from reference {ref.shape}")
            m = case_metrics(pred, ref, k)
            entry["dice"] = {}
            for i, c in enumerate(classes):
                if ref_present[i]:
                    for key in ("dice", "iou", "hd95"):
                        per_class[c][key].append(m[key][i])
                    entry["dice"][c] = m["dice"][i]
        if all(v is False for v in ref_present):
            n_free += 1
            n_free_empty += int(entry["empty_pred"])
            entry["lesion_free"] = True
        else:
            entry["lesion_free"] = False
        scores = out.scores or {}
        pres = scores.get("presence")
        if pres is not None and len(pres) == k:
            for i, c in enumerate(classes):
                if ref_present[i] is not None:
                    presence_scores[c].append((float(pres[i]), bool(ref_present[i])))
        if rec.reference_label is not None and isinstance(scores.get("image_class"), dict):
            img_scores.append((scores["image_class"], rec.reference_label))
        if entry.get("dice"):  # a case with lesions: how well each acquisition score flags it
            failure_rows.append((float(np.mean(list(entry["dice"].values()))), scores))
        per_case[cid] = entry

    result: dict[str, Any] = {"n_cases": n_cases, "n_without_outputs": n_missing, "split": split or "all"}
    result["per_class"] = {
        c: {"dice": _nanmean(v["dice"]), "iou": _nanmean(v["iou"]), "hd95": _nanmean(v["hd95"]), "n": len(v["dice"])}
        for c, v in per_class.items()
    }
    for key in ("dice", "iou", "hd95"):
        result[key] = _nanmean([v[key] for v in result["per_class"].values() if v["n"]])
    result["n_lesion_free"] = n_free
    result["empty_rate"] = n_free_empty / n_free if n_free else None
    result["presence_auc"] = {
        c: _none_if_nan(binary_auc([s for s, _ in v], [y for _, y in v])) if v else None for c, v in presence_scores.items()
    }
    result["image_class_auc"] = None
    result["image_class_auc_macro"] = None
    if img_scores:
        aucs = {}
        for name in project.image_classes:
            aucs[name] = _none_if_nan(binary_auc([float(s.get(name, 0.0)) for s, _ in img_scores], [lab == name for _, lab in img_scores]))
        result["image_class_auc"] = aucs
        result["image_class_auc_macro"] = _nanmean([v for v in aucs.values() if v is not None])
    result["failure_detection"] = failure_detection(failure_rows)
    result["per_case"] = per_case
    return result


#: A case whose Dice is below this counts as a failure of the model.
FAILURE_DICE = 0.5


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties; NaN when either side is constant).

    Args:
        x, y: paired values.
    """
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def failure_detection(rows: Sequence[tuple[float, dict]]) -> dict[str, dict]:
    """Does each acquisition strategy's case score point at the model's failures?

    For every score strategy of ``acquisition.STRATEGIES``: the Spearman correlation of its
    score with 1 − Dice and the AUROC of its score for Dice < `FAILURE_DICE`, over the cases
    with lesions. Pointing at failures is not the same as saving annotations, but a strategy at
    chance here (0 and 0.5) sends the annotator to cases the model already gets right as often
    as to the ones it gets wrong.

    Args:
        rows: (case Dice, the case's stored scores) of the cases with lesions.

    Returns:
        ``{strategy: {"spearman", "auroc", "n"}}`` (None where undefined).
    """
    from training_backend.active.acquisition import FEATURES, STRATEGIES

    out = {}
    for name, strat in STRATEGIES.items():
        keys = [k for k in strat.needs if k != FEATURES]
        if len(keys) != 1:
            continue  # random and kcenter give no per-case score
        pairs = [(float(sc[keys[0]]), d) for d, sc in rows
                 if isinstance(sc.get(keys[0]), (int, float)) and math.isfinite(sc[keys[0]])]
        if not pairs:
            continue
        score, dice = [p[0] for p in pairs], [p[1] for p in pairs]
        out[name] = {"spearman": _none_if_nan(spearman(score, [1 - d for d in dice])),
                     "auroc": _none_if_nan(binary_auc(score, [d < FAILURE_DICE for d in dice])),
                     "n": len(pairs)}
    return out


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def summarise(result: dict) -> str:
    """A short text table of an ``evaluate_project`` result (for the CLI).

    Args:
        result: the dict returned by ``evaluate_project``.
    """

    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [f"cases evaluated: {result['n_cases']} (split: {result.get('split', 'all')}; without outputs: {result['n_without_outputs']})"]
    rows = [(c, f(v["dice"]), f(v["iou"]), f(v["hd95"], 1), str(v["n"])) for c, v in result["per_class"].items()]
    rows.append(("mean", f(result["dice"]), f(result["iou"]), f(result["hd95"], 1), ""))
    header = ("class", "Dice", "IoU", "HD95 px", "n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        lines.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths))))
    er = result["empty_rate"]
    lines.append(f"empty predictions on lesion-free cases: {'-' if er is None else f'{100 * er:.1f}%'} (n={result['n_lesion_free']})")
    pa = {c: v for c, v in result["presence_auc"].items() if v is not None}
    if pa:
        lines.append("presence AUC: " + ", ".join(f"{c} {f(v)}" for c, v in pa.items()))
    fd = result.get("failure_detection") or {}
    if fd:
        lines.append(f"do the acquisition scores point at failures? (cases with lesions; failure: "
                     f"Dice < {FAILURE_DICE})")
        lines.append("  strategy             Spearman(score, 1-Dice)  AUROC(failure)")
        for name, v in sorted(fd.items(), key=lambda kv: -(kv[1]["auroc"] or 0)):
            lines.append(f"  {name:<20} {f(v['spearman']):>23}  {f(v['auroc']):>14}")
    if result.get("image_class_auc"):
        lines.append(
            "image-class AUC: "
            + ", ".join(f"{c} {f(v)}" for c, v in result["image_class_auc"].items())
            + f" (macro {f(result['image_class_auc_macro'])})"
        )
    return "\n".join(lines)
