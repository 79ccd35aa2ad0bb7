"""The file-format record and its registry.

A format is one `FileFormat` record: its name, its suffixes, how to read its pixels, how to write
a mask (if it can), whether napari reads it by itself and whether export offers it. ``io``
(reading and writing), ``export``, the importer (through ``io.image_format``), the CLI's
``--format`` choices, the export panel's list and the napari reader all ask this registry;
``napari.yaml`` repeats what `napari_reader_patterns` and `napari_writer_suffixes` return (a
test checks that they agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

#: ``read(path, as_mask) -> array``: the pixels as stored, (H, W) or (H, W, C) (checks follow in
#: ``io``); ``as_mask`` asks for palette indices rather than colours where a format has both.
Reader = Callable[[Path, bool], np.ndarray]
#: ``write(path, array)``: write a (H, W) uint8 mask (or (H, W, 3) uint8 RGB where the format
#: says ``writes_rgb``) atomically; the folder exists.
Writer = Callable[[Path, np.ndarray], None]


@dataclass(frozen=True)
class FileFormat:
    """One image/mask file format.

    Attributes:
        name: short name used everywhere (``--format``, ``export_masks(fmt=...)``).
        title: how messages name it (``"NIfTI (.nii/.nii.gz)"``).
        suffixes: lower-case suffixes with the dot; the first is the one written.
        read: reads its pixels (see `Reader`).
        write: writes a mask (see `Writer`), or None when masks are not written in it.
        writes_rgb: ``write`` also takes (H, W, 3) RGB (colour masks).
        export: the export (CLI, panel) offers it.
        napari_reads: napari opens it by itself, so the plugin reader does not claim it.
        folder: a format stored as a folder (zarr), not a file.
        detect: recognises a path by content when its suffix says nothing (DICOM preamble, a
            zarr folder's metadata); None: by suffix only.
        lossy: its compression changes pixel values (a mask in it may hold stray values).
        layout_note: how pixels map to the file, written into export sidecars where it is not
            the obvious row-major layout.
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    read: Reader
    write: Writer | None = None
    writes_rgb: bool = False
    export: bool = False
    napari_reads: bool = True
    folder: bool = False
    detect: Callable[[Path], bool] | None = None
    lossy: bool = False
    layout_note: str | None = None

    @property
    def suffix(self) -> str:
        """The suffix given to files written in this format."""
        return self.suffixes[0]


#: name -> format, in registration order (the order lists and menus show).
FORMATS: dict[str, FileFormat] = {}


def register(fmt: FileFormat) -> FileFormat:
    """Add a format to the registry (its name and suffixes must be new).

    Args:
        fmt: the record.
    """
    if fmt.name in FORMATS:
        raise ValueError(f"file format {fmt.name!r} is registered twice")
    taken = {s for f in FORMATS.values() for s in f.suffixes}
    clash = sorted(set(fmt.suffixes) & taken)
    if clash:
        raise ValueError(f"file format {fmt.name!r}: suffixes {clash} belong to another format")
    if any(s != s.lower() or not s.startswith(".") for s in fmt.suffixes) or not fmt.suffixes:
        raise ValueError(f"file format {fmt.name!r}: suffixes must be lower case and start with '.'")
    FORMATS[fmt.name] = fmt
    return fmt


def from_name(name: str) -> FileFormat | None:
    """The format called ``name``, or named by one of its suffixes without the dot
    (``tif``, ``nii.gz``); case-insensitive; None if unknown.

    Args:
        name: a format name or suffix.
    """
    key = name.lower().lstrip(".")
    if key in FORMATS:
        return FORMATS[key]
    return next((f for f in FORMATS.values() if f".{key}" in f.suffixes), None)


def from_path(path: str | Path) -> FileFormat | None:
    """The format of ``path``: by its (longest matching) suffix, else by content; or None.

    Args:
        path: a file, or a folder (folder formats).
    """
    p = Path(path)
    name = p.name.lower()
    matches = [(len(s), f) for f in FORMATS.values() for s in f.suffixes
               if name.endswith(s) and len(name) > len(s)]
    if matches:
        return max(matches, key=lambda m: m[0])[1]
    is_dir = p.is_dir()
    if not is_dir and not p.is_file():
        return None
    return next((f for f in FORMATS.values()
                 if f.detect is not None and f.folder == is_dir and f.detect(p)), None)


def mask_formats() -> dict[str, FileFormat]:
    """Formats masks can be written in."""
    return {n: f for n, f in FORMATS.items() if f.write is not None}


def export_formats() -> dict[str, FileFormat]:
    """Formats the export offers (CLI ``--format``, the export panel)."""
    return {n: f for n, f in FORMATS.items() if f.export and f.write is not None}


def napari_reader_patterns() -> list[str]:
    """The plugin reader's ``filename_patterns`` in ``napari.yaml``: a project's ``project.json``
    and every format napari does not read itself."""
    return ["project.json"] + [f"*{s}" for f in FORMATS.values() if not f.napari_reads
                               for s in f.suffixes]


def napari_writer_suffixes() -> list[str]:
    """The Labels writer's ``filename_extensions`` in ``napari.yaml``: every file format a mask
    can be written in."""
    return [s for f in mask_formats().values() if not f.folder for s in f.suffixes]


def one_line(exc: BaseException) -> str:
    """An exception as one short line (for `InputError` messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def bytes_writer(encode: Callable[[np.ndarray, Path], bytes]) -> Writer:
    """A `Writer` from an encoder to bytes: the bytes are written atomically.

    Args:
        encode: ``encode(array, path) -> file content`` (``path`` for suffix-dependent choices).
    """
    def write(path: Path, array: np.ndarray) -> None:
        from training_backend.project.atomic import atomic_write_bytes

        atomic_write_bytes(path, encode(array, path))

    return write
