"""Reading images and masks, writing masks.

Formats: PNG, JPEG, TIFF (8/16-bit, float; via tifffile), DICOM (single frame; via pydicom),
NIfTI (2-D, ``.nii`` / ``.nii.gz``; via nibabel) and zarr arrays (a folder holding
``zarr.json`` or ``.zarray``, e.g. ``scan.zarr`` or ``store.zarr/images/c000001``).

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

import gzip
import io as _bytes_io
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from training_backend.errors import InputError

#: File suffix (lower case) -> format name.
SUFFIX_FORMATS: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".zarr": "zarr",
}
#: Formats ``write_mask`` can write, and the suffix ``export`` gives each.
MASK_FORMATS: dict[str, str] = {"png": ".png", "tiff": ".tif", "nifti": ".nii.gz", "zarr": ".zarr"}

_STEM_SUFFIXES = set(SUFFIX_FORMATS) | {".bmp", ".gif", ".webp", ".mha", ".mhd", ".nrrd", ".h5"}
_FORMAT_NAMES = "PNG, JPEG, TIFF, DICOM, NIfTI (.nii/.nii.gz) or zarr"
_MAX_LISTED = 6  # how many bad values an error message lists


# --------------------------------------------------------------------------- paths


def _is_zarr_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def image_format(path: str | os.PathLike) -> str | None:
    """The format name of ``path`` from its suffix (or content), or None if unsupported.

    Args:
        path: a file, or a zarr folder.

    Returns:
        One of ``png``, ``jpeg``, ``tiff``, ``dicom``, ``nifti``, ``zarr``, or None. Files with
        no known suffix are recognised as DICOM by their ``DICM`` preamble; folders holding
        zarr metadata are zarr whatever their name.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    fmt = SUFFIX_FORMATS.get(p.suffix.lower())
    if fmt is not None:
        return fmt
    if p.is_dir():
        return "zarr" if _is_zarr_dir(p) else None
    if p.is_file() and _looks_like_dicom(p):
        return "dicom"
    return None


def file_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``a (1).nii.gz`` -> ``a (1)``).

    Args:
        path: any path; only image suffixes are removed (``1.2.840.5`` stays as it is).
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in (".nii.gz", ".ome.tiff", ".ome.tif", ".ome.zarr"):
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
        raise InputError(path, f"unsupported file type '{suffix}'; expected {_FORMAT_NAMES}")
    if fmt != "zarr":
        if path.is_dir():
            raise InputError(path, f"is a folder, expected a {fmt.upper()} file")
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
    return fmt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- raw readers
# Each returns an array laid out as (H, W) or (H, W, C) where the format says so; dtype and
# channel checks happen afterwards, shared by images and masks.


def _read_pil(path: Path, fmt: str, palette_indices: bool) -> np.ndarray:
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
        raise InputError(path, f"not a valid {fmt.upper()} file (corrupt, or another format "
                               f"with a {path.suffix} name)") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(path, f"image too large to read safely ({_one_line(exc)})") from exc
    except Exception as exc:  # PIL raises many types for corrupt/truncated data
        raise InputError(path, f"cannot read {fmt.upper()} data, corrupt or truncated? "
                               f"({_one_line(exc)})") from exc
    mode = im.mode
    if mode == "P" and palette_indices:
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


def _read_tiff(path: Path) -> np.ndarray:
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
                               f"compression? ({_one_line(exc)})") from exc
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


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise InputError(path, "not a DICOM file (no DICM header)") from exc
    except Exception as exc:
        raise InputError(path, f"cannot read DICOM file, corrupt or truncated? "
                               f"({_one_line(exc)})") from exc
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
        hint = ("; compressed data may need the pylibjpeg or gdcm package"
                if getattr(syntax, "is_compressed", False) else ", corrupt or truncated?")
        raise InputError(path, f"cannot decode DICOM pixel data (transfer syntax {name}{hint}): "
                               f"{_one_line(exc)}") from exc
    arr = np.asarray(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" and arr.size:
        lo, hi = arr.min(), arr.max()
        arr = (hi - arr) + lo  # mirror in the value range; same dtype, same range
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"invalid RescaleSlope/RescaleIntercept ({_one_line(exc)})") from exc
    if slope != 1.0 or intercept != 0.0:
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return arr


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI file, corrupt or truncated? "
                               f"({_one_line(exc)})") from exc
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


def _read_zarr(path: Path) -> np.ndarray:
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
        raise InputError(path, f"cannot read zarr array ({_one_line(exc)})") from exc
    if arr.ndim > 2:
        arr = arr.reshape([n for n in arr.shape if n != 1] or [1, 1])
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:
        arr = np.moveaxis(arr, 0, -1)  # channel-first (C, H, W) -> (H, W, C)
    return arr


def _read_raw(path: Path, palette_indices: bool) -> tuple[np.ndarray, str]:
    fmt = _check_path(path)
    if fmt in ("png", "jpeg"):
        arr = _read_pil(path, fmt, palette_indices)
    elif fmt == "tiff":
        arr = _read_tiff(path)
    elif fmt == "dicom":
        arr = _read_dicom(path)
    elif fmt == "nifti":
        arr = _read_nifti(path)
    else:
        arr = _read_zarr(path)
    return np.asarray(arr), fmt


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
        hint = " (a lossy JPEG mask?)" if fmt == "jpeg" else ""
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


def _tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Args:
        path: destination file; its folder must exist.
        data: the complete file content.
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mask_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = image_format(path)
        if fmt not in MASK_FORMATS:
            raise InputError(path, f"cannot tell the mask format from the name; use one of "
                                   f"{', '.join(MASK_FORMATS)} (suffixes "
                                   f"{', '.join(sorted(set(MASK_FORMATS.values()) | {'.tiff', '.nii'}))})")
        return fmt
    fmt = fmt.lower()
    aliases = {"tif": "tiff", "nii": "nifti", "nii.gz": "nifti"}
    fmt = aliases.get(fmt, fmt)
    if fmt not in MASK_FORMATS:
        raise ValueError(f"unknown mask format {fmt!r}; expected one of {', '.join(MASK_FORMATS)}")
    return fmt


def _encode(mask: np.ndarray, fmt: str, path: Path) -> bytes:
    if fmt == "png":
        from PIL import Image

        buf = _bytes_io.BytesIO()
        Image.fromarray(mask, mode=None).save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    if fmt == "tiff":
        import tifffile

        buf = _bytes_io.BytesIO()
        tifffile.imwrite(buf, mask, compression="zlib", photometric="minisblack")
        return buf.getvalue()
    import nibabel as nib  # nifti

    img = nib.Nifti1Image(np.ascontiguousarray(mask.T), affine=np.eye(4))  # (W, H) = (x, y)
    img.header.set_data_dtype(np.uint8)
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


def _write_zarr_dir(path: Path, mask: np.ndarray) -> None:
    import zarr

    tmp = _tmp_sibling(path)
    try:
        chunks = (min(mask.shape[0], 1024), min(mask.shape[1], 1024))
        arr = zarr.create_array(str(tmp), shape=mask.shape, dtype="uint8", chunks=chunks,
                                fill_value=0)
        arr[...] = mask
        if path.exists():
            old = _tmp_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_rgb(path: str | os.PathLike, image: np.ndarray, fmt: str | None = None) -> Path:
    """Write an (H, W, 3) uint8 RGB image atomically as PNG or TIFF (a viewable colour mask).

    Args:
        path: destination (its folder must exist).
        image: (H, W, 3) uint8.
        fmt: ``png`` or ``tiff``; None = from the suffix.

    Returns:
        The path written.
    """
    path = Path(path)
    fmt = _mask_format(path, fmt)
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise ValueError(f"an RGB image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if fmt not in ("png", "tiff"):
        raise InputError(path, f"RGB images are written as png or tiff, not {fmt}")
    if not path.parent.is_dir():
        raise InputError(path.parent, "output folder does not exist")
    buf = _bytes_io.BytesIO()
    if fmt == "png":
        from PIL import Image

        Image.fromarray(image).save(buf, format="PNG", optimize=True)
    else:
        import tifffile

        tifffile.imwrite(buf, image, compression="zlib", photometric="rgb")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray, fmt: str | None = None) -> Path:
    """Write a 2-D uint8 class mask atomically.

    Args:
        path: destination (its folder must exist). File formats are replaced atomically; a
            zarr folder is built beside it and swapped in with two renames.
        mask: ``(H, W)`` integer array with values 0..255.
        fmt: ``png``, ``tiff``, ``nifti`` or ``zarr``; None = from the suffix
            (``.png``, ``.tif``/``.tiff``, ``.nii``/``.nii.gz``, ``.zarr``).

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
    if fmt == "zarr":
        _write_zarr_dir(path, mask)
    else:
        atomic_write_bytes(path, _encode(mask, fmt, path))
    return path
