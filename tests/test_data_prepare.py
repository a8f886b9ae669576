"""``medsam3 prepare`` end to end, and the registry of the paper's datasets."""

from __future__ import annotations

import argparse
import json

import pytest

from data_fixtures import hc18_folder, kvasir_folder, msd_hippocampus, recist_npz
from medsam3.commands import prepare
from medsam3.data import registry
from medsam3.data.layouts import LAYOUTS
from medsam3.data.manifest import read_manifest
from medsam3.data.splits import read_splits
from medsam3.data.vocabulary import Vocabulary
from medsam3.errors import InputError, OutputError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medsam3")
    prepare.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


# -- registry ------------------------------------------------------------------------------------------
PAPER_INTERNAL = {
    "PS-FH-AOP-2023",
    "DRIVE",
    "COph100",
    "Breast Cancer Segmentation",
    "Intraretinal Cystoid Fluid",
    "m2caiSeg",
    "FetoPlac",
    "GlaS 2015",
    "SegThy",
    "PAPILA",
}
PAPER_EXTERNAL = {"TN3K", "HC18", "CVC-ClinicDB", "ETIS-Larib", "PH2", "CHASE_DB1", "STARE"}
PAPER_GROUP_SIZES = {
    "chest x-ray": 3,
    "x-ray": 2,
    "ultrasound": 7,
    "endoscopy": 6,
    "pathology": 4,
    "virtual microscopy": 2,
    "electron microscopy": 2,
    "microscopy": 1,
    "fundus/oct": 5,
    "dermoscopy": 1,
}


def test_registry_matches_the_paper():
    entries = registry.entries()
    assert len(entries) == 40 and len({e.name for e in entries}) == 40
    training = [e for e in entries if e.role != "external"]
    assert len(training) == 33
    assert {e.name for e in entries if e.role == "internal-eval"} == PAPER_INTERNAL
    assert {e.name for e in entries if e.role == "external"} == PAPER_EXTERNAL
    groups = {}
    for e in training:
        groups[e.group] = groups.get(e.group, 0) + 1
    assert groups == PAPER_GROUP_SIZES
    assert sum(e.images for e in training) == 76956  # paper Table 1 total
    assert registry.get("kvasir_seg").name == "Kvasir-SEG"
    with pytest.raises(InputError, match="did you mean Kvasir-SEG"):
        registry.get("kvasir")


def test_registry_entries_are_consistent():
    vocab = Vocabulary.bundled()
    for e in registry.entries():
        assert e.layout in LAYOUTS or e.layout is None, e.name
        assert all(vocab.is_concept(c) for c in e.concepts), e.name
        if e.labels:
            assert set(e.labels.values()) <= set(e.concepts), e.name
        for pair in e.options.get("pairs", []):
            assert set(pair.get("labels", {}).values()) <= set(e.concepts), e.name
        assert e.license and (e.url is None or e.url.startswith("https://")), e.name
        assert e.layout is not None or "--layout" in e.notes, e.name  # says what to convert to


def test_list(capsys):
    assert run(["--list"]) == 0
    out = capsys.readouterr().out
    assert "Kvasir-SEG" in out and "STARE" in out and "33 training datasets" in out


# -- prepare --------------------------------------------------------------------------------------------
def test_registry_dataset_then_merge_second_dataset(data_dir, tmp_path, capsys):
    kv = kvasir_folder(data_dir, tmp_path / "data" / "Kvasir-SEG")
    out = tmp_path / "out" / "manifest.jsonl"
    assert run(["--dataset", "Kvasir-SEG", "--root", str(kv), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Kvasir-SEG (folder2d" in text and "5 cases" in text and "polyp (5 records)" in text
    assert "train 4, val 1" in text
    records = read_manifest(out)
    assert {r.dataset for r in records} == {"Kvasir-SEG"} and all(r.group == "endoscopy" for r in records)

    hip = msd_hippocampus(data_dir, tmp_path / "data" / "Task04_Hippocampus")
    assert run(["--layout", "msd", "--root", str(hip), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "anterior hippocampus (4 records)" in text and "2 datasets" in text
    records = read_manifest(out)
    assert sorted({r.dataset for r in records}) == ["Kvasir-SEG", "Task04_Hippocampus"]
    splits = read_splits(out.with_name("manifest.splits.json"))
    assert {r.case_id: r.split for r in records if r.dataset == "Kvasir-SEG"} == splits["Kvasir-SEG"]
    # preparing again gives the same manifest
    before = out.read_text()
    assert run(["--dataset", "Kvasir-SEG", "--root", str(kv), "-o", str(out)]) == 0
    assert out.read_text() == before


def test_re_prepare_keeps_splits_and_appends_new_cases(data_dir, tmp_path):
    hc = hc18_folder(data_dir, tmp_path / "data" / "hc", n=10)
    out = tmp_path / "out" / "m.jsonl"
    run(
        [
            "--layout",
            "folder2d",
            "--root",
            str(hc),
            "--name",
            "HC",
            "--images",
            "training_set/*_HC.png",
            "--mask",
            "{stem}_Annotation.png",
            "--labels",
            str(_labels(tmp_path, {"1": "fetal head"})),
            "-o",
            str(out),
        ]
    )
    first = {r.case_id: r.split for r in read_manifest(out)}
    assert sorted(first.values()).count("val") == 2
    hc18_folder(data_dir, tmp_path / "more", n=20)
    for f in (tmp_path / "more" / "training_set").iterdir():
        if not (hc / "training_set" / f.name).exists():
            f.rename(hc / "training_set" / f.name)
    run(
        [
            "--layout",
            "folder2d",
            "--root",
            str(hc),
            "--name",
            "HC",
            "--images",
            "training_set/*_HC.png",
            "--mask",
            "{stem}_Annotation.png",
            "--labels",
            str(tmp_path / "labels.json"),
            "-o",
            str(out),
        ]
    )
    second = {r.case_id: r.split for r in read_manifest(out)}
    assert len(second) == 20 and {c: second[c] for c in first} == first
    assert sorted(second.values()).count("val") == 3  # ceil(20 * 0.15)


def _labels(tmp_path, doc):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    return path


def test_external_dataset_is_all_test(data_dir, tmp_path):
    hc = hc18_folder(data_dir, tmp_path / "data" / "HC18", n=4)
    out = tmp_path / "o.jsonl"
    run(["--dataset", "HC18", "--root", str(hc), "-o", str(out)])
    records = read_manifest(out)
    assert {r.split for r in records} == {"test"} and len(records) == 4
    assert all(r.mask.get("fill_holes") for r in records)


def test_npz_with_labels_file_and_vocabulary_file(data_dir, tmp_path, capsys):
    recist_npz(data_dir, tmp_path / "data" / "npz", n=2)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"concepts": {"deep lesion": ["recist lesion"]}, "datasets": {}}))
    out = tmp_path / "o.jsonl"
    run(
        [
            "--layout",
            "npz",
            "--root",
            str(tmp_path / "data" / "npz"),
            "--name",
            "RECIST",
            "--labels",
            str(_labels(tmp_path, {"recist lesion": 1})),
            "--vocabulary",
            str(vocab),
            "-o",
            str(out),
        ]
    )
    records = read_manifest(out)
    assert {r.labels[1] for r in records} == {"deep lesion"} and {r.dims for r in records} == {3}
    assert "warning" not in capsys.readouterr().out


def test_errors(data_dir, tmp_path):
    kv = kvasir_folder(data_dir, tmp_path / "data" / "Kvasir-SEG")
    with pytest.raises(InputError, match="no reader for this release format"):
        run(["--dataset", "BTXRD", "--root", str(kv), "-o", str(tmp_path / "o.jsonl")])
    with pytest.raises(InputError, match="the mask values have no names"):
        run(["--layout", "folder2d", "--root", str(kv), "-o", str(tmp_path / "o.jsonl")])
    with pytest.raises(InputError, match="--root and -o"):
        run(["--dataset", "Kvasir-SEG"])
    # the manifest may not be written inside the dataset folder (inputs are never modified)
    with pytest.raises(OutputError, match="refusing to write over an input"):
        run(["--dataset", "Kvasir-SEG", "--root", str(kv), "-o", str(kv / "manifest.jsonl")])
    assert not (kv / "manifest.jsonl").exists()
    # a failed preparation leaves an existing manifest untouched
    out = tmp_path / "out" / "m.jsonl"
    run(["--dataset", "Kvasir-SEG", "--root", str(kv), "-o", str(out)])
    before = out.read_text()
    (kv / "masks" / next(iter(sorted((kv / "masks").iterdir()))).name).write_bytes(b"broken")
    with pytest.raises(InputError):
        run(["--dataset", "Kvasir-SEG", "--root", str(kv), "-o", str(out)])
    assert out.read_text() == before


def test_registry_pair_rules_and_same_names_in_two_folders(data_dir, tmp_path, capsys):
    """TN3K: trainval-image/ + trainval-mask/ and test-image/ + test-mask/, file names repeated."""
    import shutil

    from data_fixtures import KVASIR_CASES

    root = tmp_path / "data" / "TN3K"
    src = data_dir / "kvasir_seg_sample"
    for part in ("trainval", "test"):
        (root / f"{part}-image").mkdir(parents=True)
        (root / f"{part}-mask").mkdir()
        for i, case in enumerate(KVASIR_CASES[:3]):
            shutil.copy(src / "images" / f"{case}.jpg", root / f"{part}-image" / f"{i:04d}.jpg")
            shutil.copy(src / "masks" / f"{case}.jpg", root / f"{part}-mask" / f"{i:04d}.jpg")
    out = tmp_path / "o.jsonl"
    assert run(["--dataset", "TN3K", "--root", str(root), "-o", str(out)]) == 0
    records = read_manifest(out)
    assert sorted(r.case_id for r in records) == [
        f"{p}-image/{i:04d}" for p in ("test", "trainval") for i in range(3)
    ]
    assert {r.labels[1] for r in records} == {"thyroid nodule"} and {r.split for r in records} == {"test"}


def test_unknown_label_names_are_listed_in_the_summary(data_dir, tmp_path, capsys):
    kv = kvasir_folder(data_dir, tmp_path / "data" / "polyps")
    out = tmp_path / "o.jsonl"
    run(
        [
            "--layout",
            "folder2d",
            "--root",
            str(kv),
            "--labels",
            str(_labels(tmp_path, {"1": "Mystery_Blob"})),
            "-o",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "not in the vocabulary" in text and "'Mystery_Blob'" in text
    assert "modality unknown" in text
    assert {r.labels[1] for r in read_manifest(out)} == {"mystery blob"}


# file names as the public releases write them (as documented in each entry's notes); empty files suffice
# because discovery reads no pixels
RELEASE_FILES = {
    "PH2": [
        "PH2Dataset/PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
        "PH2Dataset/PH2 Dataset images/IMD002/IMD002_lesion/IMD002_lesion.bmp",
        "PH2Dataset/PH2 Dataset images/IMD002/IMD002_roi/IMD002_R1_Label4.bmp",
    ],
    "DRIVE": [
        "training/images/21_training.tif",
        "training/1st_manual/21_manual1.gif",
        "training/mask/21_training_mask.gif",
    ],
    "PolypGen": ["data_C1/images_C1/100H0050.jpg", "data_C1/masks_C1/100H0050_mask.jpg"],
    "CVC-ClinicDB": ["PNG/Original/1.png", "PNG/Ground Truth/1.png"],
    "ISIC 2018": [
        "ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg",
        "ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png",
    ],
    "BUSI": [
        "Dataset_BUSI_with_GT/benign/benign (1).png",
        "Dataset_BUSI_with_GT/benign/benign (1)_mask.png",
        "Dataset_BUSI_with_GT/benign/benign (1)_mask_1.png",
        "Dataset_BUSI_with_GT/normal/normal (1).png",
        "Dataset_BUSI_with_GT/normal/normal (1)_mask.png",
    ],
    "STARE": ["im0001.ppm", "im0001.ah.ppm", "im0001.vk.ppm"],
    "CHASE_DB1": ["Image_01L.jpg", "Image_01L_1stHO.png", "Image_01L_2ndHO.png"],
    "GlaS 2015": ["train_1.bmp", "train_1_anno.bmp"],
    "CholecSeg8k": [
        "video01/video01_00080/frame_80_endo.png",
        "video01/video01_00080/frame_80_endo_mask.png",
        "video01/video01_00080/frame_80_endo_color_mask.png",
        "video01/video01_00080/frame_80_endo_watershed_mask.png",
    ],
    "HC18": [
        "training_set/010_HC.png",
        "training_set/010_HC_Annotation.png",
        "training_set/010_2HC.png",
        "training_set/010_2HC_Annotation.png",
    ],
    "ACOUSLIC": ["images/stacked_fetal_ultrasound/a1.mha", "masks/stacked_fetal_abdomen/a1.mha"],
    "US-Nerve": ["train/1_1.tif", "train/1_1_mask.tif"],
    "BKAI-IGH NeoPolyp": ["train/train/abc.jpeg", "train_gt/train_gt/abc.jpeg"],
}


@pytest.mark.parametrize("name", sorted(RELEASE_FILES))
def test_registry_pair_rules_find_the_documented_files(tmp_path, name):
    from medsam3.data.layouts import discover

    entry = registry.get(name)
    for rel in RELEASE_FILES[name]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = discover(entry.layout, tmp_path, {**entry.options, "labels": entry.labels or {1: "x"}})
    pairs = {c.case_id: [str(p.relative_to(tmp_path)) for p in c.label] for c in found.candidates}
    images = {str(c.image[0].relative_to(tmp_path)) for c in found.candidates}
    labels = {p for v in pairs.values() for p in v}
    # every non-image file of the release that is a mask of the chosen kind is used, and no mask is an image
    assert images and not images & labels
    assert images | labels <= set(RELEASE_FILES[name])
    expected_pairs = {"BUSI": 1, "HC18": 2}.get(name, 1)
    assert len(found.candidates) == expected_pairs, pairs
    if name == "BUSI":
        assert len(next(iter(pairs.values()))) == 2  # _mask and _mask_1 merged


def test_arcade_registry_entry_reads_the_zenodo_layout(tmp_path):
    """syntax/<subset>/images/*.png + syntax/<subset>/annotations/<subset>.JSON, as the Zenodo page says."""
    from medsam3.data.layouts import discover

    entry = registry.get("ARCADE")
    for subset in ("train", "val"):
        (tmp_path / "arcade" / "syntax" / subset / "images").mkdir(parents=True)
        (tmp_path / "arcade" / "syntax" / subset / "annotations").mkdir()
        (tmp_path / "arcade" / "syntax" / subset / "images" / "1.png").write_bytes(b"")
        doc = {
            "images": [{"id": 1, "file_name": "1.png", "height": 512, "width": 512}],
            "categories": [{"id": 1, "name": "1"}, {"id": 2, "name": "9a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [[1, 1, 9, 1, 9, 9]]}],
        }
        (tmp_path / "arcade" / "syntax" / subset / "annotations" / f"{subset}.JSON").write_text(
            json.dumps(doc)
        )
    (tmp_path / "arcade" / "stenosis" / "train" / "annotations").mkdir(parents=True)
    (tmp_path / "arcade" / "stenosis" / "train" / "annotations" / "train.JSON").write_text("{}")
    found = discover(entry.layout, tmp_path, entry.options)
    assert sorted(c.case_id for c in found.candidates) == ["train/1", "val/1"]
    assert all(c.label_names == {1: "coronary artery", 2: "coronary artery"} for c in found.candidates)


def test_labels_file_regions_add_union_concepts(data_dir, tmp_path):
    """A list value in --labels is a region: its mask is the union of the labels, its slices their union."""
    import SimpleITK as sitk

    root = msd_hippocampus(data_dir, tmp_path / "data" / "Task04")
    labels = _labels(tmp_path, {"anterior hippocampus": 1, "posterior hippocampus": 2, "hippocampus": [1, 2]})
    out = tmp_path / "o.jsonl"
    assert (
        run(
            [
                "--layout",
                "nnunet",
                "--root",
                str(root),
                "--name",
                "Hippo",
                "--labels",
                str(labels),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    records = read_manifest(out)
    assert records and all(r.regions == {"hippocampus": [1, 2]} for r in records)
    for r in records:
        assert r.concepts == ["anterior hippocampus", "hippocampus", "posterior hippocampus"]
        assert r.concept_values()["hippocampus"] == [1, 2]
        label = sitk.GetArrayFromImage(sitk.ReadImage(r.label[0]))
        expected = [k for k in range(label.shape[0]) if (label[k] > 0).any()]
        assert r.foreground_slices("hippocampus").tolist() == expected
        union = set(r.foreground_slices("anterior hippocampus").tolist()) | set(
            r.foreground_slices("posterior hippocampus").tolist()
        )
        assert sorted(union) == expected
    # A region over a value the labels do not name is refused, naming the file; no manifest is written.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"anterior hippocampus": 1, "hippocampus": [1, 2]}))
    with pytest.raises(InputError, match=r"region 'hippocampus' uses label value\(s\) \[2\]"):
        run(
            [
                "--layout",
                "nnunet",
                "--root",
                str(root),
                "--name",
                "Hippo",
                "--labels",
                str(bad),
                "-o",
                str(tmp_path / "bad.jsonl"),
            ]
        )
    assert not (tmp_path / "bad.jsonl").exists()
