"""``medsam3 segment`` end to end on real 2D samples with a tiny random SAM3 saved to a folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medsam3.cli import main

KVASIR = "kvasir_seg_sample/images/cju0qoxqj9q6s0835b43399p4.jpg"  # RGB JPEG 1348 x 1070
HC18 = "hc18_ultrasound/training_set/000_HC.png"  # grey PNG 800 x 540
BIOMEDPARSE = "biomedparse_demo/demo/04_CT_liver.png"  # RGBA PNG 1024 x 1024 (R = G = B)
SAM_MED2D = "sam_med2d_demo/images/s0619_32.png"  # CT slice, RGB PNG 225 x 155


def _build(out: Path, presence_bias: float) -> Path:
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config()).eval()
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(presence_bias)
    save_sam3(model, build_processor(model.config), out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny random SAM3 whose presence head says "present" (so prompts are kept at threshold 0.1)."""
    return _build(tmp_path_factory.mktemp("tiny-sam3") / "model", presence_bias=20.0)


def segment(capsys, *argv):
    code = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_outputs(out_dir: Path, stem: str):
    mask = np.asarray(PILImage.open(out_dir / f"{stem}_mask.png"))
    summary = json.loads((out_dir / f"{stem}.json").read_text())
    overlay = PILImage.open(out_dir / f"{stem}_overlay.png")
    return mask, summary, overlay


def check_consistent(mask: np.ndarray, summary: dict, shape: tuple[int, int]) -> None:
    assert mask.shape == shape
    values = {e["value"] for e in summary["labels"] if e["value"] is not None}
    assert set(np.unique(mask).tolist()) <= values | {0}
    for e in summary["labels"]:
        if e["value"] is None:
            continue
        assert e["area_px"] == int((mask == e["value"]).sum()), e
        if e["area_px"]:
            ys, xs = np.nonzero(mask == e["value"])
            assert e["box"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    for key in ("value", "name", "score", "presence", "area_px", "area_mm2", "box", "absent", "prompt"):
        assert all(key in e for e in summary["labels"])


def test_kvasir_jpeg_two_prompts(data_dir, model_dir, tmp_path, capsys):
    image = data_dir / KVASIR
    code, out, err = segment(
        capsys, image, "-p", "polyp", "-p", "blood vessel", "--model", model_dir, "-o", tmp_path
    )
    assert code == 0, err
    stem = image.stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{stem}_mask.png", f"{stem}_overlay.png", f"{stem}.json"]
    )
    mask, summary, overlay = read_outputs(tmp_path, stem)
    check_consistent(mask, summary, (1070, 1348))
    assert [(e["value"], e["name"]) for e in summary["labels"]] == [(1, "polyp"), (2, "blood vessel")]
    assert summary["settings"]["threshold"] == 0.1 and summary["settings"]["presence_threshold"] == 0.5
    assert summary["settings"]["model"] == str(model_dir.resolve())
    assert all(e["area_mm2"] is None for e in summary["labels"])  # a JPEG has no physical pixel size
    assert summary["settings"]["image_encoder_runs"] == 1
    assert summary["settings"]["preprocessing"][0]["method"] == "uint8"
    assert {"medsam3", "torch", "transformers"} <= set(summary["versions"])
    assert summary["image"]["shape"] == [1070, 1348]
    assert all(e["presence"] > 0.99 for e in summary["labels"])  # the biased presence head
    assert "polyp" in out and "blood vessel" in out and "mask:" in out
    assert overlay.mode == "RGB"


def test_hc18_png_text_and_box_and_instances(data_dir, model_dir, tmp_path, capsys):
    image = data_dir / HC18
    code, _, err = segment(
        capsys,
        image,
        "-p",
        "fetal head",
        "--box",
        "200,100,600,450",
        "--instances",
        "--threshold",
        "0.2",
        "--model",
        model_dir,
        "-o",
        tmp_path,
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, image.stem)
    check_consistent(mask, summary, (540, 800))
    labels = summary["labels"]
    assert labels[0]["prompt"] == {
        "text": "fetal head",
        "kind": "text+box",
        "boxes": [[200.0, 100.0, 600.0, 450.0]],
        "box_labels": [1],
    }
    kept = [e for e in labels if not e["absent"]]
    assert [e["value"] for e in kept] == list(range(1, len(kept) + 1))
    assert all(e["instance"] == k + 1 for k, e in enumerate(kept))
    assert all(e["score"] > 0.2 for e in kept)
    assert summary["settings"]["mode"] == "instances" and summary["settings"]["threshold"] == 0.2


def test_biomedparse_rgba_png(data_dir, model_dir, tmp_path, capsys):
    image = data_dir / BIOMEDPARSE
    code, _, err = segment(
        capsys, image, "-p", "liver", "-p", "left kidney", "--model", model_dir, "-o", tmp_path
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, image.stem)
    check_consistent(mask, summary, (1024, 1024))
    assert mask.dtype == np.uint8


def test_sam_med2d_ct_png_with_ct_modality(data_dir, model_dir, tmp_path, capsys):
    image = data_dir / SAM_MED2D
    code, _, err = segment(
        capsys, image, "-p", "liver", "-p", "lung", "--modality", "CT", "--model", model_dir, "-o", tmp_path
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, image.stem)
    check_consistent(mask, summary, (155, 225))
    # 8-bit CT slices are already windowed: divided by 255, one encoder run for both concepts.
    assert summary["settings"]["image_encoder_runs"] == 1
    assert summary["settings"]["modality"] == "CT"
    assert summary["labels"][0]["preprocessing"].startswith("CT 8-bit data")


def test_single_dicom_ct_slice_in_hounsfield_units(data_dir, model_dir, tmp_path, capsys):
    image = data_dir / "dcmqi_ct3slice" / "ct-3slice" / "03.dcm"  # int16 HU, read as a (1, 512, 512) volume
    code, _, err = segment(
        capsys, image, "-p", "liver", "-p", "lung", "-p", "spleen", "--model", model_dir, "-o", tmp_path
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, "03")
    check_consistent(mask, summary, (512, 512))
    # The concepts choose the windows: abdomen for liver and spleen, lung for lung: two encoder runs.
    assert summary["settings"]["image_encoder_runs"] == 2
    assert [e["preprocessing"].split(" (")[0] for e in summary["labels"]] == [
        "CT window abdomen",
        "CT window lung",
        "CT window abdomen",
    ]
    assert summary["image"]["spacing"][:2] == pytest.approx([0.810547, 0.810547])
    liver = summary["labels"][0]
    assert liver["area_mm2"] == pytest.approx(liver["area_px"] * 0.810547**2, rel=1e-5)


def test_absent_prompt_is_reported_not_guessed(data_dir, tmp_path_factory, tmp_path, capsys):
    absent_model = _build(tmp_path_factory.mktemp("absent") / "model", presence_bias=-20.0)
    image = data_dir / HC18
    code, out, err = segment(capsys, image, "-p", "fetal head", "--model", absent_model, "-o", tmp_path)
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, image.stem)
    (entry,) = summary["labels"]
    assert entry["absent"] and entry["reason"] == "presence"
    assert entry["area_px"] == 0 and entry["box"] is None
    assert not mask.any()
    assert "absent (presence)" in out


def test_points_use_the_tracker_of_a_video_model_folder(data_dir, tmp_path_factory, tmp_path, capsys):
    import torch
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    config = tiny_sam3_video_config()
    folder = save_sam3(
        Sam3VideoModel(config).eval(),
        build_processor(config, video=True),
        tmp_path_factory.mktemp("video") / "model",
    )
    image = data_dir / HC18
    code, _, err = segment(
        capsys,
        image,
        "--point",
        "400,270",
        "-p",
        "fetal head",
        "--point",
        "420,300",
        "--presence-threshold",
        "0",
        "--threshold",
        "0",
        "--model",
        folder,
        "-o",
        tmp_path,
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path, image.stem)
    check_consistent(mask, summary, (540, 800))
    point, text = summary["labels"]
    assert point["source"] == "tracker" and point["prompt"]["kind"] == "point" and not point["absent"]
    assert point["name"] == "1 point"
    assert text["source"] == "detector" and text["prompt"]["kind"] == "text+point"


def test_points_without_tracker_weights_are_a_clear_error(data_dir, model_dir, tmp_path, capsys):
    code, _, err = segment(
        capsys, data_dir / HC18, "--point", "400,270", "--model", model_dir, "-o", tmp_path / "out"
    )
    assert code == 2
    assert "tracker" in err and "Give a text with the points" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["-p", "polyp", "--box", "10,10,900,200"],
            r"box \(10, 10, 900, 200\) lies outside the image of 800 x 540",
        ),
        (["-p", ""], "empty text prompt"),
        (["-p", "polyp", "--box", "10,10,5,20"], "degenerate"),
        (["--point", "3"], "point '3'"),
        ([], "no prompt"),
        (["-p", "polyp", "--window", "lung"], "CT only"),
        (["-p", "polyp", "--model", "{missing}"], "model folder not found"),
        (["-p", "polyp", "--point", "900,10"], r"point \(900, 10\) lies outside"),
        (["-p", " ".join(["lesion"] * 40)], r"too long: \d+ tokens, SAM3 reads at most 32"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(data_dir, model_dir, tmp_path, capsys, extra, message):
    out_dir = tmp_path / "out"
    extra = [str(tmp_path / "no-model") if e == "{missing}" else e for e in extra]
    if "--model" not in extra:
        extra += ["--model", str(model_dir)]
    code, _, err = segment(capsys, data_dir / HC18, *extra, "-o", out_dir)
    assert code == 2
    last = err.strip().splitlines()[-1]  # (model loading may print progress bars before it)
    assert last.startswith("error: ") and "Traceback" not in err
    assert re.search(message, last), err
    assert not out_dir.exists()


def test_output_folder_that_is_a_file(data_dir, model_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    code, _, err = segment(capsys, data_dir / HC18, "-p", "head", "--model", model_dir, "-o", target)
    assert code == 2 and "is an existing file" in err and target.read_text() == "x"


def test_missing_image_and_3d_volume(data_dir, model_dir, tmp_path, capsys):
    code, _, err = segment(
        capsys, tmp_path / "nope.png", "-p", "liver", "--model", model_dir, "-o", tmp_path / "o"
    )
    assert code == 2 and "nope.png" in err
    volume = sorted((data_dir / "msd_hippocampus" / "images").glob("*.nii.gz"))[0]
    # Volumes are segmented (tests/test_volume_cli.py); instance mode stays 2D only.
    code, _, err = segment(
        capsys, volume, "-p", "hippocampus", "--instances", "--model", model_dir, "-o", tmp_path / "o"
    )
    assert code == 2 and "instances is for 2D images" in err
    assert not (tmp_path / "o").exists()


def test_inputs_are_never_written(data_dir, model_dir, tmp_path, capsys):
    image = tmp_path / "case.png"
    image.write_bytes((data_dir / SAM_MED2D).read_bytes())
    before = image.read_bytes()
    code, _, err = segment(capsys, image, "-p", "liver", "--model", model_dir, "-o", tmp_path)
    assert code == 0, err
    assert image.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == {
        "case.png",
        "case_mask.png",
        "case_overlay.png",
        "case.json",
    }
    # The model folder is an input too: writing into it is refused before the model runs.
    listing = sorted(p.name for p in model_dir.iterdir())
    code, _, err = segment(capsys, image, "-p", "liver", "--model", model_dir, "-o", model_dir / "out")
    assert code == 2 and "refusing to write over an input" in err
    assert sorted(p.name for p in model_dir.iterdir()) == listing


def test_help_documents_prompt_association(capsys):
    assert main(["segment", "--help"]) == 0
    text = capsys.readouterr().out
    assert "attach to" in text and "--box" in text and "--instances" in text


def test_image_size_runs_the_model_at_another_input_size(data_dir, model_dir, tmp_path, capsys):
    """``--image-size`` gives the masks of a model resized beforehand, leaves the folder alone, and is
    recorded in the summary; a size the patches do not divide is refused before any output."""
    from medsam3.io.readers import read_image
    from medsam3.model.input_size import resize_sam3_input
    from medsam3.model.loading import load_sam3
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter

    before = (model_dir / "model.safetensors").read_bytes()
    code, _, err = segment(
        capsys,
        data_dir / HC18,
        "-p",
        "fetal head",
        "--model",
        model_dir,
        "--image-size",
        "168",
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert code == 0, err
    mask, summary, _ = read_outputs(tmp_path / "out", "000_HC")
    assert summary["settings"]["model_input_size"] == 168
    assert (model_dir / "model.safetensors").read_bytes() == before

    loaded = load_sam3(model_dir, device="cpu", dtype="fp32")
    loaded.model = resize_sam3_input(loaded.model, 168)
    direct = Segmenter(loaded).segment(read_image(data_dir / HC18), [Prompt(text="fetal head")])
    np.testing.assert_array_equal(mask, direct.label_map)
    plain = Segmenter(model_dir, device="cpu")
    assert plain.engine.image_size == 224 and plain.engine.at_size(None) is plain.engine

    code, _, err = segment(
        capsys,
        data_dir / HC18,
        "-p",
        "fetal head",
        "--model",
        model_dir,
        "--image-size",
        "100",
        "-o",
        tmp_path / "bad",
        "--device",
        "cpu",
    )
    assert code == 2 and "multiple of the patch size 14" in err
    assert not (tmp_path / "bad").exists()


def test_track_mode_refuses_a_resized_model(model_dir):
    from medsam3.errors import OptionError
    from medsam3.predict.segmenter import Segmenter

    with pytest.raises(OptionError, match="image_size cannot be combined with mode track"):
        Segmenter(model_dir, device="cpu", image_size=168, mode="track")
