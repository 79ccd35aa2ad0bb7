"""Write a Labels layer as a mask file (PNG / TIFF / NIfTI) through ``training_backend.project.io``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """napari writer for one Labels layer.

    Args:
        path: destination; the suffix picks the format (``.png``, ``.tif``/``.tiff``,
            ``.nii``/``.nii.gz``).
        data: the layer data, a 2-D integer array with values 0..255.
        meta: the layer's metadata (unused: masks carry no extra information).

    Returns:
        ``[path]`` of the file written.
    """
    from training_backend.project import io
    from training_backend.errors import InputError

    mask = np.asarray(data)
    if mask.ndim != 2:
        raise InputError(path, f"only 2-D label layers can be saved as masks, got {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise InputError(path, f"label values {int(mask.min())}..{int(mask.max())} do not fit a "
                               "uint8 mask (0..255)")
    written = io.write_mask(Path(path), mask.astype(np.uint8), None)
    return [str(written)]
