"""Pairing prediction files with reference files: keys, label names, grids (hand-made cases)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError
from medsam3.evaluate.pairing import (
    align_prediction,
    case_key,
    case_name,
    index_folder,
    match_labels,
    read_summary,
    reference_names,
    resample_nearest,
    summary_for,
)
from medsam3.image import Image


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.bundled()


def test_case_keys():
    assert case_key("a/case7_mask.png") == "case7"
    assert case_key("case7_PRED.nii.gz") == "case7"
    assert case_key("case7.seg.nrrd") == "case7"
    assert case_key("000_HC_Annotation.png") == "000_hc"
    assert case_key("a_seg_mask.png") == "a_seg"  # one suffix only
    assert case_key("_mask.png") == "_mask"  # nothing left: the stem itself
    assert case_name("Case7_gt.nii") == "Case7"


def test_index_folder(tmp_path):
    for name in ("b_mask.png", "b.json", "b_overlay.png", ".hidden.png", "notes.txt", "a.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert index_folder(tmp_path, "prediction") == {"a": tmp_path / "a.nii.gz", "b": tmp_path / "b_mask.png"}
    (tmp_path / "B_pred.png").write_bytes(b"x")
    with pytest.raises(InputError, match="same case key 'b'"):
        index_folder(tmp_path, "prediction")
    with pytest.raises(InputError, match="folder not found"):
        index_folder(tmp_path / "nope", "reference")


def test_summary_of_medsam3_segment(tmp_path):
    doc = {
        "labels": [
            {"value": 1, "name": "polyp", "prompt": {"text": "polyp"}, "score": 0.8, "presence": 0.9},
            {"value": 2, "name": "nucleus #1", "prompt": {"text": "nucleus"}, "score": 0.5, "presence": None},
            {"value": None, "name": "lung", "prompt": {"text": "lung"}, "score": 0.01, "absent": True},
        ]
    }
    (tmp_path / "img.json").write_text(json.dumps(doc))
    (tmp_path / "img_mask.png").write_bytes(b"x")
    path = summary_for(tmp_path / "img_mask.png")
    assert path == tmp_path / "img.json"
    s = read_summary(path)
    assert s.names == {1: "polyp", 2: "nucleus"} and s.scores == {1: 0.8, 2: 0.5} and s.presence == {1: 0.9}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a prediction summary"):
        read_summary(tmp_path / "bad.json")


def test_reference_names_from_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    assert reference_names(tmp_path, None)[0] == {1: "liver", 2: "spleen"}
    user = tmp_path / "names.json"
    user.write_text(json.dumps({"1": "Kidney_L"}))
    assert reference_names(tmp_path, user) == ({1: "Kidney_L"}, str(user))


def test_match_by_name_through_the_vocabulary(vocab):
    matches, warns = match_labels(
        [1, 2],
        {1: "Kidney_L", 2: "liver"},
        [3, 4, 9],
        {3: "Liver", 4: "left kidney", 9: "spleen"},
        vocab,
        where="c1",
    )
    assert [(m.ref_value, m.name, m.pred_values, m.how) for m in matches] == [
        (1, "left kidney", [4], "name"),
        (2, "liver", [3], "name"),
    ]
    assert warns == ["c1: predicted labels ['spleen'] are not named by the reference (not scored)"]
    # several prediction values of one concept (instances) are one mask
    matches, _ = match_labels([1], {1: "cell nucleus"}, [1, 2], {1: "nucleus", 2: "nuclei"}, vocab)
    assert matches[0].pred_values == [1, 2]


def test_match_without_prediction_names(vocab):
    matches, warns = match_labels([1, 2], {1: "liver", 2: "spleen"}, [1, 2, 5], {}, vocab, where="c")
    assert [(m.ref_value, m.name, m.pred_values, m.how) for m in matches] == [
        (1, "liver", [1], "value"),
        (2, "spleen", [2], "value"),
    ]
    assert "prediction values [5]" in warns[0]
    # a binary reference takes the prediction's single value, whatever it is
    matches, _ = match_labels([1], {}, [255], {}, vocab)
    assert (matches[0].pred_values, matches[0].name, matches[0].how) == ([255], "foreground", "single label")
    with pytest.raises(InputError, match="give --label-map"):
        match_labels([1], {}, [1, 2], {}, vocab, where="c")


def test_match_unnamed_reference_with_named_prediction(vocab):
    matches, _ = match_labels([1], {}, [1], {1: "Polyps"}, vocab)
    assert (matches[0].name, matches[0].pred_values) == ("polyp", [1])
    with pytest.raises(InputError, match="give --ref-labels"):
        match_labels([1], {}, [1, 2], {1: "polyp", 2: "liver"}, vocab, where="c")
    with pytest.raises(InputError, match="have no names"):
        match_labels([1, 2], {}, [1], {1: "polyp"}, vocab, where="c")


def volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, path="x.nii.gz"):
    return Image(
        np.asarray(array),
        spacing,
        origin,
        np.eye(3) if direction is None else direction,
        "OTHER",
        {"path": path, "spacing_known": True},
    )


def test_align_same_and_rearranged_grids(tmp_path):
    ref_arr = np.zeros((4, 5, 6), np.uint8)
    ref_arr[1:3, 2:4, 1:5] = 1
    ref = volume(ref_arr)
    assert align_prediction(volume(ref_arr), ref, tmp_path / "p", tmp_path / "r")[1] == "same grid"
    # the same voxels stored with the x axis reversed (direction -1, origin at the far end)
    flipped = volume(ref_arr[:, :, ::-1], origin=(5.0, 0.0, 0.0), direction=np.diag([-1.0, 1.0, 1.0]))
    arr, how = align_prediction(flipped, ref, tmp_path / "p", tmp_path / "r")
    assert how == "rearranged" and np.array_equal(arr, ref_arr)
    # a picture without pixel size only needs the same shape
    pic = Image(ref_arr[0], (1.0, 1.0), (0.0, 0.0), np.eye(2), "OTHER", {"spacing_known": False})
    ref2d = Image(ref_arr[0], (0.3, 0.3), (5.0, 5.0), np.eye(2), "OTHER", {})
    assert align_prediction(pic, ref2d, tmp_path / "p", tmp_path / "r")[1] == "same shape"


def test_align_refuses_other_grids_unless_resampling(tmp_path):
    ref_arr = np.zeros((4, 8, 8), np.uint8)
    ref_arr[:, 2:6, 4:8] = 1
    ref = volume(ref_arr)
    # the same object on a grid of 2 mm voxels in-plane, voxel centres at 0.5 mm offsets
    coarse = np.zeros((4, 4, 4), np.uint8)
    coarse[:, 1:3, 2:4] = 1
    pred = volume(coarse, spacing=(2.0, 2.0, 1.0), origin=(0.5, 0.5, 0.0))
    with pytest.raises(InputError) as err:
        align_prediction(pred, ref, tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")
    msg = str(err.value)
    assert "pred.nii.gz" in msg and "ref.nii.gz" in msg and "--resample" in msg
    assert "spacing (2.0, 2.0, 1.0)" in msg and "spacing (1.0, 1.0, 1.0)" in msg
    arr, how = align_prediction(pred, ref, tmp_path / "p", tmp_path / "r", resample=True)
    assert how == "resampled" and np.array_equal(arr, ref_arr)
    with pytest.raises(InputError, match="is 2D but its reference"):
        align_prediction(Image.from_array(np.zeros((8, 8))), ref, tmp_path / "p", tmp_path / "r")


def test_resample_picture_without_geometry_stretches():
    small = Image(
        np.array([[0, 1], [2, 3]], np.uint8),
        (1.0, 1.0),
        (0.0, 0.0),
        np.eye(2),
        "OTHER",
        {"spacing_known": False},
    )
    big = Image(
        np.zeros((4, 4), np.uint8), (1.0, 1.0), (0.0, 0.0), np.eye(2), "OTHER", {"spacing_known": False}
    )
    assert resample_nearest(small, big).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
