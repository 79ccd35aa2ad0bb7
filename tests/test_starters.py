"""Starter models: export into the package, find by name, predict and fine-tune, list.

A fake ``fundus-starter`` (the four IDRiD lesion classes, RGB) is trained for a few steps on a
tiny synthetic project and exported into a temporary starters folder; only the last test reads
the real shipped weights, and is skipped when they are not installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_project
from training_backend.cli import main
from training_backend.errors import InputError
from training_backend.events import Finished
from training_backend.learning import starters
from training_backend.learning.checkpoints import load_checkpoint, resolve_checkpoint
from training_backend.learning.trainer import TrainConfig, run_training
from training_backend.project.store import Project

ROOT = Path(__file__).resolve().parents[1]
FUNDUS = ["MA", "HE", "EX", "SE"]
NAME = "fundus-starter"
CARD = {"description": "Fundus lesions (test model).", "data": "synthetic discs",
        "licence": "test only", "command": "pytest tests/test_starters.py",
        "scores": {"dice": {"MA": 0.1, "HE": 0.2, "EX": 0.4, "SE": None},
                   "presence_auc": {"MA": 0.5, "HE": 0.6, "EX": 0.7, "SE": 0.8},
                   "holdout_images": 3},
        "steps": 3, "date": "2026-12-02"}


def tiny_run(**kw) -> TrainConfig:
    base = dict(method="supervised", steps=3, batch_size=2, image_size=32, threads=1,
                validate_every=50, mc_samples=2, predict=False)
    base.update(kw)
    return TrainConfig(**base)


def train(path, **kw) -> Finished:
    events = list(run_training(path, tiny_run(**kw)))
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``latest.pt`` of a 3-step model of the four fundus classes on RGB images."""
    root = tmp_path_factory.mktemp("starter_src")
    project = make_tiny_project(root / "fundus", classes=FUNDUS, size=32,
                                rgb_cases=tuple(range(10)))
    fin = train(project.path, model_id="src")
    return Path(fin.checkpoint)


@pytest.fixture()
def shipped(tmp_path, monkeypatch, trained) -> Path:
    """The fake starter installed in a temporary starters folder; returns its model.pt."""
    root = tmp_path / "starters"
    monkeypatch.setattr(starters, "STARTERS_DIR", root)
    return starters.export_starter(trained, root / NAME, dict(CARD))


def test_export_writes_a_small_model_its_card_and_model_card(shipped, trained):
    from training_backend.learning.inference import load_model

    folder = shipped.parent
    sha = starters.file_sha256(shipped)
    assert shipped.name == f"model-{sha[:12]}.pt"              # named by its content
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "card.json", shipped.name]
    raw = torch.load(shipped, weights_only=True)
    assert set(raw) == {"model", "meta"}                  # no optimiser, rng, step ...
    assert shipped.stat().st_size < 0.6 * trained.stat().st_size
    meta = raw["meta"]
    assert meta["model_id"] == meta["starter"] == NAME and "project" not in meta
    assert meta["config"]["init_from"] is None and meta["config"]["model_id"] == NAME
    original = load_checkpoint(trained)["model"]
    assert all(torch.equal(original[k], v) for k, v in raw["model"].items())
    assert set(raw["model"]) == set(original)
    method, cfg = load_model(shipped)                     # the product's own loaders
    assert cfg.image_size == 32 and method.in_channels == 3

    card = json.loads((folder / "card.json").read_text())
    assert card["name"] == NAME and card["classes"] == FUNDUS and card["method"] == "supervised"
    assert card["channels"] == 3 and card["image_size"] == 32 and card["image_classes"] == [
        "normal", "abnormal"]
    assert card["model_sha256"] == sha and card["model_file"] == shipped.name
    assert starters.find_starter(NAME).checkpoint == shipped
    assert card["scores"] == CARD["scores"] and card["command"] == CARD["command"]
    text = (folder / "MODEL_CARD.md").read_text()
    assert text.startswith(f"# {NAME}") and "MA, HE, EX, SE" in text
    assert "| EX | 0.400 | 0.700 |" in text and "| SE | - | 0.800 |" in text
    assert CARD["command"] in text and "synthetic discs" in text
    assert f"--init-from {NAME} --image-size 32\n" in text


def test_export_refuses_a_card_that_contradicts_the_checkpoint(tmp_path, trained):
    dest = tmp_path / NAME
    with pytest.raises(InputError, match="checkpoint"):
        starters.export_starter(trained, dest, {**CARD, "classes": ["EX"]})
    with pytest.raises(InputError, match="needs licence"):
        starters.export_starter(trained, dest, {k: v for k, v in CARD.items() if k != "licence"})
    with pytest.raises(InputError, match="folder"):
        starters.export_starter(trained, dest, {**CARD, "name": "other"})
    with pytest.raises(InputError, match="no such checkpoint"):
        starters.export_starter(tmp_path / "none.pt", dest, dict(CARD))
    assert not list(dest.glob("model*.pt")) and not (dest / "card.json").exists()


def _other_model(trained: Path, where: Path) -> Path:
    """The trained checkpoint with one weight changed: another model of the same kind."""
    ckpt = load_checkpoint(trained)
    key = _encoder_key(ckpt["model"])
    ckpt["model"][key] = ckpt["model"][key] + 0.5
    torch.save(ckpt, where)
    return where


def test_a_reinstall_killed_at_any_point_leaves_a_usable_starter(shipped, trained, tmp_path,
                                                                 monkeypatch):
    """The card is the commit point: the new model file is written beside the old one, the
    card switches to it, the old one is removed last."""
    from training_backend.project import atomic

    folder, old = shipped.parent, shipped
    newer = _other_model(trained, tmp_path / "newer.pt")

    def killed(*_args, **_kw):
        raise KeyboardInterrupt("killed")

    real_json = atomic.atomic_write_json
    monkeypatch.setattr(atomic, "atomic_write_json", killed)   # killed before the card is written
    with pytest.raises(KeyboardInterrupt):
        starters.export_starter(newer, folder, dict(CARD))
    assert len(list(folder.glob("model-*.pt"))) == 2            # the new file, not yet named
    assert resolve_checkpoint(None, NAME) == old                # the old starter, intact
    monkeypatch.setattr(atomic, "atomic_write_json", real_json)
    monkeypatch.setattr(starters, "model_card_text", killed)   # killed after the card
    with pytest.raises(KeyboardInterrupt):
        starters.export_starter(newer, folder, dict(CARD))
    new = resolve_checkpoint(None, NAME)                        # the new starter, checked
    assert new != old and old.is_file() and new.name == json.loads(
        (folder / "card.json").read_text())["model_file"]
    monkeypatch.undo()
    monkeypatch.setattr(starters, "STARTERS_DIR", folder.parent)
    assert starters.export_starter(newer, folder, dict(CARD)) == new
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "card.json", new.name]
    key = _encoder_key(load_checkpoint(newer)["model"])
    assert torch.equal(load_checkpoint(new)["model"][key], load_checkpoint(newer)["model"][key])
    card = json.loads((folder / "card.json").read_text())
    card["model_file"] = "../elsewhere.pt"                     # a card naming another folder
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="model_file '../elsewhere.pt' is not a file name"):
        resolve_checkpoint(None, NAME)


def test_resolved_by_name_after_the_projects_own_models(shipped, tiny_project):
    assert resolve_checkpoint(tiny_project, NAME) == shipped
    assert resolve_checkpoint(None, NAME) == shipped
    own = tiny_project.path / "models" / NAME / "latest.pt"   # a user's model of that name wins
    own.parent.mkdir(parents=True)
    shutil.copyfile(shipped, own)
    assert resolve_checkpoint(tiny_project, NAME) == own
    with pytest.raises(InputError, match=r"starter models: fundus-starter\)"):
        resolve_checkpoint(tiny_project, "no-such-model")


def test_a_broken_install_is_one_clear_line(shipped, tmp_path, capsys):
    project = make_tiny_project(tmp_path / "p", classes=FUNDUS, size=32)
    with open(shipped, "ab") as fh:                        # a model file that is not the card's
        fh.write(b"x")
    with pytest.raises(InputError, match="does not match its card.json"):
        resolve_checkpoint(project, NAME)
    shipped.unlink()                                       # no model file at all
    assert main(["predict", "--project", str(project.path), "--model", NAME]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "starter model 'fundus-starter' is not installed" in err
    fit, why = starters.fitting_starters(FUNDUS)
    assert fit == [] and why == (f"starter model fundus-starter is not installed (its "
                                 f"{shipped.name} is missing)")


def test_which_starters_fit_and_why_not(shipped, tmp_path, monkeypatch):
    fit, why = starters.fitting_starters(FUNDUS)
    assert [s.name for s in fit] == [NAME] and why == ""
    fit, why = starters.fitting_starters(["lesion"])
    assert fit == [] and why == ("no starter model predicts the classes lesion "
                                 "(fundus-starter predicts MA, HE, EX, SE)")
    assert not starters.find_starter(NAME).fits(["EX", "HE", "MA", "SE"])  # order matters
    monkeypatch.setattr(starters, "STARTERS_DIR", tmp_path / "empty")
    assert starters.fitting_starters(FUNDUS) == ([], "no starter model is installed")
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "card.json").write_text("{not json")
    monkeypatch.setattr(starters, "STARTERS_DIR", bad.parent)
    with pytest.raises(InputError, match=r"card.json.*unreadable starter model card"):
        starters.starters()


def test_predict_a_project_with_the_starter(shipped, bundled_sample, capsys):
    """The bundled IDRiD sample has the starter's classes: every case gets its prediction."""
    assert main(["predict", "--project", str(bundled_sample), "--model", NAME,
                 "--mc-samples", "1", "--device", "cpu"]) == 0
    project = Project.open(bundled_sample)
    outputs = [project.read_outputs(cid) for cid in project.case_ids()]
    assert all(o is not None and o.model_id == NAME for o in outputs)
    assert outputs[0].pred.shape == project.case(project.case_ids()[0]).shape
    assert "wrote predictions for 10 cases" in capsys.readouterr().out


def test_predicting_other_classes_names_the_starters_classes(shipped, tiny_project, capsys):
    assert main(["predict", "--project", str(tiny_project.path), "--model", NAME]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "starter model fundus-starter predicts the lesion classes MA, HE, EX, SE" in err
    assert "has lesion" in err


def _encoder_key(state: dict) -> str:
    """A deep encoder convolution (its shape does not depend on the input channels)."""
    return [k for k in state if "encoder" in k and k.endswith("weight") and state[k].ndim == 4][-1]


def test_fine_tune_from_the_starter_on_the_cli(shipped, bundled_sample, capsys):
    start = torch.load(shipped, weights_only=True)["model"]
    key = _encoder_key(start)
    assert main(["train", "--project", str(bundled_sample), "--init-from", NAME,
                 "--steps", "1", "--image-size", "32", "--lr", "1e-7", "--threads", "1",
                 "--no-predict", "--model-id", "tuned", "--device", "cpu", "--seed", "1"]) == 0
    tuned = load_checkpoint(bundled_sample / "models" / "tuned" / "latest.pt")
    assert tuned["meta"]["config"]["init_from"] == NAME
    assert torch.allclose(tuned["model"][key], start[key], atol=1e-4)   # it started there
    for k in ("net.out.conv.conv.weight", "net.heads.cam_convs.0.weight"):
        assert torch.allclose(tuned["model"][k], start[k], atol=1e-4)  # the same classes: kept


def test_fine_tune_into_other_classes_keeps_what_fits(shipped, tmp_path):
    """A project of other lesion classes keeps the encoder and decoder; the class heads
    start anew (as a fresh run of the same seed starts them), also where their shapes would
    fit (four classes of other names), and the run says so in one line."""
    from training_backend.cli.train import ProgressPrinter

    start = torch.load(shipped, weights_only=True)["model"]
    key, head = _encoder_key(start), "net.out.conv.conv.weight"
    for name, classes in (("one", ("lesion",)), ("four", ("A", "B", "C", "D"))):
        project = make_tiny_project(tmp_path / name, classes=classes, size=32,
                                    rgb_cases=tuple(range(10)))  # RGB: a fresh run's draws
        events = list(run_training(project.path, tiny_run(
            steps=1, lr=1e-7, init_from=NAME, model_id="tuned", seed=1, pretrained="none")))
        assert isinstance(events[-1], Finished), events[-1]
        tuned = load_checkpoint(events[-1].checkpoint)["model"]
        fresh = load_checkpoint(train(project.path, steps=1, lr=1e-7, model_id="fresh", seed=1,
                                      pretrained="none").checkpoint)["model"]
        [told] = [e for e in events if type(e).__name__ == "InitFrom"]
        assert type(events[events.index(told) - 1]).__name__ == "Started"
        assert head in told.anew and key not in told.anew and told.source == NAME
        assert told.kept == len(start) - sum(k in start for k in told.anew)
        assert told.note == (f"{NAME} has the lesion classes MA, HE, EX, SE, this project "
                             f"{', '.join(classes)}: its class heads start anew "
                             f"({len(told.anew)} weight tensors); the other {told.kept} are kept")
        for k in told.anew:                       # anew: a fresh run's weights, not the starter's
            torch.testing.assert_close(tuned[k], fresh[k], rtol=0, atol=1e-5, msg=f"{name} {k}")
            assert (tuned[k].shape != start[k].shape
                    or not torch.allclose(tuned[k], start[k], atol=1e-2)), f"{name} {k}"
        kept = [k for k in start if k in tuned and k not in told.anew]
        assert len(kept) == told.kept
        for k in (k for k in kept if k.endswith(("weight", "bias"))):  # the rest: the starter's
            torch.testing.assert_close(tuned[k], start[k], rtol=0, atol=1e-4, msg=f"{name} {k}")
        assert not torch.allclose(fresh[key], start[key], atol=1e-2)
    out = __import__("io").StringIO()
    ProgressPrinter(out)(told)                    # the CLI prints the line
    assert out.getvalue() == told.note + "\n"


def test_a_fine_tune_does_not_take_the_projects_pretrained_encoder(shipped, tmp_path):
    """With --init-from the run starts from that model only, even when the project holds a
    pretrained encoder that would fit a fresh run (same size, channels and network)."""
    from training_backend.config import PretrainConfig
    from training_backend.jobs.pretrain_record import ENCODER_FILE, pretrained_dir
    from training_backend.learning.pretrain import pretrain

    project = make_tiny_project(tmp_path / "p", classes=FUNDUS, size=32,
                                rgb_cases=tuple(range(10)))
    pretrain(project.path, PretrainConfig(model=tiny_run().model, image_size=32, batch_size=2,
                                          steps=1, device="cpu", threads=1))
    encoder = load_checkpoint(pretrained_dir(project.path) / ENCODER_FILE)["model"]
    start = torch.load(shipped, weights_only=True)["model"]
    fresh = list(run_training(project.path, tiny_run(steps=1, lr=1e-7, model_id="fresh")))
    assert any(type(e).__name__ == "PretrainedEncoder" and e.networks for e in fresh)  # it fits
    events = list(run_training(project.path, tiny_run(steps=1, lr=1e-7, init_from=NAME,
                                                      model_id="tuned")))
    assert not any(type(e).__name__ == "PretrainedEncoder" for e in events)
    [told] = [e for e in events if type(e).__name__ == "InitFrom"]
    assert told.anew == () and told.note == "" and told.kept == len(start)
    tuned = load_checkpoint(events[-1].checkpoint)["model"]
    for k, v in encoder.items():
        if k.endswith("weight") and v.ndim == 4:
            torch.testing.assert_close(tuned["net.encoder." + k], start["net.encoder." + k],
                                       rtol=0, atol=1e-4)
            assert not torch.allclose(tuned["net.encoder." + k], v, atol=1e-3), k


def test_the_models_verb_lists_starters_and_the_projects_models(shipped, bundled_sample,
                                                               tiny_project, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"  {NAME}  classes MA, HE, EX, SE  supervised, 3 channel(s), 32 px" in out
    assert "holdout Dice MA 0.10 · HE 0.20 · EX 0.40 · SE -" in out
    train(tiny_project.path, model_id="mine")
    assert main(["models", "--project", str(tiny_project.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [row] = data["starters"]
    assert row["name"] == NAME and row["installed"] and row["fits_project"] is False
    assert row["scores"]["dice"]["EX"] == 0.4
    assert [m["name"] for m in data["project"]["models"]] == ["mine"]
    assert main(["models", "--project", str(bundled_sample)]) == 0
    out = capsys.readouterr().out
    assert "fits this project" in out and "none trained yet" in out


def test_the_registry_imports_no_torch():
    code = ("import sys; from training_backend.learning import starters; "
            "starters.starters(); starters.fitting_starters(['MA']); "
            "import training_backend.cli.models; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


REAL = starters.STARTERS_DIR / NAME


def _real_model() -> Path:
    """The shipped starter's model file, as its card names it."""
    card = REAL / "card.json"
    name = json.loads(card.read_text(encoding="utf-8")).get("model_file") if card.is_file() else None
    return REAL / (name or starters.MODEL_FILE)


@pytest.mark.skipif(not _real_model().is_file(),
                    reason="the fundus-starter weights are not installed (run "
                           "scripts/train_fundus_starter.py --install)")
def test_the_shipped_fundus_starter(bundled_sample):
    from training_backend.learning.inference import load_model, predict_image

    card = json.loads((REAL / "card.json").read_text(encoding="utf-8"))
    raw = torch.load(_real_model(), weights_only=True)
    assert set(raw) == {"model", "meta"}
    meta = raw["meta"]
    assert card["name"] == NAME and card["classes"] == meta["classes"] == FUNDUS
    assert card["channels"] == meta["in_channels"] and card["image_size"] == meta["image_size"]
    assert card["method"] == meta["method"] and card["model_sha256"] == starters.file_sha256(
        _real_model())
    for field in ("description", "data", "licence", "command", "date", "steps", "scores"):
        assert card.get(field) not in (None, ""), field
    torch.set_num_threads(1)
    project = Project.open(bundled_sample)
    method, cfg = load_model(resolve_checkpoint(project, NAME))
    cid = project.case_ids()[0]
    out = predict_image(method.inference_copy(), project.read_image(cid),
                        meta["in_channels"], cfg.image_size, 1, "cpu")
    assert out["pred"].shape == project.case(cid).shape
    assert out["prob"].shape[0] == len(FUNDUS) + 1 and np.isfinite(out["prob"]).all()
