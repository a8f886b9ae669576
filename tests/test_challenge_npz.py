"""The CVPR 2025 text-guided 3D challenge format end to end: safe prompts, per-case prompts, label ids,
instance tasks, the challenge's prediction files.

Three levels: hand-computed (prompt forms, precedence, label ids, instance numbering), a hostile npz whose
prompts would run code if unpickled normally, and ``medsam3 segment`` on challenge files built from the real
sample volumes with the tiny model of the server tests.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medsam3.cli import main
from medsam3.errors import InputError, PromptError
from medsam3.image import Image
from medsam3.io.npz import TextPrompts, parse_text_prompts, read_npz, read_text_prompts
from medsam3.predict.case_prompts import (
    SOURCE_CLI,
    SOURCE_FILE,
    SOURCE_JSON,
    CasePrompts,
    PromptSources,
    PromptsTable,
    apply_case_prompts,
    split_instances,
    split_label_ids,
)
from medsam3.predict.prompts import Prompt
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.volume.outputs import volume_output_paths
from medsam3.predict.volume.prompts import VolumePrompt

SAMPLES = "medsam2_recist_npz"


def challenge_npz(path: Path, imgs: np.ndarray, prompts, spacing=(1.0, 1.0, 2.5)) -> Path:
    """A validation / test case as the challenge ships it: imgs, spacing, text_prompts (pickled dict)."""
    arrays = {"imgs": imgs, "spacing": np.asarray(spacing, dtype=np.float64)}
    if prompts is not None:
        arrays["text_prompts"] = np.array(prompts, dtype=object)
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------------------------------
# the stored prompt forms


@pytest.mark.parametrize(
    ("value", "labels", "instance"),
    [
        ({"1": "liver", "2": " left  kidney ", "instance_label": 0}, {1: "liver", 2: "left kidney"}, False),
        ({"01": "spleen", "instance_label": "1"}, {1: "spleen"}, True),
        ({"0": "background", "3": "aorta"}, {3: "aorta"}, False),  # label 0 is the background
        ({"2": ["liver lesion", "lesion in CT"]}, {2: "liver lesion"}, False),  # phrasings: the first
        (json.dumps({"5": "pancreas", "instance_label": 0}), {5: "pancreas"}, False),
        ("CT imaging of the spleen", {1: "CT imaging of the spleen"}, False),  # a plain text: label 1
        (np.array(["liver", "spleen"]), {1: "liver", 2: "spleen"}, False),
        (
            np.array({"7": np.str_("stomach"), "instance_label": np.int64(0)}, dtype=object),
            {7: "stomach"},
            False,
        ),
    ],
)
def test_prompt_forms(value, labels, instance):
    assert parse_text_prompts(value, "case.npz") == TextPrompts(labels, instance)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"liver": "liver"}, "key 'liver' is not a label id"),
        ({"-1": "liver"}, "negative"),
        ({"1": "  "}, "label 1 has an empty text"),
        ({"1": "a", "01": "b"}, "names label 1 twice"),
        ({"1": "a", "instance_label": 2}, "instance_label is 2"),
        ({"instance_label": 0}, "holds no prompt"),
        ({"1": 5}, "expected a text, got int"),
    ],
)
def test_malformed_prompts_are_named(value, message):
    with pytest.raises(InputError, match=message) as info:
        parse_text_prompts(value, "CT_x.npz")
    assert str(info.value).startswith("CT_x.npz: ")


def test_read_npz_keeps_instance_label_and_reads_an_image_with_bad_prompts(tmp_path):
    imgs = np.zeros((3, 8, 8), np.uint8)
    good = challenge_npz(tmp_path / "CT_good.npz", imgs, {"4": "Lesions in CT", "instance_label": 1})
    assert read_text_prompts(good) == TextPrompts({4: "Lesions in CT"}, True)
    image, _, prompts = read_npz(good)
    assert prompts == {4: "Lesions in CT"} and image.meta["instance_label"] == 1
    bad = challenge_npz(tmp_path / "CT_bad.npz", imgs, {"one": "liver"})
    image, _, prompts = read_npz(bad)  # the image is still readable (with -p, say)
    assert prompts == {} and "not a label id" in image.meta["text_prompts_problem"]
    with pytest.raises(InputError, match="CT_bad.npz: text_prompts key 'one'"):
        read_text_prompts(bad)
    assert read_text_prompts(challenge_npz(tmp_path / "none.npz", imgs, None)) is None


# --------------------------------------------------------------------------------------------------
# a hostile npz


class _RunsCode:
    """Unpickled normally, this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def hostile_npz(path: Path, marker: Path) -> Path:
    """An npz whose ``text_prompts`` is a 0-d object array holding ``{"1": <object running code>}``."""
    imgs = np.zeros((3, 8, 8), np.uint8)
    np.savez(path, imgs=imgs, spacing=np.ones(3))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, np.lib.format.header_data_from_array_1_0(np.array(None, dtype=object))
    )
    buf.write(pickle.dumps(np.array({"1": _RunsCode(marker)}, dtype=object), protocol=3))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("text_prompts.npy", buf.getvalue())
    return path


def test_hostile_prompts_are_refused_and_never_run(tmp_path, capsys):
    # the file is a real threat: numpy's own loader with pickles allowed runs the command
    control = tmp_path / "control-marker"
    with np.load(hostile_npz(tmp_path / "control.npz", control), allow_pickle=True) as z:
        z["text_prompts"]
    assert control.exists()

    marker = tmp_path / "marker"
    path = hostile_npz(tmp_path / "CT_evil.npz", marker)
    with pytest.raises(InputError, match=r"refusing to unpickle (posix|os)\.system") as info:
        read_text_prompts(path)
    assert info.value.path == path and str(info.value).startswith(
        f"{path}: text_prompts cannot be read safely"
    )
    with pytest.raises(InputError, match="refusing to unpickle"):
        PromptSources().for_case(path, "CT_evil")
    code = main(["segment", str(path), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: text_prompts cannot be read safely" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# where a case's prompts come from


def test_label_ids_on_the_command_line():
    items = [("text", "1=liver"), ("box", "1,2,3,4"), ("text", " 12 = left kidney")]
    assert split_label_ids(items) == (
        [("text", "liver"), ("box", "1,2,3,4"), ("text", "left kidney")],
        [1, 12],
    )
    assert split_label_ids([("text", "liver"), ("text", "x=y")]) == (
        [("text", "liver"), ("text", "x=y")],
        None,
    )
    for bad, message in [
        ([("text", "1=liver"), ("text", "spleen")], "every prompt"),
        ([("box", "1,2,3,4"), ("text", "1=liver")], "every prompt"),
        ([("text", "0=liver")], "background"),
        ([("text", "2=liver"), ("text", "2=spleen")], "label id 2 is given to two"),
    ]:
        with pytest.raises(PromptError, match=message):
            split_label_ids(bad)


def test_prompts_json_forms(tmp_path):
    direct = tmp_path / "direct.json"
    direct.write_text(json.dumps({"2": "liver", "1": "spleen", "instance_label": 0}))
    table = PromptsTable.load(direct)
    assert table.lookup(Path("any.nii.gz"), "any") == ("(every case)", TextPrompts({1: "spleen", 2: "liver"}))
    keyed = tmp_path / "keyed.json"
    keyed.write_text(
        json.dumps({"CT_a.npz": "aorta", "CT_a": "not used", "MR_b": {"3": "brain", "instance_label": 1}})
    )
    table = PromptsTable.load(keyed)
    assert table.lookup(Path("in/CT_a.npz"), "CT_a") == (
        "CT_a.npz",
        TextPrompts({1: "aorta"}),
    )  # file name first
    assert table.lookup(Path("in/MR_b.nii.gz"), "MR_b") == (
        "MR_b",
        TextPrompts({3: "brain"}, True),
    )  # then name
    assert table.lookup(Path("in/CT_c.npz"), "CT_c") is None
    for doc, message in [
        ("[1, 2]", "non-empty object"),
        ("{", "cannot read"),
        ('{"CT_a": {"x": "liver"}}', "'CT_a'"),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(doc)
        with pytest.raises(InputError, match=message):
            PromptsTable.load(bad)


def test_prompt_precedence_table(tmp_path):
    """-p > --prompts-json (direct, else file name, else name) > the npz's text_prompts > an error."""
    imgs = np.zeros((3, 8, 8), np.uint8)
    stored = {"2": "Liver in CT", "5": "Spleen in CT", "instance_label": 0}
    with_prompts = challenge_npz(tmp_path / "CT_p.npz", imgs, stored)
    without = challenge_npz(tmp_path / "CT_q.npz", imgs, None)
    (tmp_path / "keyed.json").write_text(json.dumps({"CT_q": {"9": "aorta"}, "CT_r.nii.gz": "heart"}))
    (tmp_path / "direct.json").write_text(json.dumps({"3": "pancreas"}))
    keyed, direct = tmp_path / "keyed.json", tmp_path / "direct.json"
    cli = [VolumePrompt("kidney"), VolumePrompt("liver")]
    rows = [
        # (-p items, prompts JSON, case) -> (source, texts, label ids)
        (
            [("text", "kidney"), ("text", "liver")],
            direct,
            with_prompts,
            SOURCE_CLI,
            ("kidney", "liver"),
            (1, 2),
        ),
        (
            [("text", "4=kidney"), ("text", "8=liver")],
            keyed,
            without,
            SOURCE_CLI,
            ("kidney", "liver"),
            (4, 8),
        ),
        ([], direct, with_prompts, SOURCE_JSON, ("pancreas",), (3,)),
        ([], keyed, without, SOURCE_JSON, ("aorta",), (9,)),  # by name (CT_q)
        ([], keyed, tmp_path / "CT_r.nii.gz", SOURCE_JSON, ("heart",), (1,)),  # by file name, any format
        ([], keyed, with_prompts, SOURCE_FILE, ("Liver in CT", "Spleen in CT"), (2, 5)),  # not in the JSON
        ([], None, with_prompts, SOURCE_FILE, ("Liver in CT", "Spleen in CT"), (2, 5)),
    ]
    for items, table, case, source, texts, ids in rows:
        sources = PromptSources.from_args(items, table)
        got = sources.for_case(case, case.name.split(".")[0], cli if items else None)
        assert (got.source, got.texts, got.label_ids, got.instance) == (source, texts, ids, False), (
            items,
            case,
        )
    with pytest.raises(PromptError, match="CT_q.npz: no prompt for this case"):
        PromptSources.from_args([]).for_case(without, "CT_q")
    with pytest.raises(PromptError, match="or an entry for 'CT_q.npz' in"):
        PromptSources.from_args([], direct.with_name("keyed.json")).for_case(tmp_path / "CT_q.npz", "other")


def test_instance_tasks_need_one_prompt_and_the_normaliser_is_reported(tmp_path):
    imgs = np.zeros((3, 8, 8), np.uint8)
    two = challenge_npz(tmp_path / "CT_two.npz", imgs, {"1": "lesion", "2": "tumor", "instance_label": 1})
    with pytest.raises(PromptError, match="instance_label is 1 but 2 prompts"):
        PromptSources().for_case(two, "CT_two")
    one = challenge_npz(
        tmp_path / "CT_one.npz", imgs, {"3": "Lesions in whole-body PET/CT", "instance_label": 1}
    )
    case = PromptSources.from_args([], normalize=True).for_case(one, "CT_one")
    assert case.instance and case.texts == ("lesion",) and case.label_ids == (3,)
    record = case.record(instances=4, seconds=1.23456)
    assert record == {
        "prompt_source": SOURCE_FILE,
        "prompt_detail": str(one),
        "prompts": {"3": "lesion"},
        "label_ids": [3],
        "instance": True,
        "instances": 4,
        "normalized": {
            "3": {
                "text": "Lesions in whole-body PET/CT",
                "concept": "lesion",
                "matched": "lesions",
                "rule": "term",
            }
        },
        "seconds": 1.235,
    }
    # an unmapped sentence is used as written, and reported as such
    odd = challenge_npz(tmp_path / "CT_odd.npz", imgs, {"1": "Whole-body PET scan"})
    case = PromptSources.from_args([], normalize=True).for_case(odd, "CT_odd")
    assert case.texts == ("Whole-body PET scan",) and case.matches[0].concept is None
    # command-line prompts keep their boxes when normalised
    sources = PromptSources.from_args([("text", "Spleen in CT"), ("box", "1,1,5,5")], normalize=True)
    cli = [Prompt("Spleen in CT", boxes=[(1, 1, 5, 5)])]
    (prompt,) = sources.for_case(one, "CT_one", cli).prompts(cli, volume=False)
    assert prompt.text == "spleen" and prompt.boxes == [(1.0, 1.0, 5.0, 5.0)]


# --------------------------------------------------------------------------------------------------
# label ids and instances


def test_instances_are_6_connected_components_in_scan_order():
    mask = np.zeros((4, 6, 6), bool)
    mask[0, 0, 0] = mask[0, 1, 0] = True  # blob A: two voxels sharing a face
    mask[1, 3, 3] = True  # blob B ...
    mask[2, 4, 4] = True  # ... and blob C touch B only across an edge / corner: separate under 6-connectivity
    mask[3, 0:2, 4:6] = True  # blob D: a 2 x 2 square
    labels, count = split_instances(mask)
    assert count == 4 and labels.dtype == np.uint8
    # numbered by each blob's first voxel in C order: A (0,0,0), B (1,3,3), C (2,4,4), D (3,0,4)
    assert labels[0, 0, 0] == labels[0, 1, 0] == 1
    assert (labels[1, 3, 3], labels[2, 4, 4], labels[3, 0, 4]) == (2, 3, 4)
    assert np.array_equal(labels > 0, mask) and np.bincount(labels.ravel()).tolist() == [136, 2, 1, 1, 4]
    from scipy import ndimage

    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 3  # 26-connectivity would join B and C


def _result(label_map: np.ndarray, names: list[str]) -> SegmentationResult:
    ref = Image(np.zeros(label_map.shape, np.uint8), (2.0, 1.0, 0.5), (0.0, 0.0, 0.0), np.eye(3), "CT", {})
    entries = []
    for i, name in enumerate(names):
        voxels = int((label_map == i + 1).sum())
        entries.append(
            LabelEntry(i + 1, i, VolumePrompt(name), 0.9, 0.99, voxels=voxels, volume_ml=voxels * 0.001)
        )
    return SegmentationResult(label_map, entries, ref)


def test_label_ids_and_instances_on_a_result():
    label_map = np.zeros((3, 4, 5), np.uint8)
    label_map[0, :2, :2] = 1
    label_map[2, 1:3, 3:5] = 2
    case = CasePrompts(("liver", "spleen"), (3, 300), SOURCE_FILE)
    result, instances = apply_case_prompts(_result(label_map, ["liver", "spleen"]), case)
    assert instances is None and result.label_map.dtype == np.uint16  # 300 needs 16 bits
    assert np.array_equal(result.label_map, np.where(label_map == 1, 3, np.where(label_map == 2, 300, 0)))
    assert [e.value for e in result.labels] == [3, 300] and result.label_names() == {
        3: "liver",
        300: "spleen",
    }
    assert result.to_dict()["labels"][1]["voxels"] == 4
    same, _ = apply_case_prompts(
        _result(label_map, ["liver", "spleen"]), CasePrompts(("a", "b"), (1, 2), SOURCE_CLI)
    )
    assert same.label_map is label_map  # 1..N: unchanged

    lesions = np.zeros((3, 4, 5), np.uint8)
    lesions[0, 0, 0:2] = 1
    lesions[2, 3, 4] = 1
    result, instances = apply_case_prompts(
        _result(lesions, ["lesion"]), CasePrompts(("lesion",), (7,), SOURCE_FILE, instance=True)
    )
    assert instances == 2 and result.label_map.dtype == np.uint8
    assert result.label_map[0, 0, 0] == result.label_map[0, 0, 1] == 1 and result.label_map[2, 3, 4] == 2
    first, second = result.labels
    assert (first.value, first.name, first.voxels, first.box3d, first.slice_range) == (
        1,
        "lesion #1",
        2,
        (0, 0, 0, 2, 1, 1),
        (0, 0),
    )
    assert (second.value, second.voxels, second.box3d) == (2, 1, (4, 3, 2, 5, 4, 3))
    assert first.volume_ml == pytest.approx(2 * 0.001)  # 2 x 1 x 0.5 mm voxels
    empty, instances = apply_case_prompts(
        _result(np.zeros((2, 2, 2), np.uint8), ["lesion"]),
        CasePrompts(("lesion",), (1,), SOURCE_FILE, instance=True),
    )
    assert instances == 0 and [e.value for e in empty.labels] == [None]


def test_challenge_output_paths():
    ref = Image(
        np.zeros((2, 3, 4), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", {"format": "npz"}
    )
    paths = volume_output_paths(ref, "out", "CT_x", overlay=False, output_types=["challenge-npz"])
    assert {k: p.name for k, p in paths.items()} == {"challenge_npz": "CT_x.npz", "json": "CT_x.json"}
    paths = volume_output_paths(ref, "out", "CT_x", overlay=False, output_types=["npz", "challenge-npz"])
    assert {k: p.name for k, p in paths.items()} == {
        "labels": "CT_x_seg.npz",
        "challenge_npz": "CT_x.npz",
        "json": "CT_x.json",
    }
    default = volume_output_paths(ref, "out", "CT_x", overlay=False)  # unchanged without the option
    assert {k: p.name for k, p in default.items()} == {"labels": "CT_x_seg.npz", "json": "CT_x.json"}


def test_resuming_without_a_case_record_checks_the_label_values():
    from medsam3.commands.segment import _values_fit

    semantic = {"labels": [{"value": 3, "prompt_index": 0}, {"value": 300, "prompt_index": 1}]}
    assert _values_fit(semantic, (3, 300), False)
    assert not _values_fit(semantic, (3, 301), False) and not _values_fit(semantic, (300, 3), False)
    assert not _values_fit(semantic, (3, 300), True)  # names without "#k": not an instance task
    plain = {"labels": [{"value": 1, "prompt_index": 0}, {"value": None, "prompt_index": 1}]}
    assert _values_fit(plain, (1, 2), False)
    instances = {"labels": [{"value": 1, "name": "lesion #1"}, {"value": 2, "name": "lesion #2"}]}
    assert _values_fit(instances, (5,), True)


# --------------------------------------------------------------------------------------------------
# end to end


def _crop(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Six slices of a real sample, every fourth row and column (128 x 128), with the spacing that fits."""
    with np.load(data_dir / SAMPLES / name) as z:
        imgs, spacing = z["imgs"][4:10, ::4, ::4].copy(), z["spacing"].astype(np.float64)
    spacing[:2] *= 4
    return imgs, spacing


def _segment(capsys, *argv) -> tuple[int, str]:
    code = main(["segment", *map(str, argv)])
    return code, capsys.readouterr().err


def _csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


@pytest.fixture
def challenge_folder(data_dir, tmp_path) -> tuple[Path, Path]:
    """A validation folder as the challenge ships it, and a prompts JSON overriding one case."""
    val = tmp_path / "val"
    val.mkdir()
    a, sa = _crop(data_dir, "CT_Lesion_000001_02_01_008-023.npz")
    b, sb = _crop(data_dir, "CT_Lesion_000002_03_01_035-047.npz")
    c, sc = _crop(data_dir, "CT_Lesion_000009_03_01_036-048.npz")
    semantic = {
        "1": "CT imaging of the spleen within the abdomen",
        "7": "Visualization of the left kidney in CT",
    }
    challenge_npz(val / "CT_AbdTumor_a.npz", a, {**semantic, "instance_label": 0}, sa)
    challenge_npz(val / "CT_Lesion_b.npz", b, {"2": "Lesions in abdominal CT", "instance_label": 1}, sb)
    challenge_npz(val / "CT_Liver_c.npz", c, {"1": "liver"}, sc)
    challenge_npz(val / "CT_None_d.npz", c, None, sc)  # no prompt anywhere: fails alone
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"CT_Liver_c.npz": {"300": "Liver in abdominal CT", "instance_label": 0}}))
    return val, prompts


def test_a_challenge_folder_end_to_end(challenge_folder, serve_model, tmp_path, capsys):
    val, prompts = challenge_folder
    out = tmp_path / "preds"
    argv = [val, "-o", out, "--model", serve_model, "--device", "cpu", "--output-type", "challenge-npz"]
    argv += ["--no-overlay", "--normalize-prompts", "--prompts-json", prompts]
    code, err = _segment(capsys, *argv)
    assert code == 1 and "CT_None_d" in err and "no prompt for this case" in err

    def npz(name: str) -> np.ndarray:
        with np.load(out / f"{name}.npz") as z, np.load(val / f"{name}.npz", allow_pickle=False) as src:
            assert z.files == ["segs"] and z["segs"].shape == src["imgs"].shape == (6, 128, 128)
            return z["segs"]

    summaries = {
        n: json.loads((out / f"{n}.json").read_text()) for n in ("CT_AbdTumor_a", "CT_Lesion_b", "CT_Liver_c")
    }
    # semantic case: the file's label ids, sentences normalised
    segs = npz("CT_AbdTumor_a")
    record = summaries["CT_AbdTumor_a"]["case"]
    assert segs.dtype == np.uint8 and set(np.unique(segs).tolist()) <= {0, 1, 7}
    assert [e["value"] for e in summaries["CT_AbdTumor_a"]["labels"]] == [1, 7]
    assert record["prompt_source"] == "npz text_prompts" and record["label_ids"] == [1, 7]
    assert record["prompts"] == {"1": "spleen", "7": "left kidney"} and record["instance"] is False
    assert {k: v["concept"] for k, v in record["normalized"].items()} == {"1": "spleen", "7": "left kidney"}
    assert summaries["CT_AbdTumor_a"]["outputs"] == {"challenge_npz": "CT_AbdTumor_a.npz"}
    # instance case: 6-connected components numbered 1..K
    from scipy import ndimage

    segs = npz("CT_Lesion_b")
    record = summaries["CT_Lesion_b"]["case"]
    k = record["instances"]
    assert record["instance"] is True and record["label_ids"] == [2] and k >= 1
    assert set(np.unique(segs).tolist()) == set(range(k + 1))
    relabelled, count = ndimage.label(segs > 0, structure=ndimage.generate_binary_structure(3, 1))
    assert count == k and np.array_equal(relabelled, segs)
    assert [e["value"] for e in summaries["CT_Lesion_b"]["labels"]] == list(range(1, k + 1))
    # the prompts JSON wins over the file's own prompts; label 300 needs uint16
    segs = npz("CT_Liver_c")
    record = summaries["CT_Liver_c"]["case"]
    assert segs.dtype == np.uint16 and set(np.unique(segs).tolist()) <= {0, 300} and (segs == 300).any()
    assert (
        record["prompt_source"] == "prompts JSON" and record["prompt_detail"] == f"{prompts} [CT_Liver_c.npz]"
    )
    assert record["normalized"]["300"]["concept"] == "liver"
    assert not (out / "CT_None_d.npz").exists() and not (out / "CT_None_d.json").exists()
    # wall time per case, the same in the JSON and the CSV
    rows = _csv(out / "summary.csv")
    assert {n: r["status"] for n, r in rows.items()} == {
        "CT_AbdTumor_a": "ok",
        "CT_Lesion_b": "ok",
        "CT_Liver_c": "ok",
        "CT_None_d": "failed",
    }
    for name, summary in summaries.items():
        assert summary["case"]["seconds"] > 0
        assert rows[name]["seconds"] == f"{summary['case']['seconds']:.2f}"
    assert rows["CT_Lesion_b"]["instances"] == str(k) and rows["CT_Lesion_b"]["instance"] == "1"
    assert rows["CT_Liver_c"]["prompt source"] == "prompts JSON"

    # a second run skips the finished cases and leaves their files alone
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".npz", ".json")}
    code, err = _segment(capsys, *argv)
    assert code == 1 and "CT_None_d" in err
    rows = _csv(out / "summary.csv")
    assert [rows[n]["status"] for n in summaries] == ["skipped"] * 3
    assert rows["CT_Lesion_b"]["seconds"] == f"{summaries['CT_Lesion_b']['case']['seconds']:.2f}"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".npz", ".json")} == before
    # a JSON without its case record (a run stopped just before adding it): the label values still tell
    for name in ("CT_Lesion_b", "CT_Liver_c"):
        path = out / f"{name}.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "case"}))
    code, _ = _segment(capsys, *argv)
    assert code == 1 and [_csv(out / "summary.csv")[n]["status"] for n in summaries] == ["skipped"] * 3
    # other prompts (no normaliser): the finished cases are not silently reused
    code, _ = _segment(capsys, *[a for a in argv if a != "--normalize-prompts"])
    assert code == 1 and "other prompts" in _csv(out / "summary.csv")["CT_AbdTumor_a"]["error"]


def test_challenge_predictions_never_overwrite_the_inputs(challenge_folder, serve_model, capsys):
    val, _ = challenge_folder
    names = sorted(p.name for p in val.iterdir())
    code, err = _segment(capsys, val, "-o", val, "--model", serve_model, "--output-type", "challenge-npz")
    assert code == 2 and "refusing to write over an input" in err and "other than the input folder" in err
    assert sorted(p.name for p in val.iterdir()) == names


def test_one_case_file_prompts_or_command_line(data_dir, serve_model, tmp_path, capsys):
    imgs, spacing = _crop(data_dir, "CT_Lesion_000015_01_01_081-093.npz")
    case = challenge_npz(
        tmp_path / "CT_one.npz", imgs, {"2": "liver", "5": "spleen", "instance_label": 0}, spacing
    )
    model = ["--model", serve_model, "--device", "cpu", "--no-overlay"]
    # no -p: the file's prompts and label ids, in the usual <stem>_seg.npz (segs with its geometry)
    code, err = _segment(capsys, case, "-o", tmp_path / "a", *model)
    assert code == 0, err
    with np.load(tmp_path / "a" / "CT_one_seg.npz") as z:
        assert set(np.unique(z["segs"]).tolist()) <= {0, 2, 5} and {"spacing", "label_names"} <= set(z.files)
        assert json.loads(str(z["label_names"])) == {"2": "liver", "5": "spleen"}
    summary = json.loads((tmp_path / "a" / "CT_one.json").read_text())
    assert summary["case"]["prompt_source"] == "npz text_prompts" and summary["case"]["label_ids"] == [2, 5]
    assert "normalized" not in summary["case"]
    # -p wins; -p LABEL=TEXT numbers the prompts
    code, err = _segment(capsys, case, "-o", tmp_path / "b", "-p", "4=aorta", *model)
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "CT_one.json").read_text())
    assert [(e["value"], e["name"]) for e in summary["labels"]] == [(4, "aorta")]
    assert summary["case"]["prompt_source"] == "command line"
    with np.load(tmp_path / "b" / "CT_one_seg.npz") as z:
        assert set(np.unique(z["segs"]).tolist()) <= {0, 4}
    # no prompt from any source: a clear error before the model loads
    bare = challenge_npz(tmp_path / "CT_bare.npz", imgs, None, spacing)
    code, err = _segment(capsys, bare, "-o", tmp_path / "c", "--model", tmp_path / "no-model")
    assert code == 2 and f"{bare}: no prompt for this case" in err


def test_a_folder_without_any_prompt_source_is_refused_before_the_model(data_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(data_dir / "msd_hippocampus/images/hippocampus_019.nii.gz", folder)
    code, err = _segment(capsys, folder, "-o", tmp_path / "out", "--model", tmp_path / "no-model")
    assert code == 2 and "no prompt given: use -p TEXT, --prompts-json FILE" in err


def test_prompts_json_for_a_nifti_case(data_dir, serve_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"4": "hippocampus"}))
    src = data_dir / "msd_hippocampus/images/hippocampus_019.nii.gz"
    code, err = _segment(
        capsys, src, "-o", tmp_path, "--prompts-json", prompts, "--model", serve_model, "--no-overlay"
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "hippocampus_019.json").read_text())
    assert [e["value"] for e in summary["labels"]] == [4] and summary["case"][
        "prompt_source"
    ] == "prompts JSON"
    from medsam3.io.readers import read_label_map

    assert set(np.unique(read_label_map(tmp_path / "hippocampus_019_seg.nii.gz").array).tolist()) <= {0, 4}
