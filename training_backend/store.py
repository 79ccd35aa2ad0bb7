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

Layout and label conventions: see ``docs/architecture.md``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zarr
from zarr.storage import LocalStore

from training_backend.errors import InputError, ProjectError

FORMAT = "lesionseg-project"
FORMAT_VERSION = 1
#: Value of explicitly painted background in a ``sparse`` mask (0 there means "unlabelled").
BACKGROUND = 255
#: Value of ignored pixels in a training target.
IGNORE = -1
ANNOTATION_KINDS = ("full", "sparse")
SPLITS = ("train", "holdout")
#: Image classes that mean "no lesion of any class" unless the project says otherwise.
DEFAULT_NEGATIVE_NAMES = ("normal", "healthy", "negative", "none", "no_dr", "no dr", "no lesion",
                          "no_lesion", "lesion-free", "absent", "0")
DEFAULT_COLORS = ("#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa",
                  "#ff2d55", "#a2845e")
#: Outputs kept per case (the newest ones); older ones are removed after a newer one is listed.
KEEP_OUTPUTS = 2
_TMP_MAX_AGE_S = 3600.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AnnotationVersion:
    """One saved annotation mask (immutable once listed)."""

    version: int
    kind: str
    author: str
    time: str
    source: str
    parent: int | None
    key: str
    labelled_fraction: float

    @classmethod
    def from_dict(cls, d: dict) -> "AnnotationVersion":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CaseRecord:
    """What the index knows about one case (no pixel data)."""

    id: str
    name: str
    source: str | None
    shape: tuple[int, int]
    channels: int
    dtype: str
    image_label: str | None = None
    presence: dict[str, bool] | None = None
    annotations: tuple[AnnotationVersion, ...] = ()
    has_reference: bool = False
    reference_label: str | None = None
    reference_presence: dict[str, bool] | None = None
    split: str = "train"
    label_history: tuple[dict, ...] = ()
    image_key: str = ""
    reference_key: str | None = None

    @property
    def latest(self) -> AnnotationVersion | None:
        return self.annotations[-1] if self.annotations else None

    @property
    def status(self) -> str:
        """``full`` | ``sparse`` | ``image label`` | ``unlabelled`` (the best supervision it has)."""
        if self.latest is not None:
            return self.latest.kind
        if self.image_label is not None or self.presence:
            return "image label"
        return "unlabelled"

    @classmethod
    def from_dict(cls, d: dict) -> "CaseRecord":
        return cls(
            id=d["id"], name=d["name"], source=d.get("source"),
            shape=tuple(d["shape"]), channels=int(d["channels"]), dtype=d["dtype"],
            image_label=d.get("image_label"), presence=d.get("presence"),
            annotations=tuple(AnnotationVersion.from_dict(a) for a in d.get("annotations", ())),
            has_reference=bool(d.get("reference_key")) or d.get("reference_label") is not None
            or bool(d.get("reference_presence")),
            reference_label=d.get("reference_label"),
            reference_presence=d.get("reference_presence"),
            split=d.get("split", "train"),
            label_history=tuple(d.get("label_history", ())),
            image_key=d["image_key"], reference_key=d.get("reference_key"),
        )


@dataclass(frozen=True)
class OutputRecord:
    """Metadata of the latest model outputs of a case (no arrays)."""

    case_id: str
    output_id: str
    model_id: str
    time: str
    key: str
    scores: dict
    has_features: bool
    older: tuple[str, ...] = ()


@dataclass
class Outputs:
    """Model outputs of one case, at the image's size."""

    case_id: str
    output_id: str
    model_id: str
    time: str
    pred: np.ndarray              # (H, W) uint8 class map
    prob: np.ndarray              # (K+1, H, W) float16
    cam: np.ndarray               # (K, H, W) float16 in [0, 1]
    uncertainty: np.ndarray       # (H, W) float16
    scores: dict = field(default_factory=dict)
    features: np.ndarray | None = None


# --------------------------------------------------------------------------------------- helpers
def mask_to_target(mask: np.ndarray, kind: str) -> np.ndarray:
    """Convert a stored mask into a training target (int64; -1 ignore, 0 bg, k class k).

    Args:
        mask: (H, W) uint8 mask as stored.
        kind: ``"full"`` or ``"sparse"``.
    """
    target = mask.astype(np.int64)
    if kind == "sparse":
        target[mask == 0] = IGNORE
        target[mask == BACKGROUND] = 0
    elif kind == "full":
        target[mask == BACKGROUND] = 0
    else:
        raise ValueError(f"unknown annotation kind {kind!r}")
    return target


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None


def _write_array(folder: Path, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
    """Write ``data`` as a standalone zarr v3 array in a new folder (fsynced)."""
    if chunks is None:
        chunks = tuple(min(s, 512) if i < 2 else s for i, s in enumerate(data.shape))
        if data.ndim == 3 and data.shape[0] <= 16 and data.shape[-1] > 16:  # (C, H, W) maps
            chunks = (1,) + tuple(min(s, 512) for s in data.shape[1:])
    arr = zarr.create_array(store=LocalStore(str(folder)), shape=data.shape, dtype=data.dtype,
                            chunks=chunks, fill_value=0, overwrite=True)
    arr[...] = data
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)


def _check_mask(mask: np.ndarray, shape: tuple[int, int], n_classes: int, kind: str,
                what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(what, f"mask must be 2-D (H, W), got shape {mask.shape}")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(what, f"mask size {mask.shape[1]}x{mask.shape[0]} does not match the "
                               f"image size {shape[1]}x{shape[0]}")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise InputError(what, "mask holds non-integer values")
    values = np.unique(mask)
    allowed = set(range(n_classes + 1)) | {BACKGROUND}
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise InputError(what, f"mask values {bad[:5]} are not classes 0..{n_classes}"
                               f" (or {BACKGROUND} = painted background)")
    out = mask.astype(np.uint8)
    if kind == "full":
        out[out == BACKGROUND] = 0
    return out


# --------------------------------------------------------------------------------------- project
class Project:
    """A lesionseg project folder. Open with :meth:`open`, make one with :meth:`create`."""

    def __init__(self, path: Path, meta: dict, mode: str):
        self.path = Path(path)
        self._meta = meta
        self.mode = mode
        self._index: dict = {"version": FORMAT_VERSION, "cases": {}, "order": []}
        self._outputs: dict = {"version": FORMAT_VERSION, "models": {}, "cases": {}}
        self._index_stamp: tuple | None = None
        self._outputs_stamp: tuple | None = None
        self._lock_fh = None
        self._batch_flush: float | None = None
        self._batch_every = 2.0
        self.refresh()

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
        meta = _read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise ProjectError(f"{meta_path}: not a lesionseg project file")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ProjectError(f"{meta_path}: project format {meta['version']} is newer than this "
                               f"lesionseg understands ({FORMAT_VERSION}); please upgrade")
        project = cls(path, meta, mode)
        if mode == "r+":
            project._clean_stale_tmp()
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
        self._require_writable()
        allowed = {"name", "colors", "image_classes", "negative_classes"}
        unknown = set(changes) - allowed
        if unknown:
            raise ProjectError(f"{self.path}: cannot change {sorted(unknown)}")
        with self._locked():
            meta = _read_json(self.path / "project.json")
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

    # ---- locking and index I/O
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive project lock (``fcntl.flock``), reentrant within this object."""
        if self._lock_fh is not None:
            yield
            return
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self._lock_fh = fh
            yield
        finally:
            self._lock_fh = None
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    @contextlib.contextmanager
    def batch(self, flush_every_s: float = 2.0) -> Iterator["Project"]:
        """Group many changes (e.g. an import) into few index writes.

        The index is written at most every ``flush_every_s`` seconds and at the end; between
        flushes the lock is released briefly so that other writers (the GUI) get their turn.
        A crash loses at most the unflushed cases (their arrays stay unlisted, as garbage).
        """
        self._require_writable()
        if self._batch_flush is not None:
            yield self
            return
        self._batch_flush = time.monotonic()
        self._batch_every = flush_every_s
        try:
            with self._locked():
                self.refresh()
                try:
                    yield self
                finally:
                    self._write_index()
        finally:
            self._batch_flush = None

    def _write_index(self) -> None:
        atomic_write_json(self.path / "index.json", self._index)
        self._index_stamp = self._stamp(self.path / "index.json")

    def _maybe_flush_batch(self) -> None:
        if self._batch_flush is None or time.monotonic() - self._batch_flush < self._batch_every:
            return
        self._write_index()
        fh = self._lock_fh
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)  # let other writers in, then take it back
        time.sleep(0.01)
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self.refresh()
        self._batch_flush = time.monotonic()

    @staticmethod
    def _stamp(path: Path) -> tuple | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self) -> bool:
        """Re-read the indexes if another process changed them. Returns True if anything changed."""
        changed = False
        for attr, fname in (("_index", "index.json"), ("_outputs", "outputs.json")):
            p = self.path / fname
            stamp = self._stamp(p)
            if stamp is not None and stamp != getattr(self, f"{attr}_stamp"):
                setattr(self, attr, _read_json(p))
                setattr(self, f"{attr}_stamp", stamp)
                changed = True
        return changed

    def _mutate_index(self):
        """Context manager: lock, reload, yield the index dict, write it back atomically."""
        project = self

        @contextlib.contextmanager
        def cm():
            project._require_writable()
            if project._batch_flush is not None:  # inside batch(): lock held, flush later
                yield project._index
                project._maybe_flush_batch()
                return
            with project._locked():
                project.refresh()
                yield project._index
                project._write_index()
        return cm()

    def _mutate_outputs(self):
        project = self

        @contextlib.contextmanager
        def cm():
            project._require_writable()
            with project._locked():
                project.refresh()
                yield project._outputs
                atomic_write_json(project.path / "outputs.json", project._outputs)
                project._outputs_stamp = project._stamp(project.path / "outputs.json")
        return cm()

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise ProjectError(f"{self.path}: project was opened read-only")

    def _tmp_folder(self) -> Path:
        tmp = self.zarr_path / ".tmp"
        tmp.mkdir(exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}"

    def _clean_stale_tmp(self) -> None:
        tmp = self.zarr_path / ".tmp"
        if not tmp.is_dir():
            return
        cutoff = time.time() - _TMP_MAX_AGE_S
        for entry in tmp.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)

    def _place(self, tmp: Path, key: str) -> None:
        """Atomically move a finished temporary array folder to its key."""
        final = self.zarr_path / key
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def _open_array(self, key: str) -> zarr.Array:
        return zarr.open_array(store=LocalStore(str(self.zarr_path / key), read_only=True), mode="r")

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
        image = np.asarray(image)
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
        self._check_labels(what, image_label, presence)
        if split not in SPLITS:
            raise InputError(what, f"split must be one of {SPLITS}, got {split!r}")
        self._require_writable()
        tmp = self._tmp_folder()
        _write_array(tmp, image)
        with self._mutate_index() as index:
            cid = f"c{len(index['order']) + 1:06d}"
            while cid in index["cases"]:  # never reuse an id
                cid = f"c{int(cid[1:]) + 1:06d}"
            key = f"images/{cid}"
            if (self.zarr_path / key).exists():  # left by a crashed add; not in the index
                shutil.move(str(self.zarr_path / key), str(self._tmp_folder()))
            self._place(tmp, key)
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
        with self._mutate_index() as index:
            rec = index["cases"].get(cid)
            if rec is None:
                raise ProjectError(f"{self.path}: no case {cid!r}")
            if rec["annotations"] or rec["reference_key"] or rec["label_history"] or cid in self._outputs.get("cases", {}):
                raise ProjectError(f"{self.path}: case {cid} has annotations or outputs; not discarded")
            image = self.zarr_path / rec["image_key"]
            del index["cases"][cid]
            index["order"].remove(cid)
        if image.exists():
            with contextlib.suppress(OSError):
                shutil.move(str(image), str(self._tmp_folder()))

    def image(self, cid: str) -> zarr.Array:
        """The image as a lazy zarr array ((H, W) or (H, W, 3))."""
        return self._open_array(self.case(cid).image_key)

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
        with self._mutate_index() as index:
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
        with self._mutate_index() as index:
            for cid in cids:
                self._case_dict(index, cid)["split"] = split

    # ---- annotations
    def save_annotation(self, cid: str, mask: np.ndarray, kind: str, author: str = "user",
                        source: str = "manual", parent: int | None = None) -> AnnotationVersion:
        """Save a mask as a new annotation version (never overwrites an earlier version).

        Args:
            cid: case id.
            mask: (H, W) integer class map at the image's size (see the label conventions).
            kind: ``"full"`` (0 = background) or ``"sparse"`` (0 = unlabelled, 255 = background).
            author: user name or ``model:<id>``.
            source: where it came from (``manual``, ``import:<path>``, ``prediction:<output id>``).
            parent: version this one was edited from (default: the latest).
        """
        if kind not in ANNOTATION_KINDS:
            raise InputError(cid, f"annotation kind must be one of {ANNOTATION_KINDS}, got {kind!r}")
        rec = self.case(cid)
        mask = _check_mask(mask, rec.shape, len(self.classes), kind, f"{rec.name} ({cid})")
        labelled = 1.0 if kind == "full" else float(np.count_nonzero(mask)) / mask.size
        self._require_writable()
        tmp = self._tmp_folder()
        _write_array(tmp, mask)
        with self._mutate_index() as index:
            entry = self._case_dict(index, cid)
            history = entry.setdefault("annotations", [])
            version = (history[-1]["version"] + 1) if history else 1
            if parent is None and history:
                parent = history[-1]["version"]
            key = f"annotations/{cid}/v{version:04d}-{uuid.uuid4().hex[:8]}"
            self._place(tmp, key)
            av = AnnotationVersion(version=version, kind=kind, author=author, time=now_iso(),
                                   source=source, parent=parent, key=key,
                                   labelled_fraction=round(labelled, 6))
            history.append(av.to_dict())
        return av

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
        return self._open_array(av.key)[...], av

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
        tmp = None
        if mask is not None:
            mask = _check_mask(mask, rec.shape, len(self.classes), "full", f"{rec.name} ({cid})")
            tmp = self._tmp_folder()
            _write_array(tmp, mask)
        with self._mutate_index() as index:
            entry = self._case_dict(index, cid)
            if tmp is not None:
                key = f"reference/{cid}-{uuid.uuid4().hex[:8]}"
                self._place(tmp, key)
                entry["reference_key"] = key
                if presence is None:
                    presence = {c: bool(np.any(mask == i + 1)) for i, c in enumerate(self.classes)}
            if image_label is not None:
                entry["reference_label"] = image_label
            if presence is not None:
                entry["reference_presence"] = {k: bool(v) for k, v in presence.items()}

    def read_reference(self, cid: str) -> np.ndarray | None:
        rec = self.case(cid)
        return None if rec.reference_key is None else self._open_array(rec.reference_key)[...]

    # ---- weak targets
    def is_negative(self, image_label: str | None) -> bool:
        return image_label is not None and image_label in self.negative_classes

    def presence_target(self, record: CaseRecord) -> list[int]:
        """Per lesion class: 1 present, 0 absent, -1 unknown, from what the user gave."""
        k = len(self.classes)
        target = [-1] * k
        if record.latest is not None and record.latest.kind == "full":
            mask, _ = self.read_annotation(record.id)
            present = set(int(v) for v in np.unique(mask))
            target = [1 if i + 1 in present else 0 for i in range(k)]
        elif record.latest is not None:  # sparse: painted lesion pixels prove presence
            mask, _ = self.read_annotation(record.id)
            present = set(int(v) for v in np.unique(mask))
            target = [1 if i + 1 in present else -1 for i in range(k)]
        if self.is_negative(record.image_label):
            target = [0] * k
        elif record.image_label is not None and k == 1 and target[0] == -1:
            target = [1]
        for i, c in enumerate(self.classes):
            if record.presence and c in record.presence:
                target[i] = int(bool(record.presence[c]))
        return target

    # ---- model outputs
    def write_outputs(self, cid: str, model_id: str, pred: np.ndarray, prob: np.ndarray,
                      cam: np.ndarray, uncertainty: np.ndarray, scores: dict,
                      features: np.ndarray | None = None) -> str:
        """Store model outputs for a case (arrays at the image size); returns the output id."""
        rec = self.case(cid)
        h, w = rec.shape
        k = len(self.classes)
        shapes = {"pred": (pred, (h, w)), "prob": (prob, (k + 1, h, w)), "cam": (cam, (k, h, w)),
                  "uncertainty": (uncertainty, (h, w))}
        for name, (arr, shape) in shapes.items():
            if tuple(np.shape(arr)) != shape:
                raise ValueError(f"outputs for {cid}: {name} has shape {np.shape(arr)}, expected {shape}")
        self._require_writable()
        output_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        tmp = self._tmp_folder()
        tmp.mkdir()
        _write_array(tmp / "pred", np.asarray(pred, dtype=np.uint8))
        _write_array(tmp / "prob", np.asarray(prob, dtype=np.float16))
        _write_array(tmp / "cam", np.clip(np.asarray(cam, dtype=np.float32), 0, 1).astype(np.float16))
        _write_array(tmp / "uncertainty", np.asarray(uncertainty, dtype=np.float16))
        if features is not None:
            _write_array(tmp / "features", np.asarray(features, dtype=np.float32).ravel())
        key = f"outputs/{cid}/{output_id}"
        removed: list[str] = []
        with self._mutate_outputs() as outputs:
            self._place(tmp, key)
            prev = outputs["cases"].get(cid)
            history = ([prev["key"]] + list(prev.get("older", []))) if prev else []
            outputs["cases"][cid] = {
                "case_id": cid, "output_id": output_id, "model_id": model_id, "time": now_iso(),
                "key": key, "scores": _jsonable(scores), "has_features": features is not None,
                "older": history[:KEEP_OUTPUTS - 1],
            }
            removed = history[KEEP_OUTPUTS - 1:]
        for old in removed:
            shutil.rmtree(self.zarr_path / old, ignore_errors=True)
        return output_id

    def output_record(self, cid: str) -> OutputRecord | None:
        d = self._outputs["cases"].get(cid)
        if d is None:
            return None
        return OutputRecord(case_id=cid, output_id=d["output_id"], model_id=d["model_id"],
                            time=d["time"], key=d["key"], scores=dict(d.get("scores", {})),
                            has_features=bool(d.get("has_features")), older=tuple(d.get("older", ())))

    def read_outputs(self, cid: str) -> Outputs | None:
        rec = self.output_record(cid)
        if rec is None:
            return None
        base = rec.key

        def load(name):
            return self._open_array(f"{base}/{name}")[...]

        return Outputs(case_id=cid, output_id=rec.output_id, model_id=rec.model_id, time=rec.time,
                       pred=load("pred"), prob=load("prob"), cam=load("cam"),
                       uncertainty=load("uncertainty"), scores=rec.scores,
                       features=load("features") if rec.has_features else None)

    def read_features(self, cid: str) -> np.ndarray | None:
        """Only the pooled feature vector of the latest outputs (cheap; for diversity sampling)."""
        rec = self.output_record(cid)
        if rec is None or not rec.has_features:
            return None
        return self._open_array(f"{rec.key}/features")[...]

    def register_model(self, model_id: str, info: dict) -> None:
        """Record a trained model (method, checkpoint path, metrics, ...)."""
        with self._mutate_outputs() as outputs:
            entry = outputs["models"].setdefault(model_id, {"created": now_iso()})
            entry.update(_jsonable(info))
            entry["updated"] = now_iso()

    def models(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._outputs["models"].items()}

    def latest_model(self) -> tuple[str, dict] | None:
        models = self._outputs["models"]
        if not models:
            return None
        mid = max(models, key=lambda m: models[m].get("updated", ""))
        return mid, dict(models[mid])

    # ---- summary
    def supervision_counts(self) -> dict[str, int]:
        """How many (training-split) cases have each kind of supervision (for method choice);
        "maskless" counts the cases without a mask, whatever image label they have."""
        counts = {"full": 0, "sparse": 0, "image_label": 0, "unlabelled": 0, "maskless": 0}
        for rec in self.cases():
            if rec.split == "holdout":
                continue
            if rec.latest is not None:
                counts[rec.latest.kind] += 1
            if rec.latest is None or rec.latest.labelled_fraction <= 0:  # as the trainer counts
                counts["maskless"] += 1
            if rec.image_label is not None or rec.presence:
                counts["image_label"] += 1
            if rec.latest is None and rec.image_label is None and not rec.presence:
                counts["unlabelled"] += 1
        return counts

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
            "predictions": len(self._outputs["cases"]),
            "models": len(self._outputs["models"]),
        }


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays inside dicts/lists to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
