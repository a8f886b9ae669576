"""``medsam3 preview`` end to end on real samples, and its errors (exit status 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from medsam3.cli import main
from medsam3.overlay import PALETTE


def png(path) -> np.ndarray:
    with PILImage.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def test_preview_mr_volume_with_labels(data_dir, tmp_path, capsys):
    src = data_dir / "msd_hippocampus/images/hippocampus_003.nii.gz"
    lab = data_dir / "msd_hippocampus/labels/hippocampus_003.nii.gz"
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"labels": {"background": 0, "anterior": 1, "posterior": 2}}))
    out = tmp_path / "out"
    rc = main(
        [
            "preview",
            str(src),
            "-o",
            str(out),
            "--size",
            "128",
            "--labels",
            str(lab),
            "--label-names",
            str(names),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "RAS -> LPS" in text and "percentiles 0.5-99.5" in text
    assert "2 present: 1: anterior, 2: posterior" in text
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "model_input.png",
        "montage.png",
        "overlay_montage.png",
        "overlay_planes.png",
        "planes.png",
        "preview.json",
    ]
    model_input = png(out / "model_input.png")
    assert model_input.shape == (128, 128, 3) and model_input.dtype == np.uint8
    assert model_input.std() > 10  # an image, not a blank
    summary = json.loads((out / "preview.json").read_text())
    assert summary["orientation"]["original"] == "RAS"
    assert summary["orientation"]["canonical"] == "LPS"
    assert summary["orientation"]["through_plane_axis"] == 0
    assert summary["intensity"]["method"] == "percentiles"
    assert summary["labels"]["present"] == {"1": "anterior", "2": "posterior"}
    overlay = png(out / "overlay_planes.png")[..., :3]
    for colour in PALETTE[:2]:
        assert np.all(overlay == colour, axis=-1).sum() > 50


def test_preview_ct_window_from_concept_and_names(data_dir, tmp_path, capsys):
    src = data_dir / "totalsegmentator/example_ct_sm.nii.gz"
    lab = data_dir / "totalsegmentator/example_seg.nii.gz"
    names = data_dir / "totalsegmentator/labels_total_and_total_mr.json"
    out = tmp_path / "ct"
    rc = main(
        [
            "preview",
            str(src),
            "-o",
            str(out),
            "--size",
            "64",
            "--concept",
            "liver tumor",
            "--labels",
            str(lab),
            "--label-names",
            f"{names}#total",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "window liver (W150 L30, concept)" in text
    summary = json.loads((out / "preview.json").read_text())
    assert summary["intensity"]["window"] == "liver"
    assert summary["labels"]["present"]["5"] == "liver"
    assert summary["canonical_shape"] == [30, 101, 122]

    out2 = tmp_path / "ct2"
    assert main(["preview", str(src), "-o", str(out2), "--size", "64", "--window", "lung"]) == 0
    assert json.loads((out2 / "preview.json").read_text())["intensity"]["window"] == "lung"
    assert not (out2 / "overlay_planes.png").exists()


def test_preview_png_model_input_is_the_image(data_dir, tmp_path, capsys):
    src = data_dir / "biomedparse_demo/demo/04_CT_liver.png"
    mask = data_dir / "biomedparse_demo/demo_mask/04_CT_liver_tumor.png"
    with PILImage.open(src) as im:
        original = np.asarray(im.convert("RGB"))
    out = tmp_path / "png"
    rc = main(["preview", str(src), "-o", str(out), "--size", str(original.shape[0]), "--labels", str(mask)])
    assert rc == 0
    assert "2D" in capsys.readouterr().out
    # 8-bit grey data at the model size: the model input is the picture itself
    np.testing.assert_array_equal(png(out / "model_input.png"), original)
    assert sorted(p.name for p in out.iterdir()) == ["model_input.png", "overlay.png", "preview.json"]
    summary = json.loads((out / "preview.json").read_text())
    assert summary["labels"]["present"] == {"1": "04_CT_liver_tumor"}  # unnamed single mask: its file name
    assert summary["intensity"]["method"] == "uint8"
    overlay = png(out / "overlay.png")[..., :3]
    assert np.all(overlay == PALETTE[0], axis=-1).sum() > 50


def test_preview_colour_photo_resized(data_dir, tmp_path):
    src = sorted((data_dir / "kvasir_seg_sample").rglob("*.jpg"))[0]
    out = tmp_path / "rgb"
    assert main(["preview", str(src), "-o", str(out), "--size", "96", "--modality", "rgb"]) == 0
    img = png(out / "model_input.png")
    assert img.shape == (96, 96, 3)
    assert json.loads((out / "preview.json").read_text())["intensity"]["method"] == "uint8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "lungs2"], "unknown window 'lungs2'"),
        (["--modality", "MR", "--window", "lung"], "windows apply to CT only"),
        (["--size", "0"], "--size"),
    ],
)
def test_preview_errors_exit_2_and_write_nothing(data_dir, tmp_path, capsys, extra, message):
    src = data_dir / "totalsegmentator/example_ct_sm.nii.gz"
    out = tmp_path / "never"
    assert main(["preview", str(src), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists() or not any(out.iterdir())


def test_preview_unknown_modality_and_missing_file(data_dir, tmp_path, capsys):
    src = data_dir / "totalsegmentator/example_ct_sm.nii.gz"
    assert main(["preview", str(src), "-o", str(tmp_path / "o"), "--modality", "CAT"]) == 2
    assert "invalid choice: 'CAT'" in capsys.readouterr().err
    assert main(["preview", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_preview_refuses_to_write_over_its_input(data_dir, tmp_path, capsys):
    src = tmp_path / "model_input.png"
    with PILImage.open(data_dir / "biomedparse_demo/demo/04_CT_liver.png") as im:
        im.save(src)
    before = src.read_bytes()
    assert main(["preview", str(src), "-o", str(tmp_path), "--size", "32"]) == 2
    assert "refusing to write over an input" in capsys.readouterr().err
    assert src.read_bytes() == before
