"""``lesionseg import | export | info | sample`` through the real dispatcher."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from training_backend.project import io
from training_backend.cli import main
from training_backend.project.sample import SAMPLE_CLASSES, create_sample_project, sample_manifest_path
from training_backend.project.store import Project

H, W = 20, 28


def _make_set(root, n_bad_label=0):
    """BUSI-like set: grey images, ';'-separated mask unions, a cls column, odd names."""
    (root / "images").mkdir(parents=True)
    (root / "mask").mkdir()
    rows = []
    expected = {}
    for i, cls in enumerate(["normal", "benign", "malignant", "benign"]):
        name = f"{cls} ({i + 1})"
        img = np.full((H, W), 40 * i, np.uint8)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        m1 = np.zeros((H, W), np.uint8)
        m2 = np.zeros((H, W), np.uint8)
        if cls != "normal":
            m1[2:6, 2:6] = 255
            m2[10:14, 12:20] = 255
        Image.fromarray(m1).save(root / "mask" / f"{name}_mask.png")
        Image.fromarray(m2).save(root / "mask" / f"{name}_mask_1.png")
        cell = f"mask/{name}_mask.png;mask/{name}_mask_1.png"
        rows.append([f"images/{name}.png", cls, cell])
        expected[name] = ((m1 > 0) | (m2 > 0)).astype(np.uint8)
    for j in range(n_bad_label):
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "images" / f"odd {j}.png")
        rows.append([f"images/odd {j}.png", "", "mask/missing.png"])
    path = root / "labels.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "cls", "masks"])
        writer.writerows(rows)
    return path, expected


def _info(project, capsys) -> dict:
    capsys.readouterr()
    assert main(["info", "--project", str(project), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_import_creates_project_and_info_counts(tmp_path, capsys):
    csv_path, expected = _make_set(tmp_path / "busi ü")
    project = tmp_path / "P (1)"
    code = main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:lesion", "--label-col", "cls", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "imported 4 of 4" in out.out
    p = Project.open(project)
    assert p.classes == ["lesion"]
    assert p.image_classes == ["normal", "benign", "malignant"]  # negative first
    for rec in p.cases():
        np.testing.assert_array_equal(p.read_annotation(rec.id)[0], expected[rec.name])
    info = _info(project, capsys)
    assert info["cases"] == 4
    assert info["image_labels"] == {"normal": 1, "benign": 2, "malignant": 1}
    assert info["annotations"] == {"full": 4, "sparse": 0, "none": 0}
    assert info["references"] == 0 and info["predictions"] == 0
    assert main(["info", "--project", str(project)]) == 0
    text = capsys.readouterr().out
    assert "normal 1, benign 2, malignant 1" in text and "full 4" in text


def test_partial_import_exits_nonzero_and_lists_rows(tmp_path, capsys):
    csv_path, _ = _make_set(tmp_path / "d", n_bad_label=2)
    project = tmp_path / "P"
    code = main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:lesion", "--label-col", "cls"])
    out = capsys.readouterr()
    assert code == 1
    assert "imported 4 of 6" in out.out and "2 skipped" in out.out
    assert "skipped row 6:" in out.err and "skipped row 7:" in out.err
    assert "missing.png: mask file not found" in out.err
    assert "importing 6/6" in out.err  # progress line
    assert _info(project, capsys)["cases"] == 4
    # running it again imports nothing new, still reports the bad rows
    assert main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:lesion", "--label-col", "cls", "--quiet"]) == 1
    assert "4 already in the project" in capsys.readouterr().out
    assert _info(project, capsys)["cases"] == 4


def test_missing_column_is_one_error_and_creates_nothing(tmp_path, capsys):
    csv_path, _ = _make_set(tmp_path / "d")
    project = tmp_path / "P"
    code = main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "lesion_mask:lesion", "--label-col", "grade"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "lesion_mask" in err and "grade" in err
    assert str(csv_path) in err
    assert not project.exists()


def test_failed_import_leaves_existing_project_unchanged(tmp_path, capsys):
    csv_path, _ = _make_set(tmp_path / "d")
    project = tmp_path / "P"
    assert main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:lesion", "--label-col", "cls", "--quiet"]) == 0
    index = (project / "index.json").read_text(encoding="utf-8")
    assert main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:lesion", "--label-col", "nope"]) == 2
    assert main(["import", str(csv_path), "--project", str(project),
                 "--mask-col", "masks:other"]) == 2  # not a class of the project
    assert json.loads((project / "index.json").read_text(encoding="utf-8")) == json.loads(index)


def test_all_rows_bad_removes_the_new_project(tmp_path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    (root / "l.csv").write_text("image\nnothere.png\n", encoding="utf-8")
    project = tmp_path / "P"
    assert main(["import", str(root / "l.csv"), "--project", str(project), "--quiet"]) == 1
    assert not project.exists()
    assert "nothere.png: file not found" in capsys.readouterr().err


def test_export_via_cli_and_previous_files_kept(tmp_path, capsys):
    csv_path, expected = _make_set(tmp_path / "d")
    project = tmp_path / "P"
    main(["import", str(csv_path), "--project", str(project), "--mask-col", "masks:lesion",
          "--label-col", "cls", "--quiet"])
    out = tmp_path / "masks out"
    assert main(["export", "--project", str(project), "--out", str(out), "--format", "nifti",
                 "--quiet"]) == 0
    assert "exported 4 mask(s)" in capsys.readouterr().out
    for name, target in expected.items():
        np.testing.assert_array_equal(io.read_mask(out / f"{name}.nii.gz"), target)
    assert main(["export", "--project", str(project), "--out", str(out), "--format", "nifti",
                 "--quiet"]) == 0
    assert len(list(out.glob("*.prev-*.nii.gz"))) == 4
    assert len(list(out.glob("provenance.prev-*.csv"))) == 1
    assert main(["export", "--project", str(project), "--out", str(tmp_path / "none"),
                 "--source", "prediction", "--quiet"]) == 1
    assert "no case has a prediction" in capsys.readouterr().err


def test_folder_and_single_file_import(tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((H, W), i, np.uint8)).save(folder / f"s{i}.png")
    project = tmp_path / "P"
    assert main(["import", str(folder), "--project", str(project), "--quiet"]) == 0
    extra = tmp_path / "extra (x).tif"
    io.write_mask(extra, np.zeros((H, W), np.uint8))
    assert main(["import", str(extra), "--project", str(project), "--quiet"]) == 0
    info = _info(project, capsys)
    assert info["cases"] == 4 and info["annotations"]["none"] == 4
    assert main(["import", str(folder), "--project", str(project),
                 "--label-col", "cls"]) == 2  # label columns need a CSV


def test_sample_verb_and_api(tmp_path, capsys):
    assert main(["sample", "--project", str(tmp_path / "S")]) == 0
    assert "CC BY 4.0" in capsys.readouterr().out
    info = _info(tmp_path / "S", capsys)
    assert info["classes"] == list(SAMPLE_CLASSES)
    assert info["cases"] == 10 and info["annotations"]["full"] == 7
    assert info["image_labels"] == {"no lesion": 3, "lesion": 7}
    ref = create_sample_project(tmp_path / "R", reference=True)
    assert ref.summary()["references"] == 7
    assert all(not r.annotations for r in ref.cases())
    with open(sample_manifest_path(), encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[1:] == ["image", "MA_mask", "HE_mask", "EX_mask", "SE_mask", "dr"]
    assert (sample_manifest_path().parent / "NOTICE").read_text().count("CC BY 4.0") >= 1
    assert main(["sample", "--project", str(tmp_path / "S")]) == 2  # exists: one-line error


@pytest.mark.parametrize("verb, words", [("import", "--mask-col"), ("export", "--format"),
                                         ("info", "--json"), ("sample", "IDRiD")])
def test_help_texts(verb, words, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    assert words in capsys.readouterr().out


def test_unknown_option_is_reported_with_the_verbs_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--project", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
              "--what", "predictions"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lesionseg export" in err and "--source" in err
    assert err.strip().splitlines()[-1] == "lesionseg export: error: unrecognized arguments: --what predictions"
    assert not (tmp_path / "o").exists()
