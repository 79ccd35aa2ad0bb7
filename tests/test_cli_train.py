"""``lesionseg train | predict | evaluate | methods`` end to end on the tiny project."""
from __future__ import annotations

import io
import json


from training_backend.cli import main
from training_backend.cli.train import ProgressPrinter
from training_backend.events import Finished, Loss, Progress, Started, Validation
from training_backend.project.store import Project

TINY = ["--image-size", "32", "--batch-size", "2", "--base", "4", "--threads", "1",
        "--mc-samples", "2", "--validate-every", "5"]


def test_methods_lists_names_needs_and_descriptions(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("supervised", "cam", "mean_teacher"):
        assert name in out
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["cam"]["requires"] == ["image_label"] and rows["supervised"]["description"]
    assert "unlabelled images" in rows["mean_teacher"]["learns_from"]


def test_train_predict_evaluate_end_to_end(tiny_project, capsys):
    p = str(tiny_project.path)
    assert main(["train", "--project", p, "--steps", "10", "--model-id", "cli", *TINY]) == 0
    cap = capsys.readouterr()
    last = cap.out.strip().splitlines()[-1]
    assert last.startswith("model cli (steps at step 10) checkpoint ") and last.endswith("step_000010.pt")
    assert "training cli: method supervised on cpu" in cap.err and "step 10/10" in cap.err
    assert "predictions written for 10 cases" in cap.err

    project = Project.open(p)
    first = {cid: project.output_record(cid).output_id for cid in project.case_ids()}
    assert main(["predict", "--project", p, "--cases", "c000002,case 03 (full)"]) == 0
    assert "wrote predictions for 2 cases" in capsys.readouterr().out
    project.refresh()
    changed = {cid for cid in first if project.output_record(cid).output_id != first[cid]}
    assert changed == {"c000002", "c000003"}

    assert main(["evaluate", "--project", p, "--json", "--split", "holdout"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_cases"] == 2 and result["split"] == "holdout" and "lesion" in result["per_class"]
    assert main(["evaluate", "--project", p]) == 0
    assert "Dice" in capsys.readouterr().out

    # resume a finished model: nothing left to do, same step
    assert main(["train", "--project", p, "--resume", "--model-id", "cli", "--no-predict"]) == 0
    assert "(steps at step 10)" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tiny_project, tmp_path, capsys):
    p = str(tiny_project.path)
    assert main(["train", "--project", p, "--method", "nope", "--steps", "1", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lesionseg train: error:") and "nope" in err[-1]
    assert main(["train", "--project", str(tmp_path / "missing"), "--steps", "1"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["predict", "--project", p]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert main(["train", "--project", p, "--option", "novalue", "--steps", "1"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["train", "--project", p, "--steps", "3", "--budget-s", "0"]) == 2  # both: fine,
    assert "budget_s" in capsys.readouterr().err               # but each must be valid


def test_progress_printer_without_a_terminal():
    buf = io.StringIO()
    printer = ProgressPrinter(buf)
    printer(Started("m", "supervised", "cpu", 5, 1, 100, None))
    for step in range(1, 101):
        printer(Loss(step, {"loss": 1.0 / step}))
        if step == 50:
            printer(Validation(step, 0.5, {"lesion": 0.5}))
        printer(Progress(step, 100, step * 0.1, step / 100))
    printer(Finished("m", 100, "steps", "x.pt"))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("training m: method supervised on cpu, 5 training / 1 validation")
    assert 10 <= len(lines) <= 12  # one line per 10 % when not a terminal
    assert "step 100/100" in lines[-1] and "dice 0.500" in lines[-1] and "loss 0.0100" in lines[-1]
