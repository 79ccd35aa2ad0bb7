"""The one atomic write (`training_backend.project.atomic`) and its users: the store's indexes, mask
files, checkpoints; and the one supervision count shared by the store and the trainer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from training_backend.project import atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_writes_bytes_text_and_json_leaving_no_temporary_file(tmp_path):
    atomic.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic.atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic.atomic_write_json(tmp_path / "c.json", {"ä": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"ä": [1, 2]}
    atomic.atomic_write_text(tmp_path / "b.txt", "new")  # replaces
    assert (tmp_path / "b.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failing_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    atomic.atomic_write_json(target, {"v": 1})

    def refuse(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_store_io_and_checkpoints_use_the_one_atomic_write(tmp_path, monkeypatch):
    """Every writer goes through `atomic_path`, which fsyncs its temporary file: recording the
    files it fsyncs proves who used it."""
    import torch

    from training_backend.learning import checkpoints

    from training_backend.project import io
    from training_backend.project.store import Project

    calls = []
    real = atomic.fsync_file

    def recording(path):
        calls.append(os.path.basename(path)[1:].split(".tmp-")[0])  # ".<name>.tmp-<pid>-<id>"
        real(path)

    monkeypatch.setattr(atomic, "fsync_file", recording)
    Project.create(tmp_path / "p", ["lesion"])
    io.write_mask(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    step = tmp_path / "step_000001.pt"
    checkpoints.save_checkpoint(step, {"w": torch.zeros(2)})
    checkpoints.link_latest(step)
    assert {"index.json", "outputs.json", "project.json", "m.png", "step_000001.pt",
            "latest.pt"} <= set(calls)
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["w"].shape == (2,)


def test_store_and_trainer_count_supervision_alike(tiny_project):
    """An emptied sparse mask teaches nothing: both counts call it maskless, not sparse."""
    from training_backend.learning.data import build_training_set

    cid = tiny_project.case_ids()[4]  # the sparse case
    tiny_project.save_annotation(cid, np.zeros((48, 48), np.uint8), "sparse")
    counts = tiny_project.supervision_counts()
    assert counts == {"full": 4, "sparse": 0, "image_label": 6, "unlabelled": 2, "maskless": 4}
    ts = build_training_set(tiny_project, image_size=32, validation=False)
    assert ts.counts == counts
