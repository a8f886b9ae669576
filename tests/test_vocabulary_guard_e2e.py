"""The vocabulary guard of the bundled ``medsam3-nano`` on real samples, at the command line and in Python.

The model ships ``concepts.json`` with its five concepts: other prompts ("liver", "kidney", "brain tumor")
are reported absent with the reason ``unknown concept`` and the known concepts, in the printed table, the
JSON summary and the Python result; synonyms ("foetal head", "hippocampi", "colon polyp") are segmented as
their concept (the same label maps as the concept's own name); ``--allow-unknown-concepts`` segments
anyway. 2D pictures, a volume, a folder of cases and a challenge npz with sentence prompts.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image as PILImage

import medsam3
from medsam3.cli import main
from medsam3.model.concepts import ModelConcepts
from medsam3.model.resolve import BUNDLED_MODEL_DIR

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"
HC18 = SAMPLES / "hc18_400_HC.png"
HIPPO = SAMPLES / "hippocampus_019.nii.gz"
NANO_CONCEPTS = ["anterior hippocampus", "fetal head", "hippocampus", "polyp", "posterior hippocampus"]


def segment_cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["segment", *map(str, argv), "--device", "cpu", "--dtype", "fp32"])
    return code, out.getvalue()


def test_the_bundled_model_records_its_five_concepts():
    concepts = ModelConcepts.of_model(BUNDLED_MODEL_DIR)
    assert concepts is not None and concepts.restricts
    assert concepts.names == NANO_CONCEPTS
    assert concepts.trained_on["datasets"] == {
        "HC18": ["fetal head"],
        "Kvasir-SEG": ["polyp"],
        "MSD-Hippocampus": ["anterior hippocampus", "hippocampus", "posterior hippocampus"],
    }


def test_cli_2d_unknown_prompts_are_reported_not_segmented(tmp_path):
    code, out = segment_cli(HC18, "-p", "liver", "-p", "foetal head", "-p", "kidney", "-o", tmp_path / "g")
    assert code == 0
    assert "absent (unknown concept)" in out
    line = next(row for row in out.splitlines() if row.startswith("unknown concept:"))
    assert "'liver', 'kidney'" in line and ", ".join(NANO_CONCEPTS) in line
    assert "--allow-unknown-concepts" in line
    summary = json.loads((tmp_path / "g" / "hc18_400_HC.json").read_text())
    liver, head, kidney = summary["labels"]
    for e in (liver, kidney):
        assert e["absent"] and e["reason"] == "unknown concept" and e["area_px"] == 0
        assert e["known_concepts"] == NANO_CONCEPTS and e["score"] is None
    assert not head["absent"] and head["name"] == "foetal head"
    assert summary["settings"]["vocabulary"]["prompts"][1]["concept"] == "fetal head"
    mask = np.asarray(PILImage.open(tmp_path / "g" / "hc18_400_HC_mask.png"))
    assert set(np.unique(mask).tolist()) == {0, 2} and int((mask == 2).sum()) == head["area_px"]

    # the synonym gives exactly the concept's own mask
    code, _ = segment_cli(HC18, "-p", "fetal head", "-o", tmp_path / "c")
    same = np.asarray(PILImage.open(tmp_path / "c" / "hc18_400_HC_mask.png"))
    assert code == 0 and np.array_equal(same == 1, mask == 2)

    # the override: "liver" is segmented (the model answers something), nothing is reported unknown
    code, out = segment_cli(HC18, "-p", "liver", "--allow-unknown-concepts", "-o", tmp_path / "a")
    allowed = json.loads((tmp_path / "a" / "hc18_400_HC.json").read_text())
    assert code == 0 and "unknown concept" not in out
    assert (
        allowed["labels"][0]["reason"] != "unknown concept" and allowed["labels"][0]["source"] == "detector"
    )


def test_cli_volume_known_synonym_and_unknown_prompt(tmp_path):
    code, out = segment_cli(HIPPO, "-p", "hippocampi", "-p", "brain tumor", "-o", tmp_path)
    assert code == 0 and "'brain tumor'" in out
    summary = json.loads((tmp_path / "hippocampus_019.json").read_text())
    hippo, tumor = summary["labels"]
    assert not hippo["absent"] and hippo["voxels"] > 1000
    assert tumor["reason"] == "unknown concept" and tumor["voxels"] == 0
    labels = np.asarray(nib.load(str(tmp_path / "hippocampus_019_seg.nii.gz")).dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1} and int((labels == 1).sum()) == hippo["voxels"]


def test_python_api_reports_unknown_concepts():
    result = medsam3.segment(HC18, ["kidney", "fetal head"], device="cpu", dtype="fp32")
    kidney, head = result.labels
    assert (
        kidney.absent and kidney.reason == "unknown concept" and kidney.known_concepts == tuple(NANO_CONCEPTS)
    )
    assert not head.absent and not (result.label_map == 1).any() and (result.label_map == 2).sum() > 0
    allowed = medsam3.segment(HC18, ["kidney"], device="cpu", dtype="fp32", allow_unknown_concepts=True)
    assert allowed.labels[0].reason != "unknown concept"


def test_folder_of_cases_reports_unknown_concepts_once(data_dir, tmp_path):
    from data_fixtures import kvasir_folder

    folder = kvasir_folder(data_dir, tmp_path / "kvasir")
    images = sorted((folder / "images").glob("*.jpg"))[:2]
    cases = tmp_path / "cases"
    cases.mkdir()
    for f in images:
        shutil.copy(f, cases / f.name)
    code, out = segment_cli(cases, "-p", "colon polyp", "-p", "kidney", "-o", tmp_path / "out")
    assert code == 0
    assert "'kidney' not segmented in 2 case(s)" in out
    for f in images:
        summary = json.loads((tmp_path / "out" / f"{f.stem}.json").read_text())
        polyp, kidney = summary["labels"]
        assert polyp["source"] == "detector" and kidney["reason"] == "unknown concept"


def test_challenge_npz_sentence_prompts(tmp_path):
    img = nib.load(str(HIPPO))
    volume = np.asarray(img.dataobj).transpose(2, 1, 0)  # NIfTI (x, y, z) -> (z, y, x)
    prompts = {
        "1": "Visualization of the hippocampus in MRI",
        "2": "Liver in abdominal CT",
        "instance_label": 0,
    }
    case = tmp_path / "MR_hippocampus.npz"
    np.savez(
        case,
        imgs=volume.astype(np.float32),
        spacing=np.array([1.0, 1.0, 1.0]),
        text_prompts=np.array(prompts, dtype=object),
    )
    code, out = segment_cli(case, "-o", tmp_path / "out")
    assert code == 0 and "'Liver in abdominal CT'" in out
    summary = json.loads((tmp_path / "out" / "MR_hippocampus.json").read_text())
    hippo, liver = summary["labels"]
    assert not hippo["absent"] and hippo["voxels"] > 1000
    assert liver["reason"] == "unknown concept" and liver["voxels"] == 0
    matched = summary["settings"]["vocabulary"]["prompts"]
    assert [(m["concept"], m["rule"]) for m in matched] == [("hippocampus", "sentence"), (None, "unknown")]
