"""Concept vocabulary: normalisation, synonyms, dataset-scoped names, user files merged over the bundled."""

from __future__ import annotations

import json

import pytest

from data_fixtures import msd_hippocampus
from medsam3.data.indexing import prepare_dataset
from medsam3.data.vocabulary import Vocabulary, normalize_term
from medsam3.errors import InputError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kidney_left", "left kidney"),
        ("Left_Kidney", "left kidney"),
        ("kidney L", "left kidney"),
        ("Kidney  Rt", "right kidney"),
        ("liver+tumour", "liver tumor"),
        ("vertebrae_L5", "vertebrae l5"),  # 'l5' is not a side word
        ("adrenal_gland_right", "right adrenal gland"),
        ("COVID-19 infection", "covid-19 infection"),
    ],
)
def test_normalize_term(name, expected):
    assert normalize_term(name) == expected


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.bundled()


@pytest.mark.parametrize(
    ("name", "concept"),
    [
        ("kidney_left", "left kidney"),
        ("left_kidney", "left kidney"),
        ("Left Kidney", "left kidney"),
        ("kidney L", "left kidney"),
        ("lung_upper_lobe_left", "left upper lung lobe"),
        ("iliac_vena_right", "right iliac vein"),
        ("vertebrae_T12", "t12 vertebra"),
        ("heart_ventricle_left", "left ventricle"),
        ("postcava", "inferior vena cava"),
        ("public+symphysis", "pubic symphysis"),
        ("Polyps", "polyp"),
        ("Nuclei", "cell nucleus"),
        ("Retinal Blood Vessel", "retinal blood vessel"),
        ("Skin Lesion", "skin lesion"),
        ("thyroid nodule", "thyroid nodule"),
        ("fetal head", "fetal head"),
    ],
)
def test_synonyms_resolve_to_canonical_terms(vocab, name, concept):
    r = vocab.resolve(name)
    assert r.known and r.concept == concept


def test_every_totalsegmentator_name_is_known(vocab, data_dir):
    names = json.loads((data_dir / "totalsegmentator" / "labels_total_and_total_mr.json").read_text())
    unknown = [n for task in names.values() for n in task.values() if not vocab.resolve(n).known]
    assert unknown == []


def test_bundled_synonyms_are_unambiguous(vocab):
    owner = {}
    for concept, synonyms in vocab.concepts.items():
        for s in [concept, *synonyms]:
            key = normalize_term(s)
            assert owner.setdefault(key, concept) == concept, f"{s!r} names {owner[key]!r} and {concept!r}"


def test_dataset_scoped_names(vocab):
    assert vocab.resolve("Anterior", "Task04_Hippocampus").concept == "anterior hippocampus"
    assert vocab.resolve("Posterior", ["Dataset004_Hippocampus"]).concept == "posterior hippocampus"
    outside = vocab.resolve("Anterior", "Task02_Heart")
    assert not outside.known and outside.concept == "anterior"
    assert vocab.resolve("cancer", "Task03_Liver").concept == "liver tumor"
    assert vocab.resolve("cancer", "Task07_Pancreas").concept == "pancreatic tumor"


def test_unknown_names_kept_normalised_and_reported(data_dir, tmp_path):
    root = msd_hippocampus(data_dir, tmp_path / "Brain_Study")  # not a hippocampus-scoped name
    doc = json.loads((root / "dataset.json").read_text())
    doc["name"] = "Brain study"
    (root / "dataset.json").write_text(json.dumps(doc))
    records, report, _ = prepare_dataset("Brain_Study", "nnunet", root)
    assert records[0].labels == {1: "anterior", 2: "posterior"}
    assert report.unknown_names == ["Anterior", "Posterior"]


def test_user_vocabulary_merges_over_bundled(tmp_path, vocab):
    user = tmp_path / "my_vocab.json"
    user.write_text(
        json.dumps(
            {
                "concepts": {
                    "lung infection": ["infection"],
                    "Hepatic Cyst": ["liver cyst", "cyst of liver"],
                },
                "datasets": {"brain study": {"anterior": "anterior hippocampus"}},
            }
        )
    )
    merged = Vocabulary.default(user)
    assert vocab.resolve("infection").concept == "covid-19 infection"
    assert merged.resolve("infection").concept == "lung infection"  # user synonym wins
    assert merged.resolve("COVID infection").concept == "covid-19 infection"  # other bundled synonyms stay
    assert merged.resolve("cyst_of_liver").concept == "hepatic cyst"
    assert merged.resolve("Anterior", "Brain_Study").concept == "anterior hippocampus"
    assert merged.resolve("kidney_left").concept == "left kidney"


def test_bad_vocabulary_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"concepts": {"liver": 3}}))
    with pytest.raises(InputError, match="synonyms of concept 'liver'"):
        Vocabulary.load(bad)
    with pytest.raises(InputError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
