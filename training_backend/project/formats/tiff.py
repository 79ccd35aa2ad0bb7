"""TIFF (8/16-bit, float; OME-TIFF's first series), read and written with tifffile.

Axes are put in (Y, X, channel) order by tifffile's axis names; a stack of several images is
refused. Masks are written zlib-compressed, grey (``minisblack``) or RGB.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from training_backend.errors import InputError
from training_backend.project.formats.base import FileFormat, bytes_writer, one_line, register


def _read(path: Path, _as_mask: bool) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(path, "TIFF file holds no image")
            series = tif.series[0]
            axes = series.axes
            arr = series.asarray()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read TIFF data, corrupt, truncated or an unsupported "
                               f"compression? ({one_line(exc)})") from exc
    # Put Y, X first and the sample/channel axis last, using tifffile's axis names.
    if "Y" in axes and "X" in axes and len(axes) == arr.ndim:
        order = [axes.index("Y"), axes.index("X")]
        rest = [i for i in range(arr.ndim) if i not in order]
        channel = [i for i in rest if axes[i] in "SC" and arr.shape[i] > 1]
        other = [i for i in rest if i not in channel]
        arr = np.transpose(arr, order + other + channel)  # (H, W, *other, *channel)
        other_shape = arr.shape[2 : 2 + len(other)]
        if any(n > 1 for n in other_shape):
            raise InputError(path, f"TIFF holds a stack of shape {tuple(series.shape)} "
                                   f"(axes {axes}); expected a single 2-D image")
        arr = arr.reshape(arr.shape[:2] + arr.shape[2 + len(other):])
    return arr


def _encode(array: np.ndarray, _path: Path) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, compression="zlib",
                     photometric="rgb" if array.ndim == 3 else "minisblack")
    return buf.getvalue()


TIFF = register(FileFormat(
    name="tiff", title="TIFF", suffixes=(".tif", ".tiff"), read=_read,
    write=bytes_writer(_encode), writes_rgb=True, export=True))
