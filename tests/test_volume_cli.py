"""``medsam3 segment VOLUME`` end to end on real volumes: outputs with the input's format and geometry.

A tiny random SAM3 saved to a folder, its presence head biased so that concepts are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsam3.cli import main
from medsam3.io.readers import read_image, read_label_map
from video_fixtures import OPEN_THRESHOLDS

HIPPOCAMPUS = "msd_hippocampus/images/hippocampus_019.nii.gz"  # MR (41, 47, 36)


def _save(model, processor, out: Path) -> Path:
    from medsam3.model.loading import save_sam3

    return save_sam3(model, processor, out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor

    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config()).eval()
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    return _save(model, build_processor(model.config), tmp_path_factory.mktemp("tiny") / "model")


def segment(capsys, *argv):
    code = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_case(out_dir: Path, stem: str, source, label_suffix: str, n_prompts: int) -> dict:
    """The label map read back has the input's geometry, values 0..n, and matches the JSON."""
    summary = json.loads((out_dir / f"{stem}.json").read_text())
    labels_path = out_dir / f"{stem}_seg{label_suffix}"
    assert summary["outputs"]["labels"] == labels_path.name
    labels = read_label_map(labels_path)
    assert labels.same_geometry(source), (labels.spacing, labels.origin, source.spacing, source.origin)
    assert set(np.unique(labels.array).tolist()) <= set(range(n_prompts + 1))
    assert [e["value"] for e in summary["labels"]] == list(range(1, n_prompts + 1))
    for e in summary["labels"]:
        mask = labels.array == e["value"]
        assert e["voxels"] == int(mask.sum())
        assert e["volume_ml"] == pytest.approx(e["voxels"] * source.voxel_volume_ml, rel=1e-5)
        if e["voxels"]:
            zs = np.flatnonzero(mask.any(axis=(1, 2)))
            assert e["slice_range"] == [int(zs[0]), int(zs[-1])]
    assert summary["image"]["shape"] == list(source.spatial_shape)
    for kind in ("overlay", "montage"):
        assert (out_dir / summary["outputs"][kind]).stat().st_size > 0
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left
    return summary


def test_nifti_two_prompts(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / HIPPOCAMPUS
    code, out, err = segment(
        capsys,
        src,
        "-p",
        "hippocampus",
        "-p",
        "left kidney",
        "--model",
        model_dir,
        "--slice-batch",
        "8",
        "-o",
        tmp_path,
    )
    assert code == 0, err
    summary = check_case(tmp_path, "hippocampus_019", read_image(src), ".nii.gz", 2)
    assert sorted(summary["outputs"]) == ["label_names", "labels", "montage", "overlay"]
    settings = summary["settings"]
    assert settings["image_encoder_runs"] == 41 and settings["slice_plane"] == "axial"
    assert settings["volume"]["slice_batch"] == 8 and settings["mode"] == "volume (slices)"
    assert "hippocampus" in out and "voxels" in out and "labels:" in out


def test_nrrd_with_options(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / "pyradiomics" / "breast1_image.nrrd"  # MR (21, 120, 45)
    code, _, err = segment(
        capsys,
        src,
        "-p",
        "breast lesion",
        "--keep-largest",
        "--min-component-voxels",
        "5",
        "--no-fill-holes",
        "--model",
        model_dir,
        "-o",
        tmp_path,
    )
    assert code == 0, err
    summary = check_case(tmp_path, "breast1_image", read_image(src), ".nrrd", 1)
    (entry,) = summary["labels"]
    assert entry["post"]["keep_largest"] and entry["post"]["components_kept"] <= 1
    assert summary["settings"]["volume"]["fill_holes"] is False
    assert read_label_map(tmp_path / "breast1_image_seg.nrrd").meta["label_names"] == {1: "breast lesion"}


def test_mha_in_mha_out(data_dir, model_dir, tmp_path, capsys):
    from medsam3.io.writers import write_image

    source = read_image(data_dir / HIPPOCAMPUS)
    src = write_image(source, tmp_path / "case.mha")
    code, _, err = segment(capsys, src, "-p", "hippocampus", "--model", model_dir, "-o", tmp_path / "out")
    assert code == 0, err
    check_case(tmp_path / "out", "case", read_image(src), ".mha", 1)


def test_npz_in_npz_out(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / "medsam2_recist_npz" / "CT_Lesion_000001_02_01_008-023.npz"  # (16, 512, 512), PLI
    code, _, err = segment(capsys, src, "-p", "lesion", "--model", model_dir, "-o", tmp_path)
    assert code == 0, err
    source = read_image(src)
    summary = check_case(tmp_path, src.stem, source, ".npz", 1)
    with np.load(tmp_path / f"{src.stem}_seg.npz") as npz:
        assert npz["segs"].shape == np.load(src)["imgs"].shape  # the input's own array layout
        assert {"spacing", "origin", "direction"} <= set(npz.files)
    assert summary["settings"]["orientation"].startswith("PLI -> LPS")


def test_dicom_series_gives_nifti_and_a_dicom_seg(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / "dcmqi_ct3slice" / "ct-3slice"  # 3 CT slices of 512 x 512 with full UIDs
    code, _, err = segment(capsys, src, "-p", "liver", "-p", "heart", "--model", model_dir, "-o", tmp_path)
    assert code == 0, err
    source = read_image(src)
    summary = check_case(tmp_path, "ct-3slice", source, ".nii.gz", 2)
    assert summary["outputs"]["dicom_seg"] == "ct-3slice_seg.dcm"
    seg = read_label_map(tmp_path / "ct-3slice_seg.dcm", reference=source, overlap="error")
    nifti = read_label_map(tmp_path / "ct-3slice_seg.nii.gz")
    assert seg.same_geometry(source)
    np.testing.assert_array_equal(seg.array, nifti.array)
    assert seg.meta["label_names"] == {1: "liver", 2: "heart"}


def test_anonymised_dicom_series_gets_nifti_only(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / "totalsegmentator" / "example_ct_dicom"  # 20 slices 512 x 512, no Study/Series UID
    code, _, err = segment(
        capsys, src, "-p", "liver", "--slice-batch", "10", "--model", model_dir, "-o", tmp_path
    )
    assert code == 0, err
    summary = check_case(tmp_path, "example_ct_dicom", read_image(src), ".nii.gz", 1)
    assert "dicom_seg" not in summary["outputs"] and not (tmp_path / "example_ct_dicom_seg.dcm").exists()
    assert "StudyInstanceUID" in summary["dicom_seg_not_written"]


def test_box_prompts_on_a_volume(data_dir, model_dir, tmp_path, capsys):
    src = data_dir / HIPPOCAMPUS
    code, _, err = segment(
        capsys,
        src,
        "-p",
        "hippocampus",
        "--box",
        "5,5,30,40",
        "--box-slice",
        "20",
        "-p",
        "tumour",
        "--box3d",
        "0,0,10,36,47,15",
        "--model",
        model_dir,
        "-o",
        tmp_path,
    )
    assert code == 0, err
    summary = check_case(tmp_path, "hippocampus_019", read_image(src), ".nii.gz", 2)
    key, box3d = summary["labels"]
    assert key["prompt"] == {
        "text": "hippocampus",
        "kind": "text+box",
        "boxes": [[5.0, 5.0, 30.0, 40.0]],
        "box_labels": [1],
        "box_slice": 20,
    }
    assert key["voxels"] > 0 and box3d["voxels"] > 0
    assert key["slice_range"][0] <= 20 <= key["slice_range"][1]  # the chain contains the key slice
    assert 10 <= box3d["slice_range"][0] and box3d["slice_range"][1] <= 14
    assert box3d["slices_detected"] <= 5


def test_track_mode_from_a_video_model_folder(data_dir, tmp_path_factory, tmp_path, capsys):
    import torch
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor

    config = tiny_sam3_video_config(**OPEN_THRESHOLDS)
    config.detector_config.detr_decoder_config.num_queries = 1
    torch.manual_seed(0)
    model = Sam3VideoModel(config).eval()
    with torch.no_grad():
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    folder = _save(model, build_processor(config, video=True), tmp_path_factory.mktemp("video") / "model")
    src = data_dir / "pyradiomics" / "breast1_image.nrrd"
    code, _, err = segment(
        capsys, src, "-p", "lesion", "--mode", "track", "--probes", "2", "--model", folder, "-o", tmp_path
    )
    assert code == 0, err
    summary = check_case(tmp_path, "breast1_image", read_image(src), ".nrrd", 1)
    assert summary["labels"][0]["source"] == "video tracker" and summary["labels"][0]["voxels"] > 0
    assert summary["settings"]["video_model"] == str(folder.resolve())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-p", "liver", "--box", "1,1,5,5"], "needs --box-slice"),
        (["-p", "liver", "--box", "1,1,5,5", "--box-slice", "41"], r"outside the 41 slices"),
        (["-p", "liver", "--box3d", "0,0,0,37,10,10"], "lies outside the volume of 36 x 47 x 41"),
        (["-p", "liver", "--point", "3,3"], "points are for 2D images"),
        (["-p", "liver", "--mode", "track", "--box3d", "0,0,0,5,5,5"], "text prompts only"),
        (["-p", "liver", "--window", "lung"], "CT only"),
        (["-p", "liver", "--slice-batch", "0"], "slice_batch must be at least 1"),
        (["-p", "liver", "--mode", "track"], "video model"),
    ],
)
def test_bad_volume_inputs_exit_2_and_write_nothing(data_dir, model_dir, tmp_path, capsys, extra, message):
    out_dir = tmp_path / "out"
    code, _, err = segment(capsys, data_dir / HIPPOCAMPUS, *extra, "--model", model_dir, "-o", out_dir)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and message in last, err  # argparse prefixes "medsam3 segment: "
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_inputs_are_never_written(data_dir, model_dir, tmp_path, capsys):
    series = tmp_path / "series"
    shutil.copytree(data_dir / "dcmqi_ct3slice" / "ct-3slice", series)
    before = {p.name: p.read_bytes() for p in series.iterdir()}
    code, _, err = segment(capsys, series, "-p", "liver", "--model", model_dir, "-o", series / "out")
    assert code == 2 and "refusing to write over an input" in err
    code, _, err = segment(capsys, series, "-p", "liver", "--model", model_dir, "-o", tmp_path)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in series.iterdir()} == before
    assert {p.name for p in tmp_path.iterdir()} == {
        "series",
        "series_seg.nii.gz",
        "series_seg.json",
        "series_seg.dcm",
        "series_overlay.png",
        "series_montage.png",
        "series.json",
    }
