"""Export masks of a project as files, with provenance sidecars.

One mask per case, named after the stem of the case's source image (``benign (12).png`` ->
``benign (12).png`` / ``.tif`` / ``.nii.gz`` / ``.zarr``); cases whose stems collide (case
insensitively) all get ``_<case id>`` appended. What the pixels hold (``values``):

* ``index`` (default): class indices (k = the k-th of ``project.classes``); a ``sparse``
  annotation keeps its stored meaning, 0 = unlabelled and 255 = background painted explicitly.
  Right for pipelines, but a mask of values 0..4 looks black in an image viewer.
* ``binary``: 255 where any lesion class is, 0 elsewhere (viewable; the classes merge).
* ``color``: an RGB image, each class in the project's colour on black (PNG / TIFF only; a
  sparse annotation's painted background is dark grey).

The sidecars say which it is (``values`` and the meaning of every pixel value) and which kind
each file is.

Beside the masks: ``provenance.csv`` and ``provenance.json`` (one row per exported mask: case
id, name, file, image path, what was exported, version/output id, kind, author, time, origin,
model id; the JSON adds the class table and the meaning of every pixel value).

Existing files are never overwritten silently: an existing ``name.ext`` in the output folder is
first renamed to ``name.prev-<UTC timestamp>.ext`` (the old export stays as a trace), and the
report lists those renames. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io as _text_io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from training_backend.project import formats, io
from training_backend.project.atomic import atomic_write_bytes
from training_backend.project.atomic import remove_dead_temporaries
from training_backend.errors import InputError

SOURCES = ("annotation", "prediction", "reference")
#: What exported pixels hold (module docstring).
VALUES = ("index", "binary", "color")
#: Colour of a sparse annotation's painted background in ``color`` exports.
PAINTED_BACKGROUND_RGB = (64, 64, 64)
PROVENANCE_FIELDS = ("case_id", "name", "file", "image", "mask", "version", "kind", "author",
                     "time", "origin", "model_id")


@dataclass
class ExportReport:
    """Outcome of an export.

    Attributes:
        out_dir: the output folder.
        exported: ``(case id, written path)`` per mask.
        skipped: ``(case id, reason)`` for cases with nothing to export.
        kept: previous files that were renamed to ``*.prev-<timestamp>.*`` before writing.
        sidecars: the provenance files written.
    """

    out_dir: Path
    exported: list[tuple[str, Path]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the counts."""
        text = f"exported {len(self.exported)} mask(s) to {self.out_dir}"
        if self.skipped:
            text += f"; {len(self.skipped)} case(s) had nothing to export"
        if self.kept:
            text += f"; {len(self.kept)} earlier file(s) kept as *.prev-*"
        return text


def _split_suffix(name: str) -> tuple[str, str]:
    lower = name.lower()
    suffixes = [f.suffix for f in formats.export_formats().values()] + [".csv", ".json"]
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot else (name, "")


def _keep_previous(path: Path, stamp: str, report: ExportReport) -> None:
    """Rename an existing ``path`` to ``<stem>.prev-<stamp><suffix>`` (never overwriting)."""
    if not path.exists():
        return
    stem, suffix = _split_suffix(path.name)
    target = path.with_name(f"{stem}.prev-{stamp}{suffix}")
    n = 2
    while target.exists():
        target = path.with_name(f"{stem}.prev-{stamp}-{n}{suffix}")
        n += 1
    os.replace(path, target)
    report.kept.append(target)


def _safe_stem(text: str) -> str:
    """A file stem from a case name or image path: keeps spaces, parentheses and non-ASCII."""
    stem = text.replace("/", "_").replace("\\", "_").replace("\0", "").strip()
    if stem in ("", ".", ".."):
        stem = "case"
    return stem.lstrip(".") or "case"


def export_file_names(project, case_ids: list[str], suffix: str) -> dict[str, str]:
    """The file name each case is exported under.

    Args:
        project: the project.
        case_ids: cases to name.
        suffix: file suffix including the dot (``.png``).

    Returns:
        ``{case id: file name}``; stems that collide (case-insensitively) get ``_<case id>``.
    """
    stems = {}
    for cid in case_ids:
        rec = project.case(cid)
        base = io.file_stem(rec.source) if rec.source else rec.name
        stems[cid] = _safe_stem(base)
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    return {cid: (f"{s}_{cid}" if counts[s.lower()] > 1 else s) + suffix
            for cid, s in stems.items()}


def _mask_and_provenance(project, cid: str, source: str) -> tuple[np.ndarray, dict] | None:
    rec = project.case(cid)
    if source == "annotation":
        got = project.read_annotation(cid)
        if got is None:
            return None
        mask, av = got
        model_id = av.author.split(":", 1)[1] if av.author.startswith("model:") else ""
        return mask, {"version": av.version, "kind": av.kind, "author": av.author,
                      "time": av.time, "origin": av.source, "model_id": model_id}
    if source == "prediction":
        out = project.read_outputs(cid)
        if out is None:
            return None
        return out.pred, {"version": out.output_id, "kind": "prediction",
                          "author": f"model:{out.model_id}", "time": out.time,
                          "origin": f"prediction:{out.output_id}", "model_id": out.model_id}
    if not rec.has_reference:
        return None
    mask = project.read_reference(cid)
    if mask is None:
        return None
    return mask, {"version": "", "kind": "reference", "author": "", "time": "",
                  "origin": "reference", "model_id": ""}


def _hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _class_rgb(project) -> list[tuple[int, int, int]]:
    """RGB of each lesion class (the project's colours, the default palette otherwise)."""
    from training_backend.project.store import DEFAULT_COLORS

    colors = project.colors
    out = []
    for i, name in enumerate(project.classes):
        default = DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
        try:
            out.append(_hex_rgb(colors.get(name, default)))
        except (ValueError, IndexError, AttributeError):  # not "#rrggbb": the default colour
            out.append(_hex_rgb(default))
    return out


def viewable(project, mask: np.ndarray, values: str) -> np.ndarray:
    """A class-index mask as ``values`` asks (module docstring).

    Args:
        project: the project (its classes and colours).
        mask: (H, W) uint8 class indices (255 = painted background of a sparse annotation).
        values: one of `VALUES`.

    Returns:
        (H, W) uint8 for ``index`` / ``binary``, (H, W, 3) uint8 for ``color``.
    """
    if values == "index":
        return mask
    lesion = (mask > 0) & (mask <= len(project.classes))
    if values == "binary":
        return np.where(lesion, np.uint8(255), np.uint8(0))
    lut = np.zeros((256, 3), np.uint8)
    for k, rgb in enumerate(_class_rgb(project), start=1):
        lut[k] = rgb
    lut[255] = PAINTED_BACKGROUND_RGB
    return lut[mask]


def _pixel_values(project, source: str, values: str = "index") -> dict[str, str]:
    if values == "binary":
        return {"0": "no lesion (background; unlabelled in sparse annotations)",
                "255": "lesion (any class: " + ", ".join(project.classes) + ")"}
    if values == "color":
        out = {"#000000": "background (kind full) / unlabelled (kind sparse)"
               if source == "annotation" else "background"}
        for name, rgb in zip(project.classes, _class_rgb(project)):
            out["#%02x%02x%02x" % rgb] = name
        if source == "annotation":
            out["#%02x%02x%02x" % PAINTED_BACKGROUND_RGB] = ("background painted explicitly "
                                                             "(kind sparse only)")
        return out
    values = {"0": "background" if source != "annotation"
              else "background (kind full) / unlabelled (kind sparse)"}
    for k, name in enumerate(project.classes, start=1):
        values[str(k)] = name
    if source == "annotation":
        values["255"] = "background painted explicitly (kind sparse only)"
    return values


def export_masks(project, out_dir: str | os.PathLike, fmt: str = "png",
                 source: str = "annotation", on_progress: Callable[[int, int], None] | None = None,
                 case_ids: list[str] | None = None, values: str = "index") -> ExportReport:
    """Write one mask file per case plus ``provenance.csv`` / ``provenance.json``.

    Args:
        project: an open project.
        out_dir: output folder (created if missing).
        fmt: ``png``, ``tiff``, ``nifti`` or ``zarr`` (`formats.export_formats`).
        source: ``annotation`` (latest version of each case), ``prediction`` (latest model
            output's class map) or ``reference`` (the hidden reference masks).
        on_progress: called as ``on_progress(done, total)`` after each case.
        case_ids: restrict to these cases (default: all, in import order).
        values: ``index`` (class indices), ``binary`` (0/255) or ``color`` (RGB, PNG/TIFF).

    Returns:
        :class:`ExportReport`.
    """
    offered = formats.export_formats()
    if fmt not in offered:
        raise InputError(out_dir, f"unknown export format {fmt!r}; expected one of "
                                  f"{', '.join(offered)}")
    if source not in SOURCES:
        raise InputError(out_dir, f"unknown mask source {source!r}; expected one of "
                                  f"{', '.join(SOURCES)}")
    if values not in VALUES:
        raise InputError(out_dir, f"unknown mask values {values!r}; expected one of "
                                  f"{', '.join(VALUES)}")
    if values == "color" and not offered[fmt].writes_rgb:
        rgb = " or ".join(n for n, f in offered.items() if f.writes_rgb)
        raise InputError(out_dir, f"colour masks are RGB images: export them as {rgb}, "
                                  f"not {fmt}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out)  # left by an export that was killed
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    report = ExportReport(out_dir=out)
    cids = list(project.case_ids() if case_ids is None else case_ids)
    names = export_file_names(project, cids, offered[fmt].suffix)
    rows: list[dict] = []
    for i, cid in enumerate(cids, start=1):
        got = _mask_and_provenance(project, cid, source)
        if got is None:
            report.skipped.append((cid, f"no {source}"))
        else:
            mask, prov = got
            target = out / names[cid]
            _keep_previous(target, stamp, report)
            pixels = viewable(project, np.asarray(mask), values)
            if pixels.ndim == 3:
                io.write_rgb(target, pixels, fmt)
            else:
                io.write_mask(target, pixels, fmt)
            report.exported.append((cid, target))
            rec = project.case(cid)
            rows.append({"case_id": cid, "name": rec.name, "file": names[cid],
                         "image": rec.source or "", "mask": source, **prov})
        if on_progress is not None:
            on_progress(i, len(cids))
    _write_sidecars(project, out, rows, fmt, source, now, stamp, report, values)
    return report


def _write_sidecars(project, out: Path, rows: list[dict], fmt: str, source: str,
                    now: datetime, stamp: str, report: ExportReport,
                    values: str = "index") -> None:
    buf = _text_io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PROVENANCE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    meta = {
        "format": "lesionseg-export",
        "version": 1,
        "project": project.name,
        "project_path": str(project.path),
        "exported": now.isoformat(timespec="seconds"),
        "mask": source,
        "file_format": fmt,
        "classes": {str(k): c for k, c in enumerate(project.classes, start=1)},
        "values": values,
        "pixel_values": _pixel_values(project, source, values),
        "cases": rows,
    }
    note = formats.FORMATS[fmt].layout_note
    if note:
        meta[f"{fmt}_layout"] = note
    for name, data in (("provenance.csv", buf.getvalue().encode("utf-8")),
                       ("provenance.json", json.dumps(meta, indent=1, ensure_ascii=False)
                        .encode("utf-8"))):
        path = out / name
        _keep_previous(path, stamp, report)
        atomic_write_bytes(path, data)
        report.sidecars.append(path)
