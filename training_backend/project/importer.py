"""Import images, masks and image-level labels into a project.

Two entry points, both returning an :class:`ImportReport`:

- :func:`import_folder` — every readable image in a folder (natural sort order), no labels.
- :func:`import_csv` — one row per image, with mask columns, an image-label column, optional
  per-class presence columns and a split column. Paths in the CSV are relative to the CSV's
  folder (absolute paths work too).

Rules (``import_csv``):

- The header is checked first: any missing column is one error and nothing is imported.
- Each row is read and checked completely (image, every mask, labels, sizes) before anything is
  written, so a bad row leaves no trace; it is skipped and reported as ``(row, path, problem)``
  with ``row`` the line number a spreadsheet shows (header = row 1). Good rows are imported.
- A mask cell may hold several ``;``-separated files: their union is used. With a class name
  (``("HE_mask", "HE")``) a cell holds binary masks (0/1 or 0/255) of that class; with class
  None it holds class-index maps (0..K over ``project.classes``).
- All mask columns of a row combine into one class map. An empty cell means "no lesion of that
  class" when another mask cell of the row is filled; a row whose mask cells are all empty has
  no mask (unless ``empty_as_background``: then an all-background mask). Where classes overlap
  the class later in ``project.classes`` wins, whatever the column order.
- ``reference=False``: the mask becomes a ``full`` annotation (author ``import``, source
  ``import:<mask path>``). ``reference=True``: it becomes the hidden reference mask
  (evaluation and simulated annotation only; training never reads it).
- Image labels (``label_col``) and presence (``presence_cols``) are visible training labels.
  With ``reference=True`` they are also recorded as the reference labels (so evaluation can
  score image-level predictions even after a user relabels); ``hide_labels=True`` records them
  as reference only (not visible). So ``reference=True`` gives "hidden reference masks +
  visible image labels", the benchmark setup for weak supervision; add ``hide_labels`` to start
  from nothing at all (e.g. to simulate labelling in active learning).
- A row whose image (resolved path) is already a case's source is not imported again; it is
  counted in ``ImportReport.duplicates`` (not an error), so re-running an import is harmless.
- Case names are the image file stem; if a case already has that name, the CSV-relative path
  (without suffix) is used instead.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np

from training_backend.project import formats, io
from training_backend.errors import InputError, ProjectError

ProgressCallback = Callable[[int, int], None]

_TRUE = {"1", "true", "yes", "y", "present", "t"}
_FALSE = {"0", "false", "no", "n", "absent", "f"}
_SPLITS = {"train": "train", "training": "train", "holdout": "holdout", "hold-out": "holdout",
           "test": "holdout", "testing": "holdout"}


@dataclass
class ImportReport:
    """Outcome of an import.

    Attributes:
        imported: ids of the cases added, in order.
        skipped: ``(row, path, problem)`` for each row/file not imported because of a problem
            (row = spreadsheet row number for CSVs, 1-based position for folders).
        duplicates: ``(row, path, case_id)`` for rows whose image was already in the project.
        n_rows: rows (or files) looked at.
    """

    imported: list[str] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    duplicates: list[tuple[int, str, str]] = field(default_factory=list)
    n_rows: int = 0

    @property
    def ok(self) -> bool:
        """True when no row was skipped because of a problem."""
        return not self.skipped

    def summary(self) -> str:
        """One line: counts of imported / already present / skipped."""
        parts = [f"imported {len(self.imported)} of {self.n_rows}"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} already in the project")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)


@dataclass
class CsvTable:
    """A CSV read into memory: header, rows (dicts) and their spreadsheet row numbers."""

    path: Path
    header: list[str]
    rows: list[dict[str, str]]
    row_numbers: list[int]

    def require(self, columns: Iterable[str]) -> None:
        """Raise one InputError naming every missing column.

        Args:
            columns: column names that must be in the header.
        """
        missing = [c for c in dict.fromkeys(columns) if c not in self.header]
        if missing:
            listed = ", ".join(repr(c) for c in missing)
            have = ", ".join(self.header) or "(empty)"
            raise InputError(self.path, f"missing column(s) {listed}; the header has: {have}")

    def distinct(self, column: str) -> list[str]:
        """Sorted distinct non-empty values of a column.

        Args:
            column: a column in the header.
        """
        return sorted({(r.get(column) or "").strip() for r in self.rows} - {""})


def read_csv_table(csv_path: str | os.PathLike) -> CsvTable:
    """Read a CSV file (UTF-8, BOM allowed; comma, semicolon or tab separated).

    Args:
        csv_path: the CSV file.

    Raises:
        InputError: missing/unreadable file, not UTF-8, no header, duplicate column names.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from exc
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from exc
    lines = text.splitlines(keepends=True)
    if not text.strip():
        raise InputError(path, "empty CSV file (no header)")
    # The header's most frequent separator wins (comma when tied or absent).
    delimiter = max(",;\t", key=lambda d: (lines[0].count(d), d == ","))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        dupes = sorted({h for h in header if header.count(h) > 1 and h})
        if dupes:
            raise InputError(path, f"duplicate column name(s) {', '.join(dupes)}")
        rows, numbers = [], []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line
            rows.append({h: (values[i] if i < len(values) else "") for i, h in enumerate(header)})
            numbers.append(reader.line_num)
    except csv.Error as exc:
        raise InputError(path, f"malformed CSV at line {reader.line_num}: {exc}") from exc
    return CsvTable(path=path, header=header, rows=rows, row_numbers=numbers)


def parse_mask_col(spec: str) -> tuple[str, str | None]:
    """Parse a ``COL[:CLASS]`` command-line value.

    Args:
        spec: ``"masks:lesion"`` -> ``("masks", "lesion")``; ``"labelmap"`` -> ``("labelmap", None)``.
            The class is after the *last* colon, so column names may contain colons.
    """
    if ":" in spec:
        col, cls = spec.rsplit(":", 1)
        if not col or not cls:
            raise ValueError(f"expected COLUMN:CLASS, got {spec!r}")
        return col, cls
    return spec, None


def _parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if not v:
        return None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(value)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _resolve(base: Path, cell: str) -> Path:
    p = Path(cell.strip())
    return p if p.is_absolute() else base / p


@dataclass
class _Row:
    """Everything one row will write, checked and in memory."""

    image: np.ndarray
    image_path: Path
    mask: np.ndarray | None
    mask_source: str
    label: str | None
    presence: dict[str, bool] | None
    split: str


class _Importer:
    """Shared state of one import: the project, known sources and names, the report."""

    def __init__(self, project, on_progress: ProgressCallback | None):
        self.project = project
        self.on_progress = on_progress
        self.report = ImportReport()
        self.sources: dict[str, str] = {}
        self.names: set[str] = set()
        for rec in project.cases():
            if rec.source:
                self.sources[rec.source] = rec.id
            self.names.add(rec.name)

    def progress(self, i: int, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(i, n)

    def duplicate_of(self, image_path: Path) -> str | None:
        return self.sources.get(str(image_path.resolve()))

    def name_for(self, image_path: Path, rel: str | None) -> str:
        name = io.file_stem(image_path)
        if name in self.names and rel:
            parent = PurePosixPath(rel.replace(os.sep, "/")).parent
            if str(parent) not in ("", "."):
                name = f"{parent}/{name}"
        return name

    def write(self, row: _Row, rel: str | None, reference: bool, hide_labels: bool) -> str:
        """Add the case and its mask/labels; returns the case id."""
        project = self.project
        visible_label = None if hide_labels else row.label
        visible_presence = None if hide_labels else row.presence
        name = self.name_for(row.image_path, rel)
        source = str(row.image_path.resolve())
        with project.together():  # the case and its mask reach the index in one write
            cid = project.add_case(row.image, name, source=source, image_label=visible_label,
                                   presence=visible_presence, split=row.split)
            try:
                if row.mask is not None and not reference:
                    project.save_annotation(cid, row.mask, "full", author="import",
                                            source=f"import:{row.mask_source}")
                if reference or hide_labels:
                    ref_mask = row.mask if reference else None
                    if ref_mask is not None or row.label is not None or row.presence is not None:
                        project.set_reference(cid, mask=ref_mask, image_label=row.label,
                                              presence=row.presence)
            except BaseException:
                # all of the row or none of it: a case without its mask would be taken for an
                # already imported duplicate when the import is run again
                with contextlib.suppress(ProjectError, OSError):  # the first error is the one to tell
                    project.discard_new_case(cid)
                raise
        self.sources[source] = cid
        self.names.add(name)
        return cid


def import_folder(project, folder: str | os.PathLike, recursive: bool = False,
                  image_label: str | None = None, split: str = "train",
                  on_progress: ProgressCallback | None = None) -> ImportReport:
    """Import every supported image in a folder as an unannotated case.

    Args:
        project: an open, writable :class:`~training_backend.project.store.Project`.
        folder: the folder; files are taken in natural sort order (``img2`` before ``img10``).
            Hidden files are ignored; zarr array folders count as images.
        recursive: also look in sub-folders.
        image_label: optional image label given to every case (one of ``project.image_classes``).
        split: ``"train"`` or ``"holdout"`` for every case.
        on_progress: called as ``on_progress(done, total)`` after each file.

    Returns:
        The report; unreadable files are skipped and listed (position, path, problem).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found" if not folder.exists() else "not a folder")
    found: list[Path] = []

    def scan(d: Path) -> None:
        for entry in sorted(d.iterdir(), key=lambda p: _natural_key(p.name)):
            if entry.name.startswith("."):
                continue
            fmt = formats.from_path(entry)
            if fmt is not None and (fmt.folder or entry.is_file()):
                found.append(entry)
            elif entry.is_dir() and recursive:
                scan(entry)

    scan(folder)
    return import_files(project, found, image_label=image_label, split=split,
                        on_progress=on_progress, base=folder)


def import_files(project, paths: Sequence[str | os.PathLike], image_label: str | None = None,
                 split: str = "train", on_progress: ProgressCallback | None = None,
                 base: str | os.PathLike | None = None) -> ImportReport:
    """Import image files (in the given order) as unannotated cases.

    Args:
        project: an open, writable :class:`~training_backend.project.store.Project`.
        paths: image files or zarr array folders.
        image_label: optional image label for every case.
        split: ``"train"`` or ``"holdout"``.
        on_progress: called as ``on_progress(done, total)`` after each file.
        base: folder the paths are relative to (used only to disambiguate case names).

    Returns:
        The report; unreadable files are skipped and listed (position, path, problem).
    """
    paths = [Path(p) for p in paths]
    if image_label is not None and image_label not in project.image_classes:
        raise InputError(paths[0] if paths else "import", f"image label {image_label!r} is not "
                         f"one of the project's image classes {project.image_classes}")
    imp = _Importer(project, on_progress)
    report = imp.report
    report.n_rows = len(paths)
    with project.batch():
        for i, path in enumerate(paths, start=1):
            dup = imp.duplicate_of(path) if path.exists() else None
            if dup is not None:
                report.duplicates.append((i, str(path), dup))
            else:
                try:
                    image = io.read_image(path)
                    row = _Row(image=image, image_path=path, mask=None, mask_source="",
                               label=image_label, presence=None, split=split)
                    rel = path.relative_to(base).as_posix() if base is not None else None
                    report.imported.append(imp.write(row, rel, False, False))
                except InputError as exc:
                    report.skipped.append((i, str(path), exc.problem))
                except OSError as exc:  # a name too long, a folder we may not read, ...
                    if exc.errno not in _PATH_ERRNOS:
                        raise  # a full disk stops the import: nothing more can be saved
                    report.skipped.append((i, str(path), _os_problem(exc)))
            imp.progress(i, len(paths))
    return report


def import_csv(project, csv_path: str | os.PathLike, image_col: str = "image",
               mask_cols: Sequence[tuple[str, str | None]] = (("masks", "lesion"),),
               label_col: str | None = None, reference: bool = False,
               presence_cols: Sequence[tuple[str, str]] | None = None,
               split_col: str | None = None, hide_labels: bool = False,
               empty_as_background: bool = False,
               on_progress: ProgressCallback | None = None) -> ImportReport:
    """Import the rows of a CSV (image, masks, labels) into a project.

    Args:
        project: an open, writable :class:`~training_backend.project.store.Project`.
        csv_path: the CSV file; relative paths in it are relative to its folder.
        image_col: column holding the image path.
        mask_cols: ``(column, class name)`` pairs; class None = the cell holds class-index maps
            over ``project.classes``. Empty sequence = no masks.
        label_col: column holding the image-level label (one of ``project.image_classes``;
            empty cell = unknown).
        reference: masks become the hidden reference instead of ``full`` annotations.
        presence_cols: ``(column, class name)`` pairs with per-class presence
            (1/0, true/false, yes/no; empty = unknown).
        split_col: column with ``train`` / ``holdout`` (``test`` means holdout; empty = train).
        hide_labels: labels/presence go to the reference only (training never sees them).
        empty_as_background: a row with no mask file at all gets an all-background mask.
        on_progress: called as ``on_progress(done, total)`` after each row.

    Returns:
        :class:`ImportReport` (imported case ids, skipped rows with their problem).

    Raises:
        InputError: unreadable CSV, missing columns, or classes the project does not have
            (nothing is imported then).
    """
    table = read_csv_table(csv_path)
    mask_cols = [(c, k) for c, k in mask_cols]
    presence_cols = [(c, k) for c, k in (presence_cols or ())]
    needed = [image_col] + [c for c, _ in mask_cols] + [c for c, _ in presence_cols]
    needed += [c for c in (label_col, split_col) if c]
    table.require(needed)
    classes = project.classes
    for col, cls in list(mask_cols) + list(presence_cols):
        if cls is not None and cls not in classes:
            raise InputError(table.path, f"class {cls!r} (column {col!r}) is not a lesion class "
                                         f"of the project; its classes are {classes}")
    base = table.path.parent
    imp = _Importer(project, on_progress)
    report = imp.report
    n = len(table.rows)
    report.n_rows = n
    with project.batch():
        for i, (values, row_no) in enumerate(zip(table.rows, table.row_numbers), start=1):
            cell = values.get(image_col, "").strip()
            try:
                if not cell:
                    raise InputError(table.path, f"empty {image_col!r} cell")
                image_path = _resolve(base, cell)
                dup = imp.duplicate_of(image_path) if image_path.exists() else None
                if dup is not None:
                    report.duplicates.append((row_no, str(image_path), dup))
                    continue
                row = _read_row(project, values, base, image_path, mask_cols, label_col,
                                presence_cols, split_col, empty_as_background)
                report.imported.append(imp.write(row, cell, reference, hide_labels))
            except InputError as exc:
                report.skipped.append((row_no, exc.path, exc.problem))
            except OSError as exc:  # a name too long, a folder we may not read, ...
                if exc.errno not in _PATH_ERRNOS:
                    raise  # a full disk stops the import: nothing more can be saved
                report.skipped.append((row_no, cell, _os_problem(exc)))
            finally:
                imp.progress(i, n)
    return report


#: Errors of a path the user gave (the row is skipped); any other OSError stops the import.
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP,
                errno.ENOTDIR, errno.EISDIR, errno.EINVAL}


def _os_problem(exc: OSError) -> str:
    """One line for an operating-system error on a path from the user."""
    return f"cannot use this path ({exc.strerror or type(exc).__name__})"


def _read_row(project, values: dict[str, str], base: Path, image_path: Path,
              mask_cols: list[tuple[str, str | None]], label_col: str | None,
              presence_cols: list[tuple[str, str]], split_col: str | None,
              empty_as_background: bool) -> _Row:
    """Read and check one CSV row completely; raises InputError on the first problem."""
    classes = project.classes
    label = None
    if label_col:
        label = values.get(label_col, "").strip() or None
        if label is not None and label not in project.image_classes:
            raise InputError(image_path, f"label {label!r} (column {label_col!r}) is not one of "
                                         f"the project's image classes {project.image_classes}")
    presence: dict[str, bool] | None = None
    for col, cls in presence_cols:
        try:
            flag = _parse_bool(values.get(col, ""))
        except ValueError:
            raise InputError(image_path, f"presence value {values.get(col)!r} in column {col!r}: "
                                         f"expected 1/0, true/false or yes/no") from None
        if flag is not None:
            presence = {**(presence or {}), cls: flag}
    split = "train"
    if split_col:
        raw = values.get(split_col, "").strip().lower()
        if raw:
            if raw not in _SPLITS:
                raise InputError(image_path, f"split {raw!r} (column {split_col!r}): expected "
                                             f"train or holdout (test)")
            split = _SPLITS[raw]
    image = io.read_image(image_path)
    shape = image.shape[:2]
    # Combine mask columns in class order so that the later class wins on overlaps.
    order = sorted(mask_cols, key=lambda ck: -1 if ck[1] is None else classes.index(ck[1]))
    combined: np.ndarray | None = None
    sources: list[str] = []
    for col, cls in order:
        files = [f for f in (values.get(col) or "").split(";") if f.strip()]
        if not files:
            continue
        paths = [_resolve(base, f) for f in files]
        for p in paths:
            if not p.exists():
                raise InputError(p, f"mask file not found (column {col!r})")
        m = io.union_masks(paths, n_classes=1 if cls is not None else len(classes))
        if m.shape != shape:
            raise InputError(paths[0], f"mask is {m.shape[1]}x{m.shape[0]} but the image "
                                       f"{image_path.name} is {shape[1]}x{shape[0]}")
        if cls is not None:
            m = m * np.uint8(classes.index(cls) + 1)
        if combined is None:
            combined = np.zeros(shape, np.uint8)
        np.copyto(combined, m, where=m > 0)
        sources.extend(str(p.resolve()) for p in paths)
    if combined is None and empty_as_background and mask_cols:
        combined = np.zeros(shape, np.uint8)
        sources = ["(no mask file: all background)"]
    return _Row(image=image, image_path=image_path, mask=combined,
                mask_source=";".join(sources), label=label, presence=presence, split=split)


# ----------------------------------------------------------------------------- before importing
def column_summary(table: CsvTable, column: str, n_first: int = 3) -> str:
    """``"benign, malignant, normal … (3 distinct)"``: a column's first distinct values and
    how many distinct non-empty values it has (what a user needs to pick the right column).

    Args:
        table: the CSV.
        column: a column of its header.
        n_first: how many values to show.
    """
    seen: list[str] = []
    for row in table.rows:
        v = (row.get(column) or "").strip()
        if v and v not in seen:
            seen.append(v)
    if not seen:
        return "(empty)"
    first = ", ".join(v if len(v) <= 24 else v[:21] + "…" for v in seen[:n_first])
    more = " …" if len(seen) > n_first else ""
    return f"{first}{more} ({len(seen)} distinct)"


def guess_label_column(table: CsvTable, image_classes: Sequence[str]) -> str | None:
    """The column whose values are most often one of ``image_classes`` (by content, not by
    name: BUSI has ``label`` holding 0/1/2 codes beside ``cls`` holding the class names).

    Ties go to the column with fewer distinct values. None when no column holds a class name.

    Args:
        table: the CSV.
        image_classes: the project's image classes.
    """
    wanted = set(image_classes)
    if not wanted or not table.rows:
        return None
    best, best_key = None, (0.0, 0)
    for col in table.header:
        values = [(r.get(col) or "").strip() for r in table.rows]
        filled = [v for v in values if v]
        if not filled:
            continue
        share = sum(v in wanted for v in filled) / len(table.rows)
        key = (share, -len(set(filled)))
        if share > 0 and key > best_key:
            best, best_key = col, key
    return best


@dataclass
class CsvCheck:
    """What `check_csv` found: rows that would import and, per problem, rows that would not."""

    n_rows: int
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        """One line, e.g. ``546 rows: 0 will be imported, 546 skipped (label '1' ...: 546)``."""
        text = f"{self.n_rows} rows: {self.n_rows - self.n_skipped} will be imported"
        if self.problems:
            worst = sorted(self.problems.items(), key=lambda kv: -kv[1])
            shown = "; ".join(f"{why}: {n}" for why, n in worst[:3])
            more = f"; {len(worst) - 3} more kinds" if len(worst) > 3 else ""
            text += f", {self.n_skipped} skipped ({shown}{more})"
        return text


def check_csv(project, table: CsvTable, image_col: str,
              mask_cols: Sequence[tuple[str, str | None]] = (), label_col: str | None = None,
              split_col: str | None = None) -> CsvCheck:
    """Count the rows an `import_csv` with these columns would skip, and why, without reading
    any image (empty cells, missing files, labels that are not image classes, bad splits).
    Unreadable or mismatched files are found only by the import itself.

    Args:
        project: the project (its image classes).
        table: the CSV.
        image_col, mask_cols, label_col, split_col: as for `import_csv`.
    """
    check = CsvCheck(len(table.rows))
    base = table.path.parent
    classes = set(project.image_classes)

    def problem(why: str) -> None:
        check.problems[why] = check.problems.get(why, 0) + 1

    for values in table.rows:
        cell = (values.get(image_col) or "").strip()
        if not cell:
            problem(f"empty {image_col!r} cell")
            continue
        if not _resolve(base, cell).is_file():
            problem("image file not found")
            continue
        label = (values.get(label_col) or "").strip() if label_col else ""
        if label and label not in classes:
            problem(f"label {label!r} is not an image class")
            continue
        raw = (values.get(split_col) or "").strip().lower() if split_col else ""
        if raw and raw not in _SPLITS:
            problem(f"split {raw!r} is not train/holdout")
            continue
        files = [f for col, _ in mask_cols for f in (values.get(col) or "").split(";") if f.strip()]
        if any(not _resolve(base, f).exists() for f in files):
            problem("mask file not found")
    return check


def describe_skipped(report: ImportReport, limit: int | None = None) -> list[str]:
    """Human-readable lines for the skipped rows (``row 12: path: problem``).

    Args:
        report: an import report.
        limit: at most this many lines (plus a final "... and N more").
    """
    lines = [f"row {row}: {path}: {problem}" for row, path, problem in report.skipped]
    if limit is not None and len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


__all__ = ["ImportReport", "CsvTable", "read_csv_table", "parse_mask_col", "import_folder",
           "import_files", "import_csv", "describe_skipped", "column_summary",
           "guess_label_column", "CsvCheck", "check_csv"]
