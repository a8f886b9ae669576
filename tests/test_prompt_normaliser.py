"""The prompt normaliser: challenge-style sentences -> vocabulary concepts (rules in medsam3.data.vocabulary).

Each expected concept below was worked out by hand from the rule: words, phrases cut at relation words, the
first phrase with a term, the longest term taken left to right (ties: the last), then the context and
side rules.
"""

from __future__ import annotations

import pytest

from medsam3.data.vocabulary import PHRASE_BREAKS, Vocabulary, sentence_words

# sentence, concept, rule, matched words
SENTENCES = [
    # phrase 1 "ct imaging" has no term; phrase 2 "the spleen" -> spleen
    ("CT imaging of the spleen within the abdomen", "spleen", "term", "spleen"),
    # "visualization" | "the left kidney" | "mri": the two-word term beats "kidney"
    ("Visualization of the left kidney in MRI", "left kidney", "term", "left kidney"),
    ("Right kidney in abdominal CT", "right kidney", "term", "right kidney"),
    # "kidney right" (brackets separate words): "kidney" matched, one side word left over -> right kidney
    ("Kidney (right) on contrast-enhanced CT", "right kidney", "term+side", "kidney (right)"),
    ("Liver in abdominal CT scan", "liver", "term", "liver"),
    ("The pancreas in portal venous phase CT", "pancreas", "term", "pancreas"),
    # "abdominal" is in no term: "aorta" alone
    ("Abdominal aorta in CT angiography", "aorta", "term", "aorta"),
    # the subject comes first: "lesion", not the longer "left lung" of the context phrase
    ("Lesion in the left lung", "lesion", "term", "lesion"),
    # plural "lesions" of the term word "lesion"
    ("Lesions in whole-body PET/CT", "lesion", "term", "lesions"),
    # context rule: "liver" + "tumor" is the term "liver tumor"
    ("Tumor of the liver", "liver tumor", "term+context", "tumor ... liver"),
    # British spelling and plural: "liver tumours" -> words "liver tumors" -> term "liver tumor"
    ("Liver tumours in contrast-enhanced CT", "liver tumor", "term", "liver tumors"),
    ("Pancreatic tumor in abdominal CT", "pancreatic tumor", "term", "pancreatic tumor"),
    # context rule: "pancreas tumor" is a synonym of "pancreatic tumor"
    ("Tumour in the pancreas", "pancreatic tumor", "term+context", "tumor ... pancreas"),
    ("Kidney tumor visible in CT", "kidney tumor", "term", "kidney tumor"),
    # "peritumoral edema" is a synonym of "edema"; the context "brain tumor" + "edema" is no term
    ("Peritumoral edema of the brain tumor in MRI", "edema", "term", "peritumoral edema"),
    # left to right: "enhancing tumor" is taken first, so the overlapping "tumor region" is not
    ("Enhancing tumour region in brain MRI", "enhancing tumor", "term", "enhancing tumor"),
    # "non-enhancing" splits into "non enhancing": the three-word term wins over "tumor core"
    ("Non-enhancing tumor core in FLAIR MRI", "non-enhancing tumor", "term", "non enhancing tumor"),
    ("Tumor core of the glioma", "tumor core", "term", "tumor core"),
    ("Brain tumor in T1-weighted MRI", "brain tumor", "term", "brain tumor"),
    ("Lung nodules in chest CT", "lung nodule", "term", "lung nodules"),
    ("Myocardium of the left ventricle in cardiac MRI", "myocardium", "term", "myocardium"),
    # two one-word terms in one phrase: the last (the head noun) wins
    ("Pancreas lesion in CT", "lesion", "term", "lesion"),
    ("Gall bladder in abdominal ultrasound", "gallbladder", "term", "gall bladder"),
    ("Urinary bladder in pelvic CT", "urinary bladder", "term", "urinary bladder"),
    ("Hepatic vessels in the liver", "hepatic vessel", "term", "hepatic vessels"),
    # plural of a word ending in -a: "vertebrae" for "vertebra"
    ("Vertebrae in spine CT", "vertebra", "term", "vertebrae"),
]


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.bundled()


@pytest.mark.parametrize(("sentence", "concept", "rule", "matched"), SENTENCES)
def test_sentences_map_to_the_hand_computed_concept(vocabulary, sentence, concept, rule, matched):
    got = vocabulary.match_sentence(sentence)
    assert (got.concept, got.rule, got.matched) == (concept, rule, matched)
    assert got.used == concept and got.text == sentence
    assert vocabulary.is_concept(concept)


@pytest.mark.parametrize("sentence", ["Whole-body PET scan", "Region of interest in MRI", ""])
def test_an_unmapped_sentence_is_kept_as_written(vocabulary, sentence):
    got = vocabulary.match_sentence(sentence)
    assert got.concept is None and got.rule == "unmapped" and got.used == sentence
    assert got.to_dict() == {"text": sentence, "concept": None, "matched": None, "rule": "unmapped"}


def test_words_and_phrase_breaks():
    assert sentence_words("Non-enhancing TUMOUR core (left)") == ["non", "enhancing", "tumor", "core", "left"]
    vocab = Vocabulary.bundled()
    # no relation word may be a word of a term: a term would then be cut in two
    term_words = {w for words, _ in vocab._terms for w in words}
    assert not PHRASE_BREAKS & term_words


def test_a_user_vocabulary_adds_terms_the_normaliser_finds():
    vocab = Vocabulary.from_dict({"concepts": {"spleen": [], "splenic lesion": ["lesion of spleen"]}})
    assert vocab.match_sentence("Splenic lesions in CT").concept == "splenic lesion"
    assert vocab.match_sentence("CT of the spleen").concept == "spleen"
    # "lesion of spleen" is cut at "of": no phrase holds it, so it cannot match as a whole
    assert vocab.match_sentence("lesion of spleen").concept == "spleen"
