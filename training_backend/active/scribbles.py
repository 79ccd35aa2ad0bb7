"""Synthetic scribbles from a reference mask, drawn as a clinician would draw them.

`synthetic_scribbles` turns a full reference mask (0 background, k lesion class k) into a
sparse annotation (0 unlabelled, k lesion class k, `store.BACKGROUND` = 255 background painted)
for simulated annotation sessions (``lesionseg simulate --annotate scribble``):

* **inside each lesion** (per class, the ``max_lesions`` largest connected lesions, largest
  first): up to ``lesion_strokes`` straight strokes along the lesion's long axis (its principal
  axis, give or take 20°). A stroke starts at a point inside the lesion (points far from the
  border likelier), runs both ways until it would leave the lesion shrunk by the brush radius,
  keeps the middle 50–90 % of that run and is painted with the round brush: shrinking first
  keeps the painted stroke inside the lesion. A lesion thinner than the brush gets a
  one-pixel stroke;
* **in the background**: ``background_strokes`` strokes of random direction, at most 15 % of
  the shorter image side long, in the background that lies farther than ``gap`` pixels from
  every lesion (default 4 % of the shorter side, at least two brush widths), so they stay away
  from lesion borders. A lesion-free image gets background strokes only.

No stroke ever crosses a border: lesion strokes lie inside their own lesion and background
strokes keep ``gap`` pixels from any lesion. The brush radius is about 0.6 % of the shorter image
side (1–2 px at 256 px, 6 px at 1024 px). Everything random comes from ``seed``, so a case's
scribbles are the same in every run with the same seed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import line
from skimage.morphology import disk

#: Painted background in a sparse mask (as `training_backend.project.store.BACKGROUND`; not imported, so
#: that this module needs no store).
BACKGROUND = 255


def brush_radius(shape: tuple[int, int]) -> int:
    """The brush radius in pixels for an image of ``shape`` (about 0.6 % of the shorter side)."""
    return max(1, int(round(0.006 * min(shape))))


def synthetic_scribbles(reference: np.ndarray, n_classes: int, seed: int | tuple | list = 0, *,
                        lesion_strokes: int = 2, background_strokes: int = 3,
                        max_lesions: int = 8, gap: int | None = None,
                        radius: int | None = None) -> np.ndarray:
    """Scribbles inside the lesions and in the background of a reference mask (module docstring).

    Args:
        reference: (H, W) full mask, 0 background, k lesion class k.
        n_classes: K lesion classes (pixel values above K are rejected).
        seed: seed (an int, or a sequence such as ``(run seed, case number)``).
        lesion_strokes: most strokes per lesion.
        background_strokes: strokes in the background.
        max_lesions: most lesions scribbled per class (the largest ones).
        gap: least distance in pixels between a background stroke and a lesion (default: 4 % of
            the shorter side, at least two brush widths).
        radius: brush radius in pixels (default `brush_radius`).

    Returns:
        (H, W) uint8 sparse mask: 0 unlabelled, k class k, 255 background.
    """
    ref = np.asarray(reference)
    if ref.ndim != 2:
        raise ValueError(f"reference mask must be (H, W), got shape {ref.shape}")
    if ref.size and int(ref.max()) > n_classes:
        raise ValueError(f"reference mask has value {int(ref.max())} above the {n_classes} classes")
    rng = np.random.default_rng(seed)
    r = brush_radius(ref.shape) if radius is None else int(radius)
    out = np.zeros(ref.shape, np.uint8)
    for k in range(1, n_classes + 1):
        labels, n = ndimage.label(ref == k, structure=np.ones((3, 3), bool))
        if not n:
            continue
        sizes = np.bincount(labels.ravel())[1:]  # (n,)
        boxes = ndimage.find_objects(labels)
        for i in np.argsort(-sizes, kind="stable")[:max_lesions]:
            sl = _pad(boxes[i], r + 1, ref.shape)
            lesion = labels[sl] == i + 1
            strokes = _strokes(lesion, r, lesion_strokes, rng, central=True)
            out[sl][strokes] = k
    gap = max(2 * r + 2, int(round(0.04 * min(ref.shape)))) if gap is None else int(gap)
    far = ndimage.distance_transform_edt(ref == 0) > gap if np.any(ref) else np.ones(ref.shape, bool)
    length = 0.15 * min(ref.shape)
    strokes = _strokes(far, r, background_strokes, rng, central=False, length=length)
    out[strokes & (ref == 0)] = BACKGROUND
    return out


def _pad(sl: tuple[slice, slice], pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(sl, shape))


def _strokes(region: np.ndarray, r: int, n_strokes: int, rng: np.random.Generator,
             central: bool, length: float | None = None) -> np.ndarray:
    """Up to ``n_strokes`` straight brush strokes inside ``region``.

    Each stroke starts from a point of the region shrunk by the brush (``central``: points far
    from the edge are likelier) and runs both ways along a direction (``central``: the region's
    long axis give or take 20°; otherwise any) until it would leave the shrunk region, then keeps
    the middle 50–90 % of that run (at most ``length`` pixels), painted with the round brush.

    Args:
        region: (h, w) bool area to paint in.
        r: brush radius.
        n_strokes: most strokes.
        rng: the random generator.
        central: lesion strokes (see above) rather than background ones.
        length: longest stroke in pixels (None: no limit but the region).
    """
    painted = np.zeros(region.shape, bool)
    if n_strokes <= 0 or not region.any():
        return painted
    brush = disk(r)
    core = ndimage.binary_erosion(region, brush, border_value=0)
    if not core.any():  # thinner than the brush: one-pixel strokes inside the region itself
        core, brush = region, None
    points = np.argwhere(core)  # (N, 2)
    weights = ndimage.distance_transform_edt(core)[core] if central else np.ones(len(points))
    axis = _long_axis(points) if central else None
    for _ in range(n_strokes):
        start = points[rng.choice(len(points), p=weights / weights.sum())].astype(float)
        angle = (axis + rng.normal(0.0, np.pi / 9)) if axis is not None else rng.uniform(0, np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        ends = [_walk(core, start, sign * direction, length) for sign in (1.0, -1.0)]
        keep = rng.uniform(0.5, 0.9)
        a, b = ends[0], ends[1]
        mid = (a + b) / 2.0
        a, b = mid + (a - mid) * keep, mid + (b - mid) * keep
        rr, cc = line(*np.round(a).astype(int), *np.round(b).astype(int))
        painted[rr, cc] = True
    painted &= core
    if brush is not None:
        painted = ndimage.binary_dilation(painted, brush)
    return painted & region


def _long_axis(points: np.ndarray) -> float | None:
    """Angle (radians, as ``atan2(dy, dx)``) of the principal axis of (N, 2) pixel coordinates."""
    if len(points) < 3:
        return None
    cov = np.cov((points - points.mean(0)).T)  # (2, 2) of (row, col)
    vals, vecs = np.linalg.eigh(cov)
    dy, dx = vecs[:, int(np.argmax(vals))]
    return float(np.arctan2(dy, dx))


def _walk(core: np.ndarray, start: np.ndarray, direction: np.ndarray,
          length: float | None) -> np.ndarray:
    """The last point of ``core`` on the ray from ``start`` (at most ``length / 2`` away)."""
    h, w = core.shape
    most = (length / 2.0) if length is not None else float(h + w)
    steps = np.arange(0.0, most + 0.5, 0.5)  # (S,) half-pixel steps
    pts = start[None] + steps[:, None] * direction[None]  # (S, 2)
    idx = np.round(pts).astype(int)
    inside = (idx[:, 0] >= 0) & (idx[:, 0] < h) & (idx[:, 1] >= 0) & (idx[:, 1] < w)
    inside[inside] = core[idx[inside, 0], idx[inside, 1]]
    stop = int(np.argmin(inside)) if not inside.all() else len(inside)
    return pts[max(stop - 1, 0)]


__all__ = ["BACKGROUND", "brush_radius", "synthetic_scribbles"]
