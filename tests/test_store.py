"""The project store: versioned atomic saves, undo, labels, outputs, crash safety."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from training_backend.errors import InputError, ProjectError
from training_backend.project.store import BACKGROUND, Project, mask_to_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project(tmp_path):
    return Project.create(tmp_path / "p", ["lesion", "other"], ["normal", "benign", "malignant"])


def _img(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)


def test_create_open_roundtrip(project, tmp_path):
    cid = project.add_case(_img(), "benign (1) é", source="/data/benign (1) é.png", image_label="benign")
    rgb = np.zeros((20, 30, 3), np.uint16)
    cid2 = project.add_case(rgb, "rgb")
    p2 = Project.open(tmp_path / "p")
    assert p2.case_ids() == [cid, cid2]
    rec = p2.case(cid)
    assert rec.name == "benign (1) é" and rec.shape == (40, 50) and rec.channels == 1
    assert rec.status == "image label" and rec.image_label == "benign"
    assert p2.case(cid2).channels == 3 and p2.read_image(cid2).dtype == np.uint16
    np.testing.assert_array_equal(p2.read_image(cid), _img())
    assert p2.negative_classes == ["normal"]


def test_create_refuses_existing_and_open_refuses_non_project(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f.txt").write_text("hi")
    with pytest.raises(ProjectError, match="already exists"):
        Project.create(tmp_path / "x", ["lesion"])
    with pytest.raises(ProjectError, match="not a lesionseg project"):
        Project.open(tmp_path / "x")
    with pytest.raises(ProjectError, match="no such project"):
        Project.open(tmp_path / "missing")


def test_bad_images_and_masks_are_rejected(project):
    with pytest.raises(InputError, match="NaN"):
        project.add_case(np.full((10, 10), np.nan, np.float32), "nan.tif")
    with pytest.raises(InputError, match="shape"):
        project.add_case(np.zeros((10, 10, 4), np.uint8), "rgba.png")
    with pytest.raises(InputError, match="image label"):
        project.add_case(_img(), "x", image_label="cancer")
    cid = project.add_case(_img(), "a")
    with pytest.raises(InputError, match="does not match the image size"):
        project.save_annotation(cid, np.zeros((10, 10), np.uint8), "full")
    with pytest.raises(InputError, match=r"mask values \[7\]"):
        project.save_annotation(cid, np.full((40, 50), 7, np.uint8), "full")
    with pytest.raises(InputError, match="kind"):
        project.save_annotation(cid, np.zeros((40, 50), np.uint8), "partial")
    assert project.case(cid).annotations == ()  # nothing half-saved


def test_versions_are_kept_and_undo_is_linear(project):
    cid = project.add_case(_img(), "a")
    masks = []
    for i in range(3):
        m = np.zeros((40, 50), np.uint8)
        m[i * 5:(i + 1) * 5, :] = 1
        masks.append(m)
        project.save_annotation(cid, m, "full")
    assert [a.version for a in project.case(cid).annotations] == [1, 2, 3]
    for v, m in enumerate(masks, 1):  # every version still readable
        np.testing.assert_array_equal(project.read_annotation(cid, v)[0], m)
    project.revert_annotation(cid)  # -> content of v2
    np.testing.assert_array_equal(project.read_annotation(cid)[0], masks[1])
    project.revert_annotation(cid)  # -> content of v1
    np.testing.assert_array_equal(project.read_annotation(cid)[0], masks[0])
    assert project.revert_annotation(cid) is None  # nothing before v1
    assert len(project.case(cid).annotations) == 5  # undos leave a trace


def test_sparse_semantics_and_presence(project):
    cid = project.add_case(_img(), "a", image_label="benign")
    m = np.zeros((40, 50), np.uint8)
    m[:5] = BACKGROUND
    m[10:12, 10:12] = 2
    av = project.save_annotation(cid, m, "sparse")
    assert 0 < av.labelled_fraction < 1
    t = mask_to_target(project.read_annotation(cid)[0], "sparse")
    assert (t[:5] == 0).all() and (t[10:12, 10:12] == 2).all() and (t[20:] == -1).all()
    assert project.presence_target(project.case(cid)) == [-1, 1]
    neg = project.add_case(_img(), "n", image_label="normal")
    assert project.presence_target(project.case(neg)) == [0, 0]
    full = np.zeros((40, 50), np.uint8)
    full[0, 0] = BACKGROUND  # painted background in a full mask is just background
    project.save_annotation(neg, full, "full")
    assert project.read_annotation(neg)[0].max() == 0


def test_label_history_and_reference_hidden(project):
    cid = project.add_case(_img(), "a")
    project.set_image_label(cid, "benign", author="dr_a")
    project.set_image_label(cid, "malignant", presence={"lesion": True}, author="dr_b")
    rec = project.case(cid)
    assert rec.image_label == "malignant" and rec.label_history[-1]["image_label"] == "benign"
    ref = np.zeros((40, 50), np.uint8)
    ref[5:9, 5:9] = 1
    project.set_reference(cid, ref, image_label="malignant")
    rec = project.case(cid)
    assert rec.has_reference and rec.reference_presence == {"lesion": True, "other": False}
    assert rec.annotations == ()  # a reference is not an annotation
    np.testing.assert_array_equal(project.read_reference(cid), ref)


def test_outputs_keep_latest_two(project):
    cid = project.add_case(_img(), "a")
    keys = []
    for i in range(4):
        project.write_outputs(cid, f"m{i}", np.zeros((40, 50), np.uint8), np.zeros((3, 40, 50)),
                              np.full((2, 40, 50), 0.5), np.zeros((40, 50)), {"entropy": i},
                              features=np.arange(4))
        keys.append(project.output_record(cid).key)
    out = project.read_outputs(cid)
    assert out.model_id == "m3" and out.scores["entropy"] == 3 and out.features.shape == (4,)
    existing = [k for k in keys if (project.zarr_path / k).exists()]
    assert existing == keys[-2:]


def test_readonly_and_concurrent_writers(project, tmp_path):
    cid = project.add_case(_img(), "a")
    ro = Project.open(tmp_path / "p", mode="r")
    with pytest.raises(ProjectError, match="read-only"):
        ro.set_image_label(cid, "benign")
    other = Project.open(tmp_path / "p")  # a second process's view
    other.write_outputs(cid, "m", np.zeros((40, 50), np.uint8), np.zeros((3, 40, 50)),
                        np.zeros((2, 40, 50)), np.zeros((40, 50)), {})
    project.set_image_label(cid, "benign")  # must not lose the other writer's update
    fresh = Project.open(tmp_path / "p")
    assert fresh.output_record(cid) is not None and fresh.case(cid).image_label == "benign"


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from training_backend.project.store import Project
    p = Project.open({path!r})
    cid = p.case_ids()[0]
    i = len(p.case(cid).annotations)
    while True:
        i += 1
        m = np.zeros((64, 64), np.uint8); m[: i % 64] = 1; m[0, 0] = i % 2
        av = p.save_annotation(cid, m, "full")
        with open({done!r}, "a") as fh:
            fh.write(f"{{av.version}}\\n")
""")


def _expected(version: int) -> np.ndarray:
    m = np.zeros((64, 64), np.uint8)
    m[: version % 64] = 1
    m[0, 0] = version % 2
    return m


def test_killed_during_saves_never_corrupts(tmp_path):
    """Kill a saving process at random moments: the project always opens, every listed version
    reads back intact, and the last save the process finished is there."""
    p = Project.create(tmp_path / "p", ["lesion"])
    cid = p.add_case(np.zeros((64, 64), np.uint8), "a")
    done = tmp_path / "done.txt"
    script = _SAVER.format(root=str(ROOT), path=str(tmp_path / "p"), done=str(done))
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(1.2 + rng.random() * 1.5)  # import time + a random moment of saving
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        q = Project.open(tmp_path / "p")
        versions = q.case(cid).annotations
        finished = [int(x) for x in done.read_text().split()] if done.exists() else []
        if finished:
            assert versions[-1].version >= finished[-1]
        for av in versions:
            mask, _ = q.read_annotation(cid, av.version)
            np.testing.assert_array_equal(mask, _expected(av.version))
        json.loads((tmp_path / "p" / "index.json").read_text())
    assert len(Project.open(tmp_path / "p").case(cid).annotations) > 6


def test_batch_groups_index_writes_and_lets_others_in(tmp_path):
    p = Project.create(tmp_path / "p", ["lesion"])
    with p.batch(flush_every_s=0.0):  # flush after every change: others can interleave
        a = p.add_case(_img(), "a")
        other = Project.open(tmp_path / "p")
        assert other.case_ids() == [a]  # flushed already
        b = p.add_case(_img(), "b")
    with p.batch(flush_every_s=3600):
        for i in range(20):
            p.add_case(_img(seed=i), f"n{i}")
        assert len(Project.open(tmp_path / "p")) == 2  # not flushed yet
    assert len(Project.open(tmp_path / "p")) == 22 and p.case(b).name == "b"
