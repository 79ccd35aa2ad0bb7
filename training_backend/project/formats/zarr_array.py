"""zarr arrays (a folder holding ``zarr.json`` or ``.zarray``; OME-Zarr's full-resolution
level), read and written with zarr. Channel-first colour (``(3, H, W)``) is moved channel-last.

A mask is written as a new folder beside the target and swapped in with two renames (the old
folder, if any, is removed afterwards).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from training_backend.project.atomic import temporary_sibling
from training_backend.errors import InputError
from training_backend.project.formats.base import FileFormat, one_line, register

_MAX_LISTED = 6


def is_zarr_dir(path: Path) -> bool:
    """Whether the folder holds zarr metadata."""
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _read(path: Path, _as_mask: bool) -> np.ndarray:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Group):
            names = sorted(node.array_keys())
            if "0" in names:  # OME-Zarr multiscale: level 0 is full resolution
                node = node["0"]
            elif len(names) == 1:
                node = node[names[0]]
            else:
                listed = ", ".join(names[:_MAX_LISTED]) or "none"
                raise InputError(path, f"zarr group holds {len(names)} arrays ({listed}); "
                                       f"give the path of one array")
        arr = np.asarray(node[...])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read zarr array ({one_line(exc)})") from exc
    if arr.ndim > 2:
        arr = arr.reshape([n for n in arr.shape if n != 1] or [1, 1])
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:
        arr = np.moveaxis(arr, 0, -1)  # channel-first (C, H, W) -> (H, W, C)
    return arr


def _write(path: Path, mask: np.ndarray) -> None:
    import zarr

    tmp = temporary_sibling(path)
    try:
        chunks = (min(mask.shape[0], 1024), min(mask.shape[1], 1024))
        arr = zarr.create_array(str(tmp), shape=mask.shape, dtype="uint8", chunks=chunks,
                                fill_value=0)
        arr[...] = mask
        if path.exists():
            old = temporary_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ZARR = register(FileFormat(
    name="zarr", title="zarr", suffixes=(".zarr",), read=_read, write=_write, export=True,
    folder=True, detect=is_zarr_dir))
