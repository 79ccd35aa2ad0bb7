"""DICOM (single frame), read with pydicom; napari does not read it, so the plugin reader does.

``RescaleSlope`` / ``RescaleIntercept`` are applied (``float32`` unless they are 1 and 0);
``MONOCHROME1`` data are mirrored within their value range so that bright means high; YBR colour
comes back as RGB (pydicom). Multi-frame files are refused. A file without a suffix is recognised
by its ``DICM`` preamble. Masks are not written as DICOM.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training_backend.errors import InputError
from training_backend.project.formats.base import FileFormat, one_line, register


def looks_like_dicom(path: Path) -> bool:
    """Whether the file carries the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read(path: Path, _as_mask: bool) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise InputError(path, "not a DICOM file (no DICM header)") from exc
    except Exception as exc:
        raise InputError(path, f"cannot read DICOM file, corrupt or truncated? "
                               f"({one_line(exc)})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(path, "DICOM file has no pixel data (a report, or a DICOMDIR?)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames); export a single frame")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown"
        try:
            compressed = bool(getattr(syntax, "is_compressed", False))
        except ValueError:  # a corrupt file's UID that is no transfer syntax at all
            compressed = False
        hint = ("; compressed data may need the pylibjpeg or gdcm package"
                if compressed else ", corrupt or truncated?")
        raise InputError(path, f"cannot decode DICOM pixel data (transfer syntax {name}{hint}): "
                               f"{one_line(exc)}") from exc
    arr = np.asarray(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" and arr.size:
        lo, hi = arr.min(), arr.max()
        arr = (hi - arr) + lo  # mirror in the value range; same dtype, same range
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"invalid RescaleSlope/RescaleIntercept ({one_line(exc)})") from exc
    if slope != 1.0 or intercept != 0.0:
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return arr


DICOM = register(FileFormat(
    name="dicom", title="DICOM", suffixes=(".dcm", ".dicom"), read=_read,
    napari_reads=False, detect=looks_like_dicom))
