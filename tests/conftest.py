"""Shared fixtures: a tiny synthetic project with every kind of supervision.

``tiny_project`` (function scope, in ``tmp_path``) is a real `Project` built through the public
store API. Images are 48×48 grey uint8: a smooth background (~80) with noise, and 1–2 bright
discs (~230) as lesions of class ``"lesion"``. Image classes are ``["normal", "abnormal"]``
(``normal`` is a negative class). Every case has a hidden reference (mask + image label).

Default cases, in order (``TINY_LAYOUT``)::

    c000001-c000004  full mask            image label "abnormal"
    c000005          sparse mask          (scribbles: lesion pixels + painted background)
    c000006          image label only     "abnormal"
    c000007          image label only     "normal" (no lesion in the image)
    c000008          unlabelled
    c000009-c000010  holdout split        unlabelled, reference mask only

With 4 full cases the trainer holds 1 of them out for validation.

``tiny_project_factory(**kw)`` builds variants (see `make_tiny_project`): other layouts, a size,
several lesion classes (class k is drawn with intensity 230 - 60 (k-1)), RGB cases (e.g. a mostly
grey project with one RGB image, like BUSI). ``make_tiny_project(path, ...)`` is the same outside
pytest (``from conftest import make_tiny_project``).

``workspace`` (GUI tests) is the lesion workspace docked in a napari viewer, shut down after the
test once its background tasks have ended.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

#: Supervision of the training cases: full | sparse | label | negative | none.
TINY_LAYOUT = ("full", "full", "full", "full", "sparse", "label", "negative", "none")


def _draw_case(rng: np.random.Generator, size: int, n_classes: int, lesions: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image uint8 (S, S), reference mask uint8 (S, S))."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    base = 80 + 20 * np.sin(xx / size * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
    image = base + rng.normal(0, 8, (size, size))
    mask = np.zeros((size, size), np.uint8)
    if lesions:
        for j in range(int(rng.integers(1, 3))):
            cls = 1 + (j % n_classes) if n_classes > 1 else 1
            r = rng.uniform(size * 0.08, size * 0.16)
            cy, cx = rng.uniform(r + 2, size - r - 2, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            mask[disc] = cls
            image[disc] = 230 - 60 * (cls - 1) + rng.normal(0, 8, int(disc.sum()))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _scribbles(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sparse annotation from a reference: a few lesion pixels per disc + a painted background
    band (0 = unlabelled, k = class, 255 = background)."""
    from training_backend.project.store import BACKGROUND

    sparse = np.zeros_like(mask)
    for cls in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == cls)
        pick = rng.choice(len(ys), size=min(12, len(ys)), replace=False)
        sparse[ys[pick], xs[pick]] = cls
    band = np.zeros_like(mask, dtype=bool)
    band[1:4, :] = True
    band[:, 1:4] = True
    sparse[band & (mask == 0)] = BACKGROUND
    return sparse


def make_tiny_project(path: str | Path, layout: Sequence[str] = TINY_LAYOUT, n_holdout: int = 2,
                      size: int = 48, classes: Sequence[str] = ("lesion",),
                      image_classes: Sequence[str] = ("normal", "abnormal"),
                      rgb_cases: Sequence[int] = (), seed: int = 0):
    """Build a small synthetic project (see the module docstring).

    Args:
        path: folder to create.
        layout: supervision of each training case: ``full``, ``sparse``, ``label`` (image label
            "abnormal"), ``negative`` (image label "normal", no lesion drawn) or ``none``.
        n_holdout: extra unlabelled cases in the ``holdout`` split (with references).
        size: image side in pixels.
        classes: lesion class names (class k drawn with intensity 230 - 60 (k-1)).
        image_classes: image classes; the first is the negative one, the last the positive one.
        rgb_cases: 0-based indices of cases stored as RGB (H, W, 3) instead of grey.
        seed: random seed.

    Returns:
        The open `Project`.
    """
    from training_backend.project.store import Project

    rng = np.random.default_rng(seed)
    project = Project.create(path, list(classes), list(image_classes), name="tiny")
    negative, positive = (image_classes[0], image_classes[-1]) if image_classes else (None, None)
    kinds = list(layout) + ["holdout"] * n_holdout
    for i, kind in enumerate(kinds):
        lesions = kind != "negative"
        image, mask = _draw_case(rng, size, len(classes), lesions)
        if i in rgb_cases:
            tint = np.array([1.0, 0.9, 0.8], np.float32)
            image = np.clip(image[..., None] * tint, 0, 255).astype(np.uint8)  # (S, S, 3)
        label = negative if kind == "negative" else (positive if kind in ("full", "label") else None)
        cid = project.add_case(image, f"case {i + 1:02d} ({kind})", source=f"/synthetic/case {i + 1}.png",
                               image_label=label if image_classes else None,
                               split="holdout" if kind == "holdout" else "train")
        if kind == "full":
            project.save_annotation(cid, mask, "full", author="fixture")
        elif kind == "sparse":
            project.save_annotation(cid, _scribbles(mask, rng), "sparse", author="fixture")
        project.set_reference(cid, mask=mask,
                              image_label=(negative if not mask.any() else positive) if image_classes else None)
    return project


@pytest.fixture()
def tiny_project(tmp_path):
    """A fresh tiny project (see the module docstring) in ``tmp_path / "tiny"``."""
    return make_tiny_project(tmp_path / "tiny")


@pytest.fixture()
def tiny_project_factory(tmp_path):
    """``factory(name="tiny", **make_tiny_project kwargs)`` → a new project in ``tmp_path``."""
    def factory(name: str = "tiny", **kw):
        return make_tiny_project(tmp_path / name, **kw)
    return factory


@pytest.fixture(scope="session")
def bundled_sample_template(tmp_path_factory):
    """The bundled sample project, built once per session (copy it before changing it)."""
    from training_backend.project.sample import create_sample_project

    path = tmp_path_factory.mktemp("bundled") / "sample"
    create_sample_project(path)
    return path


@pytest.fixture()
def bundled_sample(bundled_sample_template, tmp_path):
    """A fresh copy of the bundled sample project in ``tmp_path / "sample"``."""
    import shutil

    path = tmp_path / "sample"
    shutil.copytree(bundled_sample_template, path)
    return path


@pytest.fixture()
def workspace(make_napari_viewer, qtbot):
    """The lesion workspace docked in a napari viewer (GUI tests); shut down after the test,
    once its background tasks have ended."""
    from napari_lesionseg._tasks import running_tasks
    from napari_lesionseg._widget import LesionWorkspace

    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    viewer.window.add_dock_widget(ws, name="Lesion workspace")
    yield ws
    ws.shutdown()
    qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)
