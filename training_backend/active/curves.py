"""Label-efficiency curves: a model's Dice against the annotations it learned from.

One implementation, used by the trainer panel's live curve (`napari_lesionseg._plot`) and by
``lesionseg simulate`` (`training_backend.active.simulate`, `training_backend.active.sim_report`):

* `model_points` — the panel's points: every registered model's validation Dice against the
  number of annotated cases it learned from;
* `annotation_count` / `annotation_time` — where a point lies on the x axis: annotations by
  kind, counted or priced in seconds of annotation time (`DEFAULT_COSTS_S`);
* `aggregate` / `series` — the curve: points at the same x (seeds, repeated runs) become their
  mean with the lowest and highest value (the spread);
* `first_reach` / `savings` — how many annotations a curve needs to reach a target Dice, and as
  a fraction of the reference curve's (random's) annotations.

Torch-free and Qt-free: the window imports it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

#: The kinds of annotation a point counts (the store's names).
KINDS = ("full", "sparse", "image_label")
#: Words for the kinds on plots and in tables.
KIND_LABELS = {"full": "full masks", "sparse": "scribbles", "image_label": "image labels"}
#: Seconds of a clinician's time per annotated case, by kind (``--cost`` overrides them).
DEFAULT_COSTS_S = {"image_label": 5.0, "sparse": 35.0, "full": 240.0}
#: Where `DEFAULT_COSTS_S` come from (printed by ``lesionseg simulate --help`` and the README).
COST_SOURCE = ("full mask 240 s and scribbles 35 s per image: the times Bearman et al. measured "
               "for full masks (239.7 s) and squiggles on PASCAL VOC (What's the Point, ECCV "
               "2016); image label 5 s: a few of their 1 s per-class presence answers. Natural "
               "images and crowd annotators, not clinicians: set your own with --cost")


@dataclass(frozen=True)
class CurvePoint:
    """One measured point.

    Args:
        x: annotations (or seconds of annotation time) the model learned from.
        dice: its Dice.
        series: the curve it belongs to (a strategy, ``peer``; "" for a single curve).
        seed: the seed of the run (points of one x and series from several seeds are averaged).
    """

    x: float
    dice: float
    series: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class CurveStat:
    """The curve at one x: mean Dice over the points there, and their lowest and highest."""

    x: float
    mean: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> float:
        """Half the range of the points (0 for one point)."""
        return (self.high - self.low) / 2.0


@dataclass(frozen=True)
class Saving:
    """How many annotations a curve needs to reach the reference curve's final Dice.

    Attributes:
        series: the curve.
        target: the reference curve's final mean Dice.
        reference_x: the reference curve's final x (its annotations).
        x: where this curve first reaches ``target`` (linear interpolation between its points),
            None when it never does.
        fraction: ``x / reference_x``, None when not reached.
        at_first_point: the curve is already at ``target`` at its first point, so ``x`` is an
            upper bound (fewer annotations might do; the curve says nothing below its start).
        comparable: False when the reference's final Dice is 0 (every curve "reaches" it).
    """

    series: str
    target: float
    reference_x: float
    x: float | None
    fraction: float | None
    at_first_point: bool = False
    comparable: bool = True

    def describe(self) -> str:
        """One phrase for a table: "0.55× (44 of 80)", "≤ 0.25× ...", "not reached"."""
        if not self.comparable:
            return "no comparison: random's final Dice is 0"
        if self.x is None:
            return f"not reached (random's final Dice {self.target:.3f} at {self.reference_x:g})"
        bound = "≤ " if self.at_first_point else ""
        return f"{bound}{self.fraction:.2f}× ({self.x:.1f} of {self.reference_x:g})"


def annotation_count(counts: Mapping[str, int], kinds: Sequence[str] = KINDS) -> int:
    """Annotated cases over ``kinds`` (a case with a label and a mask counts twice).

    Args:
        counts: cases per kind (`KINDS` keys; others are ignored).
        kinds: which kinds count.
    """
    return int(sum(int(counts.get(k, 0)) for k in kinds))


def annotation_time(counts: Mapping[str, int], costs: Mapping[str, float] | None = None) -> float:
    """Estimated seconds of annotation time: cases per kind times the seconds per case.

    Args:
        counts: cases per kind (`KINDS` keys).
        costs: seconds per case by kind (default `DEFAULT_COSTS_S`; missing kinds cost 0).
    """
    costs = DEFAULT_COSTS_S if costs is None else costs
    return float(sum(int(counts.get(k, 0)) * float(costs.get(k, 0.0)) for k in KINDS))


def model_points(models: Mapping[str, Mapping]) -> list[tuple[int, float]]:
    """The trainer panel's points: each registered model's validation Dice against the number
    of annotated cases it learned from (models without a validation Dice are left out).

    Args:
        models: ``Project.models()`` (model id → record with ``metrics.val_dice`` and
            ``n_annotations``, or ``n_train`` in records of older versions).
    """
    points = []
    for info in models.values():
        dice = (info.get("metrics") or {}).get("val_dice")
        n = info.get("n_annotations", info.get("n_train"))
        if isinstance(dice, (int, float)) and not isinstance(dice, bool) and math.isfinite(dice) \
                and isinstance(n, int) and not isinstance(n, bool):
            points.append((n, float(dice)))
    return points


def aggregate(points: Iterable[tuple[float, float | None]]) -> list[CurveStat]:
    """The curve through ``(x, dice)`` points: one `CurveStat` per distinct x, sorted by x.

    Points without a Dice (None or NaN) are left out.

    Args:
        points: ``(x, dice)`` pairs, e.g. one per seed and round.
    """
    by_x: dict[float, list[float]] = defaultdict(list)
    for x, d in points:
        if d is not None and math.isfinite(float(d)):
            by_x[float(x)].append(float(d))
    return [CurveStat(x, sum(v) / len(v), min(v), max(v), len(v)) for x, v in sorted(by_x.items())]


def series(points: Iterable[CurvePoint]) -> dict[str, list[CurveStat]]:
    """`aggregate` per series, in order of first appearance.

    Args:
        points: points of one or several series.
    """
    grouped: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        grouped.setdefault(p.series, []).append((p.x, p.dice))
    return {name: aggregate(pts) for name, pts in grouped.items()}


def first_reach(curve: Sequence[CurveStat], target: float) -> tuple[float | None, bool]:
    """Where a curve's mean first reaches ``target``.

    Between two points the curve is a straight line; the answer is where the first segment that
    rises to the target crosses it.

    Args:
        curve: `aggregate` output (sorted by x).
        target: the Dice to reach.

    Returns:
        ``(x, at_first_point)``: x is None when the curve never reaches ``target``;
        ``at_first_point`` is True when the first point already does (x is then an upper bound).
    """
    if not curve:
        return None, False
    if curve[0].mean >= target:
        return curve[0].x, True
    for prev, cur in zip(curve, curve[1:]):
        if prev.mean < target <= cur.mean:
            t = (target - prev.mean) / (cur.mean - prev.mean)
            return prev.x + t * (cur.x - prev.x), False
    return None, False


def savings(curves: Mapping[str, Sequence[CurveStat]], reference: str = "random") -> dict[str, Saving]:
    """For each curve, the annotations it needs to reach the reference curve's final Dice, as a
    fraction of the reference curve's final annotations.

    The reference curve is scored too: with noisy points it may reach its own final Dice before
    its last point (a fraction below 1 then says how noisy the comparison is).

    Args:
        curves: `series` output.
        reference: the curve every other is compared with.

    Returns:
        ``{series: Saving}``; empty when the reference curve is missing or empty.
    """
    ref = curves.get(reference) or []
    if not ref:
        return {}
    target, ref_x = ref[-1].mean, ref[-1].x
    out = {}
    for name, curve in curves.items():
        if target <= 0:
            out[name] = Saving(name, target, ref_x, None, None, comparable=False)
            continue
        x, first = first_reach(curve, target)
        fraction = None if x is None or ref_x <= 0 else x / ref_x
        out[name] = Saving(name, target, ref_x, x, fraction, first)
    return out


__all__ = ["COST_SOURCE", "CurvePoint", "CurveStat", "DEFAULT_COSTS_S", "KINDS", "KIND_LABELS",
           "Saving", "aggregate", "annotation_count", "annotation_time", "first_reach",
           "model_points", "savings", "series"]
