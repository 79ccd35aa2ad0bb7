"""napari reader: a lesionseg project folder, or a single medical/ordinary image file.

* A project folder (or its ``project.json``) opened in a napari window (File ▸ Open Folder,
  drag and drop, ``napari PROJECT``) opens in the Lesion workspace: the one already docked, or a
  new one, which then shows the first suggested case. The reader adds no layer itself (it
  returns napari's ``[(None,)]``); the workspace manages the case layers.
  Called with no napari window (a script), it returns the first case: the image plus an
  ``annotation`` Labels layer holding the latest saved mask (empty if none), coloured with the
  project's class colours.
* DICOM (``.dcm``, ``.dicom``) and NIfTI (``.nii``, ``.nii.gz``) files, which napari does not
  read itself, open as one image layer each, read by ``training_backend.project.io.read_image`` (so
  DICOM rescaling, NIfTI orientation etc. match what a project import would store).

The manifest (``napari.yaml``) offers this reader nothing else: PNG, JPEG and TIFF stay with
napari's own reader (no "which reader?" question), and a DICOM file without a suffix is not
recognised by napari at all (import it into a project instead: the importer reads it by its
DICM preamble). `get_reader` itself still reads every format ``io`` knows, for scripts.
Anything else returns ``None`` so that other readers get their turn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from napari_lesionseg._layers import BACKGROUND_COLOR, BACKGROUND_VALUE


def _project_folder(path: Path) -> Path | None:
    from training_backend.project.store import Project

    if path.name == "project.json":
        path = path.parent
    return path if path.is_dir() and Project.is_project(path) else None


def get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader function for ``path``, or None if it is not ours.

    Args:
        path: a path, or a list of paths (all must be readable images).
    """
    from training_backend.project import io

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
    from training_backend.project import io

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
    """Open a project: in the window's Lesion workspace when there is a napari window
    (returns ``[(None,)]``), else its first case as layer data (image + ``annotation`` Labels,
    latest version or empty).

    Args:
        path: the project folder (or its ``project.json``).
    """
    from training_backend.errors import ProjectError
    from training_backend.project.store import Project

    folder = _project_folder(Path(path[0] if isinstance(path, (list, tuple)) else path))
    viewer = _current_window_viewer()
    if viewer is not None:  # the workspace opens it (and shows any error as a notification)
        open_in_workspace(viewer, folder)
        return [(None,)]
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


def _current_window_viewer():
    """The napari viewer with a window that is current, or None (no napari, no window)."""
    import sys

    if "napari" not in sys.modules:  # a script that never imported napari has no window
        return None
    import napari

    viewer = napari.current_viewer()
    return viewer if viewer is not None and getattr(viewer, "window", None) is not None else None


def open_in_workspace(viewer, folder: Path):
    """Open ``folder`` in the viewer's Lesion workspace (docking one if there is none) and show
    its first suggested case when no case is shown (and it has cases).

    Args:
        viewer: a napari viewer with a window.
        folder: a project folder.

    Returns:
        The workspace.
    """
    from napari_lesionseg._launch import open_workspace
    from napari_lesionseg._widget import LesionWorkspace

    workspace = next((w for w in viewer.window.dock_widgets.values()
                      if isinstance(w, LesionWorkspace)), None)
    if workspace is None:
        workspace = open_workspace(viewer, folder)
    else:
        current = workspace.project
        if current is None or Path(current.path).resolve() != Path(folder).resolve():
            workspace.open_project(folder)
        dock = workspace.parent()
        if dock is not None:  # bring a tabbed or hidden workspace to the front
            dock.show()
            dock.raise_()
    workspace.show_first_case()
    return workspace
