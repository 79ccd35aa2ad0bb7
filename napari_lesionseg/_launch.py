"""``lesionseg gui``: open napari with the lesion workspace docked (optionally on a project)."""
from __future__ import annotations

import os
from pathlib import Path

DOCK_NAME = "Lesion workspace"


def open_workspace(viewer, project: str | os.PathLike | None = None):
    """Dock a :class:`LesionWorkspace` in ``viewer`` and open ``project`` in it.

    Args:
        viewer: a napari viewer.
        project: a project folder, or None.

    Returns:
        The workspace widget.
    """
    from napari_lesionseg._widget import LesionWorkspace

    workspace = LesionWorkspace(viewer)
    viewer.window.add_dock_widget(workspace, name=DOCK_NAME, area="right")
    if project is not None:
        workspace.open_project(project)
    return workspace


def launch(project: str | os.PathLike | None = None) -> int:
    """Open napari with the workspace and run the event loop until the window closes.

    Args:
        project: project folder to open (checked before any window appears).

    Returns:
        The exit code (0).

    Raises:
        ProjectError: ``project`` is not a lesionseg project (the CLI prints it as one line).
    """
    if project is not None:
        from training_backend.project.store import Project

        Project.open(Path(project))  # fail fast, before napari starts
    import napari

    viewer = napari.Viewer(title="lesionseg")
    workspace = open_workspace(viewer, project)
    workspace.show_first_case()  # no welcome screen: the first suggested case
    try:
        napari.run()
    finally:
        workspace.shutdown()
    return 0
