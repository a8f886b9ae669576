"""3D post-processing and volume prompts by hand: chains, holes, components, labels, box mapping."""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.errors import PromptError
from medsam3.image import Image
from medsam3.predict.options import VolumeOptions
from medsam3.predict.volume.plan import check_volume_request, plan_prompt
from medsam3.predict.volume.post import (
    assign_labels,
    chain_from_key,
    fill_holes_2d,
    fill_holes_in_slices,
    filter_components,
)
from medsam3.predict.volume.prompts import (
    VolumePrompt,
    canonical_box,
    covered_slices,
    slice_plane_box,
    validate_volume_prompt,
    volume_prompts_from_cli,
)
from medsam3.preprocess.orientation import plan_reorientation

# --------------------------------------------------------------------------------------------------
# post-processing


def test_chain_follows_overlapping_neighbours_from_the_key_slice():
    mask = np.zeros((7, 4, 4), dtype=bool)
    mask[0, 0, 0] = True  # overlaps slice 1 -> but slice 1 is cut off from the key by slice 2
    mask[1, 0, 0] = True
    mask[2, 3, 3] = True  # no overlap with slice 3: the chain stops going down here
    mask[3, 1:3, 1:3] = True  # key slice
    mask[4, 2, 2] = True  # overlaps the key
    mask[5, 2, 2:4] = True  # overlaps slice 4
    mask[6, 0, 0] = True  # does not overlap slice 5
    out = chain_from_key(mask, 0, 3)
    expected = np.zeros_like(mask)
    expected[3:6] = mask[3:6]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(chain_from_key(mask, 0, 2)[2], mask[2])
    assert chain_from_key(mask, 0, 2).sum() == 1
    empty_key = mask.copy()
    empty_key[3] = False
    assert not chain_from_key(empty_key, 0, 3).any()
    # along another axis: slices are mask[:, :, k]
    np.testing.assert_array_equal(chain_from_key(mask.transpose(1, 2, 0), 2, 3), expected.transpose(1, 2, 0))


def test_fill_holes_only_enclosed_regions_and_up_to_a_size():
    m = np.zeros((9, 9), dtype=bool)
    m[1:8, 1:8] = True
    m[2:4, 2:4] = False  # hole of 4 pixels
    m[5, 5] = False  # hole of 1 pixel
    m[4, 1] = False  # a notch open to the border (column 0 is background): not a hole
    filled = fill_holes_2d(m)
    assert filled[2:4, 2:4].all() and filled[5, 5]
    assert not filled[4, 0] and not filled[4, 1]
    small = fill_holes_2d(m, max_area=1)
    assert small[5, 5] and not small[2:4, 2:4].any()
    # a one-pixel hole in a 3 x 3 square
    ring = np.zeros((5, 5), dtype=bool)
    ring[1:4, 1:4] = True
    ring[2, 2] = False
    assert fill_holes_2d(ring)[2, 2]
    vol = np.stack([m, np.zeros_like(m), m])
    out = fill_holes_in_slices(vol, 0, max_area=1)
    assert out[0, 5, 5] and out[2, 5, 5] and not out[1].any() and not out[0, 2, 2]
    assert not vol[0, 5, 5]  # input untouched


def test_components_26_connected_size_filter_and_largest():
    m = np.zeros((4, 6, 6), dtype=bool)
    m[0, 0:2, 0:2] = True  # 4 voxels
    m[1, 2, 2] = True  # touches (0, 1, 1) by a corner: same component -> 5 voxels
    m[3, 4:6, 4:6] = True  # 4 voxels, separate
    m[3, 0, 5] = True  # 1 voxel
    out, rep = filter_components(m, min_voxels=4)
    assert (rep.found, rep.kept, rep.removed_voxels) == (3, 2, 1)
    assert out.sum() == 9 and not out[3, 0, 5]
    largest, rep = filter_components(m, keep_largest=True)
    assert largest.sum() == 5 and largest[1, 2, 2] and (rep.found, rep.kept) == (3, 1)
    none, rep = filter_components(m, min_voxels=6)
    assert not none.any() and rep.kept == 0
    same, rep = filter_components(np.zeros((2, 2, 2), bool))
    assert not same.any() and rep.found == 0


def test_assign_labels_resolves_overlaps_by_confidence():
    shape = (2, 3, 4)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[0, :, :2] = True
    b[0, :, 1:] = True  # overlap on column 1 of slice 0
    b[1] = True
    # concept 0 (a): 0.9 on column 0, 0.2 on column 1; concept 2 (b): 0.5 -> b wins column 1
    conf = {(0, 0): np.array([[0.9, 0.2, 0, 0]] * 3), (2, 0): 0.5}

    def confidence(i, k):
        return conf[(i, k)]

    out = assign_labels([a, None, b], [1, 2, 3], 0, confidence, shape)
    expected = np.array([[[1, 3, 3, 3]] * 3, [[3, 3, 3, 3]] * 3], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)
    # ties go to the earlier concept
    out = assign_labels([a, b], [1, 2], 0, lambda i, k: 0.5, shape)
    assert (out[0, :, 1] == 1).all() and (out[0, :, 2:] == 2).all()
    assert out.dtype == np.uint8
    assert assign_labels([None], [300], 0, confidence, shape).dtype == np.uint16


# --------------------------------------------------------------------------------------------------
# prompts on volumes


def test_cli_items_for_volumes():
    prompts = volume_prompts_from_cli(
        [
            ("text", "liver"),
            ("box", "1,2,10,20"),
            ("box_slice", "7"),
            ("text", "spleen"),
            ("text", "tumour"),
            ("box3d", "1,2,3,10,20,30"),
        ]
    )
    assert [(p.text, p.kind) for p in prompts] == [
        ("liver", "text+box"),
        ("spleen", "text"),
        ("tumour", "text+box3d"),
    ]
    assert prompts[0].box_slice == 7 and prompts[0].boxes == [(1.0, 2.0, 10.0, 20.0)]
    assert prompts[2].box3d == (1.0, 2.0, 3.0, 10.0, 20.0, 30.0)
    lead = volume_prompts_from_cli([("box3d", "0,0,0,4,4,4")])
    assert lead[0].text is None and lead[0].display_name == "3D box" and lead[0].model_text == "visual"
    for items, message in [
        ([("text", "a"), ("point", "3,4")], "points are for 2D images"),
        ([("text", "a"), ("box3d", "1,2,3")], "expected x1,y1,z1,x2,y2,z2"),
        ([("text", "a"), ("box_slice", "x")], "expected a slice index"),
        ([("text", "a"), ("box_slice", "1"), ("box_slice", "2")], "two --box-slice"),
        ([], "no prompt"),
    ]:
        with pytest.raises(PromptError, match=message):
            volume_prompts_from_cli(items)


def test_validate_volume_prompts_by_hand():
    shape = (10, 40, 60)  # Z, Y, X
    validate_volume_prompt(VolumePrompt("a", boxes=[(0, 0, 60, 40)], box_slice=9), shape)
    validate_volume_prompt(VolumePrompt("a", box3d=(0, 0, 0, 60, 40, 10)), shape)
    cases = [
        (VolumePrompt("a", boxes=[(0, 0, 5, 5)]), "needs --box-slice"),
        (VolumePrompt("a", boxes=[(0, 0, 5, 5)], box_slice=10), r"outside the 10 slices \(0..9\)"),
        (VolumePrompt("a", boxes=[(0, 0, 61, 5)], box_slice=1), "outside the slices of the volume of 60 x"),
        (VolumePrompt("a", boxes=[(5, 0, 5, 5)], box_slice=1), "degenerate"),
        (VolumePrompt("a", box3d=(0, 0, 4, 5, 5, 4)), "degenerate"),
        (VolumePrompt("a", box3d=(0, 0, 0, 5, 5, 11)), "outside the volume"),
        (VolumePrompt("a", boxes=[(0, 0, 5, 5)], box_slice=1, box3d=(0, 0, 0, 5, 5, 5)), "not both"),
        (VolumePrompt("a", box_slice=2), "without a --box"),
        (VolumePrompt(""), "empty text"),
        (VolumePrompt(), "needs a text"),
        (VolumePrompt(boxes=[(0, 0, 5, 5)], box_labels=[0], box_slice=1), "positive box"),
    ]
    for prompt, message in cases:
        with pytest.raises(PromptError, match=message):
            validate_volume_prompt(prompt, shape)


def test_boxes_map_from_input_voxels_to_canonical_slices():
    # ITK axes pointing R, A, S (a typical NIfTI): the canonical LPS frame flips x and y.
    ras = Image(
        np.zeros((10, 40, 60), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]), "CT"
    )
    reo = plan_reorientation(ras)
    assert reo.flipped == (1, 2) and reo.through_plane_axis == 0
    lo, hi = canonical_box((3, 5, 10), (4, 15, 20), reo.source_axes, reo.flipped, reo.canonical_shape)
    np.testing.assert_allclose(lo, [3, 40 - 15, 60 - 20])
    np.testing.assert_allclose(hi, [4, 40 - 5, 60 - 10])
    assert slice_plane_box(lo, hi, 0, reo.canonical_shape) == (40.0, 25.0, 50.0, 35.0)
    assert list(covered_slices(lo, hi, 0, 10)) == [3]
    plan = plan_prompt(VolumePrompt("a", boxes=[(10, 5, 20, 15)], box_slice=3), reo, 0)
    assert plan.key == 3 and plan.boxes == ((40.0, 25.0, 50.0, 35.0),) and plan.slices == range(10)
    plan3d = plan_prompt(VolumePrompt("a", box3d=(10, 5, 2.5, 20, 15, 6)), reo, 0)
    assert plan3d.slices == range(2, 6) and plan3d.key is None  # slices 2 (partly), 3, 4, 5
    # Coronal slices (axis 1): rows run along z, shown with superior at the top (rows mirrored).
    plan_cor = plan_prompt(VolumePrompt("a", box3d=(10, 5, 2, 20, 15, 6)), reo, 1)
    assert plan_cor.slices == range(25, 35)
    assert plan_cor.boxes == ((40.0, 10.0 - 6.0, 50.0, 10.0 - 2.0),)
    with pytest.raises(PromptError, match="not a slice along the chosen coronal axis"):
        plan_prompt(VolumePrompt("a", boxes=[(10, 5, 20, 15)], box_slice=3), reo, 1)


def test_check_volume_request_without_the_model():
    vol = Image.from_array(np.zeros((5, 8, 9), np.int16), modality="CT")
    prompts, reo, axis, plans = check_volume_request(vol, [VolumePrompt("liver")], VolumeOptions(axis=2))
    assert axis == 2 and plans[0].slices == range(9) and reo.is_identity
    with pytest.raises(PromptError, match="track mode takes text prompts only"):
        check_volume_request(vol, [VolumePrompt("a", box3d=(0, 0, 0, 2, 2, 2))], VolumeOptions(mode="track"))
    for bad, message in [
        (dict(mode="video"), "mode must be one of slices, track, clips, got 'video'"),
        (dict(axis=3), "axis must be one of 0, 1, 2, got 3"),
        (dict(slice_batch=0), "slice_batch must be at least 1, got 0"),
        (dict(min_component_ml=-1), "min_component_ml must be at least 0, got -1"),
    ]:
        with pytest.raises(PromptError, match=message):
            VolumeOptions(**bad)
