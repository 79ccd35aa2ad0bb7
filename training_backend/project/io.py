"""Reading images and masks, writing masks.

Formats come from the registry in `training_backend.project.formats` (one file per format): PNG, JPEG,
TIFF (8/16-bit, float; via tifffile), DICOM (single frame; via pydicom), NIfTI (2-D, ``.nii`` /
``.nii.gz``; via nibabel) and zarr arrays (a folder holding ``zarr.json`` or ``.zarray``, e.g.
``scan.zarr`` or ``store.zarr/images/c000001``). This module holds what is the same for every
format: finding the format of a path, the layout and value checks, and atomic writing.

Conventions (the same for every format):

- An image comes back as ``(H, W)`` grey or ``(H, W, 3)`` RGB. ``uint8`` and ``uint16`` data
  keep their dtype; ``bool`` becomes ``uint8`` 0/255; every other dtype (float, signed or 32-bit
  integers, rescaled DICOM) becomes ``float32``.
- Singleton axes are dropped (``(1, H, W)``, ``(H, W, 1)``). Channel-first colour data
  (``(3, H, W)`` in TIFF/zarr) is moved to channel-last.
- An alpha channel (RGBA, grey+alpha) is dropped when every pixel is fully opaque; an image
  with any transparent pixel is refused, because what lies "behind" it is undefined.
- NIfTI stores voxels as ``data[i, j]`` with *i* along x (columns). We return the row-major
  image ``image[row, col] = data[col, row]`` (a transpose, no flip): ``write_mask`` writes the
  inverse, so a mask written here reads back identically, and a NIfTI mask drawn on a NIfTI
  image lines up with it. The affine (patient orientation) is not applied.
- DICOM: ``RescaleSlope`` / ``RescaleIntercept`` are applied (result ``float32`` unless they
  are 1 and 0); ``MONOCHROME1`` data are mirrored within their value range so that bright means
  high everywhere; YBR colour data come back as RGB. Multi-frame files are refused.
- JPEG EXIF orientation is not applied: pixels are used as stored (as masks are).

Every problem the user can fix raises :class:`~training_backend.errors.InputError` with a
one-line message naming the file. Masks are written atomically (a temporary file in the same
folder, then ``os.replace``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from training_backend.project import formats
from training_backend.project.atomic import atomic_write_bytes  # noqa: F401 (kept as io.atomic_write_bytes)
from training_backend.errors import InputError

#: File suffix (lower case) -> format name (from the format registry).
SUFFIX_FORMATS: dict[str, str] = {s: f.name for f in formats.FORMATS.values() for s in f.suffixes}
#: Formats ``write_mask`` can write, and the suffix ``export`` gives each.
MASK_FORMATS: dict[str, str] = {n: f.suffix for n, f in formats.mask_formats().items()}

_STEM_SUFFIXES = set(SUFFIX_FORMATS) | {".bmp", ".gif", ".webp", ".mha", ".mhd", ".nrrd", ".h5"}
#: Suffixes with more than one dot, longest first (``.nii.gz``, OME variants).
_COMPOUND_SUFFIXES = sorted({s for s in SUFFIX_FORMATS if s.count(".") > 1}
                            | {".ome.tiff", ".ome.tif", ".ome.zarr"}, key=len, reverse=True)
_MAX_LISTED = 6  # how many bad values an error message lists


def _format_names() -> str:
    titles = [f.title for f in formats.FORMATS.values()]
    return ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else "".join(titles)


# --------------------------------------------------------------------------- paths


def image_format(path: str | os.PathLike) -> str | None:
    """The format name of ``path`` from its suffix (or content), or None if unsupported.

    Args:
        path: a file, or a zarr folder.

    Returns:
        One of ``png``, ``jpeg``, ``tiff``, ``dicom``, ``nifti``, ``zarr``, or None. Files with
        no known suffix are recognised as DICOM by their ``DICM`` preamble; folders holding
        zarr metadata are zarr whatever their name.
    """
    fmt = formats.from_path(path)
    return None if fmt is None else fmt.name


def file_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``a (1).nii.gz`` -> ``a (1)``).

    Args:
        path: any path; only image suffixes are removed (``1.2.840.5`` stays as it is).
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    suffix = Path(name).suffix
    # Only known suffixes are removed: DICOM files are often named by UID ("1.2.840.5").
    return name[: -len(suffix)] if suffix.lower() in _STEM_SUFFIXES else name


def _check_path(path: Path) -> str:
    """Existence/permission checks shared by the readers; returns the format name."""
    if not path.exists():
        raise InputError(path, "file not found")
    if not os.access(path, os.R_OK):
        raise InputError(path, "cannot read the file (permission denied)")
    fmt = image_format(path)
    if fmt is None:
        if path.is_dir():
            raise InputError(path, "is a folder, not an image (a zarr array folder holds "
                                   "zarr.json or .zarray)")
        suffix = "".join(Path(path.name).suffixes[-1:]) or "(none)"
        raise InputError(path, f"unsupported file type '{suffix}'; expected {_format_names()}")
    if not formats.FORMATS[fmt].folder:
        if path.is_dir():
            raise InputError(path, f"is a folder, expected a {fmt.upper()} file")
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
    return fmt


def _read_raw(path: Path, palette_indices: bool) -> tuple[np.ndarray, str]:
    fmt = _check_path(path)
    return np.asarray(formats.FORMATS[fmt].read(path, palette_indices)), fmt


# --------------------------------------------------------------------------- layout checks


def _opaque(alpha: np.ndarray) -> bool:
    if alpha.dtype == bool:
        return bool(alpha.all())
    if np.issubdtype(alpha.dtype, np.integer):
        return bool((alpha == np.iinfo(alpha.dtype).max).all())
    return bool((alpha == 1.0).all())


def _to_2d_or_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) or (H, W, C) with C in 1..4 -> (H, W) or (H, W, 3); alpha handled."""
    if arr.size == 0:
        raise InputError(path, f"empty image (shape {tuple(arr.shape)})")
    if arr.ndim > 2:
        squeezed = [n for n in arr.shape if n != 1]
        if len(squeezed) >= 2:
            arr = arr.reshape(squeezed)
    if arr.ndim < 2:
        raise InputError(path, f"has {arr.ndim} dimension(s) (shape {tuple(arr.shape)}); "
                               f"expected a 2-D image")
    if arr.ndim > 3:
        raise InputError(path, f"has {arr.ndim} dimensions (shape {tuple(arr.shape)}); "
                               f"expected a 2-D image, grey (H, W) or colour (H, W, 3)")
    if arr.ndim == 3:
        channels = arr.shape[-1]
        if channels == 2 or channels == 4:
            if not _opaque(arr[..., -1]):
                kind = "RGBA" if channels == 4 else "grey+alpha"
                raise InputError(path, f"{kind} image with transparent pixels; remove the "
                                       f"transparency (flatten) and save as grey or RGB")
            arr = arr[..., :-1]
            channels -= 1
        if channels == 1:
            arr = arr[..., 0]
        elif channels != 3:
            raise InputError(path, f"3-D data of shape {tuple(arr.shape)} is not a 2-D image "
                                   f"(grey, RGB or RGBA); volumes are not supported")
    return arr


def _finite_float32(arr: np.ndarray, path: Path) -> np.ndarray:
    if np.iscomplexobj(arr):
        raise InputError(path, "complex-valued data; expected real intensities")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    if bad:
        raise InputError(path, f"contains {bad} NaN or infinite value(s)")
    return out


# --------------------------------------------------------------------------- public readers


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one 2-D image.

    Args:
        path: a PNG/JPEG/TIFF/DICOM/NIfTI file or a zarr array folder.

    Returns:
        ``(H, W)`` grey or ``(H, W, 3)`` RGB; ``uint8``/``uint16`` kept, ``bool`` -> ``uint8``
        0/255, everything else ``float32`` (finite). See the module docstring for layouts.

    Raises:
        InputError: missing/unreadable file, unknown type, corrupt data, transparent alpha,
            NaN/inf, more than 2-D, empty.
    """
    path = Path(path)
    arr, _ = _read_raw(path, palette_indices=False)
    arr = _to_2d_or_rgb(arr, path)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype not in (np.uint8, np.uint16):
        if arr.dtype.kind not in "biuf" and not np.iscomplexobj(arr):
            raise InputError(path, f"unsupported pixel type {arr.dtype}")
        arr = _finite_float32(arr, path)
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike, n_classes: int = 1) -> np.ndarray:
    """Read a class-index mask.

    Binary masks stored as 0/255 (or 0/65535) become 0/1; colour masks whose channels are all
    equal become grey (an opaque alpha channel is ignored); palette PNGs give their indices.

    Args:
        path: a mask file (same formats as :func:`read_image`).
        n_classes: the largest allowed class index K (values must lie in ``0..K``).

    Returns:
        ``(H, W)`` uint8 class map, 0 = background, k = class k.

    Raises:
        InputError: unreadable file, coloured mask, non-integer values, or values outside
            ``0..n_classes`` (the message lists the bad values).
    """
    path = Path(path)
    arr, fmt = _read_raw(path, palette_indices=True)
    if arr.size == 0:
        raise InputError(path, f"empty mask (shape {tuple(arr.shape)})")
    if arr.ndim > 2:
        squeezed = [n for n in arr.shape if n != 1]
        if len(squeezed) >= 2:
            arr = arr.reshape(squeezed)
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):
        if arr.shape[-1] in (2, 4):
            if not _opaque(arr[..., -1]):
                raise InputError(path, "mask has transparent pixels (alpha channel); save it "
                                       "as a grey class-index image")
            arr = arr[..., :-1]
        first = arr[..., 0]
        if any(not np.array_equal(first, arr[..., c]) for c in range(1, arr.shape[-1])):
            raise InputError(path, "colour mask (its R, G, B channels differ); expected a "
                                   "grey class-index mask")
        arr = first
    if arr.ndim != 2:
        raise InputError(path, f"mask has shape {tuple(arr.shape)}; expected a 2-D mask")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        arr = _finite_float32(arr, path)
        if not np.array_equal(arr, np.round(arr)):
            raise InputError(path, "mask has non-integer values; expected class indices")
    elif arr.dtype.kind not in "iu":
        raise InputError(path, f"unsupported mask pixel type {arr.dtype}")
    values = np.unique(arr)
    full_on = {255, 65535} if arr.dtype.kind in "iu" else {255.0}
    top = values.max()
    if top > n_classes and top in full_on and set(values.tolist()) <= {0, top}:
        return (arr > 0).astype(np.uint8)  # binary 0/255 mask
    bad = values[(values < 0) | (values > n_classes)]
    if bad.size:
        listed = ", ".join(str(v) for v in bad[:_MAX_LISTED].tolist())
        more = f" and {bad.size - _MAX_LISTED} more" if bad.size > _MAX_LISTED else ""
        lossy = formats.FORMATS[fmt]
        hint = f" (a lossy {lossy.title} mask?)" if lossy.lossy else ""
        raise InputError(path, f"mask values {listed}{more} outside 0..{n_classes} "
                               f"(0 = background, 1..{n_classes} = class){hint}")
    return arr.astype(np.uint8)


def union_masks(paths, n_classes: int = 1) -> np.ndarray:
    """Union of several masks of the same image (pixel-wise maximum).

    Args:
        paths: mask files (at least one), all the same size.
        n_classes: largest allowed class index (see :func:`read_mask`); where class maps
            overlap the higher index wins.

    Returns:
        ``(H, W)`` uint8 class map.

    Raises:
        InputError: any unreadable mask, or a mask whose size differs from the first.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("union_masks needs at least one path")
    out = read_mask(paths[0], n_classes)
    for p in paths[1:]:
        m = read_mask(p, n_classes)
        if m.shape != out.shape:
            raise InputError(p, f"mask is {m.shape[0]}x{m.shape[1]} but {paths[0].name} is "
                                f"{out.shape[0]}x{out.shape[1]}")
        np.maximum(out, m, out=out)
    return out


# --------------------------------------------------------------------------- writing


def _mask_format(path: Path, fmt: str | None) -> str:
    writable = formats.mask_formats()
    if fmt is None:
        fmt = image_format(path)
        if fmt not in writable:
            suffixes = sorted(s for f in writable.values() for s in f.suffixes)
            raise InputError(path, f"cannot tell the mask format from the name; use one of "
                                   f"{', '.join(writable)} (suffixes {', '.join(suffixes)})")
        return fmt
    found = formats.from_name(fmt)
    if found is None or found.name not in writable:
        raise ValueError(f"unknown mask format {fmt!r}; expected one of {', '.join(writable)}")
    return found.name


def write_rgb(path: str | os.PathLike, image: np.ndarray, fmt: str | None = None) -> Path:
    """Write an (H, W, 3) uint8 RGB image atomically as PNG or TIFF (a viewable colour mask).

    Args:
        path: destination (its folder must exist).
        image: (H, W, 3) uint8.
        fmt: a format that ``writes_rgb`` (``png``, ``tiff``); None = from the suffix.

    Returns:
        The path written.
    """
    path = Path(path)
    fmt = _mask_format(path, fmt)
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"an RGB image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    record = formats.FORMATS[fmt]
    if not record.writes_rgb:
        rgb = " or ".join(n for n, f in formats.mask_formats().items() if f.writes_rgb)
        raise InputError(path, f"RGB images are written as {rgb}, not {fmt}")
    if not path.parent.is_dir():
        raise InputError(path.parent, "output folder does not exist")
    record.write(path, image)
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray, fmt: str | None = None) -> Path:
    """Write a 2-D uint8 class mask atomically.

    Args:
        path: destination (its folder must exist). File formats are replaced atomically; a
            zarr folder is built beside it and swapped in with two renames.
        mask: ``(H, W)`` integer array with values 0..255.
        fmt: ``png``, ``tiff``, ``nifti`` or ``zarr`` (any format of the registry with a
            writer); None = from the suffix (``.png``, ``.tif``/``.tiff``,
            ``.nii``/``.nii.gz``, ``.zarr``).

    Returns:
        The path written.
    """
    path = Path(path)
    fmt = _mask_format(path, fmt)
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.dtype.kind not in "biu" or (mask.size and int(mask.max()) > 255):
            raise ValueError(f"mask must hold integers 0..255, got {mask.dtype}")
        mask = mask.astype(np.uint8)
    mask = np.ascontiguousarray(mask)
    if not path.parent.is_dir():
        raise InputError(path.parent, "output folder does not exist")
    formats.FORMATS[fmt].write(path, mask)
    return path
