"""Kill harness: SIGKILL the saving process, the trainer or both, then check that nothing is lost.

Each trial copies a small template project, runs one action in a child process and kills it
(SIGKILL) at a random moment, then checks the project in a fresh process:

* it opens (read-write: the open also removes temporary files of writers that died);
* every annotation version listed is intact and reads back with its provenance, every version
  the child reported as finished is listed, earlier versions are unchanged, an undo holds the
  content of the version it restores;
* every listed image, annotation and model output reads completely; no temporary file is left
  after that open; every visible exported file reads completely;
* a killed import can simply be run again (every row then in the project exactly once, with
  its mask); a killed export can be run again;
* a killed trainer resumes from its last checkpoint and finishes its steps.

Kill moments: half of the trials kill at a random point among the child's file-system writes
(an audit hook counts opens for writing, renames, removals, links and folder creations, and
the child kills itself at the chosen one, so the kill lands just before that operation), the
others after a random delay within the action's measured duration (anywhere, also mid-write).

Actions (kinds): annotation save, label save, undo last save, checkpoint write, prediction
write, import, export, trainer (kill + resume), saver+trainer (both killed).

    .venv/bin/python benchmarks/reliability_kill.py [--trials 200] [--seed 0] [--kinds a,b] [--json]

The parent process only forks: every zarr or torch operation runs in a forked child (zarr's
I/O thread does not survive a fork), so a trial costs a fork, not an interpreter start.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import signal
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

# Imported once here, used only in forked children.
import torch  # noqa: E402,F401  (pre-imported: children start at once)

from training_backend.learning import checkpoints

from training_backend.project import export, importer, io  # noqa: E402,F401
from training_backend.events import Failed, Finished, Started  # noqa: E402
from training_backend.learning.models import ModelConfig  # noqa: E402
from training_backend.project.store import Project  # noqa: E402
from training_backend.learning.trainer import TrainConfig, run_training  # noqa: E402

KINDS = ("annotation", "label", "undo", "checkpoint", "prediction", "import", "export",
         "trainer", "saver+trainer")
SIZE = 40
N_IMPORT_ROWS = 5
TRAIN_STEPS = 30
SAVES = 3
WRITE_EVENTS = {"os.rename", "os.remove", "os.link", "os.mkdir", "os.rmdir", "shutil.rmtree",
                "os.truncate", "os.symlink"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# ------------------------------------------------------------------------------ children
def _install_kill_hook(kill_at: int | None) -> dict:
    """Count file-system writes; SIGKILL this process at the ``kill_at``-th (audit hook)."""
    state = {"n": 0}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & _WRITE_FLAGS))
            if not writes or isinstance(args[0], int):
                return
        elif event not in WRITE_EVENTS:
            return
        state["n"] += 1
        if kill_at is not None and state["n"] >= kill_at:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # with a forked saver, if any

    sys.addaudithook(hook)
    return state


def _fork(fn: Callable, *args, kill_at: int | None = None, count: bool = False) -> tuple[int, int]:
    """Run ``fn(*args)`` in a forked child; returns (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        try:
            state = _install_kill_hook(kill_at) if (kill_at is not None or count) else None
            t0 = time.monotonic()
            result = fn(*args)
            out = {"ok": True, "result": result, "seconds": time.monotonic() - t0,
                   "writes": state["n"] if state else None}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
        data = json.dumps(out, default=str).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
        os._exit(0)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int, timeout: float = 300.0) -> dict:
    chunks = []
    deadline = time.monotonic() + timeout
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.005)
            continue
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    out = json.loads(text) if text else {"ok": False, "killed": True}
    out["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return out


def run_child(fn: Callable, *args, timeout: float = 300.0) -> Any:
    """``fn(*args)`` in a forked child, to completion; its result (raises on its error)."""
    out = _collect(*_fork(fn, *args), timeout=timeout)
    if not out.get("ok"):
        raise RuntimeError(out.get("traceback") or out)
    return out["result"]


# ------------------------------------------------------------------------------ content
def pattern(tag: int, shape=(SIZE, SIZE), top: int = 1) -> np.ndarray:
    """A deterministic mask for ``tag`` (values 0..top)."""
    m = np.zeros(shape, np.uint8)
    m[: (tag * 7) % shape[0] + 1, : (tag * 5) % shape[1] + 1] = 1 + tag % top
    m[-1, -1] = tag % 2
    return m


def digest(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return hashlib.sha1(arr.tobytes() + str((arr.shape, arr.dtype.str)).encode()).hexdigest()


def build_template(root: Path) -> dict:
    """A small project (full, sparse, labelled, unlabelled cases), a CSV with images and masks
    to import, and the digests of every listed array (runs in a child)."""
    rng = np.random.default_rng(0)
    project = Project.create(root / "project", ["lesion"], ["normal", "abnormal"], name="kill")
    for i in range(8):
        image = rng.integers(0, 200, (SIZE, SIZE), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[5 + i:15 + i, 8:20] = 1
        image[mask > 0] = 240
        cid = project.add_case(image, f"case {i}", source=f"/synthetic/case {i}.png",
                               image_label="abnormal" if i < 5 else None)
        if i < 3:
            project.save_annotation(cid, mask, "full", author="template")
        if i == 0:
            project.save_annotation(cid, pattern(99), "full", author="template")
        if i == 3:
            sparse = np.zeros_like(mask)
            sparse[mask > 0] = 1
            sparse[0:2] = 255
            project.save_annotation(cid, sparse, "sparse", author="template")
    data = root / "import"
    data.mkdir()
    rows = []
    for i in range(N_IMPORT_ROWS):
        image = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        io.write_mask(data / f"img {i}.png", image)
        io.write_mask(data / f"img {i}_mask.png", pattern(50 + i) * 255)
        rows.append({"image": f"img {i}.png", "masks": f"img {i}_mask.png", "cls": "abnormal"})
    with open(data / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "masks", "cls"])
        writer.writeheader()
        writer.writerows(rows)
    return snapshot(root / "project")


def snapshot(path: Path) -> dict:
    """Digests and provenance of everything the project lists (runs in a child)."""
    project = Project.open(path, mode="r")
    cases = {}
    for rec in project.cases():
        versions = {}
        for av in rec.annotations:
            mask, _ = project.read_annotation(rec.id, av.version)
            versions[str(av.version)] = {"digest": digest(mask), **av.to_dict()}
        cases[rec.id] = {"image": digest(project.read_image(rec.id)), "versions": versions,
                         "label": rec.image_label, "source": rec.source}
    return {"cases": cases}


# ------------------------------------------------------------------------------ actions
def _log(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())
    os.fsync(fd)


def act_annotation(path: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    p = Project.open(path)
    for i in range(SAVES):
        cid = p.case_ids()[(i * 3) % len(p)]
        tag = 1000 + i
        kind = "full" if i % 2 else "sparse"
        av = p.save_annotation(cid, pattern(tag), kind, author=f"kill-{i}", source=f"harness:{tag}")
        _log(fd, json.dumps({"cid": cid, "version": av.version, "tag": tag, "kind": kind}))


LABELS = ("normal", None, "abnormal")


def act_label(path: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    p = Project.open(path)
    cid = p.case_ids()[6]
    for i in range(SAVES * 2):
        p.set_image_label(cid, LABELS[i % 3], author=f"kill-{i}")
        _log(fd, json.dumps({"cid": cid, "i": i}))


def act_undo(path: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    p = Project.open(path)
    cid = p.case_ids()[0]  # two template versions
    av = p.save_annotation(cid, pattern(2000), "full", author="kill", source="harness:2000")
    _log(fd, json.dumps({"cid": cid, "version": av.version, "tag": 2000, "kind": "full"}))
    for _ in range(2):
        av = p.revert_annotation(cid, author="kill-undo")
        _log(fd, json.dumps({"cid": cid, "version": av.version, "undo": True}))


def act_checkpoint(path: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    folder = Path(path) / "models" / "ck"
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(1, 5):
        payload = {"model": {"w": torch.full((64, 64), float(step))}, "step": step,
                   "meta": {"n_classes": 1}}
        step_file = folder / f"step_{step:06d}.pt"
        checkpoints.save_checkpoint(step_file, payload)
        checkpoints.link_latest(step_file)
        _log(fd, json.dumps({"step": step}))


def _outputs(k: int, tag: int) -> tuple:
    pred = pattern(tag)
    prob = np.full((k + 1, SIZE, SIZE), tag % 7 / 7, np.float32)
    cam = np.full((k, SIZE, SIZE), tag % 5 / 5, np.float32)
    unc = np.full((SIZE, SIZE), tag % 3 / 3, np.float32)
    return pred, prob, cam, unc


def act_prediction(path: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    p = Project.open(path)
    for i in range(SAVES * 2):
        cid = p.case_ids()[i % 3]
        tag = 3000 + i
        oid = p.write_outputs(cid, "kill-model", *_outputs(len(p.classes), tag),
                              {"entropy": float(tag)}, np.arange(8, dtype=np.float32))
        _log(fd, json.dumps({"cid": cid, "output_id": oid, "tag": tag}))


def _eager_flush() -> None:
    """Worst case for an import: the index is flushed after every change (default: every 2 s),
    so a kill can land between any two of a row's writes."""
    original = Project.batch

    def batch(self, flush_every_s: float = 0.0):
        return original(self, flush_every_s=0.0)

    Project.batch = batch


def act_import(path: str, log: str) -> None:
    _eager_flush()
    p = Project.open(path)
    csv_path = Path(path).parent / "import" / "labels.csv"
    report = importer.import_csv(p, csv_path, mask_cols=[("masks", "lesion")], label_col="cls")
    if report.skipped:
        raise RuntimeError(f"import skipped rows: {report.skipped}")


EXPORT_FORMATS = ("png", "tiff", "nifti", "zarr")


def act_export(path: str, log: str, fmt: str) -> None:
    p = Project.open(path, mode="r")
    export.export_masks(p, Path(path).parent / "export", fmt=fmt, source="annotation")


def _train_config(**kw) -> TrainConfig:
    base = dict(steps=TRAIN_STEPS, batch_size=2, image_size=32, model=ModelConfig(base=4, depth=2),
                threads=1, validate_every=10 ** 6, predict=True, mc_samples=1,
                checkpoint_every_s=0.001, model_id="kill")
    base.update(kw)
    return TrainConfig(**base)


def act_trainer(path: str, log: str) -> None:
    for event in run_training(path, _train_config()):
        if isinstance(event, Failed):
            raise RuntimeError(event.message)


def act_saver_trainer(path: str, log: str) -> None:
    """Saves annotations in a second (forked) process while this one trains."""
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(20):
                act_annotation(path, log)
                time.sleep(0.05)
        finally:
            os._exit(0)
    try:
        act_trainer(path, log)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


ACTIONS: dict[str, Callable] = {"annotation": act_annotation, "label": act_label, "undo": act_undo,
                                "checkpoint": act_checkpoint, "prediction": act_prediction,
                                "import": act_import, "export": act_export,
                                "trainer": act_trainer, "saver+trainer": act_saver_trainer}


# ------------------------------------------------------------------------------ checks
def _log_lines(log: str) -> list[dict]:
    if not os.path.exists(log):
        return []
    lines = Path(log).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _dead_temps(path: Path) -> list[str]:
    """Temporary files still in the project after a read-write open (all writers are dead)."""
    found = []
    tmp = path / "store.zarr" / ".tmp"
    if tmp.is_dir():
        found += [f"store.zarr/.tmp/{e.name}" for e in tmp.iterdir()]
    found += [e.name for e in path.glob("*.tmp-*")]
    return found


def check_project(path: str, before: dict, log: str, kind: str) -> list[str]:
    """Problems found in a project after a kill (runs in a fresh child)."""
    problems: list[str] = []
    path_ = Path(path)
    for name in ("project.json", "index.json", "outputs.json"):
        try:
            json.loads((path_ / name).read_text())
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} unreadable: {exc}")
    try:
        project = Project.open(path_, mode="r+")
    except Exception as exc:  # noqa: BLE001
        return problems + [f"project does not open: {type(exc).__name__}: {exc}"]
    left = _dead_temps(path_)
    if left:
        problems.append(f"temporary files left after the next open: {left[:3]}")
    contents: dict[tuple[str, int], str] = {}
    for rec in project.cases():
        try:
            project.read_image(rec.id)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{rec.id}: image unreadable: {exc}")
        for av in rec.annotations:
            try:
                mask, got = project.read_annotation(rec.id, av.version)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{rec.id} v{av.version}: unreadable: {exc}")
                continue
            contents[(rec.id, av.version)] = digest(mask)
            if not (av.author and av.time and av.source and av.kind in ("full", "sparse")):
                problems.append(f"{rec.id} v{av.version}: provenance incomplete {av.to_dict()}")
            if av.source.startswith("harness:"):
                tag = int(av.source.split(":")[1])
                if digest(mask) != digest(pattern(tag)):
                    problems.append(f"{rec.id} v{av.version}: content differs from what was saved")
        versions = [a.version for a in rec.annotations]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"{rec.id}: version numbers {versions}")
        for av in rec.annotations:  # an undo holds the content of the version it restored
            if av.source.startswith("revert:") and (rec.id, av.parent) in contents:
                if contents[(rec.id, av.version)] != contents[(rec.id, av.parent)]:
                    problems.append(f"{rec.id} v{av.version}: undo content is not v{av.parent}")
        if rec.id in before["cases"]:
            old = before["cases"][rec.id]
            for v, info in old["versions"].items():
                now = next((a for a in rec.annotations if a.version == int(v)), None)
                if now is None:
                    problems.append(f"{rec.id} v{v}: earlier version lost")
                elif contents.get((rec.id, int(v))) != info["digest"] or now.key != info["key"] \
                        or now.author != info["author"] or now.time != info["time"]:
                    problems.append(f"{rec.id} v{v}: earlier version changed")
    for cid in before["cases"]:
        if cid not in project.case_ids():
            problems.append(f"{cid}: case lost")
    for cid in project.case_ids():
        if project.output_record(cid) is not None:
            try:
                out = project.read_outputs(cid)
                assert out.pred.shape == project.case(cid).shape
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{cid}: outputs unreadable: {type(exc).__name__}: {exc}")
    lines = _log_lines(log)
    problems += KIND_CHECKS.get(kind, lambda *a: [])(project, before, lines, path_)
    return problems


def _check_saved(project, before, lines, path) -> list[str]:
    problems = []
    for line in lines:
        if line.get("undo"):
            continue
        rec = project.case(line["cid"])
        av = next((a for a in rec.annotations if a.version == line["version"]), None)
        if av is None or av.source != f"harness:{line['tag']}" or av.kind != line["kind"]:
            problems.append(f"finished save {line} not listed as saved")
    return problems


def _check_label(project, before, lines, path) -> list[str]:
    if not lines:
        return []
    rec = project.case(lines[-1]["cid"])
    done = lines[-1]["i"]
    allowed = {LABELS[done % 3], LABELS[(done + 1) % 3]}
    if rec.image_label not in allowed:
        return [f"label {rec.image_label!r} is neither the last saved nor the next"]
    return []


def _check_checkpoint(project, before, lines, path) -> list[str]:
    problems = []
    folder = path / "models" / "ck"
    steps = [line["step"] for line in lines]
    for f in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        try:
            ckpt = checkpoints.load_checkpoint(f)
            step = int(ckpt["step"])
            if float(ckpt["model"]["w"][0, 0]) != step:
                problems.append(f"{f.name}: weights do not match step {step}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{f.name}: does not load: {exc}")
            continue
        if f.name == "latest.pt" and steps and step not in (steps[-1], steps[-1] + 1):
            problems.append(f"latest.pt is step {step}, the last finished was {steps[-1]}")
    if steps and not (folder / "latest.pt").is_file():
        problems.append("latest.pt missing after a finished checkpoint")
    return problems


def _check_prediction(project, before, lines, path) -> list[str]:
    problems = []
    for cid in {line["cid"] for line in lines}:
        done = [line for line in lines if line["cid"] == cid]
        out = project.read_outputs(cid)
        if out is None:
            problems.append(f"{cid}: finished outputs missing")
            continue
        tags = {line["tag"] for line in done}
        tags.add(max(tags) + 3)  # written but not logged when killed
        ok = any(digest(out.pred) == digest(pattern(t)) for t in tags)
        if not ok or out.features is None:
            problems.append(f"{cid}: latest outputs are not the last written")
    return problems


def _check_import(project, before, lines, path) -> list[str]:
    """The import is run again; every row must then be in the project once, with its mask."""
    problems = []
    csv_path = path.parent / "import" / "labels.csv"
    table = importer.read_csv_table(csv_path)
    for rec in project.cases():  # after the kill, before the rerun: no half-imported row
        if rec.id not in before["cases"] and not rec.annotations:
            problems.append(f"{rec.id} ({rec.name}) imported without its mask")
    report = importer.import_csv(project, csv_path, mask_cols=[("masks", "lesion")],
                                 label_col="cls")
    if report.skipped:
        problems.append(f"rerun skipped rows: {report.skipped}")
    project.refresh()
    by_source: dict[str, list] = {}
    for rec in project.cases():
        by_source.setdefault(rec.source, []).append(rec)
    for i, row in enumerate(table.rows):
        source = str((csv_path.parent / row["image"]).resolve())
        recs = by_source.get(source, [])
        if len(recs) != 1:
            problems.append(f"row {i}: {len(recs)} cases after the rerun")
            continue
        got = project.read_annotation(recs[0].id)
        if got is None or digest(got[0]) != digest(pattern(50 + i)) or len(recs[0].annotations) != 1:
            problems.append(f"row {i}: mask missing or wrong after the rerun")
    if len(project) != len(before["cases"]) + len(table.rows):
        problems.append(f"{len(project)} cases after the rerun, expected "
                        f"{len(before['cases']) + len(table.rows)}")
    return problems


def _check_export(project, before, lines, path) -> list[str]:
    """Visible exported files read completely; the export can be run again."""
    problems = []
    out = path.parent / "export"

    def visible_ok() -> None:
        for f in sorted(out.iterdir()) if out.is_dir() else []:
            if f.name.startswith("."):
                continue
            try:
                if f.name.endswith(".json"):
                    json.loads(f.read_text())
                elif f.name.endswith(".csv"):
                    importer.read_csv_table(f)
                else:
                    io.read_image(f)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"export {f.name}: half-written ({exc})")

    visible_ok()
    ro = Project.open(path, mode="r")
    report = export.export_masks(ro, out, fmt="png")
    if len(report.exported) != sum(1 for r in ro.cases() if r.annotations):
        problems.append("rerun of the export did not write every mask")
    visible_ok()
    hidden = [f.name for f in out.iterdir() if f.name.startswith(".")]
    if hidden:
        problems.append(f"temporary files left in the export folder after a rerun: {hidden[:3]}")
    return problems


def _check_trainer(project, before, lines, path) -> list[str]:
    """Resume the killed run: it starts at the last checkpoint's step and finishes."""
    problems = []
    latest = path / "models" / "kill" / "latest.pt"
    saved = None
    if latest.exists():
        try:
            saved = int(checkpoints.load_checkpoint(latest)["step"])
        except Exception as exc:  # noqa: BLE001
            return [f"latest.pt does not load: {exc}"]
    events = list(run_training(path, _train_config(), resume=True))
    if saved is None:
        if not (isinstance(events[-1], Failed) and events[-1].user_error):
            problems.append(f"resume without a checkpoint: {events[-1]}")
        return problems + (_check_saved(project, before, lines, path) if lines else [])
    started = events[0]
    if not isinstance(started, Started) or started.start_step != saved:
        problems.append(f"resume started at {getattr(started, 'start_step', started)}, "
                        f"checkpoint step {saved}")
    if not isinstance(events[-1], Finished) or events[-1].step != TRAIN_STEPS:
        problems.append(f"resumed run did not finish: {events[-1]}")
    leftovers = [f.name for f in latest.parent.glob(".*.tmp-*")]
    if leftovers:
        problems.append(f"checkpoint temporaries left after the resume: {leftovers}")
    return problems + (_check_saved(project, before, lines, path) if lines else [])


KIND_CHECKS = {"annotation": _check_saved, "undo": _check_saved, "label": _check_label,
               "checkpoint": _check_checkpoint, "prediction": _check_prediction,
               "import": _check_import, "export": _check_export, "trainer": _check_trainer,
               "saver+trainer": _check_trainer}


# ------------------------------------------------------------------------------ trials
@dataclass
class Result:
    trials: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    killed: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, killed: bool, problems: list[str]) -> None:
        self.trials[kind] = self.trials.get(kind, 0) + 1
        self.failures[kind] = self.failures.get(kind, 0) + (1 if problems else 0)
        self.killed[kind] = self.killed.get(kind, 0) + (1 if killed else 0)
        if problems and len(self.examples) < 30:
            self.examples.append(f"{kind}: " + "; ".join(problems[:3]))


def _args(kind: str, path: Path, log: Path, trial: int) -> tuple:
    if kind == "export":
        return (str(path), str(log), EXPORT_FORMATS[trial % len(EXPORT_FORMATS)])
    return (str(path), str(log))


def run(trials: int = 200, seed: int = 0, kinds=KINDS, work: Path | None = None,
        verbose: bool = False) -> Result:
    """Run ``trials`` kill trials (kinds in turn) and return the counts."""
    rng = random.Random(seed)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="lesionseg-kill-")) if own else Path(work)
    try:
        template = work / "template"
        template.mkdir(parents=True, exist_ok=True)
        before = run_child(build_template, template)
        # dry runs: how many writes and how long each action takes
        profile = {}
        for kind in kinds:
            trial_dir = _fresh(template, work / f"dry-{kind}")
            out = _collect(*_fork(ACTIONS[kind], *_args(kind, trial_dir / "project",
                                                         trial_dir / "log", 0), count=True))
            if not out.get("ok"):
                raise RuntimeError(f"{kind} does not run: {out.get('traceback')}")
            profile[kind] = (max(1, out["writes"]), out["seconds"])
            shutil.rmtree(trial_dir)
        result = Result()
        for t in range(trials):
            kind = kinds[t % len(kinds)]
            trial_dir = _fresh(template, work / "trial")
            project, log = trial_dir / "project", trial_dir / "log"
            writes, seconds = profile[kind]
            if t % 2 == 0:
                out = _collect(*_fork(ACTIONS[kind], *_args(kind, project, log, t),
                                      kill_at=rng.randint(1, writes)))
            else:
                pid, r = _fork(ACTIONS[kind], *_args(kind, project, log, t))
                time.sleep(rng.uniform(0.0, seconds))
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                out = _collect(pid, r)
            killed = out.get("signal") == signal.SIGKILL
            if not killed and not out.get("ok"):
                problems = [f"action failed by itself: {out.get('error')}"]
            else:
                check = _collect(*_fork(check_project, str(project), before, str(log), kind))
                problems = check["result"] if check.get("ok") else \
                    [f"check crashed: {check.get('traceback', check)}"]
            result.add(kind, killed, problems)
            if verbose:
                print(f"trial {t:4d} {kind:14s} {'killed' if killed else 'finished'}"
                      f" {'FAIL ' + '; '.join(problems)[:300] if problems else 'ok'}",
                      file=sys.stderr, flush=True)
        return result
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _fresh(template: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target, symlinks=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--verbose", action="store_true", help="one line per trial on stderr")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    t0 = time.monotonic()
    result = run(args.trials, args.seed, kinds, verbose=args.verbose)
    elapsed = time.monotonic() - t0
    if args.json:
        print(json.dumps({"trials": result.trials, "failures": result.failures,
                          "killed": result.killed, "examples": result.examples,
                          "seconds": round(elapsed, 1)}, indent=1))
    else:
        print(f"{'kind':15s} {'trials':>6s} {'killed':>6s} {'failures':>8s}")
        for kind in kinds:
            print(f"{kind:15s} {result.trials.get(kind, 0):6d} {result.killed.get(kind, 0):6d} "
                  f"{result.failures.get(kind, 0):8d}")
        print(f"{'total':15s} {sum(result.trials.values()):6d} {sum(result.killed.values()):6d} "
              f"{sum(result.failures.values()):8d}   ({elapsed:.0f} s)")
        for line in result.examples:
            print("  " + line)
    return 1 if sum(result.failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
