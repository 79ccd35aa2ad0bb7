"""The bundled IDRiD sample as napari layers (first image with lesions + its mask)."""
from __future__ import annotations

import csv

import numpy as np

from napari_lesionseg._layers import BACKGROUND_VALUE


def make_sample_data() -> list[tuple]:
    """Return ``[(image, meta, "image"), (mask, meta, "labels")]`` of one sample case.

    The first case with lesion masks is used; its per-class masks are combined into one class
    map (MA=1, HE=2, EX=3, SE=4), coloured like a project made from the sample.
    """
    from training_backend.project import io
    from training_backend.project.sample import (
        SAMPLE_CLASSES,
        SAMPLE_COLORS,
        SAMPLE_MASK_COLS,
        sample_manifest_path,
    )

    manifest = sample_manifest_path()
    with open(manifest, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    row = next((r for r in rows if any((r.get(col) or "").strip() for col, _ in SAMPLE_MASK_COLS)),
               rows[0])
    base = manifest.parent
    image = io.read_image(base / row["image"])
    mask = np.zeros(image.shape[:2], dtype=np.uint8)   # (H, W) class map
    for col, cls in SAMPLE_MASK_COLS:
        for cell in filter(None, (c.strip() for c in (row.get(col) or "").split(";"))):
            part = io.read_mask(base / cell, n_classes=1)
            mask[part > 0] = SAMPLE_CLASSES.index(cls) + 1
    colors = {None: "transparent", 0: "transparent", BACKGROUND_VALUE: "transparent"}
    colors.update({i + 1: SAMPLE_COLORS[c] for i, c in enumerate(SAMPLE_CLASSES)})
    name = io.file_stem(row["image"])
    return [
        (image, {"name": name, "rgb": image.ndim == 3}, "image"),
        (mask, {"name": f"{name} lesions", "colormap": colors, "opacity": 0.6,
                "metadata": {"classes": list(SAMPLE_CLASSES)}}, "labels"),
    ]
