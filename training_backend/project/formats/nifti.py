"""NIfTI (2-D, ``.nii`` / ``.nii.gz``), read and written with nibabel; napari does not read it.

NIfTI stores voxels as ``data[i, j]`` with *i* along x (columns). Images come back row-major,
``image[row, col] = data[col, row]`` (a transpose, no flip); masks are written with the inverse,
so a mask written here reads back identically and lines up with a NIfTI image. The affine
(patient orientation) is not applied; masks get the identity affine.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from training_backend.errors import InputError
from training_backend.project.formats.base import FileFormat, bytes_writer, one_line, register


def _read(path: Path, _as_mask: bool) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI file, corrupt or truncated? "
                               f"({one_line(exc)})") from exc
    if data.dtype.names:  # RGB24 / RGBA32 structured voxels
        data = np.stack([data[name] for name in data.dtype.names], axis=-1)
        spatial = data.shape[:-1]
        colour = True
    else:
        spatial = data.shape
        colour = False
    kept = [n for n in spatial if n != 1]
    if len(kept) > 2:
        raise InputError(path, f"NIfTI volume of shape {tuple(spatial)}; only 2-D images "
                               f"(one slice) are supported")
    if len(kept) < 2:  # a 1-pixel-wide or empty image: keep two axes so the shape check reports it
        kept = list(spatial[:2]) if len(spatial) >= 2 else kept + [1] * (2 - len(kept))
    data = data.reshape(kept + ([data.shape[-1]] if colour else []))
    return np.swapaxes(data, 0, 1)  # (i=x, j=y) -> (row=j, col=i)


def _encode(mask: np.ndarray, path: Path) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(mask.T), affine=np.eye(4))  # (W, H) = (x, y)
    img.header.set_data_dtype(np.uint8)
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


NIFTI = register(FileFormat(
    name="nifti", title="NIfTI (.nii/.nii.gz)", suffixes=(".nii.gz", ".nii"), read=_read,
    write=bytes_writer(_encode), export=True, napari_reads=False,
    layout_note="voxel [i, j] = mask[row j, column i] (image transposed), identity affine"))
