"""``lesionseg import | export | info | sample``: getting data in and out of a project."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from training_backend.project import io
from training_backend.errors import InputError, ProjectError
from training_backend.project.formats import export_formats

_SKIPPED_SHOWN = 30  # skipped rows listed in full; the rest are counted

_IMPORT_EPILOG = """\
examples:
  lesionseg import data/busi/labels.csv --project busi --mask-col masks:lesion --label-col cls
  lesionseg import data/idrid/labels.csv --project idrid --mask-col MA_mask:MA \\
      --mask-col HE_mask:HE --mask-col EX_mask:EX --mask-col SE_mask:SE
  lesionseg import scans/ --project P            (every image in a folder, no labels)

CSV rules: paths are relative to the CSV; a mask cell may list several files separated by ';'
(their union is used); an empty mask cell means that lesion is absent when another mask cell
of the row is filled, and "no mask" when all are empty. Where lesion classes overlap, the class
listed later in the project's classes wins. Rows with a problem are skipped and listed; the
others are imported (exit status 1 if any row was skipped). Re-running an import skips images
already in the project.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import``, ``export``, ``info`` and ``sample`` verbs.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    p = subparsers.add_parser(
        "import", help="import images, masks and labels from a CSV, a folder or a file",
        description="Import images with their masks and image-level labels into a project "
        "(created if it does not exist: lesion classes from --mask-col/--classes, image classes "
        "from the distinct values of --label-col).",
        epilog=_IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="a CSV file (one row per image), a folder of images, or one image file")
    p.add_argument("--project", required=True, help="project folder (created if missing)")
    p.add_argument("--image-col", default="image", metavar="COL",
                   help="CSV column with the image path (default: image)")
    p.add_argument("--mask-col", action="append", default=[], metavar="COL[:CLASS]",
                   help="CSV column with mask file(s): COL:CLASS = binary masks (0/1 or 0/255) of "
                   "lesion class CLASS; COL alone = class-index maps (0..K over the project's "
                   "classes). Repeat for several classes.")
    p.add_argument("--label-col", metavar="COL",
                   help="CSV column with the image-level label (e.g. normal/benign/malignant); "
                   "empty cells = unknown")
    p.add_argument("--presence-col", action="append", default=[], metavar="COL:CLASS",
                   help="CSV column saying whether lesion class CLASS is present (1/0, yes/no); "
                   "repeatable")
    p.add_argument("--split-col", metavar="COL",
                   help="CSV column with train / holdout (holdout cases are never trained on)")
    p.add_argument("--reference", action="store_true",
                   help="store the masks as hidden reference (for evaluation and simulated "
                   "annotation; training never sees them); labels stay visible and are also "
                   "kept as reference")
    p.add_argument("--hide-labels", action="store_true",
                   help="store image labels / presence as reference only (not visible to training)")
    p.add_argument("--empty-as-background", action="store_true",
                   help="a row whose mask cells are all empty gets an all-background mask (for "
                   "sets where images without mask files are lesion-free)")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="lesion classes of a new project, in pixel-value order (default: the "
                   "classes named in --mask-col, else 'lesion')")
    p.add_argument("--image-classes", nargs="+", metavar="CLASS",
                   help="image classes of a new project (default: the distinct --label-col "
                   "values, negative ones like 'normal' first)")
    p.add_argument("--name", help="display name of a new project (default: the folder name)")
    p.add_argument("--recursive", action="store_true",
                   help="folder import: also import images in sub-folders")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_import)

    e = subparsers.add_parser(
        "export", help="export masks (annotations, predictions or reference) as files",
        description="Write one mask file per case, named after its source image, with pixel "
        "values = class indices (sparse annotations keep 0 = unlabelled, 255 = background; "
        "--values binary or color for masks that an image viewer shows), plus "
        "provenance.csv and provenance.json. An existing file of the same name is kept, renamed "
        "to NAME.prev-<timestamp>.EXT, never overwritten.")
    e.add_argument("--project", required=True, help="project folder")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    e.add_argument("--format", default="png", choices=list(export_formats()),
                   help="file format (default: png; nifti writes .nii.gz, zarr a folder per mask)")
    e.add_argument("--source", default="annotation",
                   choices=["annotation", "prediction", "reference"],
                   help="what to export: the latest annotation of each case (default), the "
                   "latest model prediction, or the hidden reference masks")
    e.add_argument("--values", default="index", choices=["index", "binary", "color"],
                   help="pixel values: class indices (default), binary 0/255 (any lesion), or "
                   "the class colours as RGB (png/tiff); the sidecars say which")
    e.add_argument("--quiet", action="store_true", help="no progress line")
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "info", help="show what a project holds (cases, labels, annotations, predictions)",
        description="Counts of cases, image labels per class, annotations by kind, reference "
        "data, predictions and models.")
    i.add_argument("--project", required=True, help="project folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_info)

    s = subparsers.add_parser(
        "sample", help="create a project from the bundled IDRiD fundus sample",
        description="Create a project with the bundled sample: 10 colour fundus photographs "
        "(256x256) from IDRiD (Porwal et al. 2018, CC BY 4.0), 7 with MA/HE/EX/SE lesion masks "
        "and 3 lesion-free, image labels 'lesion' / 'no lesion'.")
    s.add_argument("--project", required=True, help="project folder to create")
    s.add_argument("--reference", action="store_true",
                   help="store the masks as hidden reference instead of annotations (to try "
                   "weak supervision and active learning and score them)")
    s.add_argument("--hide-labels", action="store_true",
                   help="keep the image labels as reference only")
    s.set_defaults(func=_sample)


# --------------------------------------------------------------------------- progress


class _Progress:
    """A progress line on stderr: rewritten in place on a terminal, every ~10% otherwise."""

    def __init__(self, what: str, quiet: bool = False):
        self.what = what
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total == 0:
            return
        step = max(1, total // 10)
        if self.tty:
            print(f"\r{self.what} {done}/{total}", end="", file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)
        elif done == total or done // step != self.last // step:
            elapsed = time.monotonic() - self.t0
            print(f"{self.what} {done}/{total} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        self.last = done


# --------------------------------------------------------------------------- import


def _negative_first(values: list[str]) -> list[str]:
    from training_backend.project.store import DEFAULT_NEGATIVE_NAMES

    neg = [v for v in values if v.strip().lower() in DEFAULT_NEGATIVE_NAMES]
    return neg + [v for v in values if v not in neg]


def _parse_pairs(specs: list[str], option: str, need_class: bool) -> list[tuple[str, str | None]]:
    from training_backend.project.importer import parse_mask_col

    pairs = []
    for spec in specs:
        try:
            col, cls = parse_mask_col(spec)
        except ValueError as exc:
            raise InputError(option, str(exc)) from None
        if need_class and cls is None:
            raise InputError(option, f"expected COLUMN:CLASS, got {spec!r}")
        pairs.append((col, cls))
    return pairs


def _import(args: argparse.Namespace) -> int:
    from training_backend.project import importer
    from training_backend.project.store import Project

    source = Path(args.source)
    if not source.exists():
        raise InputError(source, "not found")
    is_csv = source.is_file() and source.suffix.lower() in (".csv", ".tsv", ".txt")
    mask_cols = _parse_pairs(args.mask_col, "--mask-col", need_class=False)
    presence_cols = _parse_pairs(args.presence_col, "--presence-col", need_class=True)
    table = None
    if is_csv:
        table = importer.read_csv_table(source)
        needed = [args.image_col] + [c for c, _ in mask_cols + presence_cols]
        table.require(needed + [c for c in (args.label_col, args.split_col) if c])
        if not mask_cols:
            maskish = [h for h in table.header if "mask" in h.lower()]
            if maskish:
                print(f"note: no --mask-col given, so no masks are imported (mask-like "
                      f"columns: {', '.join(maskish)})", file=sys.stderr)
    elif mask_cols or presence_cols or args.label_col or args.split_col:
        raise InputError(source, "--mask-col/--label-col/--presence-col/--split-col need a "
                                 "CSV file as SOURCE")
    elif not source.is_dir() and io.image_format(source) is None:
        raise InputError(source, "not a CSV file, a folder or an image file")

    project_path = Path(args.project)
    existed = project_path.exists()
    created = False
    if Project.is_project(project_path):
        project = Project.open(project_path, mode="r+")
        if args.classes and list(args.classes) != project.classes:
            raise ProjectError(f"{project_path}: the project's classes are {project.classes}, "
                               f"not {list(args.classes)} (--classes applies to new projects)")
    else:
        named = [c for _, c in mask_cols + presence_cols if c is not None]
        classes = list(args.classes or dict.fromkeys(named) or ["lesion"])
        if args.image_classes:
            image_classes = list(args.image_classes)
        elif table is not None and args.label_col:
            image_classes = _negative_first(table.distinct(args.label_col))
        else:
            image_classes = []
        project = Project.create(project_path, classes=classes, image_classes=image_classes,
                                 name=args.name)
        created = True
        print(f"created project {project_path} (classes: {', '.join(classes)}"
              + (f"; image classes: {', '.join(image_classes)}" if image_classes else "") + ")",
              file=sys.stderr)

    progress = _Progress("importing", args.quiet)
    t0 = time.monotonic()
    try:
        if table is not None:
            report = importer.import_csv(
                project, source, image_col=args.image_col, mask_cols=mask_cols,
                label_col=args.label_col, reference=args.reference,
                presence_cols=presence_cols, split_col=args.split_col,
                hide_labels=args.hide_labels, empty_as_background=args.empty_as_background,
                on_progress=progress)
        elif source.is_dir() and io.image_format(source) != "zarr":
            report = importer.import_folder(project, source, recursive=args.recursive,
                                            on_progress=progress)
        else:
            report = importer.import_files(project, [source], on_progress=progress)
    except BaseException:
        if created and not project.case_ids():
            _discard_new_project(project_path, existed)  # nothing in it: leave no trace
        raise
    elapsed = time.monotonic() - t0
    if created and not report.imported:
        _discard_new_project(project_path, existed)
        print(f"nothing imported; removed the new project {project_path}", file=sys.stderr)
    for line in importer.describe_skipped(report, limit=_SKIPPED_SHOWN):
        print(f"skipped {line}", file=sys.stderr)
    print(f"{report.summary()} into {project_path} ({elapsed:.1f} s)")
    return 1 if report.skipped else 0


def _discard_new_project(path: Path, existed: bool) -> None:
    """Remove a project this command created (keeping the folder if the user made it)."""
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    from training_backend.project.export import export_masks
    from training_backend.project.store import Project

    project = Project.open(args.project, mode="r")
    report = export_masks(project, args.out, fmt=args.format, source=args.source,
                          values=args.values,
                          on_progress=_Progress("exporting", args.quiet))
    for path in report.kept:
        print(f"kept earlier file as {path.name}", file=sys.stderr)
    print(report.summary())
    if not report.exported:
        print(f"nothing to export: no case has a{'n' if args.source[0] in 'aeiou' else ''} "
              f"{args.source}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- info


def project_info(project) -> dict:
    """Counts describing a project (what ``lesionseg info --json`` prints): the store's
    ``summary()`` plus image labels per class (zeros included), annotations by kind including
    ``none``, unlabelled images, cases with presence, splits and the negative classes.

    Args:
        project: an open project.
    """
    recs = project.cases()
    info = dict(project.summary())
    labels = {c: 0 for c in project.image_classes}
    for r in recs:
        if r.image_label is not None:
            labels[r.image_label] = labels.get(r.image_label, 0) + 1
    info["image_labels"] = labels
    info["unlabelled_images"] = sum(1 for r in recs if r.image_label is None)
    info["presence"] = sum(1 for r in recs if r.presence)
    annotations = {"full": 0, "sparse": 0, "none": 0}
    for r in recs:
        annotations[r.latest.kind if r.latest else "none"] += 1
    info["annotations"] = annotations
    info["annotation_versions"] = sum(len(r.annotations) for r in recs)
    info["splits"] = {"train": sum(1 for r in recs if r.split != "holdout"),
                      "holdout": sum(1 for r in recs if r.split == "holdout")}
    info["negative_classes"] = project.negative_classes
    return info


def _info(args: argparse.Namespace) -> int:
    from training_backend.project.store import Project

    project = Project.open(args.project, mode="r")
    info = project_info(project)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    negative = info["negative_classes"]
    rows = [
        ("project", f"{info['name']} ({project.path})"),
        ("lesion classes", ", ".join(f"{k}={c}" for k, c in enumerate(project.classes, 1))),
        ("image classes", (", ".join(project.image_classes) or "-")
         + (f" (negative: {', '.join(negative)})" if negative else "")),
        ("cases", f"{info['cases']} ({counts(info['splits'])})"),
        ("image labels", counts({**info["image_labels"], "unlabelled": info["unlabelled_images"]})),
        ("annotations", f"{counts(info['annotations'])} ({info['annotation_versions']} versions)"),
        ("reference", f"masks {info['references']}, labels {info['reference_labels']}"),
        ("predictions", f"{info['predictions']} cases, {info['models']} model(s)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------- sample


def _sample(args: argparse.Namespace) -> int:
    from training_backend.project.sample import create_sample_project

    project = create_sample_project(args.project, reference=args.reference,
                                    hide_labels=args.hide_labels)
    kind = "reference masks" if args.reference else "full annotations"
    print(f"created {project.path} with {len(project.case_ids())} cases ({kind}); "
          f"data: IDRiD, Porwal et al., Data 3(3):25 (2018), CC BY 4.0")
    return 0
