"""Security: checkpoints never run code, CSV paths never move writes outside the folders the
user named, and nothing listens on a network port."""
from __future__ import annotations

import os
import pickle
import pickletools
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training_backend.learning import checkpoints

from training_backend.project import export, importer, io
from training_backend.cli import main
from training_backend.errors import InputError
from training_backend.events import Failed, Started
from training_backend.learning.models import ModelConfig
from training_backend.jobs.process import TrainerProcess
from training_backend.project.store import Project
from training_backend.learning.trainer import TrainConfig, run_training


def _malicious(path: Path) -> Path:
    """A checkpoint whose unpickling would create ``PWNED`` beside it."""
    marker = path.parent / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    torch.save({"model": {"w": Evil()}, "meta": {"n_classes": 1, "in_channels": 1}}, path,
               pickle_module=pickle)
    return path


def test_the_crafted_checkpoint_calls_os_system_when_unpickled(tmp_path):
    """The file is really hostile: its pickle names ``os.system`` as a callable (read with
    pickletools, without running it), which any loader without ``weights_only`` would call."""
    evil = _malicious(tmp_path / "evil.pt")
    with zipfile.ZipFile(evil) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        ops = list(pickletools.genops(archive.read(name)))
    names = [str(arg) for op, arg, _pos in ops if op.name in ("GLOBAL", "SHORT_BINUNICODE",
                                                               "BINUNICODE", "UNICODE")]
    assert f"{os.system.__module__} system" in names or {os.system.__module__, "system"} <= set(names)
    assert any(op.name == "REDUCE" for op, _arg, _pos in ops)
    assert not (tmp_path / "PWNED").exists()


def test_every_loader_refuses_a_malicious_checkpoint(tiny_project, tmp_path, capsys):
    evil = _malicious(tmp_path / "evil.pt")
    with pytest.raises(InputError, match="not a readable lesionseg checkpoint"):
        checkpoints.load_checkpoint(evil)
    cfg = TrainConfig(steps=2, batch_size=2, image_size=16, model=ModelConfig(base=4, depth=2),
                      threads=1, predict=False, init_from=str(evil), model_id="evil")
    last = list(run_training(tiny_project.path, cfg))[-1]
    assert isinstance(last, Failed) and last.user_error and "evil.pt" in last.message
    assert main(["train", "--project", str(tiny_project.path), "--steps", "2",
                 "--init-from", str(evil)]) == 2
    assert main(["predict", "--project", str(tiny_project.path), "--model", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("not a readable lesionseg checkpoint") == 2
    assert not (tmp_path / "PWNED").exists()


def test_csv_paths_cannot_move_writes_outside_the_named_folders(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    io.write_mask(outside / "secret.png", np.full((8, 8), 9, np.uint8))
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    io.write_mask(data / "sub" / "..png", np.full((8, 8), 3, np.uint8))
    rows = ["image,masks", "../outside/secret.png,", f"{outside / 'secret.png'},",
            "sub/..png,", "../../../../../../etc/passwd,", "sub/../../outside/secret.png,"]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    project = Project.create(tmp_path / "p", ["lesion"])
    before = sorted(p for p in tmp_path.rglob("*") if "p" not in p.relative_to(tmp_path).parts[:1])
    report = importer.import_csv(project, data / "list.csv", mask_cols=[])
    assert len(report.imported) == 2 and report.duplicates  # read (the user's CSV), never written
    for cid in project.case_ids():  # a case named ".." or after a path up
        index = project._files.index["cases"][cid]
        index["name"] = "../../../escape"
        index["source"] = "/../../escape/../..png"
    out = tmp_path / "export"
    export.export_masks(project, out, fmt="png", source="reference")  # nothing to export
    for cid in project.case_ids():
        project.save_annotation(cid, np.ones((8, 8), np.uint8), "full")
    report = export.export_masks(project, out, fmt="png")
    assert len(report.exported) == 2
    for _cid, path in report.exported:
        assert path.resolve().parent == out.resolve()
    after = sorted(p for p in tmp_path.rglob("*") if "p" not in p.relative_to(tmp_path).parts[:1])
    assert [p for p in after if p not in before and p != out and out not in p.parents] == []


def _listening(pid: int) -> list:
    psutil = pytest.importorskip("psutil")
    try:
        return [c for c in psutil.Process(pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


def test_trainer_process_and_cli_open_no_listening_port(tiny_project, capsys):
    cfg = TrainConfig(steps=100000, batch_size=2, image_size=16, model=ModelConfig(base=4, depth=2),
                      threads=1, predict=False, model_id="net")
    with TrainerProcess(tiny_project.path, cfg) as proc:
        proc.start()
        events: list = []
        deadline = time.monotonic() + 120
        while not any(isinstance(e, Started) for e in events) and time.monotonic() < deadline:
            events += proc.poll()
            time.sleep(0.05)
        assert any(isinstance(e, Started) for e in events)
        assert _listening(proc.pid) == []
        proc.cancel()
        proc.wait(timeout=120)
    assert main(["train", "--project", str(tiny_project.path), "--steps", "2", "--image-size",
                 "16", "--base", "4", "--threads", "1", "--no-predict", "--model-id", "cli"]) == 0
    assert _listening(os.getpid()) == []
