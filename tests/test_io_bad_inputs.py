"""Every bad input is an InputError naming the file and the problem; the CLI exits 2 and writes nothing."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsam3.cli import main
from medsam3.errors import InputError
from medsam3.io.readers import read_image, read_label_map, read_npz_case


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def _bad(tmp_path: Path, kind: str, data_dir: Path) -> tuple[Path, str]:
    """Create one bad input in ``tmp_path / 'in'``; return it and a regex its error must match."""
    d = tmp_path / "in"
    d.mkdir()
    if kind == "empty":
        p = d / "empty.nii.gz"
        p.write_bytes(b"")
        return p, "empty"
    if kind == "truncated_gz":
        src = (data_dir / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()
        p = d / "cut.nii.gz"
        p.write_bytes(src[: len(src) // 2])
        return p, "truncated"
    if kind == "truncated_nii":
        full = _nifti(d / "full.nii", np.ones((8, 8, 8), np.float32))
        p = d / "cut.nii"
        p.write_bytes(full.read_bytes()[:600])
        full.unlink()
        return p, "truncated"
    if kind == "png_as_nifti":
        p = d / "scan.nii.gz"
        shutil.copy(data_dir / "hc18_ultrasound" / "training_set" / "000_HC.png", p)
        return p, "name says NIfTI .* content is PNG"
    if kind == "gzip_not_nifti":
        p = d / "notes.nii.gz"
        p.write_bytes(gzip.compress(b"hello, this is not an image" * 40))
        return p, "does not start with a NIfTI header"
    if kind == "text":
        p = d / "readme.dat"
        p.write_text("just text\n" * 50)
        return p, "unrecognised format"
    if kind == "4d":
        return _nifti(d / "fmri.nii.gz", np.ones((4, 5, 6, 3), np.float32)), "4D image .* extract a single"
    if kind == "one_voxel":
        return _nifti(d / "dot.nii.gz", np.ones((1, 1, 1), np.float32)), "single voxel"
    if kind == "nan":
        a = np.ones((4, 5, 6), np.float32)
        a[0, 0, :5] = np.nan
        a[1, 1, 1] = np.inf
        return _nifti(d / "nan.nii.gz", a), r"6 of 120 voxel values are not finite \(5 NaN, 1 infinite\)"
    if kind == "nan_nrrd":
        import SimpleITK as sitk

        a = np.ones((4, 5, 6), np.float32)
        a[2, 3, 4] = np.nan
        p = d / "nan.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
        return p, r"1 of 120 voxel values are not finite \(1 NaN, 0 infinite\)"
    if kind == "missing":
        return d / "nowhere.nii.gz", "no such file"
    if kind == "empty_folder":
        p = d / "series"
        p.mkdir()
        (p / "notes.txt").write_text("no dicom here")
        return p, "folder without DICOM files"
    if kind == "two_series":
        p = d / "study"
        p.mkdir()
        for f in sorted((data_dir / "dcmqi_ct3slice" / "ct-3slice").glob("*.dcm")):
            shutil.copy(f, p / f.name)
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77"
            ds.SOPInstanceUID = ds.SOPInstanceUID + ".7"
            ds.SeriesDescription = "second series"
            ds.save_as(p / f"b_{f.name}")
        return p, (
            "(?s)holds 2 DICOM series; choose one with --series .*"
            r"1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1 +'no description' +CT +3 "
            "files.*"
            r"1.2.826.0.1.3680043.8.498.77 +'second series' +CT +3 files"
        )
    if kind == "missing_slice":
        p = d / "gap"
        p.mkdir()
        files = sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir())
        positions = {
            f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files
        }
        ordered = sorted(files, key=positions.get)
        for f in ordered[:5] + ordered[6:8]:
            shutil.copy(f, p / f.name)
        return p, "unevenly spaced slices .* a slice is missing"
    if kind == "duplicate_slice":
        p = d / "dup"
        p.mkdir()
        files = sorted((data_dir / "dcmqi_ct3slice" / "ct-3slice").glob("*.dcm"))
        for f in files:
            shutil.copy(f, p / f.name)
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".5"
        ds.save_as(p / "echo2.dcm")
        return p, "slices at the same position"
    if kind == "npz_no_images":
        p = d / "case.npz"
        np.savez(p, something=np.zeros(3))
        return p, "BiomedSegFM npz holds 'imgs'"
    if kind == "npz_unsafe_pickle":
        p = d / "evil.npz"
        np.savez(p, imgs=np.zeros((3, 4, 4), np.uint8), text_prompts=np.array(Path("x"), dtype=object))
        return p, "text_prompts cannot be read safely"
    if kind == "npz_bad_gts":
        p = d / "mismatch.npz"
        np.savez(p, imgs=np.zeros((3, 4, 4), np.uint8), gts=np.zeros((3, 4, 5), np.uint8))
        return p, "'gts' has shape"
    raise AssertionError(kind)


KINDS = [
    "empty",
    "truncated_gz",
    "truncated_nii",
    "png_as_nifti",
    "gzip_not_nifti",
    "text",
    "4d",
    "one_voxel",
    "nan",
    "nan_nrrd",
    "missing",
    "empty_folder",
    "two_series",
    "missing_slice",
    "duplicate_slice",
    "npz_no_images",
    "npz_unsafe_pickle",
    "npz_bad_gts",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_an_input_error_naming_the_file(tmp_path, data_dir, kind):
    path, pattern = _bad(tmp_path, kind, data_dir)
    with pytest.raises(InputError, match=pattern) as info:
        read_image(path)
    assert str(path) in str(info.value) or str(path.parent) in str(info.value)
    assert info.value.path is not None


@pytest.mark.parametrize("kind", KINDS)
def test_cli_info_exits_2_and_writes_nothing(tmp_path, data_dir, kind, capsys):
    path, _ = _bad(tmp_path, kind, data_dir)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["info", str(path)])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and path.name in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_four_d_with_one_time_point_is_a_volume(tmp_path):
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    image = read_image(_nifti(tmp_path / "one.nii.gz", a))
    np.testing.assert_array_equal(image.array, a[..., 0].T)


def test_unreadable_file_reported_as_permission_problem(tmp_path, monkeypatch):
    p = _nifti(tmp_path / "locked.nii.gz", np.ones((3, 3, 3), np.float32))
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as the OS answers for a file without rights
    with pytest.raises(InputError, match="locked.nii.gz: permission denied"):
        read_image(p)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = _nifti(tmp_path / "locked.nii.gz", np.ones((3, 3, 3), np.float32))
    p.chmod(0)
    try:
        with pytest.raises(InputError, match="permission denied"):
            read_image(p)
    finally:
        p.chmod(0o644)


def test_label_map_refuses_non_integer_and_negative_values(tmp_path):
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(_nifti(tmp_path / "prob.nii.gz", np.full((3, 3, 3), 0.5, np.float32)))
    with pytest.raises(InputError, match="negative"):
        read_label_map(_nifti(tmp_path / "neg.nii.gz", np.full((3, 3, 3), -1, np.int16)))


def test_label_map_refuses_another_grid(tmp_path, data_dir):
    ref = read_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz")
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), str(other))
    with pytest.raises(InputError, match="other.nii.gz: .*does not match the reference"):
        read_label_map(other, ref)


def test_modality_override_must_be_known(data_dir):
    with pytest.raises(InputError, match="unknown modality 'photo'"):
        read_image(data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz", modality="photo")


def test_npz_case_rejects_other_formats(data_dir):
    with pytest.raises(InputError, match="not a BiomedSegFM .npz"):
        read_npz_case(data_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz")


def test_restricted_unpickler_refuses_code(tmp_path):
    """A pickled callable in text_prompts must never be called."""

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    p = tmp_path / "evil.npz"
    with open(tmp_path / "text_prompts.npy", "wb") as fh:
        np.lib.format.write_array(fh, np.array(Boom(), dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(p, "w") as zf:
        zf.write(tmp_path / "text_prompts.npy", "text_prompts.npy")
        np.save(tmp_path / "imgs.npy", np.zeros((3, 4, 4), np.uint8))
        zf.write(tmp_path / "imgs.npy", "imgs.npy")
    with pytest.raises(InputError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        read_image(p)
    assert pickle  # the module under test uses pickle only through its restricted unpickler


def test_nifti_pair_and_its_short_voxel_file(tmp_path):
    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nib.save(nib.Nifti1Pair(a, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "pair.hdr"))
    image = read_image(tmp_path / "pair.hdr")
    np.testing.assert_array_equal(image.array, a.T)
    os.truncate(tmp_path / "pair.img", 50)
    with pytest.raises(InputError, match="pair.hdr: its voxel file pair.img is missing or shorter"):
        read_image(tmp_path / "pair.hdr")
