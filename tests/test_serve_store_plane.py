"""``medsam3 serve``: the image description names the plane a volume was acquired in
(``info["display"]["acquired_plane"]``), the only plane whose boxes can be propagated through the volume.

Two levels: the store itself on synthetic volumes whose stored slices each hold one value, in axial,
coronal, sagittal and oblique acquisitions (the expected plane worked out by hand from the direction matrix,
and checked against the display array the store writes: only slices of the acquired plane are uniform);
and uploads through the HTTP API of the real MSD hippocampus volume, a synthetic sagittal NIfTI and a 2D PNG.
"""

from __future__ import annotations

import numpy as np
import pytest

from medsam3.image import Image
from medsam3.io.readers import read_image
from medsam3.io.writers import write_image
from medsam3.serve.jobs import new_id
from medsam3.serve.store import PLANE_AXIS, ImageStore
from medsam3.serve.uploads import Stored
from serve_fixtures import HC18, client_for, make_settings, upload

HIPPO19 = "msd_hippocampus/images/hippocampus_019.nii.gz"  # MR NIfTI (41, 47, 36), stored RAS

# Direction matrices in LPS; column c is where ITK axis c (i, j, k) points. k is the stored slice axis
# (array axis 0), so the plane of the stored slices is the one perpendicular to column k.
# RAS: k = (0, 0, +1) points superior -> the stored slices are axial.
RAS = np.diag([-1.0, -1.0, 1.0])
# i towards posterior, j towards inferior, k = (+1, 0, 0) towards the patient's left -> sagittal slices.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
# i towards the right, j towards inferior, k = (0, -1, 0) towards anterior -> coronal slices.
CORONAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])
# CORONAL turned 15 degrees about the S axis: k = (sin 15, -cos 15, 0) = (0.26, -0.97, 0), still mostly
# anterior -> coronal slices (the rotation stays in the direction matrix).
_T = np.deg2rad(15.0)
OBLIQUE_CORONAL = (
    np.array([[np.cos(_T), -np.sin(_T), 0.0], [np.sin(_T), np.cos(_T), 0.0], [0.0, 0.0, 1.0]]) @ CORONAL
)


def slabs(shape: tuple[int, int, int], direction: np.ndarray) -> Image:
    """A volume whose stored slice ``k`` (array axis 0) holds the value ``10 * (k + 1)`` everywhere."""
    values = 10 * (np.arange(shape[0], dtype=np.int16) + 1)
    array = np.broadcast_to(values[:, None, None], shape).copy()
    return Image(array, (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), direction, "MR", {"path": "slabs"})


def add(store: ImageStore, image: Image, kind: str = "nifti"):
    image_id = new_id()
    folder = store.new_folder(image_id)
    return store.add(
        image_id, folder, "test", Stored(folder / "source", kind, image.array.size), image, None, None
    )


def uniform_slices(display: np.ndarray, axis: int) -> bool:
    """True when every slice of ``display`` along ``axis`` holds a single value."""
    moved = np.moveaxis(display, axis, 0).reshape(display.shape[axis], -1)
    return bool((moved == moved[:, :1]).all())


@pytest.mark.parametrize(
    "direction, plane",
    [
        (RAS, "axial"),
        (CORONAL, "coronal"),
        (SAGITTAL, "sagittal"),
        (OBLIQUE_CORONAL, "coronal"),
    ],
)
def test_acquired_plane_of_synthetic_volumes(tmp_path, direction, plane):
    store = ImageStore(tmp_path / "images")
    rec = add(store, slabs((4, 5, 6), direction))
    display_info = rec.info["display"]
    assert display_info["acquired_plane"] == plane
    # The acquired plane has one display slice per stored slice (4 here; the other axes have 5 and 6).
    assert display_info["planes"][plane]["count"] == 4
    # Each of its display slices is one stored slice (uniform); slices of the other planes cut across the
    # stored slices and so hold several values.
    display = np.asarray(store.display(rec))
    assert display.shape[PLANE_AXIS[plane]] == 4
    for other in ("axial", "coronal", "sagittal"):
        assert uniform_slices(display, PLANE_AXIS[other]) == (other == plane), other
    # Four distinct display values, one per stored slice, in some order along the acquired axis.
    assert len(np.unique(display)) == 4


def test_acquired_plane_of_real_volume_and_picture_in_the_store(tmp_path, data_dir):
    store = ImageStore(tmp_path / "images")
    hippo = read_image(data_dir / HIPPO19)
    # Stored RAS: its slice axis k points superior (direction column k = (0, 0, 1) in LPS): axial.
    assert np.allclose(hippo.direction[:, 2], [0.0, 0.0, 1.0])
    rec = add(store, hippo)
    assert rec.info["display"]["acquired_plane"] == "axial"
    assert rec.info["display"]["planes"]["axial"]["count"] == 41  # the 41 stored slices

    picture = add(store, read_image(data_dir / HC18), "png")
    assert "acquired_plane" in picture.info["display"] and picture.info["display"]["acquired_plane"] is None
    assert list(picture.info["display"]["planes"]) == ["image"]


# --------------------------------------------------------------------------------------------------
# through the HTTP API


@pytest.fixture(scope="module")
def client(serve_model, tmp_path_factory):
    with client_for(make_settings(serve_model, tmp_path_factory.mktemp("work"))) as c:
        yield c


def test_acquired_plane_in_the_api_description(client, data_dir, tmp_path):
    hippo = upload(client, data_dir / HIPPO19)
    assert hippo.status_code == 201, hippo.text
    info = hippo.json()
    assert info["display"]["acquired_plane"] == "axial"
    assert client.get(f"/api/images/{info['image_id']}").json()["display"]["acquired_plane"] == "axial"

    # A sagittal acquisition written as NIfTI and read back by the server: (stored slices, rows, columns)
    # = (7, 9, 11); the sagittal plane of the display has the 7 stored slices.
    path = write_image(slabs((7, 9, 11), SAGITTAL), tmp_path / "sagittal.nii.gz")
    sag = upload(client, path)
    assert sag.status_code == 201, sag.text
    display_info = sag.json()["display"]
    assert display_info["acquired_plane"] == "sagittal"
    assert display_info["planes"]["sagittal"]["count"] == 7

    picture = upload(client, data_dir / HC18)
    assert picture.status_code == 201, picture.text
    assert picture.json()["display"]["acquired_plane"] is None
