"""Import (CSV, folder) and export (masks + provenance) against the real project store."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from training_backend.project import io
from training_backend.errors import InputError
from training_backend.project.export import export_masks
from training_backend.project.importer import (check_csv, column_summary, guess_label_column, import_csv,
                                       import_folder, read_csv_table)
from training_backend.project.store import BACKGROUND, Project

H, W = 24, 32
CLASSES = ["MA", "HE"]


def _image(seed: int, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (H, W, 3) if rgb else (H, W)
    return rng.integers(0, 255, shape, dtype=np.uint8)


def _binary(rows: slice, cols: slice, value: int = 255) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[rows, cols] = value
    return m


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def dataset(tmp_path):
    """A small two-class set with awkward names: returns (csv path, expected class maps by stem)."""
    root = tmp_path / "data set (ü)"
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    names = ["case (1)", "bild ä", "case (10)", "normal 2"]
    expected = {}
    rows = []
    for i, name in enumerate(names):
        Image.fromarray(_image(i, rgb=(i == 1))).save(root / "img" / f"{name}.png")
        ma, he = "", ""
        target = np.zeros((H, W), np.uint8)
        if i in (0, 1, 2):
            a = _binary(slice(2, 8), slice(3, 10))
            b = _binary(slice(5, 12), slice(8, 20), value=1)  # overlaps a: HE (later class) wins
            Image.fromarray(a).save(root / "masks" / f"{name}_HE.png")
            he = f"masks/{name}_HE.png"
            target[a > 0] = 2
            if i != 1:  # bild ä has no MA: empty cell = absent
                Image.fromarray(b).save(root / "masks" / f"{name}_MA.png")
                extra = _binary(slice(18, 22), slice(25, 30))
                Image.fromarray(extra).save(root / "masks" / f"{name}_MA_1.png")
                ma = f"masks/{name}_MA.png;masks/{name}_MA_1.png"  # union of two files
                target[(b > 0) | (extra > 0)] = 1
                target[a > 0] = 2
        expected[name] = target if (ma or he) else None
        label = "normal" if i == 3 else "lesion"
        rows.append([f"img/{name}.png", ma, he, label])
    csv_path = write_csv(root / "labels.csv", ["image", "MA_mask", "HE_mask", "grade"], rows)
    return csv_path, expected


@pytest.fixture
def project(tmp_path):
    return Project.create(tmp_path / "proj", classes=CLASSES, image_classes=["normal", "lesion"])


MASK_COLS = [("MA_mask", "MA"), ("HE_mask", "HE")]


def _index_state(project):
    project.refresh()
    return [(r.id, r.name, r.image_label, len(r.annotations), r.has_reference)
            for r in project.cases()]


# --------------------------------------------------------------------------- import_csv


def test_import_csv_masks_labels_union_and_overlap(project, dataset):
    csv_path, expected = dataset
    calls = []
    report = import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade",
                        on_progress=lambda i, n: calls.append((i, n)))
    assert report.ok and len(report.imported) == 4 and report.n_rows == 4
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for rec in project.cases():
        assert rec.name in expected
        img = project.read_image(rec.id)
        assert img.shape[:2] == (H, W)
        assert rec.source.endswith(f"{rec.name}.png")
        got = project.read_annotation(rec.id)
        if expected[rec.name] is None:
            assert got is None and rec.image_label == "normal"
            assert project.presence_target(rec) == [0, 0]
        else:
            mask, av = got
            np.testing.assert_array_equal(mask, expected[rec.name])
            assert av.kind == "full" and av.author == "import"
            assert av.source.startswith("import:") and "_HE.png" in av.source
            assert rec.image_label == "lesion" and not rec.has_reference
    bild = project.find("bild ä")
    assert project.read_image(bild.id).shape == (H, W, 3)
    assert project.presence_target(bild) == [0, 1]  # empty MA cell = MA absent


def test_import_csv_reference_keeps_masks_hidden_and_labels_visible(project, dataset):
    csv_path, expected = dataset
    report = import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade",
                        reference=True)
    assert report.ok
    for rec in project.cases():
        assert rec.annotations == ()  # training sees no mask
        assert rec.image_label == rec.reference_label
        ref = project.read_reference(rec.id)
        if expected[rec.name] is None:
            assert ref is None
        else:
            np.testing.assert_array_equal(ref, expected[rec.name])


def test_import_csv_hide_labels(project, dataset):
    csv_path, _ = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade", reference=True,
               hide_labels=True)
    recs = project.cases()
    assert all(r.image_label is None and r.status == "unlabelled" for r in recs)
    assert sorted(r.reference_label for r in recs) == ["lesion", "lesion", "lesion", "normal"]


def test_import_csv_empty_as_background_presence_and_split(project, dataset):
    csv_path, _ = dataset
    rows = list(csv.reader(open(csv_path, encoding="utf-8")))
    rows[0] += ["MA_present", "subset"]
    extra = [["", "train"], ["0", "holdout"], ["yes", "TEST"], ["", ""]]
    for row, more in zip(rows[1:], extra):
        row += more
    write_csv(csv_path, rows[0], rows[1:])
    report = import_csv(project, csv_path, mask_cols=MASK_COLS, label_col=None,
                        presence_cols=[("MA_present", "MA")], split_col="subset",
                        empty_as_background=True)
    assert report.ok
    recs = {r.name: r for r in project.cases()}
    assert [recs[n].split for n in ("case (1)", "bild ä", "case (10)", "normal 2")] == \
        ["train", "holdout", "holdout", "train"]
    assert recs["bild ä"].presence == {"MA": False}
    mask, _ = project.read_annotation(recs["normal 2"].id)  # all cells empty -> background
    assert mask.max() == 0


def test_bad_rows_are_skipped_and_reported_good_rows_imported(project, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(_image(0)).save(root / "good.png")
    Image.fromarray(_image(1)).save(root / "bad label.png")
    Image.fromarray(_image(2)).save(root / "size (2).png")
    Image.fromarray(_image(3)).save(root / "half.png")
    Image.fromarray(_binary(slice(1, 4), slice(1, 4))).save(root / "m.png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "big.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [
        ["good.png", "m.png", "lesion"],                      # row 2: ok
        ["bad label.png", "m.png", "malignant"],              # row 3: label not a class
        ["size (2).png", "big.png", "lesion"],                # row 4: size mismatch
        ["missing.png", "", ""],                              # row 5: no image
        ["half.png", "m.png;nowhere.png", "lesion"],          # row 6: one mask file missing
        ["broken.png", "", ""],                               # row 7: corrupt image
        ["", "m.png", ""],                                    # row 8: empty image cell
    ]
    csv_path = write_csv(root / "l.csv", ["image", "masks", "cls"], rows)
    report = import_csv(project, csv_path, mask_cols=[("masks", "HE")], label_col="cls")
    assert [project.case(c).name for c in report.imported] == ["good"]
    skipped = {row: (path, problem) for row, path, problem in report.skipped}
    assert sorted(skipped) == [3, 4, 5, 6, 7, 8]
    assert "malignant" in skipped[3][1] and skipped[3][0].endswith("bad label.png")
    assert skipped[4][0].endswith("big.png") and "32x25" in skipped[4][1]
    assert skipped[5][0].endswith("missing.png") and "not found" in skipped[5][1]
    assert skipped[6][0].endswith("nowhere.png")
    assert skipped[7][0].endswith("broken.png")
    assert "empty 'image' cell" in skipped[8][1]
    assert len(project.cases()) == 1  # all-or-nothing: no half-imported rows
    assert not report.ok and report.summary() == "imported 1 of 7, 6 skipped"


def test_csv_preview_guesses_the_label_column_by_content_and_counts_skips(project, tmp_path):
    """BUSI's layout: ``label`` holds 0/1 codes, ``cls`` the class names; the guess is ``cls``,
    and choosing ``label`` is flagged before importing (every row would be skipped)."""
    root = tmp_path / "busi"
    root.mkdir()
    rows = []
    for i in range(5):
        Image.fromarray(_image(i)).save(root / f"im{i}.png")
        rows.append([f"im{i}.png", ["normal", "lesion"][i % 2], i % 2, "train" if i else "bogus"])
    rows.append(["gone.png", "lesion", 1, ""])
    table = read_csv_table(write_csv(root / "labels.csv", ["image", "label", "cls", "split"],
                                     [[r[0], r[2], r[1], r[3]] for r in rows]))
    assert guess_label_column(table, ["normal", "lesion"]) == "cls"
    assert guess_label_column(table, ["benign"]) is None
    assert column_summary(table, "cls") == "normal, lesion (2 distinct)"
    assert column_summary(table, "image") == "im0.png, im1.png, im2.png … (6 distinct)"
    good = check_csv(project, table, "image", label_col="cls")
    assert (good.n_rows, good.n_skipped, good.problems) == (6, 1, {"image file not found": 1})
    assert good.summary() == "6 rows: 5 will be imported, 1 skipped (image file not found: 1)"
    bad = check_csv(project, table, "image", label_col="label", split_col="split")
    assert bad.problems == {"image file not found": 1, "label '0' is not an image class": 3,
                            "label '1' is not an image class": 2}
    assert bad.summary().startswith("6 rows: 0 will be imported, 6 skipped (label '0' is not")
    # what the check predicts is what the import does
    report = import_csv(project, table.path, mask_cols=[], label_col="cls", split_col="split")
    assert len(report.imported) == 4 and len(report.skipped) == 2  # + the bad split value
    assert check_csv(project, table, "image", label_col="cls", split_col="split").n_skipped == 2


def test_missing_columns_and_unknown_classes_import_nothing(project, dataset):
    csv_path, _ = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade")
    before = _index_state(project)
    with pytest.raises(InputError) as info:
        import_csv(project, csv_path, mask_cols=[("EX_mask", "HE"), ("masks", "MA")],
                   label_col="label")
    message = str(info.value)
    assert message.startswith(str(csv_path))
    assert "'EX_mask', 'masks', 'label'" in message and "header has: image" in message
    with pytest.raises(InputError, match="'SE' .* not a lesion class"):
        import_csv(project, csv_path, mask_cols=[("MA_mask", "SE")])
    assert _index_state(project) == before


def test_all_rows_bad_leaves_existing_project_unchanged(project, dataset):
    csv_path, _ = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade")
    before = _index_state(project)
    Image.fromarray(_image(9)).save(csv_path.parent / "img" / "fresh.png")
    bad = write_csv(csv_path.parent / "bad.csv", ["image", "grade"],
                    [["img/nope.png", "lesion"], ["img/fresh.png", "unknown grade"]])
    report = import_csv(project, bad, mask_cols=[], label_col="grade")
    assert report.imported == [] and len(report.skipped) == 2
    assert _index_state(project) == before
    assert _index_state(Project.open(project.path)) == before


def test_reimport_skips_duplicates(project, dataset):
    csv_path, _ = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS)
    report = import_csv(project, csv_path, mask_cols=MASK_COLS)
    assert report.ok and report.imported == [] and len(report.duplicates) == 4
    assert len(project.case_ids()) == 4


def test_write_failure_mid_row_leaves_no_half_case_and_reimport_completes(project, dataset, monkeypatch):
    csv_path, expected = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade")
    keep = _index_state(project)
    # a fresh set whose third mask write fails (disk full): the import stops with the error
    root = csv_path.parent
    rows = []
    for i in range(4):
        Image.fromarray(_image(20 + i)).save(root / "img" / f"new {i}.png")
        Image.fromarray(_binary(slice(2, 9), slice(3, 12))).save(root / "masks" / f"new {i}.png")
        rows.append([f"img/new {i}.png", f"masks/new {i}.png", "", "lesion"])
    fresh = write_csv(root / "fresh.csv", ["image", "MA_mask", "HE_mask", "grade"], rows)
    real_save, calls = Project.save_annotation, []

    def failing_save(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, *a, **kw)

    monkeypatch.setattr(Project, "save_annotation", failing_save)
    with pytest.raises(OSError):
        import_csv(project, fresh, mask_cols=MASK_COLS, label_col="grade")
    monkeypatch.setattr(Project, "save_annotation", real_save)
    state = _index_state(Project.open(project.path))
    assert state[: len(keep)] == keep  # earlier work untouched
    assert [n for (_, n, _, _, _) in state[len(keep):]] == ["new 0", "new 1"]  # whole rows only
    assert all(n_ann == 1 for (_, _, _, n_ann, _) in state[len(keep):])
    # running the import again brings in the rest, masks included
    report = import_csv(project, fresh, mask_cols=MASK_COLS, label_col="grade")
    assert len(report.imported) == 2 and len(report.duplicates) == 2
    final = _index_state(Project.open(project.path))
    assert [n for (_, n, _, _, _) in final[len(keep):]] == ["new 0", "new 1", "new 2", "new 3"]
    assert all(n_ann == 1 for (_, _, _, n_ann, _) in final[len(keep):])


def test_discard_new_case_refuses_annotated_cases(project):
    from training_backend.errors import ProjectError

    cid = project.add_case(_image(1), "a")
    other = project.add_case(_image(2), "b")
    project.save_annotation(other, _binary(slice(1, 4), slice(1, 4), value=1), "full")
    with pytest.raises(ProjectError, match="annotations"):
        project.discard_new_case(other)
    project.discard_new_case(cid)
    assert Project.open(project.path).case_ids() == [other]


def test_import_csv_class_map_column(project, tmp_path):
    Image.fromarray(_image(5)).save(tmp_path / "a.png")
    class_map = np.zeros((H, W), np.uint8)
    class_map[:5] = 1
    class_map[-5:] = 2
    io.write_mask(tmp_path / "a_labels.nii.gz", class_map)
    csv_path = write_csv(tmp_path / "l.csv", ["image", "labels"], [["a.png", "a_labels.nii.gz"]])
    report = import_csv(project, csv_path, mask_cols=[("labels", None)])
    assert report.ok
    np.testing.assert_array_equal(project.read_annotation(report.imported[0])[0], class_map)


def test_csv_with_bom_and_semicolons(project, tmp_path):
    Image.fromarray(_image(6)).save(tmp_path / "x (1).png")
    (tmp_path / "l.csv").write_text("\ufeffimage;grade\nx (1).png;normal\n", encoding="utf-8")
    report = import_csv(project, tmp_path / "l.csv", mask_cols=[], label_col="grade")
    assert report.ok and project.case(report.imported[0]).image_label == "normal"


# --------------------------------------------------------------------------- import_folder


def test_import_folder_natural_order_and_skips(project, tmp_path):
    folder = tmp_path / "scans (a)"
    folder.mkdir()
    for name in ["img10.png", "img2.png", "img1.tif"]:
        io.write_mask(folder / name, _binary(slice(0, 3), slice(0, 3)))
    (folder / "readme.txt").write_text("not an image")
    (folder / "bad.png").write_bytes(b"nope")
    report = import_folder(project, folder)
    assert [project.case(c).name for c in report.imported] == ["img1", "img2", "img10"]
    assert [(r, p.rsplit("/", 1)[-1]) for r, p, _ in report.skipped] == [(1, "bad.png")]
    assert all(r.status == "unlabelled" for r in project.cases())


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("tiff", ".tif"),
                                         ("nifti", ".nii.gz"), ("zarr", ".zarr")])
def test_import_then_export_is_pixel_exact(project, dataset, tmp_path, fmt, suffix):
    csv_path, expected = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade")
    out = tmp_path / "export (é)"
    report = export_masks(project, out, fmt=fmt)
    assert len(report.exported) == 3 and [c for c, _ in report.skipped] == \
        [project.find("normal 2").id]
    for name, target in expected.items():
        if target is None:
            assert not (out / f"{name}{suffix}").exists()
            continue
        np.testing.assert_array_equal(io.read_mask(out / f"{name}{suffix}", 2), target)
    with open(out / "provenance.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["name"] for r in rows} == {"case (1)", "bild ä", "case (10)"}
    assert all(r["kind"] == "full" and r["author"] == "import" and r["version"] == "1"
               for r in rows)
    meta = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert meta["classes"] == {"1": "MA", "2": "HE"} and meta["file_format"] == fmt
    assert len(meta["cases"]) == 3


def test_export_viewable_values_binary_and_colour_with_sidecars(project, tmp_path):
    Image.fromarray(_image(3)).save(tmp_path / "scan.png")
    import_folder(project, tmp_path)
    (cid,) = project.case_ids()
    sparse = np.zeros((H, W), np.uint8)
    sparse[0:2] = BACKGROUND                    # painted background
    sparse[5:7, 5:7] = 1                        # MA
    sparse[10:12, 10:12] = 2                    # HE
    project.save_annotation(cid, sparse, "sparse")
    project.update_meta(colors={"MA": "#ff0000", "HE": "#00ff80"})

    binary = export_masks(project, tmp_path / "bin", values="binary")
    got = io.read_image(binary.exported[0][1])
    expected = np.zeros((H, W), np.uint8)
    expected[5:7, 5:7] = expected[10:12, 10:12] = 255   # every lesion class white, bg black
    np.testing.assert_array_equal(got, expected)
    meta = json.loads((tmp_path / "bin" / "provenance.json").read_text(encoding="utf-8"))
    assert meta["values"] == "binary" and set(meta["pixel_values"]) == {"0", "255"}

    colour = export_masks(project, tmp_path / "rgb", fmt="tiff", values="color")
    rgb = io.read_image(colour.exported[0][1])
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert rgb[5, 5].tolist() == [255, 0, 0] and rgb[10, 10].tolist() == [0, 255, 128]
    assert rgb[0, 0].tolist() == [64, 64, 64] and rgb[20, 20].tolist() == [0, 0, 0]
    meta = json.loads((tmp_path / "rgb" / "provenance.json").read_text(encoding="utf-8"))
    assert meta["values"] == "color"
    assert meta["pixel_values"]["#ff0000"] == "MA" and meta["pixel_values"]["#00ff80"] == "HE"

    assert export_masks(project, tmp_path / "idx").summary().startswith("exported 1")
    assert json.loads((tmp_path / "idx" / "provenance.json").read_text())["values"] == "index"
    for fmt in ("nifti", "zarr"):                # RGB has no place in a label volume
        with pytest.raises(InputError, match="png or tiff"):
            export_masks(project, tmp_path / fmt, fmt=fmt, values="color")
    with pytest.raises(InputError, match="unknown mask values"):
        export_masks(project, tmp_path / "x", values="rainbow")
    assert not (tmp_path / "nifti").exists() and not (tmp_path / "x").exists()


def test_export_keeps_previous_files_and_handles_sparse_and_collisions(project, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(_image(7)).save(tmp_path / sub / "same.png")
    import_folder(project, tmp_path / "a")
    import_folder(project, tmp_path / "b")
    c1, c2 = project.case_ids()
    sparse = np.zeros((H, W), np.uint8)
    sparse[0:2] = BACKGROUND
    sparse[5:7, 5:7] = 2
    project.save_annotation(c1, sparse, "sparse", author="dr x")
    project.save_annotation(c2, _binary(slice(0, 4), slice(0, 4), value=1), "full")
    out = tmp_path / "out"
    first = export_masks(project, out, fmt="png")
    names = sorted(p.name for _, p in first.exported)
    assert names == [f"same_{c1}.png", f"same_{c2}.png"]  # stems collide -> case id appended
    np.testing.assert_array_equal(io.read_image(out / f"same_{c1}.png"), sparse)  # 255 kept
    meta = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert meta["pixel_values"]["255"].startswith("background painted")
    assert [c["kind"] for c in meta["cases"]] == ["sparse", "full"]
    old = (out / f"same_{c1}.png").read_bytes()
    project.save_annotation(c1, np.zeros((H, W), np.uint8), "full")
    second = export_masks(project, out, fmt="png")
    kept = {p.name for p in second.kept}
    assert len(kept) == 4  # two masks + two sidecars
    prev = [p for p in second.kept if p.name.startswith(f"same_{c1}.prev-")]
    assert len(prev) == 1 and prev[0].read_bytes() == old
    assert io.read_mask(out / f"same_{c1}.png", 2).max() == 0


def test_export_predictions_and_reference(project, dataset, tmp_path):
    csv_path, expected = dataset
    import_csv(project, csv_path, mask_cols=MASK_COLS, label_col="grade", reference=True)
    cid = project.find("case (1)").id
    k = len(CLASSES)
    pred = np.zeros((H, W), np.uint8)
    pred[3:9, 3:9] = 1
    prob = np.full((k + 1, H, W), 1 / (k + 1), np.float32)
    project.write_outputs(cid, "m1", pred, prob, np.zeros((k, H, W), np.float32),
                          np.zeros((H, W), np.float32), scores={})
    report = export_masks(project, tmp_path / "p", fmt="tiff", source="prediction")
    assert [c for c, _ in report.exported] == [cid]
    np.testing.assert_array_equal(io.read_mask(tmp_path / "p" / "case (1).tif", 2), pred)
    rows = list(csv.DictReader(open(tmp_path / "p" / "provenance.csv", encoding="utf-8")))
    assert rows[0]["model_id"] == "m1" and rows[0]["kind"] == "prediction"
    assert export_masks(project, tmp_path / "a", source="annotation").exported == []
    ref = export_masks(project, tmp_path / "r", source="reference")
    assert len(ref.exported) == 3
    np.testing.assert_array_equal(io.read_mask(tmp_path / "r" / "bild ä.png", 2),
                                  expected["bild ä"])


def test_export_rejects_unknown_format(project, tmp_path):
    with pytest.raises(InputError, match="unknown export format 'bmp'"):
        export_masks(project, tmp_path / "o", fmt="bmp")
