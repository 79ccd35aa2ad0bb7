"""napari-lesionseg: label-efficient lesion segmentation in napari.

The napari contributions (see ``napari.yaml``) live in private modules and are re-exported here
lazily, so that ``import napari_lesionseg`` stays cheap and Qt is only imported when the
workspace widget is used.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "get_reader": "napari_lesionseg._reader",
    "write_labels": "napari_lesionseg._writer",
    "make_sample_data": "napari_lesionseg._sample_data",
    "LesionWorkspace": "napari_lesionseg._widget",
    "launch": "napari_lesionseg._launch",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_lesionseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
