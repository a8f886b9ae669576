"""Bad inputs caught before training: unknown label values, geometry mismatches, missing files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from data_fixtures import KVASIR_CASES, kvasir_folder, msd_hippocampus
from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import check_records, read_manifest, write_manifest
from medsam3.errors import InputError


def _rewrite(path, change):
    img = sitk.ReadImage(str(path))
    out = change(img)
    sitk.WriteImage(out, str(path))


def test_label_value_absent_from_dataset_json(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Task04_Hippocampus")
    bad = root / "labelsTr" / "hippocampus_003.nii.gz"

    def add_value(img):
        arr = sitk.GetArrayFromImage(img)
        arr[0, 0, 0] = 7
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return out

    _rewrite(bad, add_value)
    with pytest.raises(InputError) as err:
        prepare_dataset("Task04_Hippocampus", "nnunet", root)
    msg = str(err.value)
    assert str(bad) in msg and "label value 7" in msg and "1='Anterior'" in msg


def test_image_label_geometry_mismatch_names_both_files(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Task04_Hippocampus")
    label = root / "labelsTr" / "hippocampus_004.nii.gz"
    image = root / "imagesTr" / "hippocampus_004.nii.gz"

    def shift(img):
        img.SetOrigin(tuple(o + 5.0 for o in img.GetOrigin()))
        return img

    _rewrite(label, shift)
    with pytest.raises(InputError) as err:
        prepare_dataset("Task04_Hippocampus", "nnunet", root)
    assert str(label) in str(err.value) and str(image) in str(err.value) and "origin" in str(err.value)

    def respace(img):
        img.SetOrigin(tuple(o - 5.0 for o in img.GetOrigin()))
        img.SetSpacing((1.0, 1.0, 1.5))
        return img

    _rewrite(label, respace)
    with pytest.raises(InputError, match="spacing"):
        prepare_dataset("Task04_Hippocampus", "nnunet", root)


def test_2d_shape_mismatch(data_dir, tmp_path):
    root = kvasir_folder(data_dir, tmp_path / "k")
    mask = root / "masks" / f"{KVASIR_CASES[2]}.jpg"
    PILImage.open(mask).resize((100, 80)).save(mask)
    with pytest.raises(InputError) as err:
        prepare_dataset("k", "folder2d", root, labels={1: "polyp"})
    assert str(mask) in str(err.value) and f"{KVASIR_CASES[2]}.jpg" in str(err.value)
    assert "shape (80, 100)" in str(err.value)


def test_missing_files(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Task04_Hippocampus")
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    manifest = write_manifest(tmp_path / "out" / "m.jsonl", records)
    gone = root / "imagesTr" / "hippocampus_006.nii.gz"
    gone.unlink()
    loaded = read_manifest(manifest)
    check_records(loaded, check_files=False)
    with pytest.raises(InputError) as err:
        check_records(loaded)
    assert str(gone) in str(err.value) and "does not exist" in str(err.value)
    # the dataset.json training list names the missing image too
    with pytest.raises(InputError, match="listed in dataset.json 'training' but missing"):
        prepare_dataset("Task04_Hippocampus", "nnunet", root)


def test_nnunet_listing_without_training_list_missing_channel(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Dataset004_Hippocampus", v2=True)
    (root / "imagesTr" / "hippocampus_001_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="no image for case 'hippocampus_001'"):
        prepare_dataset("Dataset004_Hippocampus", "nnunet", root)


def test_mask_values_that_fit_no_label(data_dir, tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    shutil.copy(
        data_dir / "kvasir_seg_sample" / "images" / f"{KVASIR_CASES[0]}.jpg", root / "images" / "a.jpg"
    )
    w, h = PILImage.open(root / "images" / "a.jpg").size
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 10:20] = 1
    mask[30:40, 30:40] = 2
    PILImage.fromarray(mask).save(root / "masks" / "a.png")
    with pytest.raises(InputError, match=r"mask values \[0, 1, 2\] do not fit the single label 1"):
        prepare_dataset("f", "folder2d", root, labels={1: "polyp"})
    with pytest.raises(InputError, match="label value 2 is not among"):
        prepare_dataset("f", "folder2d", root, labels={1: "polyp"}, options={"mode": "values"})
    records, _, _ = prepare_dataset("f", "folder2d", root, labels={1: "polyp", 2: "optic disc"})
    assert set(records[0].foreground) == {"polyp", "optic disc"}


def test_corrupt_manifest_and_bad_label_map(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"dataset": "a"}\n')
    with pytest.raises(InputError, match=r"m.jsonl:1: not a manifest record .*'case_id'"):
        read_manifest(bad)
    bad.write_text("\nnot json\n")
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_manifest(bad)
    dj = tmp_path / "ds"
    dj.mkdir()
    (dj / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "a "}}))
    (dj / "labelsTr").mkdir()
    with pytest.raises(InputError, match="no image/label pairs"):
        prepare_dataset("ds", "nnunet", dj)
    (dj / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": 1, "y": 1}}))
    with pytest.raises(InputError, match="label value 1 is named twice"):
        prepare_dataset("ds", "nnunet", dj)


def test_manifest_round_trip(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Task04_Hippocampus")
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    path = write_manifest(tmp_path / "out" / "m.jsonl", records)
    back = read_manifest(path)
    assert sorted(back, key=lambda r: r.case_id) == sorted(records, key=lambda r: r.case_id)
    check_records(back)
    with pytest.raises(InputError, match="twice"):
        check_records(back + back[:1])
