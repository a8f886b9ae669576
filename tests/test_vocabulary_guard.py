"""The vocabulary guard: a model that records its concepts reports other prompts as unknown, not segmented.

Three levels: matching and merging by hand (hand-written concepts, a hand-made result), the tiny random
video model of the serve tests given a ``concepts.json`` (2D, every volume mode, instances, the override,
no model work when nothing is known; always compared with the same model run without the guard on the
known prompts), and the concepts ``medsam3 train`` writes from a manifest. The bundled model on real
samples at every front end is in ``test_vocabulary_guard_e2e.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medsam3.data.manifest import Record, write_manifest
from medsam3.data.vocabulary import Vocabulary, singular_forms
from medsam3.errors import InputError, PromptError
from medsam3.io.memory import to_image
from medsam3.model.concepts import (
    CONCEPTS_FILE,
    ModelConcepts,
    concepts_for_training,
    record_trained_concepts,
)
from medsam3.predict.prompts import Prompt
from medsam3.predict.summary import LabelEntry, SegmentationResult
from medsam3.predict.vocabulary_guard import (
    UNKNOWN_CONCEPT,
    guard_prompts,
    merge_unknown,
)

NANO = ModelConcepts(
    {
        "anterior hippocampus": ["hippocampus head"],
        "fetal head": ["foetal head", "fh"],
        "hippocampus": ["hippocampi"],
        "polyp": ["polyps", "colon polyp"],
        "posterior hippocampus": [],
    }
)


# --------------------------------------------------------------------------------------------------
# matching by hand


@pytest.mark.parametrize(
    ("text", "concept", "rule"),
    [
        ("fetal head", "fetal head", "concept"),
        ("Fetal  Head", "fetal head", "concept"),
        ("foetal head", "fetal head", "concept"),  # British spelling: normalised
        ("FH", "fetal head", "synonym"),
        ("hippocampi", "hippocampus", "synonym"),
        ("Polyps", "polyp", "synonym"),
        ("colon polyp", "polyp", "synonym"),
        ("colorectal polyps", "polyp", "synonym"),  # a bundled synonym the model file does not list
        ("hippocampal head", "anterior hippocampus", "synonym"),
        ("Visualization of the hippocampus in MRI", "hippocampus", "sentence"),
        ("the polyp seen in colonoscopy", "polyp", "sentence"),
        ("liver", None, "unknown"),
        ("kidney", None, "unknown"),
        ("brain tumor", None, "unknown"),
        ("left hippocampus", None, "unknown"),  # a side the model never learnt
        ("hippocampus tumor", None, "unknown"),
        ("liver in the fetal head image", None, "unknown"),  # the subject comes first
        ("zzz", None, "unknown"),
    ],
)
def test_prompt_texts_match_the_models_concepts(text, concept, rule):
    m = NANO.match(text)
    assert (m.concept, m.rule) == (concept, rule)
    assert m.known == (concept is not None)


def test_singular_forms_of_the_last_word():
    assert singular_forms("polyps") == ["polyp"]
    assert singular_forms("hippocampi") == ["hippocampus"]
    assert singular_forms("vertebrae") == ["vertebra"]
    assert singular_forms("left kidneys") == ["left kidney"]
    assert singular_forms("arteries")[0] == "artery"
    assert singular_forms("mass") == [] and singular_forms("ab") == []
    vocab = Vocabulary.bundled()
    assert vocab.resolve("hippocampi").concept == "hippocampus"
    assert vocab.match_sentence("both hippocampi on MRI").concept == "hippocampus"


def test_concepts_file_round_trip_and_errors(tmp_path):
    path = NANO.write(tmp_path)
    assert path.name == CONCEPTS_FILE
    back = ModelConcepts.of_model(tmp_path)
    assert back is not None and back.names == NANO.names and back.restricts
    assert back.concepts["fetal head"] == ["foetal head", "fh"]
    assert ModelConcepts.of_model(tmp_path / "elsewhere") is None
    bad = {
        "must be a JSON object": [],
        "format": {"format": "other", "concepts": {"a": []}},
        "non-empty object": {"concepts": {}},
        "list of strings": {"concepts": {"polyp": "polyps"}},
        "true or false": {"concepts": {"polyp": []}, "open_vocabulary": "yes"},
    }
    for problem, doc in bad.items():
        f = tmp_path / "bad" / CONCEPTS_FILE
        f.parent.mkdir(exist_ok=True)
        f.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=problem) as err:
            ModelConcepts.load(f)
        assert str(f) in str(err.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json"):
        ModelConcepts.load(tmp_path / "broken.json")


def test_guard_keeps_geometry_and_sets_the_model_text():
    prompts = [Prompt("liver"), Prompt("foetal head"), Prompt(boxes=[(1, 1, 5, 5)]), Prompt("polyp")]
    g = guard_prompts(prompts, NANO)
    assert g.unknown == (0,) and g.run_index == [1, 2, 3]
    assert [p.model_text for p in g.run] == ["fetal head", "visual", "polyp"]
    assert [p.text for p in g.run] == ["foetal head", None, "polyp"]  # reports keep the given text
    assert g.run[2] is prompts[3]  # unchanged when the text is the concept
    assert g.matches[2] is None
    allowed = guard_prompts(prompts, NANO, allow_unknown=True)
    assert allowed.unknown == () and allowed.prompts[0].model_text == "liver"
    vol = guard_prompts([Prompt("hippocampi")], NANO, volume=True)
    assert type(vol.prompts[0]).__name__ == "VolumePrompt" and vol.prompts[0].model_text == "hippocampus"


# --------------------------------------------------------------------------------------------------
# merging by hand


def _entry(value, i, text, **kw):
    return LabelEntry(value=value, prompt_index=i, prompt=Prompt(text), score=0.9, presence=0.9, **kw)


def test_merge_renumbers_labels_entries_and_settings_by_hand():
    image = to_image(np.zeros((2, 3), dtype=np.uint8))
    run_map = np.array([[1, 2, 0], [0, 2, 2]], dtype=np.uint8)  # run prompts: "fetal head", "polyp"
    run = SegmentationResult(
        run_map,
        [_entry(1, 0, "fetal head", area_px=1), _entry(2, 1, "polyp", area_px=3)],
        image,
        {"preprocessing": [{"rule": "x", "prompts": [0, 1]}], "mode": "semantic"},
    )
    g = guard_prompts([Prompt("liver"), Prompt("fetal head"), Prompt("kidney"), Prompt("polyp")], NANO)
    merged = merge_unknown(run, g, image, volume=False, instances=False)
    assert merged.label_map.tolist() == [[2, 4, 0], [0, 4, 4]]  # prompt i has value i + 1
    assert [(e.value, e.prompt_index, e.name, e.reason) for e in merged.labels] == [
        (1, 0, "liver", UNKNOWN_CONCEPT),
        (2, 1, "fetal head", None),
        (3, 2, "kidney", UNKNOWN_CONCEPT),
        (4, 3, "polyp", None),
    ]
    assert merged.settings["preprocessing"][0]["prompts"] == [1, 3]
    liver = merged.labels[0].to_dict()
    assert liver["absent"] and liver["area_px"] == 0 and liver["known_concepts"] == NANO.names
    assert liver["source"] == "vocabulary" and liver["score"] is None
    assert merged.settings["vocabulary"]["concepts"] == NANO.names
    assert merged.settings["vocabulary"]["prompts"][1] == {
        "prompt_index": 1,
        "text": "fetal head",
        "concept": "fetal head",
        "rule": "concept",
    }
    # instances: values stay (numbered in prompt order), unknown entries have none
    inst = SegmentationResult(
        run_map,
        [_entry(1, 0, "fetal head", instance=1), _entry(2, 1, "polyp", instance=1)],
        image,
        {},
    )
    merged = merge_unknown(inst, g, image, volume=False, instances=True)
    assert merged.label_map.tolist() == run_map.tolist()
    assert [(e.value, e.prompt_index) for e in merged.labels] == [(None, 0), (1, 1), (None, 2), (2, 3)]


def test_merge_widens_the_label_type_when_the_prompts_need_it():
    image = to_image(np.zeros((1, 2), dtype=np.uint8))
    run = SegmentationResult(np.array([[1, 0]], np.uint8), [_entry(1, 0, "polyp")], image, {})
    g = guard_prompts([Prompt("liver")] * 300 + [Prompt("polyp")], NANO)
    merged = merge_unknown(run, g, image, volume=False, instances=False)
    assert merged.label_map.dtype == np.uint16 and merged.label_map.tolist() == [[301, 0]]


# --------------------------------------------------------------------------------------------------
# the tiny random video model (biased to "present", thresholds 0: every prompt it runs keeps a mask)

TINY = {"fetal head": ["foetal head"], "polyp": []}


@pytest.fixture(scope="module")
def guarded_model(serve_model, tmp_path_factory):
    """A copy of the serve tests' tiny model folder that records two concepts."""
    folder = tmp_path_factory.mktemp("guarded") / "model"
    shutil.copytree(serve_model, folder)
    ModelConcepts(TINY).write(folder)
    return folder


@pytest.fixture(scope="module")
def engine(serve_model):
    from medsam3.predict.engine import Engine

    return Engine.from_pretrained(str(serve_model), device="cpu", dtype="fp32")


def _segmenter(engine, concepts, **options):
    from medsam3.predict.segmenter import Segmenter

    return Segmenter(engine, concepts=concepts, threshold=0.0, presence_threshold=0.5, **options)


def _remapped(label_map, mapping):
    lut = np.zeros(int(label_map.max()) + 1 if label_map.size else 1, dtype=np.int64)
    for old, new in mapping.items():
        if old < lut.size:
            lut[old] = new
    return lut[label_map]


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(3)
    return to_image(rng.integers(0, 255, size=(60, 80), dtype=np.uint8))


def test_folder_concepts_guard_2d_and_match_the_unguarded_run(guarded_model, serve_model, picture):
    from medsam3.predict.segmenter import Segmenter

    seg = Segmenter(guarded_model, device="cpu", dtype="fp32", threshold=0.0)
    assert seg.guards and seg.concepts.names == ["fetal head", "polyp"]
    got = seg.segment(picture, ["liver", "foetal head", "kidney", "polyp"])
    plain = Segmenter(serve_model, device="cpu", dtype="fp32", threshold=0.0)
    assert not plain.guards  # no concepts.json: open vocabulary
    ref = plain.segment(picture, ["fetal head", "polyp"])
    assert "vocabulary" not in ref.settings
    assert np.array_equal(got.label_map, _remapped(ref.label_map, {1: 2, 2: 4}))
    assert got.label_map.dtype == ref.label_map.dtype
    states = [(e.value, e.name, e.absent, e.reason) for e in got.labels]
    assert states == [
        (1, "liver", True, UNKNOWN_CONCEPT),
        (2, "foetal head", False, None),
        (3, "kidney", True, UNKNOWN_CONCEPT),
        (4, "polyp", False, None),
    ]
    assert [e.score for e in got.labels[1::2]] == [e.score for e in ref.labels]
    assert got.settings["preprocessing"][0]["prompts"] == [1, 3]
    # an open-vocabulary model takes any prompt, as before
    open_all = plain.segment(picture, ["liver", "fetal head"])
    assert not any(e.absent for e in open_all.labels)


def test_allow_unknown_concepts_segments_every_prompt(engine, picture):
    guarded = _segmenter(engine, ModelConcepts(TINY))
    got = guarded.segment(picture, ["liver", "foetal head"], allow_unknown_concepts=True)
    ref = _segmenter(engine, None).segment(picture, ["liver", "fetal head"])
    assert np.array_equal(got.label_map, ref.label_map)
    assert not any(e.absent for e in got.labels)
    assert got.settings["vocabulary"]["unknown_prompts"].startswith("segmented as written")
    assert got.settings["vocabulary"]["prompts"][0]["rule"] == "unknown"


def test_open_vocabulary_file_changes_nothing(engine, picture):
    seg = _segmenter(engine, ModelConcepts(TINY, open_vocabulary=True))
    assert not seg.guards
    got = seg.segment(picture, ["liver", "foetal head"])
    ref = _segmenter(engine, None).segment(picture, ["liver", "foetal head"])
    assert np.array_equal(got.label_map, ref.label_map) and "vocabulary" not in got.settings


def test_instances_with_unknown_prompts(engine, picture):
    seg = _segmenter(engine, ModelConcepts(TINY), instances=True)
    got = seg.segment(picture, ["kidney", "polyp", "liver", "fetal head"])
    ref = _segmenter(engine, None, instances=True).segment(picture, ["polyp", "fetal head"])
    assert np.array_equal(got.label_map, ref.label_map)
    unknown = [e for e in got.labels if e.reason == UNKNOWN_CONCEPT]
    assert [(e.prompt_index, e.value) for e in unknown] == [(0, None), (2, None)]
    assert [e.prompt_index for e in got.labels if not e.absent] == [
        {0: 1, 1: 3}[e.prompt_index] for e in ref.labels if not e.absent
    ]


def test_nothing_known_runs_no_model(engine, picture, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(engine, "encode_images", no_model)
    got = _segmenter(engine, ModelConcepts(TINY)).segment(picture, ["liver", "kidney"])
    assert got.label_map.shape == (60, 80) and not got.label_map.any()
    assert [(e.value, e.reason) for e in got.labels] == [(1, UNKNOWN_CONCEPT), (2, UNKNOWN_CONCEPT)]
    assert got.settings["image_encoder_runs"] == 0


def test_invalid_prompts_are_errors_even_when_unknown(engine, picture):
    seg = _segmenter(engine, ModelConcepts(TINY))
    with pytest.raises(PromptError, match="outside"):
        seg.segment(picture, [Prompt("liver", boxes=[(0, 0, 500, 10)]), "polyp"])
    with pytest.raises(PromptError, match="empty text"):
        seg.segment(picture, [Prompt(""), "polyp"])


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(5)
    return to_image(rng.normal(100, 30, size=(6, 40, 48)).astype(np.float32), spacing=(0.8, 0.8, 2.0))


@pytest.mark.parametrize("mode", ["slices", "track", "clips"])
def test_volume_modes_segment_only_the_known_prompts(engine, volume, mode):
    options = {"mode": mode, "modality": "MR"}
    got = _segmenter(engine, ModelConcepts(TINY)).segment(
        volume, ["liver", "polyp", "kidney", "foetal head"], **options
    )
    ref = _segmenter(engine, None).segment(volume, ["polyp", "fetal head"], **options)
    assert np.array_equal(got.label_map, _remapped(ref.label_map, {1: 2, 2: 4}))
    assert set(np.unique(got.label_map).tolist()) <= {0, 2, 4}
    unknown = [e for e in got.labels if e.reason == UNKNOWN_CONCEPT]
    assert [(e.value, e.voxels, e.slice_range) for e in unknown] == [(1, 0, None), (3, 0, None)]
    assert [e.voxels for e in got.labels[1::2]] == [e.voxels for e in ref.labels]
    assert got.settings["mode"] == ref.settings["mode"]
    if mode == "slices":
        search = [p["prompt_index"] for p in got.settings["slice_search"]["prompts"]]
        assert search == [1, 3]


def test_volume_with_no_known_prompt(engine, volume, tmp_path):
    got = _segmenter(engine, ModelConcepts(TINY)).segment(volume, ["liver"], modality="MR")
    assert got.is_volume and got.label_map.shape == volume.spatial_shape and not got.label_map.any()
    (entry,) = got.labels
    assert entry.to_dict()["voxels"] == 0 and entry.reason == UNKNOWN_CONCEPT
    paths = got.write(tmp_path, "vol")  # every writer copes with a result that never met the model
    summary = json.loads(paths["json"].read_text())
    assert summary["labels"][0]["known_concepts"] == ["fetal head", "polyp"]


# --------------------------------------------------------------------------------------------------
# what medsam3 train records


def _record(dataset, case, labels, foreground, split="train"):
    return Record(
        dataset=dataset,
        case_id=case,
        image=[f"/data/{case}.png"],
        label=[f"/data/{case}_mask.png"],
        labels=labels,
        split=split,
        shape=[4, 4],
        foreground=foreground,
    )


RECORDS = [
    _record("US", "a", {1: "fetal head"}, {"fetal head": [[0, 1]]}),
    _record("MR", "b", {1: "hippocampus", 2: "polyp"}, {"hippocampus": [[0, 1]]}),  # polyp: a negative
    _record("MR", "c", {1: "hippocampus", 3: "liver"}, {"liver": [[0, 1]]}, split="test"),  # not trained
]


def test_training_records_concepts_with_foreground_in_the_training_split(tmp_path):
    got = concepts_for_training(RECORDS, base_source="tiny", manifest_name="m.jsonl")
    assert got.names == ["fetal head", "hippocampus"] and got.restricts
    assert got.concepts["fetal head"] == Vocabulary.bundled().concepts["fetal head"]
    assert got.trained_on["datasets"] == {"MR": ["hippocampus"], "US": ["fetal head"]}
    assert got.trained_on["base"] == "random weights (tiny)"
    # from a model with a closed vocabulary: its concepts stay known
    base = tmp_path / "base"
    base.mkdir()
    ModelConcepts({"polyp": ["colon polyp"]}).write(base)
    more = concepts_for_training(RECORDS, base_source=str(base))
    assert more.names == ["fetal head", "hippocampus", "polyp"] and more.restricts
    assert more.trained_on["base"] == "a model folder" and str(tmp_path) not in json.dumps(more.to_dict())
    # from an open-vocabulary model (a folder without the file, a Hub id not cached): it stays open
    plain = tmp_path / "plain"
    plain.mkdir()
    assert concepts_for_training(RECORDS, base_source=str(plain)).open_vocabulary
    assert concepts_for_training(RECORDS, base_source="facebook/sam3").open_vocabulary
    with pytest.raises(InputError, match="no concept with foreground"):
        concepts_for_training(RECORDS[2:], base_source="tiny")


def test_record_trained_concepts_reads_the_runs_manifest(tmp_path):
    from types import SimpleNamespace

    manifest = write_manifest(tmp_path / "m.jsonl", RECORDS)
    export = tmp_path / "export"
    export.mkdir()
    cfg = SimpleNamespace(
        data=SimpleNamespace(manifest=str(manifest), datasets=["US"]), model=SimpleNamespace(source="small")
    )
    path = record_trained_concepts(export, cfg)
    doc = json.loads(path.read_text())
    assert list(doc["concepts"]) == ["fetal head"] and doc["open_vocabulary"] is False
    assert doc["trained_on"]["manifest"] == "m.jsonl"
