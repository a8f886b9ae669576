"""``medsam3 serve`` upload safety: size limits, content sniffing, zip slip and zip bombs, declared sizes,
files that point at other files, server-chosen names only, and error messages without server paths."""

from __future__ import annotations

import gzip
import stat
import zipfile

import numpy as np
import pytest

from serve_fixtures import (
    CT3,
    HC18,
    HIPPO,
    client_for,
    make_settings,
    upload,
    zip_bytes,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("safety") / "work"


@pytest.fixture(scope="module")
def client(serve_model, work):
    settings = make_settings(
        serve_model,
        work,
        max_upload_mb=1.0,
        max_zip_entries=8,
        max_unzipped_mb=4.0,
        max_zip_ratio=50.0,
        max_voxels=2_000_000,
        max_json_kb=4.0,
    )
    with client_for(settings) as c:
        yield c


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    return body["error"]


def no_uploads_left(work) -> bool:
    """Refused uploads leave no folder behind."""
    return not any((work / "images").iterdir())


# --------------------------------------------------------------------------------------------------
# size


def test_oversize_upload_is_413(client, work):
    big = bytes(1024 * 1024 + 100_000)  # 1.1 MB > 1 MB
    message = error_of(upload(client, data=big, name="big.nii"), 413)
    assert "limit is 1 MB" in message and "--max-upload-mb" in message
    # A raw body without multipart is counted the same way.
    message = error_of(client.post("/api/images", content=big, headers={"X-Filename": "big.nii"}), 413)
    assert "too large" in message
    assert no_uploads_left(work)


def test_oversize_json_body_is_413_and_chunked_needs_a_length(client):
    r = client.post(
        "/api/images/" + "0" * 32 + "/segment",
        content=b"{" + b" " * 5000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert "request body too large" in error_of(r, 413)

    def chunks():
        yield b'{"prompts": '
        yield b'[{"text": "x"}]}'

    r = client.post(
        "/api/images/" + "0" * 32 + "/segment", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "Content-Length" in error_of(r, 411)


def test_declared_voxels_above_the_limit_are_refused_before_decoding(client, work):
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("L", (2000, 1500)).save(buf, format="PNG")  # 3 M pixels, a few kilobytes compressed
    assert len(buf.getvalue()) < 1024 * 1024
    message = error_of(upload(client, data=buf.getvalue(), name="huge.png"), 413)
    assert "declares 3,000,000 voxels" in message and "2,000,000" in message
    assert no_uploads_left(work)


# --------------------------------------------------------------------------------------------------
# content, not names


def test_content_is_sniffed_not_the_extension(client, data_dir, work):
    message = error_of(upload(client, data=b"just some text, not an image\n" * 20, name="scan.nii.gz"), 415)
    assert message.startswith("scan.nii.gz: content is an unrecognised format")
    png = (data_dir / HC18).read_bytes()
    message = error_of(upload(client, data=png, name="scan.nii.gz"), 415)
    assert "the name says NIfTI but the content is PNG" in message
    # The right content under a name without extension is read by content.
    r = upload(client, data=png, name="IMAGE0001")
    assert r.status_code == 201 and r.json()["format"] == "PNG"
    client.delete(f"/api/images/{r.json()['image_id']}")
    assert no_uploads_left(work)


def test_truncated_file_is_a_clear_400_without_server_paths(client, data_dir, work):
    data = gzip.decompress((data_dir / HIPPO).read_bytes())[:2000]  # header + a few voxels
    message = error_of(upload(client, data=data, name="cut.nii"), 400)
    assert message.startswith("cut.nii: ")
    assert str(work) not in message and "source.nii" not in message
    assert no_uploads_left(work)


def test_files_that_point_at_other_files_are_refused(client, data_dir, work):
    detached = (
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
        b"data file: ../../../../etc/passwd\n\n"
    )
    message = error_of(upload(client, data=detached, name="head.nhdr"), 400)
    assert "detached NRRD header" in message
    header = bytearray(gzip.decompress((data_dir / HIPPO).read_bytes())[:348])
    header[344:348] = b"ni1\x00"  # a .hdr of a .hdr/.img pair
    message = error_of(upload(client, data=bytes(header), name="pair.hdr"), 400)
    assert ".hdr/.img pair" in message
    mha = b"ObjectType = Image\nNDims = 2\nDimSize = 2 2\nElementType = MET_UCHAR\nElementDataFile = /etc/x\n"
    assert "MetaImage" in error_of(upload(client, data=mha, name="x.mha"), 415)
    assert no_uploads_left(work)


def test_client_file_names_never_become_paths(client, data_dir, work):
    r = upload(client, data=(data_dir / HC18).read_bytes(), name="../../etc/evil\u200bname.png")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "evilname.png"
    folder = work / "images" / info["image_id"]
    assert sorted(p.name for p in folder.iterdir()) == ["display.npy", "source.png"]
    assert not (work.parent / "etc").exists()
    for bad in ("%2e%2e", "..%2F..%2Fetc", "0" * 31 + "g", "A" * 32, "x" * 64):
        r = client.get(f"/api/images/{bad}")
        assert r.status_code == 404 and set(r.json()) == {"error"}
    client.delete(f"/api/images/{info['image_id']}")
    assert no_uploads_left(work)


# --------------------------------------------------------------------------------------------------
# zip archives


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    "entry, problem",
    [
        (("../evil.dcm", b"x" * 100), "would leave the upload folder"),
        (("ok/../../evil.dcm", b"x" * 100), "would leave the upload folder"),
        (("/etc/evil.dcm", b"x" * 100), "has an absolute path"),
        (("C:\\evil.dcm", b"x" * 100), "has an absolute path"),
        (_symlink("link.dcm", "/etc/passwd"), "is a symbolic link"),
    ],
)
def test_zip_slip_and_links_are_refused(client, work, entry, problem):
    data = zip_bytes([("series/a.dcm", b"y" * 100), entry])
    message = error_of(upload(client, data=data, name="series.zip"), 400)
    assert message.startswith("series.zip: zip entry") and problem in message
    assert not (work / "evil.dcm").exists() and not (work.parent / "evil.dcm").exists()
    assert no_uploads_left(work)


def test_zip_bombs_are_refused(client, work):
    # Ratio: 3 MB of zeros compress to a few kilobytes (> 50x).
    message = error_of(upload(client, data=zip_bytes([("a.dcm", bytes(3 * 1024 * 1024))]), name="r.zip"), 400)
    assert "expands" in message and "zip bomb" in message
    # Total size: 5 entries of 0.9 MB incompressible bytes = 4.5 MB > 4 MB, each fine on its own.
    rng = np.random.default_rng(0)
    parts = [(f"f{i}.dcm", rng.integers(0, 256, 900 * 1024, dtype=np.uint8).tobytes()) for i in range(5)]
    big = zip_bytes(parts)
    settings = client.app.state.settings
    old = settings.max_upload_mb
    settings.max_upload_mb = 8.0
    try:
        message = error_of(upload(client, data=big, name="t.zip"), 400)
    finally:
        settings.max_upload_mb = old
    assert "expands to 4.4 MB" in message and "limit is 4 MB" in message
    # Entry count.
    many = zip_bytes([(f"f{i}.dcm", b"z") for i in range(9)])
    assert "holds 9 entries; at most 8" in error_of(upload(client, data=many, name="n.zip"), 400)
    assert no_uploads_left(work)


def test_zip_without_dicom_and_damaged_zip(client, work):
    message = error_of(upload(client, data=zip_bytes([("readme.txt", b"hello" * 50)]), name="x.zip"), 400)
    assert message.startswith("x.zip: ") and "without DICOM files" in message
    message = error_of(upload(client, data=b"PK\x03\x04" + b"\x00" * 200, name="bad.zip"), 400)
    assert "damaged zip" in message
    assert no_uploads_left(work)


def test_dicom_zip_with_litter_is_read(client, data_dir):
    files = sorted((data_dir / CT3).iterdir())
    entries = [(f"CT/{f.name}", f.read_bytes()) for f in files]
    entries += [("__MACOSX/CT/._01.dcm", b"\x00\x05\x16\x07" + b"\x00" * 80), ("CT/.DS_Store", b"\x00" * 64)]
    r = upload(client, data=zip_bytes(entries), name="ct.zip")
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == [3, 512, 512] and r.json()["kind"] == "dicom-zip"
    client.delete(f"/api/images/{r.json()['image_id']}")


def test_check_zip_unit_limits(tmp_path):
    from medsam3.serve.errors import ApiError
    from medsam3.serve.settings import ServeSettings
    from medsam3.serve.uploads import check_zip, display_name, download_stem

    settings = ServeSettings(max_zip_entries=3, max_unzipped_mb=1.0, max_zip_ratio=10.0)
    path = tmp_path / "ok.zip"
    path.write_bytes(zip_bytes([("a/1.dcm", b"a" * 10), ("a/", b"")]))
    assert [i.filename for i in check_zip(path, "ok.zip", settings)] == ["a/1.dcm"]
    # zipfile cannot write encrypted entries: set the "encrypted" flag bit in both headers by hand.
    data = bytearray(zip_bytes([("e.dcm", b"data")]))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + offset
        data[at] |= 0x1
    path.write_bytes(bytes(data))
    with pytest.raises(ApiError, match="is encrypted"):
        check_zip(path, "e.zip", settings)
    assert display_name("C:\\Users\\x\\scan.nii.gz") == "scan.nii.gz"
    assert display_name("..") == "upload" and display_name(None) == "upload"
    assert download_stem("Patient Ö 1.nii.gz") == "Patient_O_1"
    assert download_stem("../../x.png") == "x"
