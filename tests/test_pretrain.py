"""Self-supervised pretraining of the encoder: the masking and its loss by hand, the images it
may read, stop and resume, and the encoder reaching every method's networks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training_backend import events as ev
from training_backend.cli import build_parser
from training_backend.cli.pretrain import config_from_args
from training_backend.config import METHOD_CATALOG, ModelConfig, PretrainConfig, TrainConfig
from training_backend.errors import InputError, LesionsegError
from training_backend.jobs.pretrain_record import (ENCODER_FILE, describe, mismatch, pretrained_dir,
                                                   read_meta, target_reached)
from training_backend.learning.checkpoints import load_checkpoint
from training_backend.learning.encoder_init import encoder_modules, start_from_pretrained
from training_backend.learning.methods import create_method
from training_backend.learning.pretrain import mask_images, masked_mse, patch_mask, pretrain, run_pretraining
from training_backend.learning.trainer import train
from training_backend.project.store import Project

NET = ModelConfig(base=4, depth=3)
TINY = dict(model=NET, image_size=32, batch_size=4, patch_size=8, device="cpu", threads=1)
#: What each method holds a U-Net encoder in (every one must start from the pretrained one).
ENCODERS = {
    "supervised": ["net.encoder"],
    "mean_teacher": ["net.encoder", "teacher.encoder"],
    "cam": ["net.encoder", "snapshot.encoder"],
    "mcwss": ["net.unet.encoder", "snapshot.unet.encoder"],
    "dual_unet": ["seg.encoder", "classifier.encoder"],
    "collaborative": ["net.encoder"],
    "caml": ["vanilla.encoder", "aux.encoder"],
    "crii": ["net.unet.encoder", "teacher.unet.encoder"],
}


# ----------------------------------------------------------------------------- the objective
def test_patch_mask_hides_whole_patches_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    mask = patch_mask(3, 8, 4, 0.5, g)  # 2×2 patches of 4 px, 2 of them hidden
    assert mask.shape == (3, 1, 8, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    for m in mask[:, 0]:
        cells = m.reshape(2, 4, 2, 4)
        assert bool((cells == cells[:, :1, :, :1]).all())  # constant over each patch
        assert int(m.sum()) == 2 * 16
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])  # drawn per image
    cut = patch_mask(1, 10, 4, 0.2, g)  # 3×3 patches (the last row and column cut to 2 px)
    assert cut.shape == (1, 1, 10, 10)
    cells = cut[0, 0, ::4, ::4]  # (3, 3): one pixel of each patch
    assert int(cells.sum()) == round(0.2 * 9) == 2
    assert torch.equal(cut[0, 0], cells.repeat_interleave(4, 0).repeat_interleave(4, 1)[:10, :10])


def test_masked_loss_and_input_by_hand():
    target = torch.arange(16.0).reshape(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0  # the left half: values 0 1 4 5 8 9 12 13
    # squares 0+1+16+25+64+81+144+169 = 500 over 8 hidden pixels
    assert float(masked_mse(torch.zeros_like(target), target, mask)) == pytest.approx(62.5)
    # two channels: the first reconstructed exactly, the second all 0 -> 500 / 16
    two = torch.cat([target, target], 1)
    pred = torch.cat([target, torch.zeros_like(target)], 1)
    assert float(masked_mse(pred, two, mask)) == pytest.approx(31.25)
    # what is shown does not count
    assert float(masked_mse(target + 100 * (1 - mask), target, mask)) == 0.0
    assert float(masked_mse(target, target, torch.zeros_like(mask))) == 0.0  # nothing hidden
    shown = mask_images(target, mask)
    assert bool((shown[..., :2] == 0).all()) and torch.equal(shown[..., 2:], target[..., 2:])


# ----------------------------------------------------------------------------- the run
def _run(path, resume=False, cancel=None, **kw):
    return list(run_pretraining(path, PretrainConfig(**{**TINY, **kw}), resume=resume, cancel=cancel))


def test_pretraining_never_reads_a_holdout_image(tiny_project, monkeypatch):
    holdout = {r.id for r in tiny_project.cases() if r.split == "holdout"}
    train_ids = {r.id for r in tiny_project.cases()} - holdout
    assert holdout and len(train_ids) == 8
    read: list[str] = []
    original = Project.read_image

    def read_image(self, cid):
        if cid in holdout:
            raise AssertionError(f"holdout image {cid} read")
        read.append(cid)
        return original(self, cid)

    monkeypatch.setattr(Project, "read_image", read_image)
    events = _run(tiny_project.path, steps=2)  # 2 steps of 4 images: one epoch
    assert isinstance(events[-1], ev.Finished), events[-1]
    assert events[0].n_train == 8 and events[0].model_id == "_pretrained"
    assert sorted(read) == sorted(train_ids)  # each non-holdout image once, cached after
    meta = read_meta(tiny_project.path)
    assert meta["images"] == 8 and meta["samples"] == 8 and meta["step"] == 2 and meta["done"]
    assert meta["image_size"] == 32 and meta["channels"] == 1 and meta["model"] == NET.to_dict()
    # not a trained model: not registered, no latest.pt for --resume / --init-from to pick
    assert "_pretrained" not in Project.open(tiny_project.path).models()
    assert not (pretrained_dir(tiny_project.path) / "latest.pt").exists()


def test_a_stopped_pretraining_resumes_with_the_same_steps(tiny_project_factory):
    straight = tiny_project_factory("straight")
    stopped = tiny_project_factory("stopped")
    _run(straight.path, steps=6)
    polls = []

    def cancel() -> bool:  # asked before every step: stop after 3
        polls.append(1)
        return len(polls) > 3

    first = _run(stopped.path, steps=6, cancel=cancel)
    assert first[-1].reason == "cancelled" and first[-1].step == 3
    assert not read_meta(stopped.path)["done"]
    assert not target_reached(read_meta(stopped.path), PretrainConfig(steps=6))
    # a resume takes the saved settings (these would change the encoder) and continues
    second = _run(stopped.path, resume=True, steps=None, image_size=48, patch_size=4)
    assert second[0].start_step == 3 and second[-1].reason == "steps" and second[-1].step == 6
    a = load_checkpoint(pretrained_dir(straight.path) / "state.pt")
    b = load_checkpoint(pretrained_dir(stopped.path) / "state.pt")
    assert a["step"] == b["step"] == 6 and a["samples"] == b["samples"] == 24
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert target_reached(read_meta(stopped.path), PretrainConfig(steps=6))
    # once there, a resume stops at once; a larger target goes on
    again = _run(stopped.path, resume=True, steps=None)
    assert [type(e).__name__ for e in again][-1] == "Finished" and again[-1].step == 6
    more = _run(stopped.path, resume=True, steps=7)
    assert more[-1].step == 7


def test_resume_without_a_pretraining_and_a_busy_project_say_so(tiny_project):
    events = _run(tiny_project.path, resume=True, steps=2)
    assert isinstance(events[-1], ev.Failed) and events[-1].user_error
    assert "no pretraining to resume" in events[-1].message
    from training_backend.jobs import trainlock

    lock = trainlock.acquire(tiny_project.path, "supervised-1")
    try:
        with pytest.raises(LesionsegError, match="already training .*supervised-1"):
            pretrain(tiny_project.path, PretrainConfig(**TINY, steps=1))
    finally:
        trainlock.release(lock)


# ----------------------------------------------------------------------------- reuse
@pytest.fixture()
def pretrained_project(tiny_project):
    _run(tiny_project.path, steps=2)
    return tiny_project


@pytest.mark.parametrize("name", sorted(METHOD_CATALOG))
def test_the_encoder_reaches_every_network_of_every_method(pretrained_project, name):
    project = Project.open(pretrained_project.path)
    saved = load_checkpoint(pretrained_dir(project.path) / ENCODER_FILE)["model"]
    method = create_method(name, in_channels=1, n_classes=1, n_image_classes=2, model=NET)
    assert [n for n, _ in encoder_modules(method)] == ENCODERS[name]
    event = start_from_pretrained(project, method, TrainConfig(method=name, image_size=32,
                                                               model=NET), channels=1)
    assert list(event.networks) == ENCODERS[name] and event.steps == 2 and event.images == 8
    for _, enc in encoder_modules(method):
        own = enc.state_dict()
        for key, value in saved.items():
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    fresh = create_method(name, in_channels=1, n_classes=1, n_image_classes=2, model=NET)
    key = "levels.0.conv1.conv.weight"
    assert not torch.equal(encoder_modules(fresh)[0][1].state_dict()[key], saved[key])


def test_a_fresh_run_starts_from_it_a_resume_and_none_do_not(pretrained_project):
    path = pretrained_project.path
    cfg = TrainConfig(method="mean_teacher", steps=1, image_size=32, batch_size=2, model=NET,
                      device="cpu", threads=1, predict=False, fold_validation=0.0,
                      validate_every=1000, lr=1e-9, weight_decay=0.0, model_id="mt")
    seen: list = []
    train(path, cfg, on_event=seen.append)
    used = [e for e in seen if isinstance(e, ev.PretrainedEncoder)]
    assert len(used) == 1 and used[0].networks == ("net.encoder", "teacher.encoder")
    assert type(seen[seen.index(used[0]) - 1]).__name__ == "Started"
    info = Project.open(path).models()["mt"]
    assert info["pretrained"]["networks"] == ["net.encoder", "teacher.encoder"]
    assert info["pretrained"]["steps"] == 2
    # the trained weights are the pretrained ones moved by one step of lr 1e-9
    saved = load_checkpoint(pretrained_dir(path) / ENCODER_FILE)["model"]
    model = load_checkpoint(path / "models" / "mt" / "latest.pt")["model"]
    for prefix in ("net.encoder.", "teacher.encoder."):
        for key, value in saved.items():
            if key.endswith("weight") or key.endswith("bias"):
                torch.testing.assert_close(model[prefix + key], value, rtol=0, atol=1e-6)
    # a resume keeps its own weights; "none" and another image size do not use it
    seen.clear()
    train(path, TrainConfig.from_dict({**cfg.to_dict(), "steps": 2}), resume=True, on_event=seen.append)
    assert not any(isinstance(e, ev.PretrainedEncoder) for e in seen)
    seen.clear()
    train(path, TrainConfig.from_dict({**cfg.to_dict(), "model_id": "none", "pretrained": "none"}),
          on_event=seen.append)
    assert not any(isinstance(e, ev.PretrainedEncoder) for e in seen)
    assert Project.open(path).models()["none"]["pretrained"] is None
    seen.clear()
    train(path, TrainConfig.from_dict({**cfg.to_dict(), "model_id": "big", "image_size": 48}),
          on_event=seen.append)
    skipped = [e for e in seen if isinstance(e, ev.PretrainedEncoder)]
    assert skipped[0].networks == () and "pretrained at 32 px" in skipped[0].note
    # a named file that is not a pretrained encoder: one line naming it
    bad = TrainConfig.from_dict({**cfg.to_dict(), "model_id": "bad",
                                 "pretrained": str(path / "models" / "mt" / "latest.pt")})
    with pytest.raises(LesionsegError, match="latest.pt.*not a pretrained encoder"):
        train(path, bad)


# ----------------------------------------------------------------------------- settings
def test_settings_round_trip_and_bad_values():
    cfg = TrainConfig(pretrained="none")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig().pretrained == "auto"
    pcfg = PretrainConfig(model=ModelConfig(base=8), image_size=64, steps=5, budget_s=9.5,
                          batch_size=3, mask_ratio=0.4, patch_size=8, lr=3e-4, seed=2, threads=1)
    assert PretrainConfig.from_dict(json.loads(json.dumps(pcfg.to_dict()))) == pcfg
    assert PretrainConfig().budget == 600.0 and PretrainConfig(steps=4).budget is None
    for bad in ({"mask_ratio": 1.0}, {"patch_size": 200}, {"steps": 0}, {"budget_s": -1}):
        with pytest.raises(InputError, match=next(iter(bad))):
            PretrainConfig(**bad)
    with pytest.raises(InputError, match="pretrained"):
        TrainConfig(pretrained=" ")
    with pytest.raises(InputError, match="model_id"):
        TrainConfig(model_id="_pretrained")
    # the command line describes the same settings
    args = build_parser().parse_args(["pretrain", "--project", "p", "--image-size", "64", "--steps",
                                      "5", "--budget-s", "9.5", "--batch-size", "3", "--base", "8",
                                      "--mask-ratio", "0.4", "--patch-size", "8", "--lr", "3e-4",
                                      "--seed", "2", "--threads", "1", "--device", "auto"])
    assert config_from_args(args) == pcfg
    train_args = build_parser().parse_args(["train", "--project", "p", "--pretrained", "none"])
    assert train_args.pretrained == "none"
    meta = {"image_size": 64, "channels": 1, "model": ModelConfig(base=8).to_dict(), "step": 5,
            "images": 3, "elapsed_s": 2.0}
    assert mismatch(meta, 64, ModelConfig(base=8, dropout=0.3), 1) == ""
    assert "base 8 vs 16" in mismatch(meta, 64, ModelConfig(), 1)
    assert mismatch(meta, 64, ModelConfig(base=8), 3) == ("pretrained on 1-channel images, this "
                                                          "run has 3")
    assert mismatch(meta, 128, ModelConfig(base=8), 1).startswith("pretrained at 64 px")
    assert describe(meta).startswith("pretrained encoder: 5 steps on 3 images (64 px)")


def test_the_cli_pretrains_refuses_to_overwrite_and_resumes(tiny_project, capsys):
    from training_backend.cli import main

    argv = ["pretrain", "--project", str(tiny_project.path), "--steps", "2", "--image-size", "32",
            "--batch-size", "4", "--base", "4", "--threads", "1", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "2 steps on 8 images (32 px)" in out.out and "pretraining the encoder" in out.err
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume continues it" in err and err.count("\n") == 1
    assert main(argv[:4] + ["3", "--resume"]) == 0
    assert read_meta(tiny_project.path)["step"] == 3
    assert np.isfinite(read_meta(tiny_project.path)["loss"])


# ----------------------------------------------------------------------------- robustness
def test_a_training_refused_by_it_hears_encoder_pretraining_and_dead_temporaries_go(tiny_project):
    import os
    import subprocess
    import sys

    from training_backend.jobs import trainlock
    from training_backend.project.atomic import HOST_TAG

    folder = pretrained_dir(tiny_project.path)
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = folder / f".state.pt.tmp-{dead.pid}.{HOST_TAG}-0a1b"    # a pretraining killed saving
    alive = folder / f".encoder.pt.tmp-{os.getpid()}.{HOST_TAG}-2c3d"  # a writer still running
    for path in (gone, alive):
        path.write_bytes(b"half a checkpoint")
    assert trainlock.holder(tiny_project.path) is None
    run = run_pretraining(tiny_project.path, PretrainConfig(**TINY, steps=1))
    assert isinstance(next(run), ev.Started)                     # it holds the lock now
    try:
        assert not gone.exists() and alive.exists()
        holder = trainlock.holder(tiny_project.path)
        assert holder["what"] == "encoder pretraining" and holder["pid"] == os.getpid()
        cfg = TrainConfig(steps=1, image_size=32, model=NET, device="cpu", threads=1, predict=False)
        with pytest.raises(LesionsegError) as refused:
            train(tiny_project.path, cfg)
        message = str(refused.value)
        assert f"already training (encoder pretraining, process {os.getpid()})" in message
        assert "_pretrained" not in message and trainlock.is_busy_error(message)
    finally:
        run.close()
    assert trainlock.holder(tiny_project.path) is None            # closing it frees the project
    assert not trainlock.is_busy_error("pretraining failed: no image to pretrain on")


def test_an_unreadable_encoder_is_skipped_under_auto_and_one_line_when_named(pretrained_project):
    path = pretrained_project.path
    encoder = pretrained_dir(path) / ENCODER_FILE
    # a file torch refuses with a message of many lines (a global outside the allowed ones)
    torch.save({"model": {}, "meta": {"where": __import__("pathlib").Path("x")}}, encoder)
    with pytest.raises(InputError) as bad:
        load_checkpoint(encoder)
    text = str(bad.value)
    assert text.startswith(f"{encoder}: not a readable lesionseg checkpoint (UnpicklingError: ")
    assert "\\n" not in text and "\n" not in text                 # its first line only
    cfg = TrainConfig(steps=1, image_size=32, batch_size=2, model=NET, device="cpu", threads=1,
                      predict=False, fold_validation=0.0, validate_every=1000, model_id="auto")
    seen: list = []
    train(path, cfg, on_event=seen.append)                       # "auto": it trains anyway
    [skipped] = [e for e in seen if isinstance(e, ev.PretrainedEncoder)]
    assert skipped.networks == () and skipped.source == str(encoder)
    assert skipped.note.startswith("not used: unreadable (not a readable lesionseg checkpoint "
                                   "(UnpicklingError: ")
    assert "\n" not in skipped.note and "\\n" not in skipped.note
    assert Project.open(path).models()["auto"]["pretrained"] is None
    named = TrainConfig.from_dict({**cfg.to_dict(), "model_id": "named", "pretrained": str(encoder)})
    with pytest.raises(LesionsegError) as refused:               # named: refused, one line
        train(path, named)
    assert str(refused.value) == text
