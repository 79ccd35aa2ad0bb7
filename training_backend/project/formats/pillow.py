"""PNG and JPEG, read and written with Pillow.

Palette PNGs read as masks give their palette indices; read as images, their colours. 16-bit
data keep ``uint16``. JPEG EXIF orientation is not applied (pixels as stored, like masks). Masks
are written as PNG only (JPEG is lossy).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from training_backend.errors import InputError
from training_backend.project.formats.base import FileFormat, bytes_writer, one_line, register


def read_pillow(path: Path, as_mask: bool, title: str) -> np.ndarray:
    """Pixels of a single-frame image Pillow reads.

    Args:
        path: the file.
        as_mask: palette images give their indices (else their colours).
        title: the format's name in messages.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise InputError(path, f"has {n_frames} frames; expected a single image")
            im.load()
    except InputError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise InputError(path, f"not a valid {title} file (corrupt, or another format "
                               f"with a {path.suffix} name)") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(path, f"image too large to read safely ({one_line(exc)})") from exc
    except Exception as exc:  # PIL raises many types for corrupt/truncated data
        raise InputError(path, f"cannot read {title} data, corrupt or truncated? "
                               f"({one_line(exc)})") from exc
    mode = im.mode
    if mode == "P" and as_mask:
        return np.asarray(im)  # class indices, as stored (palette masks)
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
    elif mode in ("La", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)  # native byte order
    elif im.mode == "I":  # 32-bit integer (older 16-bit PNG decoding, some TIFF-ish files)
        if arr.size and arr.min() >= 0 and arr.max() <= np.iinfo(np.uint16).max:
            arr = arr.astype(np.uint16)
    return arr


def _encode_png(array: np.ndarray, _path: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


PNG = register(FileFormat(
    name="png", title="PNG", suffixes=(".png",),
    read=lambda path, as_mask: read_pillow(path, as_mask, "PNG"),
    write=bytes_writer(_encode_png), writes_rgb=True, export=True))

JPEG = register(FileFormat(
    name="jpeg", title="JPEG", suffixes=(".jpg", ".jpeg"),
    read=lambda path, as_mask: read_pillow(path, as_mask, "JPEG"), lossy=True))
