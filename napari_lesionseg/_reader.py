"""napari reader: a lesionseg project folder, or a single medical/ordinary image file.

* A project folder (or its ``project.json``) opens its first case: the image plus an
  ``annotation`` Labels layer holding the latest saved mask (empty if none), coloured with the
  project's class colours. For the full workflow, use the Lesion workspace widget.
* PNG / JPEG / TIFF / DICOM / NIfTI files and zarr arrays open as one image layer each, read by
  ``training_backend.io.read_image`` (so DICOM rescaling, NIfTI orientation etc. match what a
  project import would store).

Anything else returns ``None`` so that other readers get their turn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from napari_lesionseg._layers import BACKGROUND_COLOR, BACKGROUND_VALUE


def _project_folder(path: Path) -> Path | None:
    from training_backend.store import Project

    if path.name == "project.json":
        path = path.parent
    return path if path.is_dir() and Project.is_project(path) else None


def get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader function for ``path``, or None if it is not ours.

    Args:
        path: a path, or a list of paths (all must be readable images).
    """
    from training_backend import io

    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    if not paths:
        return None
    if len(paths) == 1 and _project_folder(paths[0]) is not None:
        return read_project
    if all(io.image_format(p) is not None and p.exists() for p in paths):
        return read_images
    return None


def read_images(path: str | list[str]) -> list[tuple]:
    """Read image files as napari layer data (one image layer per file).

    Args:
        path: a path or a list of paths.
    """
    from training_backend import io

    out = []
    for p in (path if isinstance(path, (list, tuple)) else [path]):
        image = io.read_image(p)
        meta = {"name": io.file_stem(p), "rgb": image.ndim == 3, "metadata": {"source": str(p)}}
        out.append((image, meta, "image"))
    return out


def project_colors(project) -> dict:
    """Label value -> colour for a project (classes, painted background, transparent 0)."""
    from napari_lesionseg._layers import class_color

    colors = {None: "transparent", 0: "transparent", BACKGROUND_VALUE: BACKGROUND_COLOR}
    colors.update({i + 1: class_color(project, i) for i in range(len(project.classes))})
    return colors


def read_project(path: str | list[str]) -> list[tuple]:
    """Open a project's first case: image + ``annotation`` Labels (latest version or empty).

    Args:
        path: the project folder (or its ``project.json``).
    """
    from training_backend.errors import ProjectError
    from training_backend.store import Project

    folder = _project_folder(Path(path[0] if isinstance(path, (list, tuple)) else path))
    project = Project.open(folder, mode="r")
    ids = project.case_ids()
    if not ids:
        raise ProjectError(f"{folder}: the project has no cases yet; import images first")
    rec = project.case(ids[0])
    image = project.read_image(rec.id)
    saved = project.read_annotation(rec.id)
    mask = saved[0] if saved is not None else np.zeros(rec.shape, dtype=np.uint8)
    kind = saved[1].kind if saved is not None else "sparse"
    meta = {"lesionseg_project": str(folder), "case_id": rec.id, "case_name": rec.name}
    return [
        (image, {"name": rec.name, "rgb": image.ndim == 3, "metadata": dict(meta)}, "image"),
        (np.asarray(mask, dtype=np.uint8),
         {"name": "annotation", "colormap": project_colors(project), "opacity": 0.6,
          "metadata": {**meta, "kind": kind, "classes": project.classes}}, "labels"),
    ]
