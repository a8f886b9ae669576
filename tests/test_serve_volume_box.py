"""``medsam3 serve``: boxes drawn on a displayed slice segment the whole volume (``propagate``), and 3D boxes
in input voxels (``box3d``).

Three levels: the display-slice box -> input-voxel box mapping by hand and against the display volume
itself (synthetic volumes whose voxels hold their own index, stored in flipped / permuted orientations);
the whole request on the real MSD hippocampus volume with the tiny random SAM3 of ``serve_fixtures``; and
the refusals (422 before any job is queued).
"""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.errors import PromptError
from medsam3.image import Image
from medsam3.io.readers import read_image, read_label_map
from medsam3.predict.prompts import Prompt
from medsam3.predict.volume.plan import plan_prompt
from medsam3.predict.volume.prompts import VolumePrompt
from medsam3.preprocess.orientation import plan_reorientation
from medsam3.preprocess.slices import take_slice
from medsam3.serve.results import display_box_to_input, propagation_prompts, reorientation_of
from medsam3.serve.store import PLANE_AXIS
from serve_fixtures import HC18, HIPPO, client_for, make_settings, segment, upload

HIPPO19 = "msd_hippocampus/images/hippocampus_019.nii.gz"  # MR NIfTI (41, 47, 36), stored RAS

# Direction matrices (columns: where ITK axes i, j, k point, LPS).
RAS = np.diag([-1.0, -1.0, 1.0])
# Sagittal acquisition: i towards posterior, j towards inferior, k (the stored slices) towards the left.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
# Coronal acquisition: i towards the right, j towards inferior, k towards anterior.
CORONAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])


def numbered(shape, direction) -> Image:
    """A volume whose voxel ``(k, j, i)`` holds its flat index, with ``direction``."""
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    return Image(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction, "MR", {"path": "numbered"})


def input_voxels(image: Image, box3d) -> set[int]:
    x1, y1, z1, x2, y2, z2 = (int(v) for v in box3d)
    assert (x1, y1, z1, x2, y2, z2) == tuple(box3d)  # integer boxes stay integers
    return set(image.array[z1:z2, y1:y2, x1:x2].ravel().tolist())


# --------------------------------------------------------------------------------------------------
# the mapping


def test_display_box_to_input_by_hand():
    # RAS (4, 5, 6): the canonical frame mirrors y (5 rows) and x (6 columns); axial slice 2 is input slice 2.
    reo = plan_reorientation(numbered((4, 5, 6), RAS))
    assert display_box_to_input(reo, "axial", 2, (1, 2, 3, 4)) == (6 - 3, 5 - 4, 2, 6 - 1, 5 - 2, 3)

    # Sagittal acquisition (4, 5, 6): a sagittal display slice is a stored slice k, rows = j (j points
    # inferior and the display puts superior up: no mirroring in the end), columns = i (posterior).
    image = numbered((4, 5, 6), SAGITTAL)
    reo = plan_reorientation(image)
    assert reo.through_plane_axis == PLANE_AXIS["sagittal"]
    assert display_box_to_input(reo, "sagittal", 1, (2, 1, 5, 3)) == (2, 1, 1, 5, 3, 2)
    display = reo.apply(image.array)
    np.testing.assert_array_equal(take_slice(display, 2, 1, display=True), image.array[1])

    # The same volume's axial display slice 3 is input row j = 5 - 1 - 3 = 1 (j points inferior); its
    # rows run along i (anterior at the top, i points posterior: row = i), its columns along k (right to
    # left, k points left: column = k).
    assert display_box_to_input(reo, "axial", 3, (0, 1, 2, 4)) == (1, 1, 0, 4, 2, 2)
    np.testing.assert_array_equal(take_slice(display, 0, 3, display=True), image.array[:, 1, :].T)


@pytest.mark.parametrize("direction", [np.eye(3), RAS, SAGITTAL, CORONAL], ids=["LPS", "RAS", "sag", "cor"])
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_display_box_covers_the_voxels_the_slice_shows(direction, plane):
    image = numbered((5, 6, 7), direction)
    reo = plan_reorientation(image)
    display = reo.apply(image.array)
    axis = PLANE_AXIS[plane]
    for index in (0, display.shape[axis] - 1):
        shown = take_slice(display, axis, index, display=True)
        rows, cols = shown.shape
        for r1, c1, r2, c2 in ((0, 0, rows, cols), (1, 2, 3, 4), (rows - 2, 0, rows, 1)):
            box3d = display_box_to_input(reo, plane, index, (c1, r1, c2, r2))
            assert input_voxels(image, box3d) == set(shown[r1:r2, c1:c2].ravel().tolist())
            x1, y1, z1, x2, y2, z2 = box3d
            assert sorted([x2 - x1, y2 - y1, z2 - z1])[0] == 1  # one voxel thick through the plane
        # A single pixel lands on the single voxel that shows it.
        box3d = display_box_to_input(reo, plane, index, (c1 + 0.25, r1 + 0.5, c1 + 0.75, r1 + 1.0))
        x = int(np.floor(box3d[0]))
        y = int(np.floor(box3d[1]))
        z = int(np.floor(box3d[2]))
        assert image.array[z, y, x] == shown[r1, c1]


def test_reorientation_from_the_upload_description_matches_the_image():
    image = numbered((5, 6, 7), CORONAL)
    info = {
        "shape": list(image.spatial_shape),
        "spacing": list(image.spacing),
        "origin": list(image.origin),
        "direction": image.direction.tolist(),
    }
    a, b = reorientation_of(info), plan_reorientation(image)
    assert (a.source_axes, a.flipped, a.canonical_shape) == (b.source_axes, b.flipped, b.canonical_shape)


def test_propagation_prompts_are_key_slice_boxes_the_volume_segmenter_reads_back():
    image = numbered((4, 5, 6), SAGITTAL)
    reo = plan_reorientation(image)
    out = propagation_prompts(
        [Prompt("lesion", boxes=[(2, 1, 5, 3), (0, 0, 1, 1)], box_labels=[1, 0]), Prompt("liver")],
        reo,
        "sagittal",
        1,
    )
    vp, text = out
    assert isinstance(vp, VolumePrompt) and vp.text == "lesion" and vp.box_slice == 1
    assert vp.boxes == [(2.0, 1.0, 5.0, 3.0), (0.0, 0.0, 1.0, 1.0)] and vp.box_labels == [1, 0]
    assert isinstance(text, Prompt) and text.text == "liver" and not text.boxes
    # The volume segmenter's own mapping puts the boxes back on the displayed slice it searches.
    plan = plan_prompt(vp, reo, reo.through_plane_axis)
    assert plan.key == 1 and plan.boxes == ((2.0, 1.0, 5.0, 3.0), (0.0, 0.0, 1.0, 1.0))
    assert plan.box_labels == (1, 0) and plan.slices == range(4)  # every stored slice is searched

    with pytest.raises(PromptError, match="acquired in sagittal slices.*on a sagittal slice"):
        propagation_prompts([Prompt("lesion", boxes=[(0, 0, 2, 2)])], reo, "axial", 1)


# --------------------------------------------------------------------------------------------------
# the HTTP API on a real volume


@pytest.fixture(scope="module")
def client(serve_model, tmp_path_factory):
    with client_for(make_settings(serve_model, tmp_path_factory.mktemp("work"))) as c:
        yield c


@pytest.fixture(scope="module")
def hippo(client, data_dir):
    r = upload(client, data_dir / HIPPO19)
    assert r.status_code == 201, r.text
    return r.json()


def same_geometry(a, b) -> bool:
    return (
        a.spatial_shape == b.spatial_shape
        and np.allclose(a.spacing, b.spacing, atol=1e-4)
        and np.allclose(a.origin, b.origin, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=1e-5)
    )


def test_box_on_an_axial_slice_segments_the_whole_volume(client, hippo, data_dir, tmp_path):
    reference = read_image(data_dir / HIPPO19)
    assert hippo["shape"] == [41, 47, 36] and hippo["orientation"] == "RAS"
    geo = hippo["display"]["planes"]["axial"]
    assert (geo["rows"], geo["cols"]) == (47, 36)
    box = [8.0, 10.0, 28.0, 37.5]
    status = segment(
        client,
        hippo["image_id"],
        {
            "prompts": [{"text": "hippocampus", "boxes": [box]}],
            "slice": {"plane": "axial", "index": 20},
            "propagate": True,
        },
    )
    assert status["status"] == "done", status
    result = status["result"]
    assert result["scope"] == {
        "kind": "volume",
        "key_slice": {"plane": "axial", "index": 20, "input_slice": 20},
    }
    assert result["shape"] == [41, 47, 36] and result["display_shape"] == [41, 47, 36]
    (entry,) = result["labels"]
    # RAS -> display: x and y mirrored (36 columns, 47 rows), axial slice 20 is stored slice 20.
    assert entry["prompt"]["kind"] == "text+box" and entry["prompt"]["box_slice"] == 20
    assert entry["prompt"]["boxes"] == [[36 - 28.0, 47 - 37.5, 36 - 8.0, 47 - 10.0]]

    f = tmp_path / "mask.nii.gz"
    f.write_bytes(client.get(f"/api/jobs/{status['job_id']}/mask").content)
    mask = read_label_map(f)
    assert same_geometry(mask, reference) and mask.array.shape == (41, 47, 36)
    summary = client.get(f"/api/jobs/{status['job_id']}/summary").json()
    assert summary["scope"]["kind"] == "volume" and summary["label_map"]["shape"] == [41, 47, 36]
    assert summary["settings"]["slice_plane"] == "axial"
    # The viewer's copy is the mask in the display frame (RAS -> LPS: y and x mirrored).
    labels = np.frombuffer(client.get(f"/api/jobs/{status['job_id']}/labels").content, np.uint8)
    np.testing.assert_array_equal(labels.reshape(41, 47, 36), mask.array[:, ::-1, ::-1])
    # The biased tiny model keeps a mask on every slice: the structure is followed outwards from the key
    # slice into the rest of the volume (a slice-only request would label slice 20 alone).
    assert not entry["absent"] and int((mask.array == 1).sum()) == entry["voxels"] > 0
    assert mask.array[20].any() and np.delete(mask.array, 20, axis=0).any()


def test_box3d_searches_only_the_slices_it_covers(client, hippo, data_dir, tmp_path):
    status = segment(
        client, hippo["image_id"], {"prompts": [{"text": "hippocampus", "box3d": [4, 6, 10, 30, 40, 13]}]}
    )
    assert status["status"] == "done", status
    result = status["result"]
    assert result["scope"] == {"kind": "volume"} and result["shape"] == [41, 47, 36]
    (entry,) = result["labels"]
    assert entry["prompt"]["kind"] == "text+box3d" and entry["prompt"]["box3d"] == [4, 6, 10, 30, 40, 13]
    f = tmp_path / "mask.nii.gz"
    f.write_bytes(client.get(f"/api/jobs/{status['job_id']}/mask").content)
    mask = read_label_map(f).array
    assert mask[10:13].any()  # the biased tiny model keeps a mask wherever it searches
    assert not mask[:10].any() and not mask[13:].any()


# --------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}], "propagate": True},
            "'propagate' needs the slice",
        ),
        (
            {
                "prompts": [{"text": "x", "points": [[3, 3]]}],
                "slice": {"plane": "axial", "index": 5},
                "propagate": True,
            },
            "points cannot be propagated",
        ),
        (
            {
                "prompts": [{"text": "x", "boxes": [[1, 1, 40, 5]]}],
                "slice": {"plane": "axial", "index": 5},
                "propagate": True,
            },
            "lies outside",
        ),
        (
            {
                "prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}],
                "slice": {"plane": "coronal", "index": 5},
                "propagate": True,
            },
            "acquired in axial slices and is segmented slice by slice along them, so a box to "
            "propagate must be drawn on an axial slice",
        ),
        (
            {"prompts": [{"text": "x"}], "slice": {"plane": "axial", "index": 5}, "propagate": True},
            "no prompt has a box",
        ),
        (
            {
                "prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}],
                "slice": {"plane": "axial", "index": 5},
                "propagate": True,
                "instances": True,
            },
            "instances is for 2D images",
        ),
        (
            {
                "prompts": [{"text": "x", "box3d": [1, 1, 1, 5, 5, 5]}],
                "slice": {"plane": "axial", "index": 5},
            },
            "cannot be combined with 'slice'",
        ),
        (
            {"prompts": [{"text": "x", "box3d": [1, 1, 1, 5, 5, 99]}]},
            "lies outside the volume of 36 x 47 x 41",
        ),
        ({"prompts": [{"text": "x", "box3d": [1, 1, 5, 5, 5, 5]}]}, "degenerate"),
        ({"prompts": [{"text": "x", "box3d": [1, 1, 1, 5, 5]}]}, "box3d needs 6 numbers"),
        (
            {"prompts": [{"text": "x", "box3d": [1, 1, 1, 5, 5, 5], "boxes": [[1, 1, 3, 3]]}]},
            "'box3d' cannot be combined with 'boxes'",
        ),
    ],
)
def test_volume_box_requests_are_refused_before_queueing(client, hippo, body, message):
    r = client.post(f"/api/images/{hippo['image_id']}/segment", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


def test_propagate_on_a_volume_from_the_test_set_names_its_plane(client, data_dir):
    # hippocampus_001 is also stored RAS with axial slices; a sagittal box is refused with the right plane.
    info = upload(client, data_dir / HIPPO).json()
    r = client.post(
        f"/api/images/{info['image_id']}/segment",
        json={
            "prompts": [{"boxes": [[1, 1, 5, 5]]}],
            "slice": {"plane": "sagittal", "index": 3},
            "propagate": True,
        },
    )
    assert r.status_code == 422
    assert "boxes drawn on a sagittal slice cannot be propagated" in r.json()["error"]
    assert "drawn on an axial slice" in r.json()["error"]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {
                "prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}],
                "slice": {"plane": "axial", "index": 0},
                "propagate": True,
            },
            "'slice' and 'propagate' apply to volumes only",
        ),
        (
            {"prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}], "propagate": True},
            "'propagate' applies to volumes only",
        ),
        ({"prompts": [{"text": "x", "box3d": [1, 1, 0, 5, 5, 1]}]}, "'box3d' applies to volumes only"),
    ],
)
def test_volume_box_options_are_refused_on_2d_images(client, data_dir, body, message):
    image_id = upload(client, data_dir / HC18).json()["image_id"]
    r = client.post(f"/api/images/{image_id}/segment", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


def test_openapi_describes_the_volume_box_fields(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "key slice" in schemas["SegmentIn"]["properties"]["propagate"]["description"]
    assert "voxel indices of the uploaded array" in schemas["PromptIn"]["properties"]["box3d"]["description"]
    assert "'propagate'" in schemas["SegmentIn"]["properties"]["slice"]["description"]
