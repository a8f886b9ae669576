"""Compressed DICOM in: every transfer syntax of PACS and TCIA exports is decoded, lossless ones exactly.

The tests make their own compressed copies of the sample CT series (3 slices of 512 x 512, int16): with
pydicom's encoders (RLE, JPEG-LS through pyjpegls, JPEG 2000 through pylibjpeg-openjpeg, Deflate) and with
GDCM's (JPEG Lossless SV1, JPEG Baseline on an 8-bit copy). A lossless copy must read back to exactly the
voxel values and geometry of the uncompressed series; a lossy one within its stated error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from medsam3.errors import InputError
from medsam3.io.dicom import missing_decoder
from medsam3.io.readers import read_image


@pytest.fixture(scope="module")
def series(data_dir) -> list[Path]:
    return sorted((data_dir / "dcmqi_ct3slice" / "ct-3slice").glob("*.dcm"))


@pytest.fixture(scope="module")
def plain(series):
    return read_image(series[0].parent)


def _with_pydicom(series: list[Path], out: Path, uid, **kwargs) -> Path:
    out.mkdir()
    for f in series:
        ds = pydicom.dcmread(f)
        ds.compress(uid, **kwargs)
        ds.save_as(out / f.name)
    return out


def _with_gdcm(series: list[Path], out: Path, syntax) -> Path:
    import gdcm

    out.mkdir()
    for f in series:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(out / f.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    return out


def _syntax_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("uid", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_lossless_syntaxes_read_back_exactly(series, plain, tmp_path, uid):
    folder = _with_pydicom(series, tmp_path / "c", uid)
    assert _syntax_of(folder) == uid
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, plain.array)
    assert image.array.dtype == plain.array.dtype and image.same_geometry(plain, atol=1e-6)


def test_jpeg_lossless_sv1_reads_back_exactly(series, plain, tmp_path):
    import gdcm

    folder = _with_gdcm(series, tmp_path / "c", gdcm.TransferSyntax.JPEGLosslessProcess14_1)
    assert _syntax_of(folder) == JPEGLosslessSV1
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, plain.array)
    assert image.same_geometry(plain, atol=1e-6)


def test_deflate_reads_back_exactly(series, plain, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    for f in series:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(out / f.name, enforce_file_format=True)
    assert _syntax_of(out) == DeflatedExplicitVRLittleEndian
    image = read_image(out)
    np.testing.assert_array_equal(image.array, plain.array)
    assert image.same_geometry(plain, atol=1e-6)


def test_lossy_syntaxes_read_back_within_their_error(series, plain, tmp_path):
    near = read_image(_with_pydicom(series, tmp_path / "jls", JPEGLSNearLossless, jls_error=2))
    assert np.abs(near.array.astype(np.int64) - plain.array).max() <= 2  # NEAR = 2 by definition
    j2k = read_image(_with_pydicom(series, tmp_path / "j2k", JPEG2000, j2k_cr=[20]))
    error = np.abs(j2k.array.astype(np.float64) - plain.array)
    assert j2k.same_geometry(plain, atol=1e-6) and error.mean() < 0.02 * np.ptp(plain.array)


def test_jpeg_baseline_on_an_8_bit_copy(series, tmp_path):
    import gdcm

    eight = tmp_path / "eight"
    eight.mkdir()
    for f in series:
        ds = pydicom.dcmread(f)
        arr = np.clip((ds.pixel_array.astype(np.float64) + 1024) / 8, 0, 255).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = arr.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(eight / f.name, enforce_file_format=True)
    reference = read_image(eight)
    folder = _with_gdcm(sorted(eight.iterdir()), tmp_path / "jpeg", gdcm.TransferSyntax.JPEGBaselineProcess1)
    assert _syntax_of(folder) == JPEGBaseline8Bit
    image = read_image(folder)
    assert image.same_geometry(reference, atol=1e-6)
    assert np.abs(image.array.astype(np.float64) - reference.array).mean() < 2.0


def test_enhanced_multiframe_compressed(series, plain, tmp_path):
    import highdicom as hd

    legacy = [pydicom.dcmread(f) for f in series]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy,
            series_instance_uid=hd.UID(),
            series_number=9,
            sop_instance_uid=hd.UID(),
            instance_number=1,
        )
    for uid in (RLELossless, JPEG2000Lossless):
        ds = pydicom.dcmread(_saved(enhanced, tmp_path / "plain.dcm"))
        ds.compress(uid)
        path = tmp_path / f"enhanced-{uid.name.split()[0]}.dcm"
        ds.save_as(path)
        image = read_image(path)
        np.testing.assert_array_equal(image.array, plain.array)
        assert image.same_geometry(plain, atol=1e-5)


def _saved(ds, path: Path) -> Path:
    ds.save_as(path)
    return path


def test_a_syntax_without_its_decoder_is_named_with_what_to_install(series, tmp_path, monkeypatch):
    folder = _with_pydicom(series, tmp_path / "c", JPEGLSLossless)
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in missing_decoder(ds)
    with pytest.raises(InputError, match=r"needs a decoder that is not installed \(pip install python-gdcm"):
        read_image(folder)


def test_a_compressed_series_is_segmented_with_its_dicom_seg(series, plain, tmp_path, capsys, serve_model):
    from medsam3.cli import main
    from medsam3.io.readers import read_label_map

    folder = _with_pydicom(series, tmp_path / "series", JPEG2000Lossless)
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(folder),
            "-p",
            "liver",
            "-o",
            str(out),
            "--model",
            str(serve_model),
            "--threshold",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    labels = read_label_map(out / "series_seg.nii.gz")
    seg = read_label_map(out / "series_seg.dcm", plain)
    assert labels.same_geometry(plain, atol=1e-4)
    np.testing.assert_array_equal(seg.array, labels.array)
