"""Label names travel with label maps: the NIfTI header extension, the JSON sidecar, ``medsam3 info``."""

from __future__ import annotations

import gzip
import json
import logging
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam3.cli import main
from medsam3.errors import InputError, OutputError
from medsam3.image import Image
from medsam3.io import label_names as ln
from medsam3.io import volumes
from medsam3.io.readers import read_label_map
from medsam3.io.writers import write_label_map

NAMES = {1: "liver", 3: "lesion"}
#: The extension of NAMES as written: compact ASCII JSON, palette colours by rank, NUL-padded so that
#: 8 bytes (size, code) + content are a multiple of 16 (8 + 126 = 134 -> 144: 10 NUL bytes).
NAMES_JSON = (
    b'{"medsam3_labels":1,"labels":[{"value":1,"name":"liver","color":[230,25,75]},'
    b'{"value":3,"name":"lesion","color":[60,180,75]}]}'
)


def _reference() -> Image:
    """An oblique 3D grid (5, 6, 7) with non-trivial spacing and origin."""
    a = np.deg2rad(30.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    arr = np.zeros((5, 6, 7), np.int16)
    return Image(arr, (0.8125, 0.6875, 2.5), (-120.25, 35.5, 18.0), rot, "MR", {"path": "ref"})


def _labels() -> np.ndarray:
    lab = np.zeros((5, 6, 7), np.uint8)
    lab[1:3, 2:4, 1:5] = 1  # 2 * 2 * 4 = 16 voxels
    lab[4, 5, 6] = 2  # unnamed
    return lab


def _raw(path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _info_json(capsys, *args) -> dict:
    code = main(["info", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


# -- the document --------------------------------------------------------------------------------------------
def test_label_table_by_hand():
    table = ln.label_table({2: "spleen", 1: "liver", 0: "background"})
    assert table == {
        "medsam3_labels": 1,
        "labels": [
            {"value": 1, "name": "liver", "color": [230, 25, 75]},
            {"value": 2, "name": "spleen", "color": [60, 180, 75]},
        ],
    }
    assert list(table)[0] == "medsam3_labels"  # the marker key comes first
    given = ln.label_table({1: "liver", 2: "spleen"}, {2: (1, 2, 3)})
    assert [r["color"] for r in given["labels"]] == [[230, 25, 75], [1, 2, 3]]
    with pytest.raises(ValueError, match="three integers"):
        ln.label_table({1: "liver"}, {1: (1, 2, 300)})
    content = ln.nifti_extension_bytes(ln.label_table(NAMES))
    assert content == NAMES_JSON + b"\0" * 10 and (len(content) + 8) % 16 == 0


def test_sidecar_paths():
    assert ln.sidecar_path("/a/X_seg.nii.gz") == ln.Path("/a/X_seg.json")
    assert ln.sidecar_path("/a/X_seg.NII") == ln.Path("/a/X_seg.json")
    assert ln.sidecar_path("/a/case.1_seg.mha") == ln.Path("/a/case.1_seg.json")
    assert ln.sidecar_path("b/X.seg.nrrd") == ln.Path("b/X.seg.json")


def test_cielab_conversion_matches_highdicom():
    from highdicom.color import CIELabColor

    for value in [(41661, 41167, 40792), (0, 32896, 32896), (65535, 32896, 32896), (30000, 50000, 12000)]:
        assert ln.cielab_to_rgb(value) == CIELabColor.from_dicom_value(value).to_rgb()


# -- the NIfTI extension -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_extension_holds_the_exact_json(tmp_path, suffix):
    out = write_label_map(_labels(), tmp_path / f"lab{suffix}", _reference(), NAMES)
    exts = nib.load(str(out)).header.extensions
    assert [e.get_code() for e in exts] == [6]
    assert exts[0].get_content().rstrip(b"\0") == NAMES_JSON  # nibabel may drop the padding
    raw = _raw(out)  # the bytes after the 348-byte header: flag, size, code, JSON, NUL padding
    assert raw[348:360] == struct.pack("<4sii", b"\1\0\0\0", 144, 6)
    assert len(NAMES_JSON) == 126 and raw[360:496] == NAMES_JSON + b"\0" * 10
    assert ln.nifti_extensions(out) == [(6, NAMES_JSON + b"\0" * 10)]
    table = ln.read_label_table(out)
    assert table.names == NAMES and table.source == "nifti extension" and table.file == out
    assert table.colors == {1: (230, 25, 75), 3: (60, 180, 75)}
    assert ln.read_label_names(out) == NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lab{suffix}"]  # no temporaries left


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_geometry_and_voxels_unchanged_by_the_names(tmp_path, suffix):
    ref, lab = _reference(), _labels()
    plain = write_label_map(lab, tmp_path / f"plain{suffix}", ref)
    named = write_label_map(lab, tmp_path / f"named{suffix}", ref, NAMES)
    a, b = _raw(plain), _raw(named)
    # bytes: the header differs only in vox_offset (float32 at 108) and the extension flag (348..351)
    assert a[:108] == b[:108] and a[112:348] == b[112:348]
    assert a[348:352] == b"\0\0\0\0" and b[348:352] == b"\1\0\0\0"
    (off_a,), (off_b,) = struct.unpack("<f", a[108:112]), struct.unpack("<f", b[108:112])
    assert off_a == 352 and off_b == 352 + 8 + len(NAMES_JSON) + 10
    assert a[int(off_a) :] == b[int(off_b) :]  # voxel bytes
    ha, hb = nib.load(str(plain)).header, nib.load(str(named)).header
    for key in ("dim", "pixdim", "datatype", "bitpix", "qform_code", "sform_code", "scl_slope", "scl_inter"):
        np.testing.assert_array_equal(ha[key], hb[key])
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        assert ha[key] == hb[key]
    np.testing.assert_array_equal(ha.get_qform(), hb.get_qform())
    np.testing.assert_array_equal(ha.get_sform(), hb.get_sform())
    np.testing.assert_array_equal(nib.load(str(plain)).affine, nib.load(str(named)).affine)
    assert hb.get_data_dtype() == np.uint8
    data = np.asanyarray(nib.load(str(named)).dataobj)
    np.testing.assert_array_equal(data.T, lab)  # nibabel reads (x, y, z)
    # SimpleITK reads the same image from both
    ia, ib = sitk.ReadImage(str(plain)), sitk.ReadImage(str(named))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ib), lab)
    assert sitk.GetArrayFromImage(ib).dtype == np.uint8
    assert ia.GetSpacing() == ib.GetSpacing() and ia.GetOrigin() == ib.GetOrigin()
    assert ia.GetDirection() == ib.GetDirection()
    # and the package's own readers
    back = read_label_map(named, ref)
    np.testing.assert_array_equal(back.array, lab)


def test_no_extension_without_positive_names(tmp_path):
    ref, lab = _reference(), _labels()
    plain = write_label_map(lab, tmp_path / "plain.nii", ref)
    bg = write_label_map(lab, tmp_path / "bg.nii", ref, {0: "background"})
    assert plain.read_bytes() == bg.read_bytes()
    assert ln.read_label_table(bg) == ln.LabelTable()


def test_unicode_names_and_given_colours(tmp_path):
    names = {1: "Leber ü", 2: "肝臓", 5: "absent"}
    out = write_label_map(_labels(), tmp_path / "u.nii.gz", _reference(), names, colors={5: [9, 8, 7]})
    content = ln.nifti_extensions(out)[0][1]
    assert content.isascii() and b'"Leber \\u00fc"' in content and b'"\\u809d\\u81d3"' in content
    table = ln.read_label_table(out)
    assert table.names == names  # including the label absent from the map
    assert table.colors == {1: (230, 25, 75), 2: (60, 180, 75), 5: (9, 8, 7)}
    with pytest.raises(OutputError, match="three integers"):
        write_label_map(_labels(), tmp_path / "bad.nii.gz", _reference(), names, colors={1: [1, 2]})
    assert not (tmp_path / "bad.nii.gz").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(volumes, "write_volume", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_label_map(_labels(), tmp_path / "lab.nii.gz", _reference(), NAMES)
    assert list(tmp_path.iterdir()) == []


def test_existing_extensions_are_kept(tmp_path):
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.uint8), np.diag([2.0, 3.0, 4.0, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"hello"))
    nib.save(img, str(tmp_path / "src.nii"))
    ln.embed_label_table(tmp_path / "src.nii", tmp_path / "out.nii.gz", ln.label_table({1: "a"}))
    exts = ln.nifti_extensions(tmp_path / "out.nii.gz")
    assert [c for c, _ in exts] == [6, 6] and exts[0][1].rstrip(b"\0") == b"hello"
    assert ln.read_label_names(tmp_path / "out.nii.gz") == {1: "a"}
    back = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(back.affine, img.affine)
    assert np.asanyarray(back.dataobj).shape == (3, 4, 5)


def test_foreign_comment_is_ignored(tmp_path):
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'{"labels": [1, 2]}'))
    nib.save(img, str(tmp_path / "c.nii.gz"))
    assert ln.read_label_table(tmp_path / "c.nii.gz") == ln.LabelTable()


def test_corrupt_extension_is_an_input_error(tmp_path, capsys):
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'{"medsam3_labels":1,"labels":[{"value":1,'))
    path = tmp_path / "corrupt.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(
        InputError, match="corrupt.nii.gz: the label table in its NIfTI header extension is not"
    ):
        ln.read_label_table(path)
    assert main(["info", str(path), "--labels"]) == 2
    err = capsys.readouterr().err
    assert "corrupt.nii.gz" in err and "not valid JSON" in err and "Traceback" not in err

    img.header.extensions.clear()
    img.header.extensions.append(
        nib.nifti1.Nifti1Extension(6, b'{"medsam3_labels":1,"labels":[{"value":"one","name":"x"}]}')
    )
    nib.save(img, str(path))
    with pytest.raises(InputError, match="entry 1 has no label value"):
        ln.read_label_table(path)
    img.header.extensions.clear()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'{"medsam3_labels":2,"labels":[]}'))
    nib.save(img, str(path))
    with pytest.raises(InputError, match="version 2 is not supported"):
        ln.read_label_table(path)


# -- the sidecar ---------------------------------------------------------------------------------------------
def test_sidecar_round_trip(tmp_path):
    label = write_label_map(_labels(), tmp_path / "X_seg.nii.gz", _reference())
    side = ln.write_label_sidecar(label, {1: "liver", 2: "Milz ü"}, {2: (1, 2, 3)})
    assert side == tmp_path / "X_seg.json"
    text = side.read_text(encoding="utf-8")
    assert json.loads(text) == {
        "medsam3_labels": 1,
        "labels": [
            {"value": 1, "name": "liver", "color": [230, 25, 75]},
            {"value": 2, "name": "Milz ü", "color": [1, 2, 3]},
        ],
    }
    assert "Milz ü" in text  # UTF-8, not escaped
    table = ln.read_label_table(label)
    assert table.source == "sidecar" and table.file == side
    assert table.names == {1: "liver", 2: "Milz ü"} and table.colors == {1: (230, 25, 75), 2: (1, 2, 3)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X_seg.json", "X_seg.nii.gz"]


def test_sidecar_into_a_temporary_path(tmp_path):
    from medsam3.io.atomic import atomic_path

    final = ln.sidecar_path(tmp_path / "Y_seg.nii.gz")
    with atomic_path(final) as tmp:
        written = ln.write_label_sidecar(tmp, {1: "liver"}, atomic=False)
        assert written == tmp and not final.exists()
    assert final.read_text(encoding="utf-8") == ln.sidecar_text({1: "liver"})
    with pytest.raises(ValueError, match="own"):
        ln.write_label_sidecar(tmp_path / "Y_seg.nii.gz", {1: "liver"}, atomic=False)


def test_foreign_json_beside_is_not_a_sidecar(tmp_path):
    label = write_label_map(_labels(), tmp_path / "sub-01_T1w.nii.gz", _reference())
    (tmp_path / "sub-01_T1w.json").write_text('{"Modality": "MR", "labels": [{"value": 1}]}')
    assert ln.read_label_table(label) == ln.LabelTable()
    (tmp_path / "sub-01_T1w.json").write_text("not json at all")
    assert ln.read_label_table(label) == ln.LabelTable()


def test_corrupt_sidecar_is_an_input_error(tmp_path, capsys):
    label = write_label_map(_labels(), tmp_path / "Z_seg.nii.gz", _reference())
    (tmp_path / "Z_seg.json").write_text('{"medsam3_labels": 1, "labels": [{"value": 1, "name": "liv')
    with pytest.raises(
        InputError, match=r"Z_seg\.json: the label-table sidecar of Z_seg\.nii\.gz is not valid"
    ):
        ln.read_label_table(label)
    assert main(["info", str(label), "--labels"]) == 2
    err = capsys.readouterr().err
    assert "Z_seg.json" in err and "line 1" in err and "Traceback" not in err
    (tmp_path / "Z_seg.json").write_text('{"medsam3_labels": 1, "labels": [{"value": 1, "name": 7}]}')
    with pytest.raises(InputError, match="Z_seg.json: .*label 1 has no name"):
        ln.read_label_table(label)
    (tmp_path / "Z_seg.json").write_bytes(b'{"medsam3_labels": 1, "labels": [{"value": 1, "name": "\xff"}]}')
    with pytest.raises(InputError, match="Z_seg.json: .*not UTF-8"):
        ln.read_label_table(label)


def test_extension_wins_over_a_disagreeing_sidecar(tmp_path, caplog, capsys):
    label = write_label_map(_labels(), tmp_path / "W_seg.nii.gz", _reference(), NAMES)
    ln.write_label_sidecar(label, NAMES)
    assert ln.read_label_table(label).warnings == ()  # agreeing: no warning
    ln.write_label_sidecar(label, {1: "kidney"})
    with caplog.at_level(logging.WARNING, logger="medsam3.io.label_names"):
        table = ln.read_label_table(label)
    assert table.names == NAMES and table.source == "nifti extension"
    assert len(table.warnings) == 1 and "W_seg.json" in table.warnings[0]
    assert "differ" in caplog.text
    info = _info_json(capsys, label)
    assert info["label_names_source"] == "nifti extension"
    assert "W_seg.json" in info["label_names_warnings"][0]
    assert main(["info", str(label)]) == 0
    assert "warning: " in capsys.readouterr().out


# -- medsam3 info --labels -----------------------------------------------------------------------------------
def test_info_nifti_with_extension(tmp_path, capsys):
    ref = _reference()
    label = write_label_map(_labels(), tmp_path / "E_seg.nii.gz", ref, {1: "liver", 3: "lesion"})
    info = _info_json(capsys, label, "--labels")
    voxel_ml = 0.8125 * 0.6875 * 2.5 / 1000
    assert info["kind"] == "label map"
    assert info["label_names_source"] == "nifti extension" and info["label_names_file"] == str(label)
    rows = {r["value"]: r for r in info["labels"]}
    assert rows[1] == {
        "value": 1,
        "name": "liver",
        "voxels": 16,
        "volume_ml": pytest.approx(16 * voxel_ml),
        "color": [230, 25, 75],
    }
    assert rows[2] == {"value": 2, "name": None, "voxels": 1, "volume_ml": pytest.approx(voxel_ml)}
    assert rows[3]["voxels"] == 0 and rows[3]["name"] == "lesion" and rows[3]["color"] == [60, 180, 75]
    assert main(["info", str(label), "--labels"]) == 0
    out = capsys.readouterr().out
    assert "colour" in out and "#e6194b" in out and "names from: nifti extension" in out
    line = next(ln_ for ln_ in out.splitlines() if "liver" in ln_)
    assert line.split() == ["1", "liver", "16", f"{16 * voxel_ml:.4g}", "#e6194b"]


def test_info_nifti_with_sidecar_only(tmp_path, capsys):
    label = write_label_map(_labels(), tmp_path / "S_seg.nii", _reference())
    ln.write_label_sidecar(label, {2: "spleen"})
    info = _info_json(capsys, label, "--labels")
    assert info["label_names_source"] == "sidecar"
    assert info["label_names_file"] == str(tmp_path / "S_seg.json")
    rows = {r["value"]: r for r in info["labels"]}
    assert rows[2]["name"] == "spleen" and rows[2]["color"] == [230, 25, 75] and rows[2]["voxels"] == 1
    assert rows[1]["name"] is None and "color" not in rows[1]
    assert main(["info", str(label), "--labels"]) == 0
    assert "names from: sidecar S_seg.json" in capsys.readouterr().out


def test_info_without_names_is_unchanged(tmp_path, capsys):
    label = write_label_map(_labels(), tmp_path / "N_seg.nii.gz", _reference())
    info = _info_json(capsys, label, "--labels")
    assert not any(k.startswith("label_names") for k in info)
    assert [sorted(r) for r in info["labels"]] == [["name", "value", "volume_ml", "voxels"]] * 2
    assert main(["info", str(label), "--labels"]) == 0
    out = capsys.readouterr().out
    assert "colour" not in out and "names from" not in out


def test_info_nrrd_and_npz(tmp_path, capsys):
    ref = _reference()
    nrrd = write_label_map(_labels(), tmp_path / "R_seg.nrrd", ref, {1: "liver", 2: "spleen"})
    info = _info_json(capsys, nrrd, "--labels")
    assert info["label_names_source"] == "nrrd segment fields"
    assert [(r["value"], r["name"], r["voxels"]) for r in info["labels"]] == [
        (1, "liver", 16),
        (2, "spleen", 1),
    ]
    npz = write_label_map(_labels(), tmp_path / "P_seg.npz", ref, {1: "liver", 2: "spleen"})
    info = _info_json(capsys, npz, "--labels")
    assert info["label_names_source"] == "npz label_names"
    assert [(r["value"], r["name"], r["voxels"]) for r in info["labels"]] == [
        (1, "liver", 16),
        (2, "spleen", 1),
    ]
    assert ln.read_label_table(npz).names == {1: "liver", 2: "spleen"}


def test_slicer_segment_colours(tmp_path):
    image = sitk.GetImageFromArray(_labels())
    for key, value in {
        "Segment0_ID": "Segment_1",
        "Segment0_Name": "liver",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_Color": "0.501961 0.682353 0.501961",
    }.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(tmp_path / "s.seg.nrrd"), useCompression=True)
    table = ln.read_label_table(tmp_path / "s.seg.nrrd")
    assert table.source == "nrrd segment fields" and table.names == {1: "liver"}
    assert table.colors == {1: (128, 174, 128)}  # 0.501961 * 255 = 128.0, 0.682353 * 255 = 174.0


def test_info_dicom_seg_names_and_colour(data_dir, capsys):
    path = data_dir / "dcmqi_ct3slice" / "liver.dcm"
    info = _info_json(capsys, path, "--labels")
    assert info["kind"] == "segmentation" and info["label_names_source"] == "dicom seg"
    row = info["labels"][0]
    assert row["value"] == 1 and row["name"] == "Liver"
    # RecommendedDisplayCIELabValue (41661, 41167, 40792); dcmqi's own JSON gives RGB (220, 129, 101)
    assert all(abs(a - b) <= 1 for a, b in zip(row["color"], (220, 129, 101), strict=True))
    assert row["color"] == [221, 130, 101]
    assert main(["info", str(path), "--labels"]) == 0
    out = capsys.readouterr().out
    assert "names from: dicom seg" in out and "#dd8265" in out
    assert ln.read_label_names(path) == {1: "Liver"}
    assert ln.read_label_table(data_dir / "dcmqi_ct3slice" / "ct-3slice") == ln.LabelTable()


def test_npz_text_prompts(tmp_path):
    imgs = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    prompts = np.array(json.dumps({"1": "liver"}))
    np.savez_compressed(tmp_path / "img.npz", imgs=imgs, spacing=np.ones(3), text_prompts=prompts)
    assert ln.read_label_table(tmp_path / "img.npz") == ln.LabelTable()  # no label map in the file
    np.savez_compressed(
        tmp_path / "gts.npz", imgs=imgs, gts=_labels(), spacing=np.ones(3), text_prompts=prompts
    )
    table = ln.read_label_table(tmp_path / "gts.npz")
    assert table.source == "npz text_prompts" and table.names == {1: "liver"}
