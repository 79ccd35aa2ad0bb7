"""The bundled sample: 10 IDRiD fundus photographs (256x256) with lesion masks.

Seven images have masks of microaneurysms (MA), haemorrhages (HE), hard exudates (EX) and soft
exudates (SE); three (``IDRiD_NAR_*``) have no lesions. The image-level column ``dr`` says
``lesion`` / ``no lesion`` (``no lesion`` is a negative class: no lesion of any kind).
MA is kept although at 256 px microaneurysms are isolated pixels, so that a project made from
the sample has the same classes as one made from the full IDRiD set.

Data: IDRiD, Porwal et al., Data 3(3):25 (2018), CC BY 4.0 — see ``sample_data/NOTICE`` for
the attribution and the changes made; ``examples/make_sample_data.py`` regenerates it.
"""
from __future__ import annotations

import os
from pathlib import Path

from training_backend.project.importer import ImportReport, import_csv

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_CLASSES = ("MA", "HE", "EX", "SE")
SAMPLE_IMAGE_CLASSES = ("no lesion", "lesion")
#: napari-friendly colours: MA magenta, HE green, EX yellow, SE cyan.
SAMPLE_COLORS = {"MA": "#ff40ff", "HE": "#40ff40", "EX": "#ffff00", "SE": "#00e5ff"}
SAMPLE_MASK_COLS = tuple((f"{c}_mask", c) for c in SAMPLE_CLASSES)
SAMPLE_LABEL_COL = "dr"


def sample_manifest_path() -> Path:
    """Path of the sample's ``labels.csv`` (columns ``image``, ``MA_mask`` .. ``SE_mask``, ``dr``)."""
    return SAMPLE_DIR / "labels.csv"


def sample_notice() -> str:
    """The attribution text of the sample data (CC BY 4.0 requires showing it)."""
    return (SAMPLE_DIR / "NOTICE").read_text(encoding="utf-8")


def create_sample_project(path: str | os.PathLike, reference: bool = False,
                          hide_labels: bool = False):
    """Create a project at ``path`` holding the bundled IDRiD sample.

    Args:
        path: project folder to create (must not exist or be empty).
        reference: store the masks as hidden reference (to try weak/active learning and score
            it) instead of as ``full`` annotations. The ``dr`` image labels stay visible unless
            ``hide_labels``.
        hide_labels: keep the ``dr`` labels as reference only.

    Returns:
        The open :class:`~training_backend.project.store.Project`.
    """
    from training_backend.project.store import Project

    project = Project.create(path, classes=SAMPLE_CLASSES, image_classes=SAMPLE_IMAGE_CLASSES,
                             name="IDRiD sample", colors=SAMPLE_COLORS)
    report = import_sample(project, reference=reference, hide_labels=hide_labels)
    if report.skipped:  # the bundle is part of the package: a skip means a broken install
        row, file, problem = report.skipped[0]
        raise RuntimeError(f"bundled sample is damaged: row {row}: {file}: {problem}")
    return project


def import_sample(project, reference: bool = False, hide_labels: bool = False,
                  on_progress=None) -> ImportReport:
    """Import the sample into an existing project whose classes include MA, HE, EX, SE and
    whose image classes include ``no lesion`` and ``lesion``.

    Args:
        project: an open, writable project.
        reference: masks as hidden reference instead of annotations.
        hide_labels: ``dr`` labels as reference only.
        on_progress: ``on_progress(done, total)`` after each case.
    """
    return import_csv(project, sample_manifest_path(), image_col="image",
                      mask_cols=SAMPLE_MASK_COLS, label_col=SAMPLE_LABEL_COL,
                      reference=reference, hide_labels=hide_labels, on_progress=on_progress)
