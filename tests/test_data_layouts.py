"""Layout readers on small datasets built from the real samples: records, concepts, foreground slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from data_fixtures import (
    HIPPO_CASES,
    KVASIR_CASES,
    hc18_folder,
    kvasir_folder,
    msd_hippocampus,
    recist_npz,
    stardist_instances,
    uncompressed_rle,
)
from medsam3.data.coco import annotation_mask, rle_counts_from_string
from medsam3.data.indexing import prepare_dataset
from medsam3.data.labels import load_label_arrays
from medsam3.data.layouts import discover
from medsam3.data.npz_layout import read_text_prompts


def _ranges(indices):
    """Half-open ranges of sorted indices, written out independently of the package."""
    out = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@pytest.mark.parametrize("v2", [False, True], ids=["msd", "nnunet_v2"])
def test_nnunet_layout_records_concepts_and_foreground(data_dir, tmp_path, v2):
    root = msd_hippocampus(data_dir, tmp_path / "Task04_Hippocampus", v2=v2)
    records, report, splits = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    assert sorted(r.case_id for r in records) == list(HIPPO_CASES)
    for r in records:
        assert r.labels == {1: "anterior hippocampus", 2: "posterior hippocampus"}
        assert r.label_names == {1: "Anterior", 2: "Posterior"}
        assert r.modality == "MR" and r.dims == 3 and r.layout == "nnunet"
        suffix = "_0000.nii.gz" if v2 else ".nii.gz"
        assert r.image == [str(root / "imagesTr" / f"{r.case_id}{suffix}")]
        assert r.label == [str(root / "labelsTr" / f"{r.case_id}.nii.gz")]
        # foreground slices from the label file read directly with SimpleITK
        arr = sitk.GetArrayFromImage(sitk.ReadImage(r.label[0]))
        assert r.shape == list(arr.shape)
        for value, concept in r.labels.items():
            slices = [z for z in range(arr.shape[0]) if (arr[z] == value).any()]
            assert r.foreground[concept] == _ranges(slices)
    assert report.cases == 4 and report.splits == {"train": 3, "val": 1}
    assert report.unknown_names == []


def test_folder2d_jpeg_masks_are_binary_at_127(data_dir, tmp_path):
    root = kvasir_folder(data_dir, tmp_path / "kvasir")
    records, report, _ = prepare_dataset("Kvasir-SEG", "folder2d", root, labels={1: "polyp"}, modality="RGB")
    assert sorted(r.case_id for r in records) == sorted(KVASIR_CASES)
    r = records[0]
    assert r.mask == {"mode": "binary", "threshold": 127, "value": 1}
    assert r.foreground == {"polyp": [[0, 1]]} and r.dims == 2 and r.modality == "RGB"
    raw = np.asarray(PILImage.open(r.label[0]))
    arrays = load_label_arrays(r)
    assert arrays.semantic.shape == raw.shape == tuple(r.shape)
    assert int((arrays.semantic == 1).sum()) == int((raw > 127).sum())
    assert set(np.unique(arrays.semantic).tolist()) == {0, 1}


def test_folder2d_suffix_pairing_and_0_255_png(data_dir, tmp_path):
    root = hc18_folder(data_dir, tmp_path / "hc18", n=5)
    opts = {"images": "training_set/*_HC.png", "mask": "{stem}_Annotation.png"}
    records, _, _ = prepare_dataset(
        "HC18", "folder2d", root, options=opts, labels={1: "fetal head"}, modality="US"
    )
    assert len(records) == 5
    assert all(r.case_id.endswith("_HC") and "Annotation" not in r.case_id for r in records)
    r = records[0]
    assert r.mask["mode"] == "binary"  # RGB 0/255 mask
    raw = np.asarray(PILImage.open(r.label[0]))
    assert raw.ndim == 3 and set(np.unique(raw).tolist()) == {0, 255}
    sem = load_label_arrays(r).semantic
    assert int(sem.sum()) == int((raw[..., 0] == 255).sum())


def test_folder2d_grey_0_255_png_and_values_mask(data_dir, tmp_path):
    root = tmp_path / "grey"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    src = data_dir / "kvasir_seg_sample"
    case = KVASIR_CASES[0]
    img = PILImage.open(src / "images" / f"{case}.jpg")
    img.save(root / "images" / "a.png")
    binary = (np.asarray(PILImage.open(src / "masks" / f"{case}.jpg")) > 127).astype(np.uint8)
    PILImage.fromarray(binary * 255).save(root / "masks" / "a.png")
    img.save(root / "images" / "b.png")
    PILImage.fromarray(binary).save(root / "masks" / "b.png")  # already 0/1
    records, _, _ = prepare_dataset("grey", "folder2d", root, labels={1: "polyp"})
    by_case = {r.case_id: r for r in records}
    assert by_case["a"].mask["mode"] == "binary" and by_case["b"].mask["mode"] == "values"
    for r in records:
        assert int(load_label_arrays(r).semantic.sum()) == int(binary.sum())


def test_folder2d_label_names_from_json_and_multiclass_values(data_dir, tmp_path):
    root = tmp_path / "multi"
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    src = data_dir / "kvasir_seg_sample"
    case = KVASIR_CASES[1]
    PILImage.open(src / "images" / f"{case}.jpg").save(root / "img" / "x.png")
    mask = (np.asarray(PILImage.open(src / "masks" / f"{case}.jpg")) > 127).astype(np.uint8)
    rows = np.flatnonzero(mask.any(axis=1))
    mask[: (rows[0] + rows[-1]) // 2] *= 2  # upper half of the polyp labelled 2
    PILImage.fromarray(mask).save(root / "gt" / "x_mask.png")
    records, report, _ = prepare_dataset(
        "multi",
        "folder2d",
        root,
        options={"images": "img/*.png", "mask": "../gt/{stem}_mask.png"},
        labels={1: "Polyps", 2: "kidney_left"},
    )
    (r,) = records
    assert r.labels == {1: "polyp", 2: "left kidney"}
    assert r.mask["mode"] == "values"
    assert set(r.foreground) == {"polyp", "left kidney"}


def test_npz_layout_with_user_labels_prompts_in_file_and_prompts_json(data_dir, tmp_path):
    files = recist_npz(data_dir, tmp_path / "npz" / "CT_DeepLesion", n=2)
    records, _, _ = prepare_dataset("recist", "npz", tmp_path / "npz", labels={1: "lesion"})
    assert len(records) == 2
    for r, f in zip(records, files, strict=True):
        with np.load(f) as z:
            gts = z["gts"]
        assert r.dims == 3 and r.shape == list(gts.shape) and r.modality == "CT"
        assert r.foreground["lesion"] == _ranges([z for z in range(gts.shape[0]) if gts[z].any()])
        assert r.source["subset"] == "CT_DeepLesion"

    # prompts stored inside the file, as the challenge writes them (pickled dict in a 0-d object array)
    with np.load(files[0]) as z:
        arrays = {k: z[k] for k in z.files}
    prompts = {"1": ["liver lesion", "lesion in abdominal CT"], "instance_label": 0}
    inside = tmp_path / "inside" / "CT_Lesion_prompted.npz"
    inside.parent.mkdir()
    np.savez(inside, **arrays, text_prompts=np.array(prompts, dtype=object))
    assert read_text_prompts(inside) == prompts
    (r,) = prepare_dataset("inside", "npz", inside.parent)[0]
    assert r.labels == {1: "liver tumor"} and r.label_names == {1: "liver lesion"}
    assert r.prompts == {1: ["liver lesion", "lesion in abdominal CT"]}

    # prompts JSON keyed by the subset folder (CVPR25_TextSegFMData_with_class.json form)
    table = {"CT_DeepLesion": {"1": ["Lesion", "lesion in CT"], "instance_label": 0}}
    (tmp_path / "npz" / "prompts.json").write_text(json.dumps(table))
    records, _, _ = prepare_dataset("recist", "npz", tmp_path / "npz", options={"prompts": "prompts.json"})
    assert {r.labels[1] for r in records} == {"lesion"}


def test_npz_text_prompts_refuse_arbitrary_objects(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.npz"
    np.savez(path, imgs=np.zeros((2, 4, 4), np.uint8), gts=np.zeros((2, 4, 4), np.uint8))
    payload = np.lib.format.header_data_from_array_1_0(np.array(None, dtype=object))
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, payload)
    buf.write(pickle.dumps(np.array({"1": Evil()}, dtype=object), protocol=3))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("text_prompts.npy", buf.getvalue())
    from medsam3.errors import InputError

    with pytest.raises(InputError, match="refusing to load"):
        read_text_prompts(path)


@pytest.mark.parametrize("backend", ["pycocotools", "own"])
def test_coco_layout_from_stardist_instances(data_dir, tmp_path, monkeypatch, backend):
    import medsam3.data.coco as coco

    if backend == "own":
        monkeypatch.setattr(coco, "_coco_mask", None)
    elif coco._coco_mask is None:
        pytest.skip("pycocotools is not installed")
    image, inst = stardist_instances(data_dir)
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    PILImage.fromarray((image / max(1, image.max()) * 255).astype(np.uint8)).save(
        root / "images" / "nuclei.png"
    )
    PILImage.fromarray(np.zeros_like(inst, dtype=np.uint8)).save(root / "images" / "empty.png")
    h, w = inst.shape
    ids = [int(i) for i in np.unique(inst) if i][:40]
    anns = [
        {
            "id": k + 1,
            "image_id": 1,
            "category_id": 3,
            "segmentation": uncompressed_rle(inst == i),
            "iscrowd": 0,
        }
        for k, i in enumerate(ids)
    ]
    # one rectangle polygon of a second category; COCO pixel i spans [i, i+1): columns 10..28, rows 5..13
    anns.append(
        {
            "id": 99,
            "image_id": 1,
            "category_id": 7,
            "segmentation": [[10, 5, 29, 5, 29, 14, 10, 14]],
            "iscrowd": 0,
        }
    )
    doc = {
        "images": [
            {"id": 1, "file_name": "nuclei.png", "height": h, "width": w},
            {"id": 2, "file_name": "empty.png", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": [{"id": 3, "name": "nuclei"}, {"id": 7, "name": "Marker Box"}],
    }
    (root / "annotations" / "train.json").write_text(json.dumps(doc))
    records, report, _ = prepare_dataset("stardist", "coco", root, modality="MICROSCOPY")
    by_case = {r.case_id: r for r in records}
    assert set(by_case) == {"nuclei", "empty"}
    r = by_case["nuclei"]
    assert r.labels == {3: "cell nucleus", 7: "marker box"} and r.instances
    assert r.foreground == {"cell nucleus": [[0, 1]], "marker box": [[0, 1]]}
    assert by_case["empty"].foreground == {}
    assert "Marker Box" in report.unknown_names
    arrays = load_label_arrays(r)
    # every RLE instance comes back exactly (the rectangle is painted last, over any nuclei there)
    rect = np.zeros((h, w), bool)
    rect[5:14, 10:29] = True
    for k, i in enumerate(ids, start=1):
        expected = (inst == i) & ~rect
        assert np.array_equal(arrays.instances == k, expected)
        assert arrays.instance_values[k] == 3
    assert int((arrays.semantic == 7).sum()) == 19 * 9
    assert np.array_equal(annotation_mask(anns[-1]["segmentation"], h, w, use_pycocotools=False), rect)


def test_coco_rle_string_decoder_and_polygon_fallback(data_dir):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as coco_mask

    _, inst = stardist_instances(data_dir)
    h, w = inst.shape
    target = np.asfortranarray((inst == inst.max()) | (inst == 5)).astype(np.uint8)
    rle = coco_mask.encode(target)
    counts = rle["counts"].decode("ascii")
    # the package's own decoder on pycocotools' compressed string
    got = annotation_mask({"counts": counts, "size": [h, w]}, h, w, use_pycocotools=False)
    assert np.array_equal(got, target)
    assert sum(rle_counts_from_string(counts)) == h * w
    # the scanline polygon filler agrees with pycocotools up to a few boundary pixels
    poly = [[100.0, 50.0, 300.0, 80.0, 260.0, 300.0, 90.0, 240.0]]
    ours = annotation_mask(poly, h, w, use_pycocotools=False).astype(bool)
    ref = annotation_mask(poly, h, w, use_pycocotools=True).astype(bool)
    iou = (ours & ref).sum() / (ours | ref).sum()
    assert iou > 0.995


def test_discovery_reads_no_pixels_and_skips_unpaired(data_dir, tmp_path):
    root = kvasir_folder(data_dir, tmp_path / "k")
    (root / "masks" / f"{KVASIR_CASES[0]}.jpg").unlink()
    (root / "images" / "corrupt.jpg").write_bytes(b"not an image")  # never opened by discovery
    (root / "masks" / "corrupt.jpg").write_bytes(b"not an image")
    found = discover("folder2d", root, labels={1: "polyp"})
    assert len(found.candidates) == 5  # 4 pairs + the corrupt pair, whose pixels discovery never reads
    assert any(KVASIR_CASES[0] in s and "no mask" in s for s in found.skipped)


def test_nnunet_regions_and_two_channels(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Dataset004_Hippocampus", v2=True)
    doc = json.loads((root / "dataset.json").read_text())
    doc["channel_names"] = {"0": "T1", "1": "T2"}
    doc["labels"] = {"background": 0, "Anterior": 1, "Posterior": 2, "hippocampus": [1, 2]}
    (root / "dataset.json").write_text(json.dumps(doc))
    for f in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        f.with_name(f.name.replace("_0000", "_0001")).write_bytes(f.read_bytes())
    records, _, _ = prepare_dataset("Dataset004_Hippocampus", "nnunet", root)
    r = records[0]
    assert [p.rsplit("/", 1)[1] for p in r.image] == [f"{r.case_id}_0000.nii.gz", f"{r.case_id}_0001.nii.gz"]
    assert r.regions == {"hippocampus": [1, 2]} and r.modality == "MR"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(r.label[0]))
    assert r.foreground["hippocampus"] == _ranges([z for z in range(arr.shape[0]) if arr[z].any()])
    assert r.concept_values() == {
        "anterior hippocampus": [1],
        "posterior hippocampus": [2],
        "hippocampus": [1, 2],
    }


def test_concept_target_semantic_and_instances():
    from medsam3.data.labels import LabelArrays, concept_target
    from medsam3.data.manifest import Record

    sem = np.array([[0, 1, 1, 0], [0, 2, 0, 0], [3, 3, 0, 1]])
    rec = Record("d", "c", ["i"], ["l"], {1: "a", 2: "b", 3: "a"}, dims=2, shape=[3, 4])
    union, objects = concept_target(LabelArrays(sem), rec, "a")
    assert union.sum() == 5 and len(objects) == 1 and np.array_equal(objects[0], union)
    union, objects = concept_target(LabelArrays(sem), rec, "b")
    assert union.sum() == 1 and len(objects) == 1
    # instance map: ids 4 and 9 are 'a' (value 1), id 5 is 'b'
    inst = np.array([[0, 4, 4, 0], [0, 5, 0, 0], [0, 0, 0, 9]])
    sem2 = np.where(inst == 5, 2, np.where(inst > 0, 1, 0))
    arrays = LabelArrays(sem2, inst, {4: 1, 5: 2, 9: 1})
    union, objects = concept_target(arrays, rec, "a")
    assert union.sum() == 3 and [int(o.sum()) for o in objects] == [2, 1]
    empty = LabelArrays(np.zeros((3, 4), int))
    union, objects = concept_target(empty, rec, "b")
    assert not union.any() and objects == []
