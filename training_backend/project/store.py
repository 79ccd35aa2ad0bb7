"""The project store: a folder with a zarr (v3) store and small JSON indexes.

A project holds clinicians' work, so every write is atomic and versioned:

* arrays are written to a temporary folder, then renamed into place (POSIX ``rename`` is atomic);
  every annotation version gets a fresh key and is never modified or deleted by a later save;
* the JSON indexes are rewritten with write-to-temp + ``fsync`` + ``os.replace`` under an
  ``fcntl`` lock, so a reader never sees half an index and two writers (the GUI saving annotations,
  the trainer process writing predictions) never lose each other's updates;
* a reader only follows keys listed in the index, so it never sees a half-written mask.

Opening a project reads the JSON indexes only; images stay on disk until asked for (lazily, as
zarr arrays).

`Project` is the one public face; it delegates by topic to:

* ``records.py`` — the records (`CaseRecord`, `AnnotationVersion`, `Outputs`, ...);
* ``labels.py`` — label semantics (`BACKGROUND`, `mask_to_target`, `count_supervision`, presence);
* ``store_index.py`` — the JSON indexes, the lock and atomic array placement (`ProjectFiles`);
* ``store_outputs.py`` — model outputs and model records (`OutputStore`);
* ``atomic.py`` — atomic file writes (shared with ``io``, ``export`` and the checkpoints).

Everything that used to be imported from here still is (``from training_backend.project.store import
Project, BACKGROUND, CaseRecord, mask_to_target, ...``).

Layout and label conventions: see ``docs/architecture.md``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr
from zarr.storage import LocalStore

from training_backend.project.atomic import atomic_write_json
from training_backend.errors import (ConflictError, InputError, LesionsegError, ProjectError,
                                     ReadOnlyError)
from training_backend.project.labels import (BACKGROUND, DEFAULT_NEGATIVE_NAMES, IGNORE, check_mask,
                                     count_supervision, mask_to_target, presence_from)
from training_backend.project.records import (ANNOTATION_KINDS, DEFAULT_COLORS, FORMAT, FORMAT_VERSION,
                                      KEEP_OUTPUTS, SPLITS, AnnotationVersion, CaseRecord,
                                      OutputRecord, Outputs, now_iso)
from training_backend.project.store_index import ProjectFiles, read_json, write_array
from training_backend.project.store_outputs import OutputStore

__all__ = [
    "ANNOTATION_KINDS", "BACKGROUND", "DEFAULT_COLORS", "DEFAULT_NEGATIVE_NAMES", "FORMAT",
    "FORMAT_VERSION", "IGNORE", "KEEP_OUTPUTS", "SPLITS", "AnnotationVersion", "CaseRecord",
    "OutputRecord", "Outputs", "Project", "atomic_write_json", "mask_to_target", "now_iso",
]


class Project:
    """A lesionseg project folder. Open with :meth:`open`, make one with :meth:`create`."""

    def __init__(self, path: Path, meta: dict, mode: str):
        self.path = Path(path)
        self._meta = meta
        self.mode = mode
        self._files = ProjectFiles(self.path, mode)
        self._out = OutputStore(self._files, self.case, len(self.classes))

    # ---- creation / opening
    @classmethod
    def create(cls, path, classes: Iterable[str], image_classes: Iterable[str] = (),
               name: str | None = None, colors: dict[str, str] | None = None,
               negative_classes: Iterable[str] | None = None) -> "Project":
        """Create a new project folder.

        Args:
            path: folder to create (must not exist, or be empty).
            classes: lesion class names; class k (1-based) is pixel value k.
            image_classes: image-level classes (e.g. normal/benign/malignant), may be empty.
            name: display name (default: the folder name).
            colors: ``{class: "#rrggbb"}``; defaults to a fixed palette.
            negative_classes: image classes meaning "no lesion"; default: the usual names.
        """
        path = Path(path)
        classes = [str(c) for c in classes]
        image_classes = [str(c) for c in image_classes]
        if not classes:
            raise ProjectError(f"{path}: a project needs at least one lesion class")
        for group, names in (("lesion", classes), ("image", image_classes)):
            if len(set(names)) != len(names):
                raise ProjectError(f"{path}: duplicate {group} class names in {names}")
        if len(classes) > 254:
            raise ProjectError(f"{path}: at most 254 lesion classes")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProjectError(f"{path}: already exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        if negative_classes is None:
            negative_classes = [c for c in image_classes if c.strip().lower() in DEFAULT_NEGATIVE_NAMES]
        palette = dict(zip(classes, DEFAULT_COLORS * (len(classes) // len(DEFAULT_COLORS) + 1)))
        palette.update(colors or {})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name or path.name,
                "classes": classes, "colors": palette, "image_classes": image_classes,
                "negative_classes": list(negative_classes), "created": now_iso()}
        root = path / "store.zarr"
        zarr.open_group(store=LocalStore(str(root)), mode="w")
        for group in ("images", "annotations", "reference", "outputs"):
            (root / group).mkdir()
        (path / "models").mkdir()
        (path / ".lock").touch()
        atomic_write_json(path / "index.json", {"version": FORMAT_VERSION, "cases": {}, "order": []})
        atomic_write_json(path / "outputs.json", {"version": FORMAT_VERSION, "models": {}, "cases": {}})
        atomic_write_json(path / "project.json", meta)  # last: its presence marks a complete project
        return cls(path, meta, "r+")

    @classmethod
    def open(cls, path, mode: str = "r+") -> "Project":
        """Open an existing project (reads only the small JSON files).

        Args:
            path: the project folder.
            mode: ``"r+"`` (read/write) or ``"r"`` (read-only).
        """
        path = Path(path)
        if mode not in ("r", "r+"):
            raise ValueError("mode must be 'r' or 'r+'")
        meta_path = path / "project.json"
        if not path.is_dir():
            raise ProjectError(f"{path}: no such project folder")
        if not meta_path.is_file():
            raise ProjectError(f"{path}: not a lesionseg project (no project.json)")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ProjectError(f"{meta_path}: not a lesionseg project file")
        _check_meta(meta, meta_path)
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ProjectError(f"{meta_path}: project format {meta['version']} is newer than this "
                               f"lesionseg understands ({FORMAT_VERSION}); please upgrade")
        if mode == "r+" and not all(os.access(p, os.W_OK) for p in (
                path, path / "index.json", path / "store.zarr") if p.exists()):
            raise ReadOnlyError(f"{path}: the project folder is read-only: open it read-only "
                                f"to look at it without saving")
        project = cls(path, meta, mode)
        if mode == "r+":
            project._files.clean_stale_tmp()
        return project

    @staticmethod
    def is_project(path) -> bool:
        return (Path(path) / "project.json").is_file()

    # ---- metadata
    @property
    def name(self) -> str:
        return self._meta["name"]

    @property
    def classes(self) -> list[str]:
        return list(self._meta["classes"])

    @property
    def colors(self) -> dict[str, str]:
        return dict(self._meta.get("colors", {}))

    @property
    def image_classes(self) -> list[str]:
        return list(self._meta.get("image_classes", []))

    @property
    def negative_classes(self) -> list[str]:
        return list(self._meta.get("negative_classes", []))

    @property
    def zarr_path(self) -> Path:
        return self.path / "store.zarr"

    def update_meta(self, **changes) -> None:
        """Change project metadata (``name``, ``colors``, ``image_classes`` (append only),
        ``negative_classes``). Lesion classes cannot be renumbered once masks exist."""
        self._files.require_writable()
        allowed = {"name", "colors", "image_classes", "negative_classes"}
        unknown = set(changes) - allowed
        if unknown:
            raise ProjectError(f"{self.path}: cannot change {sorted(unknown)}")
        with self._files.locked():
            meta = read_json(self.path / "project.json")
            if "image_classes" in changes:
                new = [str(c) for c in changes["image_classes"]]
                if new[:len(meta["image_classes"])] != meta["image_classes"]:
                    raise ProjectError(f"{self.path}: image classes can only be appended "
                                       f"(existing: {meta['image_classes']})")
            if "colors" in changes:
                changes["colors"] = {**meta.get("colors", {}), **changes["colors"]}
            meta.update(changes)
            atomic_write_json(self.path / "project.json", meta)
            self._meta = meta

    # ---- the indexes (see store_index.ProjectFiles)
    @contextlib.contextmanager
    def batch(self, flush_every_s: float = 2.0) -> Iterator["Project"]:
        """Group many changes (e.g. an import) into few index writes.

        The index is written at most every ``flush_every_s`` seconds and at the end; between
        flushes the lock is released briefly so that other writers (the GUI) get their turn.
        A crash loses at most the unflushed cases (their arrays stay unlisted, as garbage).
        """
        with self._files.batch(flush_every_s):
            yield self

    def together(self) -> contextlib.AbstractContextManager:
        """Inside `batch`: the changes made in this block reach the index in one write (an
        imported case and its mask: a crash never leaves the case without its mask). Outside
        `batch` it does nothing."""
        return self._files.held()

    def refresh(self) -> bool:
        """Re-read the indexes if another process changed them. Returns True if anything changed."""
        return self._files.refresh()

    @property
    def _index(self) -> dict:
        return self._files.index

    # ---- cases
    def case_ids(self) -> list[str]:
        return list(self._index["order"])

    def __len__(self) -> int:
        return len(self._index["order"])

    def case(self, cid: str) -> CaseRecord:
        try:
            return CaseRecord.from_dict(self._index["cases"][cid])
        except KeyError:
            raise ProjectError(f"{self.path}: no case {cid!r}") from None

    def cases(self) -> list[CaseRecord]:
        return [self.case(cid) for cid in self._index["order"]]

    def find(self, name: str) -> CaseRecord | None:
        for cid in self._index["order"]:
            if self._index["cases"][cid]["name"] == name:
                return self.case(cid)
        return None

    def add_case(self, image: np.ndarray, name: str, source: str | None = None,
                 image_label: str | None = None, presence: dict[str, bool] | None = None,
                 split: str = "train") -> str:
        """Add an image as a new case and return its id.

        Args:
            image: (H, W) grey or (H, W, 3) RGB array, any numeric dtype (kept as is).
            name: display name (e.g. the source file stem); need not be unique.
            source: original path, kept for provenance and export names.
            image_label: one of ``image_classes`` or None.
            presence: ``{lesion class: bool}`` or None.
            split: ``"train"`` or ``"holdout"`` (never used for training).
        """
        what = source or name
        image = _check_image(np.asarray(image), what)
        self._check_labels(what, image_label, presence)
        if split not in SPLITS:
            raise InputError(what, f"split must be one of {SPLITS}, got {split!r}")
        files = self._files
        files.require_writable()
        tmp = files.tmp_folder()
        write_array(tmp, image)
        with files.mutate_index() as index:
            cid = f"c{len(index['order']) + 1:06d}"
            while cid in index["cases"]:  # never reuse an id
                cid = f"c{int(cid[1:]) + 1:06d}"
            key = f"images/{cid}"
            if (self.zarr_path / key).exists():  # left by a crashed add; not in the index
                shutil.move(str(self.zarr_path / key), str(files.tmp_folder()))
            files.place(tmp, key)
            index["cases"][cid] = {
                "id": cid, "name": str(name), "source": None if source is None else str(source),
                "shape": [int(image.shape[0]), int(image.shape[1])],
                "channels": 1 if image.ndim == 2 else 3, "dtype": str(image.dtype),
                "image_label": image_label, "presence": presence, "annotations": [],
                "reference_key": None, "reference_label": None, "reference_presence": None,
                "split": split, "label_history": [], "image_key": key, "added": now_iso(),
            }
            index["order"].append(cid)
        return cid

    def discard_new_case(self, cid: str) -> None:
        """Undo `add_case` of a case nobody has worked on yet (an import row that failed after
        its image was added): the case leaves the index, its image array goes to the store's
        temporary folder (removed later). A case with any annotation, reference mask,
        image-label change or prediction is refused with `ProjectError`: that is the user's work
        (hidden reference labels come from the import itself).

        Args:
            cid: the case id `add_case` returned.
        """
        with self._files.mutate_index() as index:
            rec = index["cases"].get(cid)
            if rec is None:
                raise ProjectError(f"{self.path}: no case {cid!r}")
            if rec["annotations"] or rec["reference_key"] or rec["label_history"] or cid in self._files.outputs.get("cases", {}):
                raise ProjectError(f"{self.path}: case {cid} has annotations or outputs; not discarded")
            image_key = rec["image_key"]
            del index["cases"][cid]
            index["order"].remove(cid)
        self._files.discard(image_key)

    def image(self, cid: str) -> zarr.Array:
        """The image as a lazy zarr array ((H, W) or (H, W, 3))."""
        return self._files.open_array(self.case(cid).image_key)

    def read_image(self, cid: str) -> np.ndarray:
        return self.image(cid)[...]

    # ---- image-level labels
    def _check_labels(self, what, image_label, presence) -> None:
        if image_label is not None and image_label not in self.image_classes:
            raise InputError(what, f"image label {image_label!r} is not one of the project's image "
                                   f"classes {self.image_classes}")
        if presence is not None:
            unknown = set(presence) - set(self.classes)
            if unknown:
                raise InputError(what, f"presence names unknown lesion classes {sorted(unknown)} "
                                       f"(classes: {self.classes})")

    def set_image_label(self, cid: str, image_label: str | None,
                        presence: dict[str, bool] | None = None, author: str = "user") -> CaseRecord:
        """Set the image-level label and/or per-class presence; the previous one goes to history."""
        self._check_labels(cid, image_label, presence)
        presence = None if presence is None else {k: bool(v) for k, v in presence.items()}
        with self._files.mutate_index() as index:
            rec = self._case_dict(index, cid)
            if rec.get("image_label") == image_label and rec.get("presence") == presence:
                return self.case(cid)
            rec.setdefault("label_history", []).append(
                {"image_label": rec.get("image_label"), "presence": rec.get("presence"),
                 "author": rec.get("label_author"), "time": rec.get("label_time")})
            rec.update(image_label=image_label, presence=presence, label_author=author,
                       label_time=now_iso())
        return self.case(cid)

    def _case_dict(self, index: dict, cid: str) -> dict:
        try:
            return index["cases"][cid]
        except KeyError:
            raise ProjectError(f"{self.path}: no case {cid!r}") from None

    def set_split(self, cids: Iterable[str], split: str) -> None:
        if split not in SPLITS:
            raise ProjectError(f"split must be one of {SPLITS}, got {split!r}")
        with self._files.mutate_index() as index:
            for cid in cids:
                self._case_dict(index, cid)["split"] = split

    # ---- annotations
    def save_annotation(self, cid: str, mask: np.ndarray, kind: str, author: str = "user",
                        source: str = "manual", parent: int | None = None,
                        check_latest: bool = False) -> AnnotationVersion:
        """Save a mask as a new annotation version (never overwrites an earlier version).

        Args:
            cid: case id.
            mask: (H, W) integer class map at the image's size (see the label conventions).
            kind: ``"full"`` (0 = background) or ``"sparse"`` (0 = unlabelled, 255 = background).
            author: user name or ``model:<id>``.
            source: where it came from (``manual``, ``import:<path>``, ``prediction:<output id>``).
            parent: version this one was edited from (default: the latest).
            check_latest: refuse (`ConflictError`, nothing saved) when ``parent`` is no longer
                the latest version: another window or process saved this case meanwhile, and
                this edit was made on an older view of it.

        Raises:
            ConflictError: with ``check_latest``, a newer version was saved meanwhile.
            ProjectError: the disk refused the write (full, read-only); nothing was changed.
        """
        if kind not in ANNOTATION_KINDS:
            raise InputError(cid, f"annotation kind must be one of {ANNOTATION_KINDS}, got {kind!r}")
        rec = self.case(cid)
        mask = check_mask(mask, rec.shape, len(self.classes), kind, f"{rec.name} ({cid})")
        labelled = 1.0 if kind == "full" else float(np.count_nonzero(mask)) / mask.size
        files = self._files
        files.require_writable()
        tmp = self._write_tmp(mask, f"the annotation of {rec.name} ({cid})")
        with self._saving(tmp, f"the annotation of {rec.name} ({cid})"), \
                files.mutate_index() as index:
            entry = self._case_dict(index, cid)
            history = entry.setdefault("annotations", [])
            version = (history[-1]["version"] + 1) if history else 1
            latest = history[-1]["version"] if history else None
            if check_latest and parent != latest:
                newest = history[-1] if history else {}
                raise ConflictError(
                    f"{rec.name} ({cid}): v{latest} was saved meanwhile by "
                    f"{newest.get('author', '?')} at {newest.get('time', '?')}; this edit of "
                    f"{'v' + str(parent) if parent else 'the unannotated case'} was not saved")
            if parent is None and history:
                parent = history[-1]["version"]
            key = f"annotations/{cid}/v{version:04d}-{uuid.uuid4().hex[:8]}"
            files.place(tmp, key)
            av = AnnotationVersion(version=version, kind=kind, author=author, time=now_iso(),
                                   source=source, parent=parent, key=key,
                                   labelled_fraction=round(labelled, 6))
            history.append(av.to_dict())
        return av

    def _write_tmp(self, data: np.ndarray, what: str) -> Path:
        """Write an array to a fresh temporary folder; a full or read-only disk raises
        `ProjectError` (the partial folder removed, the project unchanged)."""
        tmp = self._files.tmp_folder() if self.mode == "r+" else None
        try:
            if tmp is None:
                self._files.require_writable()
            write_array(tmp, data)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ProjectError(f"{self.path}: could not save {what}: "
                               f"{exc.strerror or exc}; nothing was changed") from None
        return tmp

    @contextlib.contextmanager
    def _saving(self, tmp: Path, what: str) -> Iterator[None]:
        """Around placing ``tmp`` and listing it: any failure removes the temporary folder;
        a disk error becomes a one-line `ProjectError` (earlier versions stay listed)."""
        try:
            yield
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._files.forget_stamps()
            with contextlib.suppress(LesionsegError, OSError):
                self._files.refresh()  # the memory copy must not list what the disk lacks
            raise ProjectError(f"{self.path}: could not save {what}: "
                               f"{exc.strerror or exc}; nothing was changed") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read_annotation(self, cid: str, version: int | None = None
                        ) -> tuple[np.ndarray, AnnotationVersion] | None:
        """The mask and record of a version (default: the latest); None if never annotated."""
        rec = self.case(cid)
        if not rec.annotations:
            return None
        if version is None:
            av = rec.annotations[-1]
        else:
            matches = [a for a in rec.annotations if a.version == version]
            if not matches:
                raise ProjectError(f"{self.path}: case {cid} has no annotation version {version}")
            av = matches[0]
        return self._files.open_array(av.key)[...], av

    def revert_annotation(self, cid: str, author: str = "user") -> AnnotationVersion | None:
        """Undo the latest save: the previous version is saved again as a new version (a trace of
        the undone one stays). Returns the new version, or None if there is nothing to undo."""
        rec = self.case(cid)
        if not rec.annotations:
            return None
        by_version = {a.version: a for a in rec.annotations}
        latest = rec.annotations[-1]
        # The latest content may itself be a revert: follow the chain to the edit it restores,
        # then step to what that edit was made from (linear undo, like an editor).
        current = latest
        while current.source.startswith("revert:") and current.parent in by_version:
            current = by_version[current.parent]
        target_v = current.parent if current.parent is not None else current.version - 1
        if target_v not in by_version or target_v >= current.version:
            return None
        mask, av = self.read_annotation(cid, target_v)
        return self.save_annotation(cid, mask, av.kind, author=author,
                                    source=f"revert:{latest.version}", parent=target_v)

    # ---- hidden reference (evaluation / simulation only)
    def set_reference(self, cid: str, mask: np.ndarray | None = None, image_label: str | None = None,
                      presence: dict[str, bool] | None = None) -> None:
        """Store hidden reference data for evaluation; training never reads it."""
        rec = self.case(cid)
        self._check_labels(f"{rec.name} ({cid})", image_label, presence)
        files = self._files
        tmp = None
        if mask is not None:
            mask = check_mask(mask, rec.shape, len(self.classes), "full", f"{rec.name} ({cid})")
            tmp = files.tmp_folder()
            write_array(tmp, mask)
        with files.mutate_index() as index:
            entry = self._case_dict(index, cid)
            if tmp is not None:
                key = f"reference/{cid}-{uuid.uuid4().hex[:8]}"
                files.place(tmp, key)
                entry["reference_key"] = key
                if presence is None:
                    presence = {c: bool(np.any(mask == i + 1)) for i, c in enumerate(self.classes)}
            if image_label is not None:
                entry["reference_label"] = image_label
            if presence is not None:
                entry["reference_presence"] = {k: bool(v) for k, v in presence.items()}

    def read_reference(self, cid: str) -> np.ndarray | None:
        rec = self.case(cid)
        return None if rec.reference_key is None else self._files.open_array(rec.reference_key)[...]

    # ---- weak targets (see labels.py)
    def is_negative(self, image_label: str | None) -> bool:
        return image_label is not None and image_label in self.negative_classes

    def presence_target(self, record: CaseRecord) -> list[int]:
        """Per lesion class: 1 present, 0 absent, -1 unknown, from what the user gave."""
        found = self.read_annotation(record.id) if record.latest is not None else None
        mask = None if found is None else found[0]
        return presence_from(record, mask, self.classes, self.negative_classes)

    # ---- model outputs (see store_outputs.OutputStore)
    def write_outputs(self, cid: str, model_id: str, pred: np.ndarray, prob: np.ndarray,
                      cam: np.ndarray, uncertainty: np.ndarray, scores: dict,
                      features: np.ndarray | None = None) -> str:
        """Store model outputs for a case (arrays at the image size); returns the output id."""
        return self._out.write(cid, model_id, pred, prob, cam, uncertainty, scores, features)

    def output_record(self, cid: str) -> OutputRecord | None:
        return self._out.record(cid)

    def read_outputs(self, cid: str) -> Outputs | None:
        return self._out.read(cid)

    def read_features(self, cid: str) -> np.ndarray | None:
        """Only the pooled feature vector of the latest outputs (cheap; for diversity sampling)."""
        return self._out.features(cid)

    def register_model(self, model_id: str, info: dict) -> None:
        """Record a trained model (method, checkpoint path, metrics, ...)."""
        self._out.register_model(model_id, info)

    def models(self) -> dict[str, dict]:
        return self._out.models()

    def latest_model(self) -> tuple[str, dict] | None:
        return self._out.latest_model()

    # ---- summary
    def supervision_counts(self) -> dict[str, int]:
        """How many (training-split) cases have each kind of supervision (for method choice);
        the same count the trainer makes (`labels.count_supervision`): a case whose latest mask
        is empty counts as maskless."""
        return count_supervision(r for r in self.cases() if r.split != "holdout")

    def summary(self) -> dict:
        """Counts for ``lesionseg info``."""
        recs = self.cases()
        by_label: dict[str, int] = {}
        for r in recs:
            if r.image_label is not None:
                by_label[r.image_label] = by_label.get(r.image_label, 0) + 1
        status: dict[str, int] = {}
        for r in recs:
            status[r.status] = status.get(r.status, 0) + 1
        outputs = self._files.outputs
        return {
            "project": str(self.path), "name": self.name, "classes": self.classes,
            "image_classes": self.image_classes, "cases": len(recs),
            "status": status,
            "image_labels": by_label,
            "annotations": {k: sum(1 for r in recs if r.latest and r.latest.kind == k)
                            for k in ANNOTATION_KINDS},
            "annotation_versions": sum(len(r.annotations) for r in recs),
            "references": sum(1 for r in recs if r.reference_key),
            "reference_labels": sum(1 for r in recs if r.reference_label is not None),
            "holdout": sum(1 for r in recs if r.split == "holdout"),
            "predictions": len(outputs["cases"]),
            "models": len(outputs["models"]),
        }


def _check_meta(meta: dict, path: Path) -> None:
    """`ProjectError` naming ``project.json`` when its fields are missing or of the wrong type."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ProjectError(f"{path}: corrupt project file ('classes' missing or not a list of names)")
    for key in ("image_classes", "negative_classes"):
        value = meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ProjectError(f"{path}: corrupt project file ({key!r} is not a list of names)")
    if not isinstance(meta.get("colors", {}), dict) or not isinstance(meta.get("name", ""), str):
        raise ProjectError(f"{path}: corrupt project file ('colors' or 'name')")
    try:
        int(meta.get("version", 0))
    except (TypeError, ValueError):
        raise ProjectError(f"{path}: corrupt project file ('version')") from None
    meta.setdefault("name", path.parent.name)


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    """A new case's image as stored: (H, W) or (H, W, 3), numeric, finite floats as float32."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise InputError(what, f"image must be (H, W) grey or (H, W, 3) RGB, got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(what, f"image is too small ({image.shape[1]}x{image.shape[0]})")
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise InputError(what, f"unsupported pixel type {image.dtype}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise InputError(what, "image contains NaN or infinite values")
        image = image.astype(np.float32)
    return image
