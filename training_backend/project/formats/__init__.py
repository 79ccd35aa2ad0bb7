"""File formats: one record per format in one registry (`base.FORMATS`).

Adding a format: a file here that builds its `FileFormat` (reader, mask writer if any, flags)
and calls `register`, plus its import line below. If napari does not read it itself, add its
suffixes to the reader's ``filename_patterns`` in ``napari_lesionseg/napari.yaml`` (a test
compares the manifest with the registry).
"""
from __future__ import annotations

from training_backend.project.formats.base import (FORMATS, FileFormat, export_formats, from_name,
                                           from_path, mask_formats, napari_reader_patterns,
                                           napari_writer_suffixes, register)

# one line per format, in the order lists show them
from training_backend.project.formats import pillow  # noqa: E402,F401  png, jpeg
from training_backend.project.formats import tiff  # noqa: E402,F401
from training_backend.project.formats import dicom  # noqa: E402,F401
from training_backend.project.formats import nifti  # noqa: E402,F401
from training_backend.project.formats import zarr_array  # noqa: E402,F401

__all__ = ["FORMATS", "FileFormat", "export_formats", "from_name", "from_path", "mask_formats",
           "napari_reader_patterns", "napari_writer_suffixes", "register"]
