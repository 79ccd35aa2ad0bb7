"""Fuzzing: generated bad inputs through import, the napari reader, the store API and the CLI.

Every generated input (hypothesis) goes through one entry point and must end in one of:

* ``accepted``: the input was usable (a 16-bit or float image, an opaque RGBA, a hostile but
  legal file name, ...);
* ``rejected``: a clear one-line error (`InputError` / `ProjectError` naming the file; exit
  code 2 from the CLI, or 1 with every bad row reported as skipped) or a clean skip in an
  import report;

and never in a ``failure``: any other exception (a traceback), a multi-line or anonymous
message, a CLI exit code other than 0/1/2 or a traceback on its stderr, a reader that crashes,
or a project that a rejected input changed (its JSON indexes and listed arrays are compared
before and after).

Kinds of input: truncated / corrupt / garbage / zero-byte / wrongly named PNG, JPEG, TIFF,
DICOM and NIfTI files; headers that claim a huge image; 16-bit, float, NaN/inf, complex,
int64 and bool pixels; RGBA (transparent or opaque); 1x1, 1xN and zero-size images; volumes;
masks of the wrong size, with labels out of range, fractional or coloured; CSVs with missing
columns, bad encodings, duplicate rows or columns, malformed quoting and hostile paths (``..``,
absolute, 255 characters, spaces and unicode, symlinks out of the folder); bad arguments,
missing or corrupt projects and malicious checkpoints for every CLI verb; bad values for the
store API.

    .venv/bin/python benchmarks/fuzz_inputs.py [--examples 1200] [--seed 0] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io as bytes_io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from training_backend.errors import InputError, LesionsegError  # noqa: E402

TARGETS = ("folder import", "csv import", "napari reader", "store api", "cli")


# ------------------------------------------------------------------------------ file bytes
def encode(fmt: str, arr: np.ndarray) -> bytes:
    """Encode ``arr`` as a file of format ``fmt`` (bytes)."""
    buf = bytes_io.BytesIO()
    if fmt in ("png", "jpeg"):
        from PIL import Image

        Image.fromarray(arr).save(buf, format="PNG" if fmt == "png" else "JPEG")
        return buf.getvalue()
    if fmt == "tiff":
        import tifffile

        tifffile.imwrite(buf, arr)
        return buf.getvalue()
    if fmt == "nifti":
        import nibabel as nib

        img = nib.Nifti1Image(np.ascontiguousarray(arr.T if arr.ndim == 2 else arr),
                              affine=np.eye(4), dtype=arr.dtype)
        return img.to_bytes()
    if fmt == "dicom":
        return _dicom_bytes(arr)
    raise ValueError(fmt)


def _dicom_bytes(arr: np.ndarray) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    arr = np.ascontiguousarray(arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(np.uint16))
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    buf = bytes_io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii"}
FORMATS = tuple(SUFFIX)


def _huge_png() -> bytes:
    """A PNG whose header claims 60000 x 60000 pixels (3.6 G pixels) with almost no data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
    data += struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    idat = b"IDAT" + zlib.compress(b"\0" * 100)
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat) & 0xFFFFFFFF)
    return data + b"\0\0\0\0IEND\xaeB`\x82"


def _huge_tiff() -> bytes:
    """A TIFF whose tags claim 100000 x 100000 pixels, stored in one tiny strip."""
    import struct

    entries = [(256, 4, 1, 100000), (257, 4, 1, 100000), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1),
               (278, 4, 1, 100000), (279, 4, 1, 16)]
    head = b"II*\0" + struct.pack("<I", 8)
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count)
        ifd += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
    return head + ifd + struct.pack("<I", 0) + b"\x80" * 16


def _huge_nifti() -> bytes:
    """A NIfTI header claiming 32000 x 32000 voxels with no data behind it."""
    data = bytearray(encode("nifti", np.zeros((4, 4), np.uint8)))
    import struct

    struct.pack_into("<8h", data, 40, 2, 32000, 32000, 1, 1, 1, 1, 1)
    return bytes(data[:352 + 16])


IMAGE_KINDS = ("truncated", "corrupt", "garbage", "zero bytes", "wrong suffix", "huge header",
               "16-bit", "float", "nan/inf", "rgba transparent", "rgba opaque", "1x1", "1xN",
               "zero-size", "complex", "int64", "bool", "volume", "multi-frame", "valid")
#: A wide integer range taken modulo the number of kinds: hypothesis's `sampled_from` favours
#: the first few elements, this spreads the inputs evenly over the kinds.
_spread = st.integers(0, 2 ** 20)


@st.composite
def image_file(draw) -> tuple[str, str, bytes]:
    """(kind, file suffix, bytes) of a bad, odd or borderline image file."""
    fmt = draw(st.sampled_from(FORMATS))
    h, w = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    base = rng.integers(0, 255, (h, w), dtype=np.uint8)
    kind = IMAGE_KINDS[draw(_spread) % len(IMAGE_KINDS)]  # near-uniform over the kinds
    if kind in ("float", "nan/inf", "complex", "int64", "bool", "zero-size", "volume",
                "multi-frame") and fmt in ("png", "jpeg"):
        fmt = draw(st.sampled_from(("tiff", "nifti")))
    if kind == "16-bit" and fmt == "jpeg":
        fmt = "png"
    if kind in ("rgba transparent", "rgba opaque") and fmt in ("jpeg", "dicom", "nifti"):
        fmt = "png"
    if kind in ("complex", "bool", "zero-size", "multi-frame") and fmt == "nifti" \
            and kind in ("multi-frame",):
        fmt = "tiff"
    suffix = SUFFIX[fmt]
    if kind in ("truncated", "corrupt", "valid", "wrong suffix"):
        data = encode(fmt, base)
        # positions are drawn from a fixed range and folded onto the file: an encoder's output
        # length may vary between calls (DICOM's generated UIDs), and hypothesis requires the
        # same draws to meet the same constraints on replay
        if kind == "truncated":
            data = data[: 1 + draw(_spread) % max(1, len(data) - 1)]
        elif kind == "corrupt":
            data = bytearray(data)
            for _ in range(draw(st.integers(1, 12))):
                i = draw(_spread) % len(data)
                data[i] = draw(st.integers(0, 255))
            data = bytes(data)
        elif kind == "wrong suffix":
            suffix = SUFFIX[draw(st.sampled_from([f for f in FORMATS if f != fmt]))]
    elif kind == "garbage":
        data = draw(st.binary(min_size=1, max_size=400))
    elif kind == "zero bytes":
        data = b""
    elif kind == "huge header":
        fmt = draw(st.sampled_from(("png", "tiff", "nifti")))
        suffix = SUFFIX[fmt]
        data = {"png": _huge_png, "tiff": _huge_tiff, "nifti": _huge_nifti}[fmt]()
    elif kind == "16-bit":
        data = encode(fmt, rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif kind == "float":
        data = encode(fmt, rng.normal(0, 1000, (h, w)).astype(np.float32))
    elif kind == "nan/inf":
        arr = rng.normal(0, 1, (h, w)).astype(np.float32)
        arr[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(
            st.sampled_from((np.nan, np.inf, -np.inf)))
        data = encode(fmt, arr)
    elif kind.startswith("rgba"):
        arr = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        arr[..., 3] = 255
        if kind == "rgba transparent":
            arr[0, 0, 3] = 0
        data = encode("png", arr)
    elif kind == "1x1":
        data = encode(fmt, base[:1, :1])
    elif kind == "1xN":
        data = encode(fmt, base[:1])
    elif kind == "zero-size":
        data = encode(fmt, np.zeros((0, w), np.uint8)) if fmt == "nifti" else \
            encode("tiff", np.zeros((1, 1), np.uint8))[:8]
    elif kind == "complex":
        data = encode("tiff", (rng.normal(size=(h, w)) + 1j).astype(np.complex64))
        suffix = ".tif"
    elif kind == "int64":
        data = encode(fmt if fmt != "dicom" else "tiff", rng.integers(-5, 5, (h, w)))
        suffix = SUFFIX[fmt if fmt != "dicom" else "tiff"]
    elif kind == "bool":
        data = encode("tiff", rng.random((h, w)) > 0.5)
        suffix = ".tif"
    elif kind == "volume":
        data = encode("nifti" if fmt == "nifti" else "tiff",
                      rng.integers(0, 255, (3, h, w, 2), dtype=np.uint8))
        suffix = ".nii" if fmt == "nifti" else ".tif"
    else:  # multi-frame
        data = encode("tiff", rng.integers(0, 255, (5, h, w), dtype=np.uint8))
        suffix = ".tif"
    if suffix == ".nii" and draw(st.booleans()):
        data, suffix = gzip.compress(data, mtime=0), ".nii.gz"
    return f"{kind} {suffix.lstrip('.')}", suffix, data


HOSTILE_NAMES = ("with space", "ünïcødé 病変", "x" * 240, "..", "-dash", "semi;colon", "a\tb",
                 "quote'\"", "#hash", "name\\back")


@st.composite
def hostile_name(draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(("space", "unicode", "255 chars", "dots", "dash", "semicolon",
                                 "tab", "quotes", "hash", "backslash")))
    stem = dict(zip(("space", "unicode", "255 chars", "dots", "dash", "semicolon", "tab",
                     "quotes", "hash", "backslash"), HOSTILE_NAMES))[kind]
    return kind, stem


@st.composite
def mask_file(draw, shape: tuple[int, int]) -> tuple[str, bytes]:
    """(kind, PNG/TIFF bytes) of a bad mask for an image of ``shape``."""
    kind = draw(st.sampled_from(("wrong size", "out of range", "fractional", "coloured",
                                 "nan", "255 binary", "valid", "negative", "truncated")))
    h, w = shape
    m = np.zeros(shape, np.uint8)
    m[: h // 2] = 1
    if kind == "wrong size":
        return kind, encode("png", np.zeros((h + draw(st.integers(1, 5)), w), np.uint8))
    if kind == "out of range":
        m[0, 0] = draw(st.integers(2, 254))
        return kind, encode("png", m)
    if kind == "fractional":
        return kind, encode("tiff", m.astype(np.float32) * 0.5)
    if kind == "nan":
        f = m.astype(np.float32)
        f[0, 0] = np.nan
        return kind, encode("tiff", f)
    if kind == "negative":
        return kind, encode("tiff", m.astype(np.int16) - 1)
    if kind == "coloured":
        rgb = np.stack([m, m * 0, m], axis=-1) * 255
        return kind, encode("png", rgb.astype(np.uint8))
    if kind == "255 binary":
        return kind, encode("png", m * 255)
    if kind == "truncated":
        return kind, encode("png", m)[:30]
    return kind, encode("png", m)


# ------------------------------------------------------------------------------ outcomes
@dataclass
class Tally:
    """Counts by target, kind and outcome; the failures with their details."""

    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, target: str, kind: str, outcome: str, detail: str = "") -> None:
        by_kind = self.counts.setdefault(target, {}).setdefault(kind, {})
        by_kind[outcome] = by_kind.get(outcome, 0) + 1
        if outcome == "failure":
            self.failures.append(f"[{target}] {kind}: {detail}")

    def total(self, outcome: str | None = None) -> int:
        return sum(n for kinds in self.counts.values() for outs in kinds.values()
                   for o, n in outs.items() if outcome is None or o == outcome)


def fingerprint(path: Path) -> str:
    """The project as a reader sees it: its JSON files and the listed store's files."""
    h = hashlib.sha1()
    for name in ("project.json", "index.json", "outputs.json"):
        p = path / name
        h.update(name.encode() + (p.read_bytes() if p.exists() else b"-"))
    store = path / "store.zarr"
    for root, dirs, files in sorted(os.walk(store)):
        dirs[:] = sorted(d for d in dirs if d != ".tmp")
        for f in sorted(files):
            p = Path(root) / f
            h.update(str(p.relative_to(path)).encode() + str(p.stat().st_size).encode())
    models = path / "models"
    if models.is_dir():
        for p in sorted(models.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
    return h.hexdigest()


def one_line_naming(message: str, names: tuple[str, ...] = ()) -> str | None:
    """None if ``message`` is a good user error (one line, names one of ``names``)."""
    if "\n" in message.strip():
        return f"message is not one line: {message!r}"
    if "Traceback" in message:
        return "traceback in the message"
    if names and not any(n and n in message for n in names):
        return f"message does not name the input ({names[0]!r}): {message!r}"
    return None


def classify(fn: Callable[[], Any], names: tuple[str, ...] = ()) -> tuple[str, str, Any]:
    """Run ``fn``: (outcome, detail, result)."""
    try:
        result = fn()
    except LesionsegError as exc:
        bad = one_line_naming(str(exc), names if isinstance(exc, InputError) else ())
        return ("failure", bad, None) if bad else ("rejected", str(exc), None)
    except MemoryError:
        return "failure", "MemoryError", None
    except Exception as exc:  # noqa: BLE001 - a traceback the user would see
        tb = traceback.format_exc().strip().splitlines()
        where = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File")), "")
        return "failure", f"{type(exc).__name__}: {str(exc)[:200]} ({where})", None
    return "accepted", "", result


# ------------------------------------------------------------------------------ workbench
class Bench:
    """Temporary folders, a project per target (recreated when it grows), file helpers."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0
        self.projects: dict[str, Any] = {}
        self.outside = root / "outside"
        self.outside.mkdir(parents=True, exist_ok=True)
        secret = self.outside / "secret.png"
        secret.write_bytes(encode("png", np.full((8, 8), 7, np.uint8)))
        self.secret = secret

    def folder(self) -> Path:
        self.n += 1
        d = self.root / f"in{self.n:05d}"
        d.mkdir()
        return d

    def project(self, name: str, masks: bool = False):
        from training_backend.project.store import Project

        p = self.projects.get(name)
        if p is None or len(p) > 40:
            path = self.root / f"project-{name}-{self.n}"
            p = Project.create(path, ["lesion"], ["normal", "abnormal"])
            rng = np.random.default_rng(0)
            for i in range(3):
                cid = p.add_case(rng.integers(0, 255, (16, 16), dtype=np.uint8), f"base {i}")
                if masks and i < 2:
                    m = np.zeros((16, 16), np.uint8)
                    m[:8] = 1
                    p.save_annotation(cid, m, "full")
            self.projects[name] = p
        return p

    def cleanup(self, keep: int = 50) -> None:
        folders = sorted(self.root.glob("in*"))
        for d in folders[:-keep]:
            shutil.rmtree(d, ignore_errors=True)


def _write(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    name = (stem + suffix) if len((stem + suffix).encode()) <= 255 else stem[: 200] + suffix
    name = name.replace("/", "_")
    path = folder / name
    if stem == "..":
        path = folder / f"..{suffix}"
    path.write_bytes(data)
    return path


def _changed_on_reject(bench_project, before: str, outcome: str) -> str | None:
    if outcome == "rejected" and fingerprint(bench_project.path) != before:
        return "a rejected input changed the project"
    return None


# ------------------------------------------------------------------------------ targets
def fuzz_folder_import(bench: Bench, tally: Tally, data) -> None:
    from training_backend.project import importer

    kind, suffix, content = data.draw(image_file())
    name_kind, stem = data.draw(hostile_name()) if data.draw(st.booleans()) else ("plain", "img")
    folder = bench.folder()
    _write(folder, stem, suffix, content)
    if data.draw(st.integers(0, 5)) == 0:  # a symlink out of the folder
        os.symlink(bench.secret, folder / "link.png")
        name_kind = "symlink out"
    project = bench.project("folder")
    project.refresh()
    before = fingerprint(project.path)
    outcome, detail, report = classify(lambda: importer.import_folder(project, folder))
    label = f"{kind} / {name_kind}"
    if outcome == "accepted":
        for _row, where, problem in report.skipped:
            bad = one_line_naming(f"{where}: {problem}", (where,))
            if bad:
                outcome, detail = "failure", bad
        if outcome == "accepted" and not report.imported:
            outcome = "rejected"
        if name_kind == "symlink out" and any(
                "secret" in (project.case(c).source or "") for c in report.imported):
            pass  # a symlink the user put in the folder is followed; nothing is written outside
    bad = _changed_on_reject(project, before, outcome)
    tally.add("folder import", label, "failure" if bad else outcome, bad or detail)


CSV_KINDS = ("missing column", "bad encoding", "utf-16", "duplicate rows", "duplicate columns",
             "malformed quoting", "empty", "header only", "dotdot path", "absolute path",
             "255 chars", "unicode path", "symlink out", "bad mask", "bad image", "bad label",
             "bad split", "nul byte", "semicolon", "many mask files", "valid")


def fuzz_csv_import(bench: Bench, tally: Tally, data) -> None:
    from training_backend.project import importer

    folder = bench.folder()
    kind = CSV_KINDS[data.draw(_spread) % len(CSV_KINDS)]  # near-uniform over the kinds
    good = encode("png", np.full((12, 12), 100, np.uint8))
    mask = np.zeros((12, 12), np.uint8)
    mask[:6] = 1
    (folder / "a.png").write_bytes(good)
    (folder / "a_mask.png").write_bytes(encode("png", mask))
    header, rows = ["image", "masks", "cls"], [["a.png", "a_mask.png", "abnormal"]]
    raw: bytes | None = None
    if kind == "missing column":
        drop = data.draw(st.sampled_from(header))
        i = header.index(drop)
        header = header[:i] + header[i + 1:]
        rows = [r[:i] + r[i + 1:] for r in rows]
    elif kind == "duplicate rows":
        rows = rows * data.draw(st.integers(2, 4))
    elif kind == "duplicate columns":
        header = header + ["image"]
        rows = [r + ["a.png"] for r in rows]
    elif kind == "dotdot path":
        rows = [["../" * data.draw(st.integers(1, 6)) + "outside/secret.png", "", "normal"]]
    elif kind == "absolute path":
        rows = [[str(bench.secret), data.draw(st.sampled_from(("", str(bench.secret)))), "normal"]]
    elif kind == "255 chars":
        rows = [["y" * data.draw(st.integers(250, 300)) + ".png", "", "normal"]]
    elif kind == "unicode path":
        name = data.draw(st.text(min_size=1, max_size=20).filter(
            lambda s: "/" not in s and "\0" not in s and s not in (".", "..")))
        with contextlib.suppress(OSError, UnicodeEncodeError):
            (folder / f"{name}.png").write_bytes(good)
        rows = [[f"{name}.png", "", "normal"]]
    elif kind == "symlink out":
        os.symlink(bench.secret, folder / "link.png")
        rows = [["link.png", "", "normal"]]
    elif kind == "bad mask":
        mkind, content = data.draw(mask_file((12, 12)))
        (folder / "bad_mask.png").write_bytes(content)
        kind = f"bad mask: {mkind}"
        rows = [["a.png", "bad_mask.png", "abnormal"]]
    elif kind == "bad image":
        ikind, suffix, content = data.draw(image_file())
        (folder / f"bad{suffix}").write_bytes(content)
        kind = f"bad image: {ikind}"
        rows = [[f"bad{suffix}", "", "normal"]]
    elif kind == "bad label":
        rows = [["a.png", "a_mask.png", data.draw(st.text(max_size=12))]]
    elif kind == "bad split":
        header.append("split")
        rows = [r + [data.draw(st.text(max_size=8))] for r in rows]
    elif kind == "many mask files":
        rows = [["a.png", ";".join(["a_mask.png"] * 3 + ["nope.png"] * data.draw(st.integers(0, 1))),
                 "abnormal"]]
    text = "\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n"
    if kind == "bad encoding":
        raw = "image,masks,cls\nä.png,,normal\n".encode("latin-1") + data.draw(st.binary(max_size=40))
    elif kind == "utf-16":
        raw = text.encode("utf-16")
    elif kind == "malformed quoting":
        raw = b'image,masks,cls\n"a.png,a_mask.png,abnormal\n"x"y",,\n'
    elif kind == "empty":
        raw = b""
    elif kind == "header only":
        raw = b"image,masks,cls\n"
    elif kind == "nul byte":
        raw = b"image,masks,cls\na.png\0,a_mask.png,abnormal\n"
    elif kind == "semicolon":
        raw = text.replace(",", ";").encode()
    csv_path = folder / "labels.csv"
    csv_path.write_bytes(raw if raw is not None else text.encode("utf-8"))
    project = bench.project("csv")
    project.refresh()
    before = fingerprint(project.path)
    outcome, detail, report = classify(lambda: importer.import_csv(
        project, csv_path, mask_cols=[("masks", "lesion")], label_col="cls",
        split_col="split" if "split" in header else None), (str(csv_path), "labels.csv"))
    if outcome == "accepted":
        for _row, where, problem in report.skipped:
            bad = one_line_naming(f"{where}: {problem}")
            if bad:
                outcome, detail = "failure", bad
        if outcome == "accepted" and not report.imported:
            outcome = "rejected"
    bad = _changed_on_reject(project, before, outcome)
    tally.add("csv import", kind, "failure" if bad else outcome, bad or detail)


def fuzz_reader(bench: Bench, tally: Tally, data) -> None:
    from napari_lesionseg._reader import get_reader

    which = data.draw(st.sampled_from(("file", "folder", "broken project")))
    folder = bench.folder()
    if which == "file":
        kind, suffix, content = data.draw(image_file())
        path = _write(folder, "img", suffix, content)
    elif which == "folder":
        kind = "plain folder"
        path = folder
    else:
        kind, path = _broken_project(bench, data)
        kind = f"project: {kind}"
    outcome, detail, reader = classify(lambda: get_reader(str(path)))
    if outcome == "accepted" and reader is not None:
        outcome, detail, layers = classify(lambda: reader(str(path)), (str(path), path.name))
        if outcome == "accepted" and not isinstance(layers, list):
            outcome, detail = "failure", f"reader returned {type(layers).__name__}"
    elif outcome == "accepted":
        outcome = "rejected"  # not ours: another reader gets its turn
    tally.add("napari reader", kind, outcome, detail)


def _broken_project(bench: Bench, data) -> tuple[str, Path]:
    """A copy of a small project with one thing broken."""
    src = bench.project("template", masks=True)
    path = bench.folder() / "p"
    shutil.copytree(src.path, path)
    kind = data.draw(st.sampled_from(("project.json garbage", "project.json missing keys",
                                      "index.json garbage", "index.json wrong shape",
                                      "case record incomplete", "image array deleted",
                                      "annotation array deleted", "outputs.json garbage",
                                      "zarr metadata garbage", "newer format", "intact")))
    if kind == "project.json garbage":
        (path / "project.json").write_bytes(data.draw(st.binary(max_size=50)))
    elif kind == "project.json missing keys":
        (path / "project.json").write_text(json.dumps({"format": "lesionseg-project"}))
    elif kind == "newer format":
        meta = json.loads((path / "project.json").read_text())
        meta["version"] = 99
        (path / "project.json").write_text(json.dumps(meta))
    elif kind == "index.json garbage":
        (path / "index.json").write_text("{\"cases\": [1, 2")
    elif kind == "index.json wrong shape":
        (path / "index.json").write_text(json.dumps(data.draw(st.sampled_from(
            ([], {"cases": []}, {"cases": {}, "order": ["c000001"]}, {"order": 3}, 5)))))
    elif kind == "case record incomplete":
        index = json.loads((path / "index.json").read_text())
        rec = index["cases"]["c000001"]
        rec.pop(data.draw(st.sampled_from(sorted(rec))))
        (path / "index.json").write_text(json.dumps(index))
    elif kind == "image array deleted":
        shutil.rmtree(path / "store.zarr" / "images" / "c000001")
    elif kind == "annotation array deleted":
        shutil.rmtree(path / "store.zarr" / "annotations" / "c000001")
    elif kind == "outputs.json garbage":
        (path / "outputs.json").write_text("[[[")
    elif kind == "zarr metadata garbage":
        (path / "store.zarr" / "images" / "c000001" / "zarr.json").write_text("{nope")
    return kind, path


def fuzz_store(bench: Bench, tally: Tally, data) -> None:
    project = bench.project("store", masks=True)
    project.refresh()
    cid = project.case_ids()[0]
    kind = data.draw(st.sampled_from((
        "add_case nan", "add_case complex", "add_case 4-D", "add_case 1x1", "add_case zero-size",
        "add_case object", "add_case string", "add_case rgba", "add_case bad label",
        "add_case bad split", "add_case bad presence", "save wrong size", "save out of range",
        "save fractional", "save bad kind", "save unknown case", "save 3-D", "save nan",
        "label unknown", "label unknown case", "presence unknown class", "read bad version",
        "reference wrong size", "split unknown", "case unknown", "update_meta classes",
        "valid save")))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    good = np.zeros((16, 16), np.uint8)
    calls: dict[str, Callable] = {
        "add_case nan": lambda: project.add_case(np.full((8, 8), np.nan, np.float32), "n"),
        "add_case complex": lambda: project.add_case(np.ones((8, 8), np.complex64), "n"),
        "add_case 4-D": lambda: project.add_case(np.ones((2, 8, 8, 3), np.uint8), "n"),
        "add_case 1x1": lambda: project.add_case(np.ones((1, 1), np.uint8), "n"),
        "add_case zero-size": lambda: project.add_case(np.ones((0, 8), np.uint8), "n"),
        "add_case object": lambda: project.add_case(np.array([[object()] * 4] * 4), "n"),
        "add_case string": lambda: project.add_case(np.array([["a"] * 4] * 4), "n"),
        "add_case rgba": lambda: project.add_case(np.ones((8, 8, 4), np.uint8), "n"),
        "add_case bad label": lambda: project.add_case(good, "n", image_label="benign?"),
        "add_case bad split": lambda: project.add_case(good, "n", split="test"),
        "add_case bad presence": lambda: project.add_case(good, "n", presence={"tumour": True}),
        "save wrong size": lambda: project.save_annotation(cid, np.zeros((17, 16), np.uint8), "full"),
        "save out of range": lambda: project.save_annotation(
            cid, np.full((16, 16), data.draw(st.integers(2, 254)), np.uint8), "full"),
        "save fractional": lambda: project.save_annotation(cid, np.full((16, 16), 0.5), "full"),
        "save bad kind": lambda: project.save_annotation(cid, good, data.draw(st.text(max_size=6))),
        "save unknown case": lambda: project.save_annotation("c999999", good, "full"),
        "save 3-D": lambda: project.save_annotation(cid, np.zeros((16, 16, 3), np.uint8), "full"),
        "save nan": lambda: project.save_annotation(cid, np.full((16, 16), np.nan), "sparse"),
        "label unknown": lambda: project.set_image_label(cid, data.draw(st.text(max_size=8))),
        "label unknown case": lambda: project.set_image_label("nope", "normal"),
        "presence unknown class": lambda: project.set_image_label(cid, None, {"x": True}),
        "read bad version": lambda: project.read_annotation(cid, data.draw(st.integers(-3, 99))),
        "reference wrong size": lambda: project.set_reference(cid, np.zeros((3, 3), np.uint8)),
        "split unknown": lambda: project.set_split([cid], data.draw(st.text(max_size=8))),
        "case unknown": lambda: project.case(data.draw(st.text(max_size=8))),
        "update_meta classes": lambda: project.update_meta(classes=["a", "b"]),
        "valid save": lambda: project.save_annotation(cid, (rng.random((16, 16)) > 0.5).astype(np.uint8), "full"),
    }
    before = fingerprint(project.path)
    outcome, detail, _ = classify(calls[kind])
    if kind == "read bad version" and outcome == "accepted":
        outcome = "accepted"
    bad = _changed_on_reject(project, before, outcome)
    tally.add("store api", kind, "failure" if bad else outcome, bad or detail)


def _malicious_checkpoint(path: Path) -> Path:
    """A ``.pt`` whose unpickling would run code (creates a marker file)."""
    import pickle

    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    torch.save({"model": Evil(), "meta": {}}, path, pickle_module=pickle)
    return path


def fuzz_cli(bench: Bench, tally: Tally, data) -> None:
    from training_backend.cli import main

    project = bench.project("cli", masks=True)
    folder = bench.folder()
    verb = data.draw(st.sampled_from(("import", "export", "info", "sample", "train", "predict",
                                      "evaluate", "methods", "rank", "strategies", "gui",
                                      "simulate", "pretrain", "models")))
    where = data.draw(st.sampled_from(("good project", "missing project", "broken project",
                                       "file as project")))
    if where == "good project":
        ppath, pkind = project.path, "ok"
    elif where == "missing project":
        ppath, pkind = folder / "nope", "missing"
    elif where == "file as project":
        ppath, pkind = folder / "file", "file"
        ppath.write_text("x")
    else:
        pkind, ppath = _broken_project(bench, data)
    bad_values = {
        "import": [["--mask-col", ":x"], ["--presence-col", "c"], ["--label-col", "nope"],
                   ["--classes"], ["--split-col", "s"], []],
        "export": [["--out", str(folder / "file")], ["--format", "bmp"], ["--values", "rgb"],
                   ["--source", "prediction"], ["--out", str(folder / "o"), "--values", "color",
                                                 "--format", "nifti"]],
        "train": [["--steps", "-1"], ["--steps", "0"], ["--budget-s", "nan"], ["--batch-size", "0"],
                  ["--image-size", "3"], ["--lr", "-1"], ["--method", "nope"], ["--device", "tpu"],
                  ["--option", "x"], ["--option", "dropout=oops"], ["--resume"],
                  ["--init-from", "MALICIOUS"], ["--init-from", str(folder / "none.pt")],
                  ["--model-id", "../../escape"], ["--model-id", "/abs"], ["--rounds", "0"],
                  ["--fold-validation", "2"], ["--threads", "0"], ["--mc-samples", "-2"],
                  ["--crop-size", "8"], ["--crop-size", "64"], ["--pretrained", str(folder / "none.pt")],
                  ["--pretrained", "MALICIOUS"], ["--init-from", "fundus-starter"]],
        "predict": [["--model", "MALICIOUS"], ["--model", str(folder / "none.pt")],
                    ["--model", "fundus-starter"],
                    ["--cases", "nope"], ["--working-size", "0"], ["--mc-samples", "-1"],
                    ["--device", "cuda:7"], []],
        "evaluate": [["--split", "holdout"], ["--json"], []],
        "rank": [["--strategy", "nope"], ["-k", "-3"], ["-k", "0"], ["--duplicate-threshold", "nan"],
                 ["--strategy", "kcenter"], []],
        "info": [["--json"], []], "sample": [[]], "methods": [["--json"]], "strategies": [["--json"]],
        "gui": [[]],
        # every one of these must be refused before any training (a valid simulation is minutes)
        "simulate": [["--rounds", "0"], ["--seeds", "0"], ["--start", "0"], ["--step", "-2"],
                     ["--strategy", "nope"], ["--method", "nope"], ["--budget-s", "-1"],
                     ["--cost", "mask=-5"], ["--cost", "paint"], ["--image-size", "3"],
                     ["--eval-fraction", "1.5"], ["--candidates", "-1"], ["--annotate", "pixel"],
                     ["--option", "x"], ["--set", "nope=1"]],
        "pretrain": [["--steps", "0"], ["--budget-s", "-1"], ["--image-size", "3"],
                     ["--mask-ratio", "1.5"], ["--patch-size", "0"], ["--batch-size", "0"],
                     ["--resume"], ["--steps", "1"]],
        "models": [["--json"], []],
    }
    extra = list(data.draw(st.sampled_from(bad_values[verb])))
    if "MALICIOUS" in extra:
        extra[extra.index("MALICIOUS")] = str(_malicious_checkpoint(folder / "evil.pt"))
    if verb == "import":
        kind, suffix, content = data.draw(image_file())
        src = _write(folder, "img", suffix, content)
        argv = [verb, str(src), "--project", str(ppath), "--quiet"] + extra
    elif verb == "export":
        argv = [verb, "--project", str(ppath), "--quiet"] + (extra if "--out" in extra else
                                                              ["--out", str(folder / "out")] + extra)
    elif verb == "sample":
        argv = [verb, "--project", str(ppath)]
    elif verb in ("methods", "strategies"):
        argv = [verb] + extra + [data.draw(st.sampled_from(("", "--bogus")))]
        argv = [a for a in argv if a]
    elif verb == "train":
        argv = [verb, "--project", str(ppath), "--steps", "2", "--image-size", "16",
                "--batch-size", "2", "--base", "4", "--no-predict", "--threads", "1"] + extra
    elif verb == "pretrain":
        argv = [verb, "--project", str(ppath), "--image-size", "16", "--batch-size", "2",
                "--base", "4", "--threads", "1"] + (extra if "--steps" in extra else
                                                     ["--steps", "1"] + extra)
    elif verb == "simulate":
        argv = [verb, "--project", str(ppath), "--out", str(folder / "sim"), "--steps", "1",
                "--rounds", "1", "--seeds", "1", "--no-peer", "--threads", "1"] + extra
    elif verb == "gui":  # only projects that do not open: a good one would start napari
        from training_backend.project.store import Project

        with contextlib.suppress(Exception):
            Project.open(ppath, mode="r")
            ppath, pkind = folder / "nope", "missing"
        argv = [verb, "--project", str(ppath)]
    else:
        argv = [verb, "--project", str(ppath)] + extra
    kind = f"{verb} {' '.join(a for a in extra if a.startswith('-'))} / {pkind}".strip()
    before = fingerprint(project.path)
    err, out = bytes_io.StringIO(), bytes_io.StringIO()
    code: Any = None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    except BaseException as exc:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        loc = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File")), "")
        tally.add("cli", kind, "failure", f"{argv}: {type(exc).__name__}: {str(exc)[:160]} ({loc})")
        return
    stderr = err.getvalue()
    if (folder / "PWNED").exists():
        outcome, detail = "failure", "a malicious checkpoint ran code"
    elif code not in (0, 1, 2) or "Traceback" in stderr:
        outcome, detail = "failure", f"{argv}: exit {code}: {stderr.strip()[-300:]}"
    elif code == 2:
        errors = [ln for ln in stderr.splitlines() if "error:" in ln]
        outcome = "rejected" if len(errors) == 1 else "failure"
        detail = "" if outcome == "rejected" else f"{argv}: {stderr.strip()[-300:]}"
    else:
        outcome, detail = ("accepted" if code == 0 else "rejected"), ""
    if verb == "train" and "../../escape" in extra and (project.path.parent / "escape").exists():
        outcome, detail = "failure", "a model id wrote outside the project"
    if outcome == "rejected" and where == "good project" and verb not in ("import", "train", "predict"):
        bad = _changed_on_reject(project, before, outcome)
        if bad:
            outcome, detail = "failure", f"{argv}: {bad}"
    tally.add("cli", kind, outcome, detail)


FUZZERS = {"folder import": fuzz_folder_import, "csv import": fuzz_csv_import,
           "napari reader": fuzz_reader, "store api": fuzz_store, "cli": fuzz_cli}


def run(examples: int = 1200, seed: int = 0, targets=TARGETS, derandomize: bool = False,
        root: Path | None = None) -> Tally:
    """Generate ``examples`` inputs per call of hypothesis, spread over ``targets``."""
    tally = Tally()
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="lesionseg-fuzz-")) if own else Path(root)
    bench = Bench(root)
    per_target = max(1, examples // len(targets))
    try:
        for target in targets:
            one = _property(FUZZERS[target], bench, tally, per_target, derandomize)
            if not derandomize:
                one = _seeded(one, seed)
            with warnings_quiet():
                one()
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return tally


def _property(fuzzer: Callable, bench: Bench, tally: Tally, n: int, derandomize: bool):
    """A hypothesis test running ``fuzzer`` on ``n`` generated inputs."""

    @settings(max_examples=n, derandomize=derandomize, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data) -> None:
        fuzzer(bench, tally, data)
        if bench.n % 40 == 0:
            bench.cleanup()

    return one


def _seeded(test, seed: int):
    from hypothesis import seed as hseed

    return hseed(seed)(test)


@contextlib.contextmanager
def warnings_quiet():
    import logging
    import warnings

    logging.getLogger("napari_lesionseg").setLevel(logging.CRITICAL)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1200, help="inputs in all (default 1200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    t0 = time.monotonic()
    tally = run(args.examples, args.seed, targets)
    elapsed = time.monotonic() - t0
    if args.json:
        print(json.dumps({"counts": tally.counts, "failures": tally.failures,
                          "seconds": round(elapsed, 1)}, indent=1, ensure_ascii=False))
    else:
        print(f"{'target':14s} {'inputs':>6s} {'accepted':>8s} {'rejected':>8s} {'failures':>8s}  kinds")
        for target, kinds in tally.counts.items():
            outs: dict[str, int] = {}
            for o in kinds.values():
                for k, n in o.items():
                    outs[k] = outs.get(k, 0) + n
            print(f"{target:14s} {sum(outs.values()):6d} {outs.get('accepted', 0):8d} "
                  f"{outs.get('rejected', 0):8d} {outs.get('failure', 0):8d}  {len(kinds)}")
        print(f"{'total':14s} {tally.total():6d} {tally.total('accepted'):8d} "
              f"{tally.total('rejected'):8d} {tally.total('failure'):8d}   ({elapsed:.0f} s)")
        seen = set()
        for line in tally.failures:
            key = line.split(":")[0] + line.split("(")[-1][-60:]
            if key not in seen:
                seen.add(key)
                print("  " + line[:400])
    return 1 if tally.total("failure") else 0


if __name__ == "__main__":
    sys.exit(main())
