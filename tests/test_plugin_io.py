"""napari contributions without a viewer: reader, writer, sample data, lazy package exports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_lesionseg._reader import get_reader, read_images, read_project
from napari_lesionseg._sample_data import make_sample_data
from napari_lesionseg._writer import write_labels
from training_backend.project import io
from training_backend.errors import InputError


def test_reader_opens_project_first_case_with_latest_annotation(tiny_project):
    path = str(tiny_project.path)
    reader = get_reader(path)
    assert reader is read_project
    layers = reader(path)
    assert [kind for _d, _m, kind in layers] == ["image", "labels"]
    (image, image_meta, _), (mask, mask_meta, _) = layers
    first = tiny_project.case_ids()[0]
    np.testing.assert_array_equal(image, tiny_project.read_image(first))
    saved, version = tiny_project.read_annotation(first)
    np.testing.assert_array_equal(mask, saved)
    assert mask_meta["name"] == "annotation"
    assert mask_meta["metadata"]["kind"] == version.kind == "full"
    assert mask_meta["metadata"]["case_id"] == first
    assert mask_meta["colormap"][1] == tiny_project.colors["lesion"]
    assert image_meta["rgb"] is False
    # project.json works too
    assert get_reader(str(tiny_project.path / "project.json")) is read_project


def test_reader_plain_images_and_refusals(tmp_path, tiny_project):
    png = tmp_path / "scan (1).png"
    io.write_mask(png, (np.arange(64 * 64).reshape(64, 64) % 7).astype(np.uint8), "png")
    reader = get_reader(str(png))
    assert reader is read_images
    [(data, meta, kind)] = reader(str(png))
    assert kind == "image" and data.shape == (64, 64) and meta["name"] == "scan (1)"
    np.testing.assert_array_equal(data, io.read_image(png))
    # not ours: unknown suffix, plain folder, missing file
    (tmp_path / "notes.xyz").write_text("x")
    assert get_reader(str(tmp_path / "notes.xyz")) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "missing.png")) is None
    assert get_reader([str(png), str(tmp_path / "notes.xyz")]) is None


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nii.gz"])
def test_writer_round_trip(tmp_path, suffix):
    mask = np.zeros((40, 30), np.uint8)
    mask[5:15, 3:9] = 2
    mask[20:25, 10:20] = 255
    target = tmp_path / f"mask{suffix}"
    written = write_labels(str(target), mask, {})
    assert written == [str(target)]
    back = io.read_mask(target, n_classes=255)
    np.testing.assert_array_equal(back, mask)


def test_writer_refuses_what_is_not_a_mask(tmp_path):
    with pytest.raises(InputError, match="2-D"):
        write_labels(str(tmp_path / "m.png"), np.zeros((2, 4, 4), np.uint8), {})
    with pytest.raises(InputError, match="0..255"):
        write_labels(str(tmp_path / "m.png"), np.full((4, 4), 300, np.int32), {})


def test_sample_data_is_an_image_with_its_lesion_mask():
    layers = make_sample_data()
    (image, image_meta, k1), (mask, mask_meta, k2) = layers
    assert (k1, k2) == ("image", "labels")
    assert image.ndim == 3 and image.shape[-1] == 3 and image_meta["rgb"]
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    values = set(np.unique(mask).tolist())
    assert values <= {0, 1, 2, 3, 4} and len(values) >= 2  # background plus some lesion class
    assert mask_meta["metadata"]["classes"] == ["MA", "HE", "EX", "SE"]


def test_package_exports_are_lazy_and_torch_free():
    code = ("import sys, napari_lesionseg as n; assert 'qtpy' not in sys.modules; "
            "import napari_lesionseg._widget; n.LesionWorkspace; n.get_reader; "
            "assert 'torch' not in sys.modules, 'the GUI imported torch'; print(n.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.1.0"


def test_installed_manifest_validates_with_its_imports():
    """What `npe2 validate napari-lesionseg --imports` checks: the manifest napari finds through
    the entry point parses, and every command's python_name imports."""
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-lesionseg")
    assert pm.name == "napari-lesionseg"
    assert {c.id.split(".")[-1] for c in pm.contributions.commands} == {
        "get_reader", "write_labels", "make_sample_data", "make_workspace"}
    pm.validate_imports()  # raises if a python_name does not resolve
    assert [w.display_name for w in pm.contributions.widgets] == ["Lesion workspace"]


def test_reader_claims_only_projects_and_the_medical_formats(tmp_path, tiny_project):
    """napari offers our reader for project folders, DICOM and NIfTI only: a PNG keeps
    napari's own reader alone (no "choose a reader" question), a .txt is never offered to us."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()

    def ours(path) -> bool:
        return "napari-lesionseg" in {r.plugin_name for r in pm.iter_compatible_readers([str(path)])}

    for name in ("scan.png", "photo.JPG", "slide.tif", "notes.txt", "table.csv", "other.json"):
        (tmp_path / name).write_bytes(b"x")
        assert not ours(tmp_path / name), name
    for name in ("ct.dcm", "brain.nii", "brain.nii.gz", "study.DCM"):
        (tmp_path / name).write_bytes(b"x")
        assert ours(tmp_path / name), name
    assert ours(tiny_project.path) and ours(tiny_project.path / "project.json")
    assert get_reader(str(tmp_path)) is None   # a plain folder is offered, then declined
