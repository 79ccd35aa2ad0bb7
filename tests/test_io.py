"""File I/O: every format reads back what was written; every bad input is one clear error."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from training_backend.project import io
from training_backend.errors import InputError

ODD_NAMES = ["plain", "with space (1)", "nön-äscii ü"]


def _mask(h=20, w=30, k=3) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = 1
    m[10:14, 1:5] = min(2, k)
    m[15:18, 20:28] = k
    return m


def make_dicom(path, arr, photometric="MONOCHROME2", slope=None, intercept=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(arr, photometric_interpretation=photometric,
                      bits_stored=arr.dtype.itemsize * 8)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- masks: round trip


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".nii", ".nii.gz", ".zarr"])
@pytest.mark.parametrize("stem", ODD_NAMES)
def test_write_mask_round_trip(tmp_path, suffix, stem):
    folder = tmp_path / "out (ä)"
    folder.mkdir()
    mask = _mask()
    path = io.write_mask(folder / f"{stem}{suffix}", mask)
    back = io.read_mask(path, n_classes=3)
    assert back.dtype == np.uint8 and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    # overwriting replaces the content and leaves no temporary files behind
    io.write_mask(path, np.zeros_like(mask))
    assert io.read_mask(path, 3).max() == 0
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("tiff", ".tif"), ("nifti", ".nii.gz"),
                                         ("zarr", ".zarr")])
def test_write_mask_explicit_format_and_sparse_values(tmp_path, fmt, suffix):
    mask = _mask()
    mask[0, :] = 255  # sparse masks keep 255 = painted background
    path = io.write_mask(tmp_path / f"m{suffix}", mask, fmt=fmt)
    raw = io.read_image(path)  # raw values, no mask interpretation
    np.testing.assert_array_equal(raw, mask)


def test_write_mask_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.png"
    io.write_mask(path, _mask())
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        io.write_mask(path, np.zeros((20, 30), np.uint8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # temporary file removed


def test_write_mask_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        io.write_mask(tmp_path / "a.png", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError):
        io.write_mask(tmp_path / "a.png", np.full((2, 3), 300, np.int32))
    with pytest.raises(InputError, match="cannot tell the mask format"):
        io.write_mask(tmp_path / "a.bmp", np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError, match="output folder does not exist"):
        io.write_mask(tmp_path / "missing" / "a.png", np.zeros((2, 3), np.uint8))


# --------------------------------------------------------------------------- images: formats


def test_png_grey_rgb_16bit_and_opaque_rgba(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    deep = rng.integers(0, 65535, (20, 30), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(deep).save(tmp_path / "d.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "a.png")
    for name, expected in [("g.png", grey), ("c.png", rgb), ("d.png", deep), ("a.png", rgb)]:
        got = io.read_image(tmp_path / name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected)


def test_jpeg_reads_as_rgb_uint8(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "x y (2).JPG", quality=95)
    got = io.read_image(tmp_path / "x y (2).JPG")
    assert got.shape == (16, 24, 3) and got.dtype == np.uint8
    assert abs(int(got[..., 0].mean()) - 200) < 3


def test_tiff_16bit_float_and_planar_rgb(tmp_path):
    deep = (np.arange(20 * 30).reshape(20, 30) * 70).astype(np.uint16)
    flt = np.linspace(-1, 1, 600, dtype=np.float64).reshape(20, 30)
    planar = np.stack([np.full((20, 30), v, np.uint8) for v in (10, 20, 30)])  # (3, H, W)
    tifffile.imwrite(tmp_path / "d.tif", deep)
    tifffile.imwrite(tmp_path / "f.tiff", flt)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(io.read_image(tmp_path / "d.tif"), deep)
    got = io.read_image(tmp_path / "f.tiff")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, flt, rtol=1e-6)
    got = io.read_image(tmp_path / "p.tif")
    assert got.shape == (20, 30, 3) and tuple(got[0, 0]) == (10, 20, 30)


def test_dicom_rescale_monochrome1_rgb_and_no_suffix(tmp_path):
    raw = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)
    got = io.read_image(make_dicom(tmp_path / "ct.dcm", raw, slope=2, intercept=-100))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, raw.astype(np.float32) * 2 - 100)
    plain = io.read_image(make_dicom(tmp_path / "plain.dcm", raw))
    assert plain.dtype == np.uint16
    np.testing.assert_array_equal(plain, raw)
    inverted = io.read_image(make_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, raw.max() - raw)  # bright = high
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[..., 1] = 77
    np.testing.assert_array_equal(io.read_image(make_dicom(tmp_path / "rgb.dcm", rgb,
                                                           photometric="RGB")), rgb)
    no_suffix = make_dicom(tmp_path / "IM0001", raw)
    assert io.image_format(no_suffix) == "dicom"
    np.testing.assert_array_equal(io.read_image(no_suffix), raw)


def test_nifti_transpose_convention_and_singleton_squeeze(tmp_path):
    data = np.arange(30 * 20, dtype=np.int16).reshape(30, 20)  # (x=i, y=j)
    nib.save(nib.Nifti1Image(data[:, :, None], np.eye(4)), tmp_path / "s (1).nii.gz")
    got = io.read_image(tmp_path / "s (1).nii.gz")
    assert got.shape == (20, 30) and got.dtype == np.float32
    np.testing.assert_array_equal(got, data.T)  # image[row, col] = data[col, row]
    # a mask written by write_mask lines up with the NIfTI image's voxels
    mask = (got > 300).astype(np.uint8)
    io.write_mask(tmp_path / "m.nii.gz", mask)
    on_disk = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    np.testing.assert_array_equal(on_disk, (data > 300).astype(np.uint8))


def test_zarr_array_and_ome_style_group(tmp_path):
    img = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=img.shape, dtype="uint16",
                            chunks=(10, 10))
    arr[...] = img
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.zarr"), img)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    level0 = group.create_array("0", shape=(1, 3, 20, 30), dtype="uint8")  # (T, C, Y, X)
    level0[...] = 7
    got = io.read_image(tmp_path / "g.zarr")
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    # an array inside a store, addressed by its folder (no .zarr suffix)
    sub = zarr.open_group(str(tmp_path / "store.zarr"), mode="w").create_array(
        "images/c1", shape=(4, 5), dtype="uint8")
    sub[...] = 3
    assert io.read_image(tmp_path / "store.zarr" / "images" / "c1").sum() == 60


# --------------------------------------------------------------------------- images: errors


def _bad_inputs(tmp_path):
    """(file, expected words in the problem) for each kind of bad input."""
    cases = []
    cases.append((tmp_path / "missing (1).png", "not found"))
    (tmp_path / "notes.txt").write_text("hello")
    cases.append((tmp_path / "notes.txt", "unsupported file type"))
    (tmp_path / "empty.png").write_bytes(b"")
    cases.append((tmp_path / "empty.png", "empty file"))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png" * 10)
    cases.append((tmp_path / "garbage.png", "not a valid PNG"))
    Image.fromarray(np.zeros((64, 64), np.uint8) + 9).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc ü.png").write_bytes(data[: len(data) // 2])
    cases.append((tmp_path / "trunc ü.png", "truncated"))
    tifffile.imwrite(tmp_path / "t.tif", np.ones((64, 64), np.uint16))
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    cases.append((tmp_path / "trunc.tif", "TIFF"))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    cases.append((tmp_path / "rgba.png", "transparent"))
    nan = np.zeros((8, 8), np.float32)
    nan[1, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    cases.append((tmp_path / "nan.tif", "NaN"))
    inf = np.zeros((8, 8), np.float32)
    inf[2, 2] = np.inf
    nib.save(nib.Nifti1Image(inf, np.eye(4)), tmp_path / "inf.nii")
    cases.append((tmp_path / "inf.nii", "infinite"))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 8, 8), np.uint8))
    cases.append((tmp_path / "stack.tif", "stack"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), tmp_path / "vol.nii.gz")
    cases.append((tmp_path / "vol.nii.gz", "volume"))
    z = zarr.create_array(str(tmp_path / "4d.zarr"), shape=(2, 2, 8, 8), dtype="uint8")
    z[...] = 1
    cases.append((tmp_path / "4d.zarr", "dimensions"))
    zarr.create_array(str(tmp_path / "empty.zarr"), shape=(0, 8), dtype="uint8")
    cases.append((tmp_path / "empty.zarr", "empty image"))
    (tmp_path / "plain folder").mkdir()
    cases.append((tmp_path / "plain folder", "folder"))
    (tmp_path / "fake.dcm").write_bytes(b"not dicom" * 30)
    cases.append((tmp_path / "fake.dcm", "not a DICOM"))
    make_dicom(tmp_path / "multi.dcm", np.zeros((2, 8, 8), np.uint16))
    cases.append((tmp_path / "multi.dcm", "multi-frame"))
    make_dicom(tmp_path / "ok.dcm", np.zeros((8, 8), np.uint16))
    data = (tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[:-60])
    cases.append((tmp_path / "trunc.dcm", "truncated"))
    return cases


def test_each_bad_input_is_one_line_naming_the_file(tmp_path):
    for path, words in _bad_inputs(tmp_path):
        with pytest.raises(InputError) as info:
            io.read_image(path)
        message = str(info.value)
        assert message.startswith(str(path)), message
        assert words.lower() in message.lower(), message
        assert "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        io.read_image(path)


# --------------------------------------------------------------------------- masks: reading


def test_read_mask_binary_rgb_palette_and_bool(tmp_path):
    binary = np.zeros((10, 12), np.uint8)
    binary[2:5, 3:7] = 255
    Image.fromarray(binary).save(tmp_path / "b255.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b255.png"), binary // 255)
    Image.fromarray(binary > 0).save(tmp_path / "bool.png")  # 1-bit PNG
    np.testing.assert_array_equal(io.read_mask(tmp_path / "bool.png"), binary // 255)
    Image.fromarray(np.dstack([binary] * 3)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "rgb.png"), binary // 255)
    classes = _mask()
    pal = Image.fromarray(classes, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "palette.png", 3), classes)
    tifffile.imwrite(tmp_path / "b16.tif", (binary.astype(np.uint16) * 257))
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b16.tif"), binary // 255)


def test_read_mask_errors_name_file_and_values(tmp_path):
    coloured = np.zeros((10, 12, 3), np.uint8)
    coloured[1, 1] = (255, 0, 0)
    Image.fromarray(coloured).save(tmp_path / "colour (1).png")
    with pytest.raises(InputError, match=r"colour \(1\)\.png: colour mask"):
        io.read_mask(tmp_path / "colour (1).png")
    values = np.zeros((10, 12), np.uint8)
    values[0, :4] = [1, 2, 7, 9]
    Image.fromarray(values).save(tmp_path / "v.png")
    with pytest.raises(InputError) as info:
        io.read_mask(tmp_path / "v.png", n_classes=2)
    assert str(tmp_path / "v.png") in str(info.value)
    assert "7, 9" in str(info.value) and "outside 0..2" in str(info.value)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "v.png", n_classes=9), values)
    noisy = np.zeros((32, 32), np.uint8)
    noisy[8:20, 8:20] = 255
    Image.fromarray(noisy).save(tmp_path / "lossy.jpg", quality=50)
    with pytest.raises(InputError, match="lossy JPEG"):
        io.read_mask(tmp_path / "lossy.jpg")
    tifffile.imwrite(tmp_path / "frac.tif", np.full((4, 4), 0.5, np.float32))
    with pytest.raises(InputError, match="non-integer"):
        io.read_mask(tmp_path / "frac.tif")


def test_union_masks(tmp_path):
    a = np.zeros((10, 12), np.uint8)
    b = np.zeros((10, 12), np.uint8)
    a[:3] = 255
    b[-3:] = 1
    Image.fromarray(a).save(tmp_path / "a (1).png")
    Image.fromarray(b).save(tmp_path / "a (1)_mask_1.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    union = io.union_masks([tmp_path / "a (1).png", tmp_path / "a (1)_mask_1.png"])
    np.testing.assert_array_equal(union, ((a > 0) | (b > 0)).astype(np.uint8))
    with pytest.raises(InputError, match=r"small\.png: mask is 5x5"):
        io.union_masks([tmp_path / "a (1).png", tmp_path / "small.png"])


def test_file_stem_and_format():
    assert io.file_stem("x/a (1).nii.gz") == "a (1)"
    assert io.file_stem("b.ome.tif") == "b"
    assert io.file_stem("c.png") == "c"
    assert io.file_stem("1.2.840.5") == "1.2.840.5"
    assert io.image_format("A.JPEG") == "jpeg"
    assert io.image_format("scan.nii.gz") == "nifti"
    assert io.image_format("notes.txt") is None
