"""The public Python API: ``medsam3.segment``, ``Segmenter.from_pretrained``, ``SegmentationResult``, and
images held in memory (numpy, nibabel, SimpleITK).

End to end on the two samples the package ships, with the bundled default model; conversions by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

import medsam3
from medsam3.errors import InputError, PromptError
from medsam3.io.memory import from_nibabel, from_numpy, from_sitk, to_image, to_nibabel, to_sitk
from medsam3.io.readers import read_image

SAMPLES = Path(medsam3.__file__).parent / "assets" / "samples"
HC18 = SAMPLES / "hc18_400_HC.png"
HIPPO = SAMPLES / "hippocampus_019.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def seg():
    return medsam3.Segmenter.from_pretrained(device="cpu")


# -- the one call ------------------------------------------------------------------------------------------
def test_import_is_light_and_names_are_lazy():
    code = "import sys, medsam3; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    for name in medsam3.__all__:
        assert getattr(medsam3, name) is not None
    with pytest.raises(AttributeError):
        medsam3.no_such_name  # noqa: B018


def test_one_call_on_the_fetal_head_sample(tmp_path):
    result = medsam3.segment(HC18, "fetal head", device="cpu")
    reference = np.asarray(PILImage.open(SAMPLES / "hc18_400_HC_mask.png").convert("L")) > 0
    assert result.label_map.shape == reference.shape
    assert dice(result.label_map == 1, reference) > 0.85
    label = result.labels[0]
    assert (label.concept, label.value, label.absent) == ("fetal head", 1, False)
    assert 0.0 <= label.score <= 1.0 and label.presence is not None
    paths = result.write(tmp_path)
    assert {p.name for p in paths.values()} >= {"hc18_400_HC_mask.png", "hc18_400_HC.json"}


def test_one_call_on_the_hippocampus_volume():
    result = medsam3.segment(str(HIPPO), ["hippocampus", "fetal head"], device="cpu")
    reference = np.asarray(nib.load(str(SAMPLES / "hippocampus_019_labels.nii.gz")).dataobj).transpose(
        2, 1, 0
    )
    assert result.label_map.shape == reference.shape
    assert dice(result.label_map == 1, reference > 0) > 0.75
    whole, head = result.labels
    assert whole.concept == "hippocampus" and whole.voxels > 0 and whole.volume_ml > 0
    assert head.absent  # the model knows no fetal head on a brain MRI
    # the result's NIfTI lies exactly on the input's grid
    out = result.to_nibabel()
    np.testing.assert_allclose(out.affine, nib.load(str(HIPPO)).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj).transpose(2, 1, 0), result.label_map)
    itk = result.to_sitk()
    source = sitk.ReadImage(str(HIPPO))
    np.testing.assert_allclose(itk.GetSpacing(), source.GetSpacing())
    np.testing.assert_allclose(itk.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(itk.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), result.label_map)


def test_options_are_keyword_arguments_and_are_checked():
    with pytest.raises(PromptError, match="threshold must be between 0 and 1"):
        medsam3.segment(HC18, "fetal head", threshold=3.0, device="cpu")
    with pytest.raises(PromptError, match="unknown option 'mirror'"):
        medsam3.segment(HC18, "fetal head", mirror=True, device="cpu")
    with pytest.raises(InputError, match="cannot segment a dict"):
        medsam3.segment({"a": 1}, "fetal head", device="cpu")


# -- Segmenter: str and list prompts, inputs of every kind, the same answer ------------------------------
def test_string_list_and_prompt_objects_give_the_same_result(seg):
    image = read_image(HC18)
    by_prompt = seg.segment(image, [medsam3.Prompt("fetal head")]).label_map
    np.testing.assert_array_equal(seg.segment(image, "fetal head").label_map, by_prompt)
    np.testing.assert_array_equal(seg.segment(image, ["fetal head"]).label_map, by_prompt)
    volume = read_image(HIPPO)
    by_prompt = seg.segment(volume, [medsam3.Prompt("hippocampus")]).label_map
    np.testing.assert_array_equal(seg.segment(volume, "hippocampus").label_map, by_prompt)
    np.testing.assert_array_equal(seg.segment(HIPPO, ["hippocampus"]).label_map, by_prompt)
    with pytest.raises(PromptError, match="no prompt given"):
        seg.segment(image, [])
    with pytest.raises(PromptError, match="not int"):
        seg.segment(image, [3])


def test_nibabel_sitk_and_numpy_inputs_equal_the_file(seg):
    from_file = seg.segment(HIPPO, "hippocampus").label_map
    np.testing.assert_array_equal(seg.segment(nib.load(str(HIPPO)), "hippocampus").label_map, from_file)
    np.testing.assert_array_equal(seg.segment(sitk.ReadImage(str(HIPPO)), "hippocampus").label_map, from_file)
    image = read_image(HC18)
    from_png = seg.segment(image, "fetal head").label_map
    np.testing.assert_array_equal(seg.segment(image.array, "fetal head", modality="US").label_map, from_png)


def test_numpy_volume_with_spacing(seg):
    array = read_image(HIPPO).array
    result = seg.segment(array, "hippocampus", spacing=(0.5, 0.5, 2.0), modality="MR")
    label = result.labels[0]
    assert result.label_map.shape == array.shape and label.voxels > 0
    assert label.volume_ml == pytest.approx(label.voxels * 0.5 * 0.5 * 2.0 / 1000.0)


def test_per_call_options_do_not_change_the_segmenters(seg):
    image = read_image(HC18)
    plain = seg.segment(image, "fetal head")
    mirrored = seg.segment(image, "fetal head", tta=True)
    assert mirrored.settings["test_time_mirroring"] == ["none", "x", "y", "xy"]
    assert not seg.options.tta
    np.testing.assert_array_equal(seg.segment(image, "fetal head").label_map, plain.label_map)


# -- conversions by hand -----------------------------------------------------------------------------------
def test_nibabel_frames_by_hand():
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (i, j, k)
    affine = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    image = from_nibabel(nib.Nifti1Image(data, affine), modality="CT")
    assert image.array.shape == (4, 3, 2) and image.array[3, 2, 1] == data[1, 2, 3]
    assert image.spacing == (2.0, 3.0, 4.0)
    assert image.origin == (-10.0, -20.0, 30.0)  # RAS (10, 20, 30) in LPS
    np.testing.assert_array_equal(image.direction, np.diag([-1.0, -1.0, 1.0]))
    back = to_nibabel(image)
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


def test_sitk_and_numpy_by_hand():
    itk = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    itk.SetSpacing((0.5, 0.7, 2.0))
    itk.SetOrigin((1.0, 2.0, 3.0))
    image = from_sitk(itk, modality="MR")
    assert (
        image.array.shape == (4, 5, 6)
        and image.spacing == (0.5, 0.7, 2.0)
        and image.origin == (1.0, 2.0, 3.0)
    )
    assert to_sitk(image).GetSpacing() == (0.5, 0.7, 2.0)
    picture = from_numpy(np.zeros((10, 12, 3), np.uint8))
    assert picture.is_color and picture.ndim == 2 and picture.meta["spacing_known"] is False
    volume = from_numpy(np.zeros((3, 10, 12), np.float32), spacing=(1.0, 1.0, 2.5), modality="CT")
    assert volume.ndim == 3 and volume.spacing == (1.0, 1.0, 2.5) and volume.modality == "CT"
    assert to_image(volume) is volume
    with pytest.raises(InputError, match="must be 2D"):
        from_numpy(np.zeros((2, 3, 4, 5)))
    with pytest.raises(InputError, match="spacing"):
        from_numpy(np.zeros((3, 4)), spacing=(1.0, 1.0, 1.0))
