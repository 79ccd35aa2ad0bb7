"""The file-format registry: every reader and writer, the CLI, the export panel and the napari
manifest read it; every exportable format round-trips through the export panel's list."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from training_backend.project import formats, io
from training_backend.errors import InputError

MANIFEST = Path(__file__).resolve().parent.parent / "napari_lesionseg" / "napari.yaml"


def test_the_manifest_repeats_the_registry():
    manifest = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))["contributions"]
    [reader] = manifest["readers"]
    [writer] = manifest["writers"]
    assert reader["filename_patterns"] == formats.napari_reader_patterns()
    assert writer["filename_extensions"] == formats.napari_writer_suffixes()
    # napari reads PNG/JPEG/TIFF/zarr itself: only what it lacks is claimed
    assert {f.name for f in formats.FORMATS.values() if not f.napari_reads} == {"dicom", "nifti"}


def test_io_tables_and_cli_choices_come_from_the_registry():
    from training_backend.cli import build_parser

    assert io.MASK_FORMATS == {"png": ".png", "tiff": ".tif", "nifti": ".nii.gz", "zarr": ".zarr"}
    assert set(io.SUFFIX_FORMATS.values()) == set(formats.FORMATS)
    args = ["export", "--project", "P", "--out", "OUT"]
    assert build_parser().parse_args(args).format == "png"
    for name in formats.export_formats():
        assert build_parser().parse_args(args + ["--format", name]).format == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--format", "jpeg"])  # read, never written


@pytest.mark.parametrize("name", list(formats.mask_formats()))
def test_every_mask_writer_round_trips(tmp_path, name):
    fmt = formats.FORMATS[name]
    mask = np.zeros((13, 21), np.uint8)  # not square: a transposed layout would show
    mask[2:6, 3:15] = 2
    mask[8:12, 1:4] = 255
    path = tmp_path / f"m{fmt.suffix}"
    io.write_mask(path, mask)  # the format from the suffix
    assert io.image_format(path) == name
    np.testing.assert_array_equal(io.read_mask(path, n_classes=255), mask)


def test_names_suffixes_and_content(tmp_path):
    assert formats.from_name("TIF").name == "tiff" and formats.from_name("nii.gz").name == "nifti"
    assert formats.from_name("bmp") is None
    assert formats.from_path("a (1).NII.GZ").name == "nifti"
    assert formats.from_path("x.ome.tif").name == "tiff"
    assert io.file_stem("a (1).nii.gz") == "a (1)" and io.file_stem("1.2.840.5") == "1.2.840.5"
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(formats.FORMATS["png"])
    with pytest.raises(ValueError, match="belong to another format"):
        formats.register(formats.FileFormat("png2", "PNG2", (".png",), read=lambda p, m: None))
    with pytest.raises(InputError, match="expected PNG, JPEG, TIFF, DICOM, NIfTI"):
        (tmp_path / "notes.xyz").write_text("x")
        io.read_image(tmp_path / "notes.xyz")


@pytest.mark.gui
def test_every_exportable_format_round_trips_through_the_export_panel(tmp_path, qtbot,
                                                                      tiny_project, monkeypatch):
    """For each entry of the export panel's format list: export the stored masks with it and
    read them back equal."""
    monkeypatch.setenv("LESIONSEG_SYNC", "1")  # the worker runs inline
    from napari_lesionseg._export_panel import ExportPanel
    from napari_lesionseg._state import WorkspaceState

    state = WorkspaceState()
    state.project = tiny_project
    panel = ExportPanel(state)
    qtbot.addWidget(panel)
    listed = list(panel._format.choices)  # noqa: SLF001 - the panel's list is what is tested
    assert listed == list(formats.export_formats())
    annotated = [c for c in tiny_project.case_ids() if tiny_project.case(c).latest is not None]
    for name in listed:
        panel.last_report = None
        panel._format.value = name  # noqa: SLF001
        panel._folder.value = tmp_path / name  # noqa: SLF001
        panel._export_btn.click()  # noqa: SLF001
        report = panel.last_report
        assert report is not None, name
        assert [c for c, _ in report.exported] == annotated, name
        for cid, path in report.exported:
            assert io.image_format(path) == name and path.name.endswith(formats.FORMATS[name].suffix)
            stored, _ = tiny_project.read_annotation(cid)
            np.testing.assert_array_equal(io.read_mask(path, n_classes=255), stored,
                                          err_msg=f"{name}: {path.name}")
