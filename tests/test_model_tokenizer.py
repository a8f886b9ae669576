"""The offline CLIP tokenizer reproduces CLIP's vocabulary and open_clip's token ids."""

from __future__ import annotations

import pytest

from medsam3.model.tokenizer import (
    BOS_TOKEN,
    CONTEXT_LENGTH,
    EOS_TOKEN,
    build_clip_tokenizer,
    byte_symbols,
    clip_vocab_and_merges,
)

MEDICAL_PHRASES = [
    "liver",
    "Left Kidney",
    "right kidney",
    "hippocampus",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "optic disc",
    "optic cup",
    "retinal vessels",
    "polyp",
    "brain tumour (enhancing)",
    "non-enhancing tumor core",
    "C3-C4 vertebra",
    "T1w-MRI lesion",
    "nodule <5mm",
    "fetal head",
    "placenta & vessels",
    "left atrium",
    "gland",
    "it's a cyst",
    "  lung   nodule ",
    "café-au-lait macule",
    "肝脏",
    "O2 saturation 95%",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


def test_byte_symbols_follow_clip_table():
    symbols = byte_symbols()
    assert len(symbols) == 256 and len(set(symbols)) == 256
    # printable Latin-1 bytes first, as themselves: 94 ("!".."~") + 12 ("¡".."¬") + 82 ("®".."ÿ") = 188
    assert symbols[0] == "!" and symbols[93] == "~" and symbols[94] == "¡" and symbols[187] == "ÿ"
    # then the other 68 bytes (0x00.., space, ...) as code points 256, 257, ...
    assert symbols[188] == chr(256) and symbols[255] == chr(256 + 67)


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[BOS_TOKEN] == 49406 and vocab[EOS_TOKEN] == 49407
    assert vocab["".join(merges[0])] == 512  # the first merge follows the 2 x 256 byte symbols


def test_hippocampus_ids(tokenizer):
    assert tokenizer("hippocampus")["input_ids"] == [49406, 28398, 4560, 49407]


def test_ids_match_open_clip(tokenizer):
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.get_tokenizer("ViT-B-32")
    for phrase in MEDICAL_PHRASES:
        ref = reference(phrase)[0].tolist()
        ref = ref[: ref.index(49407) + 1]
        assert tokenizer(phrase)["input_ids"] == ref, phrase


def test_padding_to_sam3_context(tokenizer):
    assert tokenizer.model_max_length == CONTEXT_LENGTH == 32
    enc = tokenizer(["left kidney", "liver"], padding="max_length", max_length=32, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 32)
    assert enc["input_ids"][0, :4].tolist() == [49406, 1823, 14610, 49407]
    assert enc["input_ids"][0, 4:].eq(49407).all()  # padded with <|endoftext|>
    assert enc["attention_mask"][0].tolist() == [1] * 4 + [0] * 28
    assert enc["attention_mask"][1].sum().item() == 3
    long = tokenizer(["liver " * 40], padding="max_length", max_length=32, truncation=True)
    assert len(long["input_ids"][0]) == 32 and long["input_ids"][0][-1] == 49407


def test_saved_tokenizer_reloads(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    build_clip_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for phrase in MEDICAL_PHRASES[:8]:
        assert loaded(phrase)["input_ids"] == tokenizer(phrase)["input_ids"]
    assert loaded.model_max_length == 32


def test_vocab_files_load_positionally(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    from medsam3.model.tokenizer import write_vocab_files

    vocab_path, merges_path = write_vocab_files(tmp_path)
    assert merges_path.read_text(encoding="utf-8").startswith("#version: 0.2\ni n\n")
    from_files = CLIPTokenizer(str(vocab_path), str(merges_path))
    for phrase in MEDICAL_PHRASES[:8]:
        assert from_files(phrase)["input_ids"] == tokenizer(phrase)["input_ids"]
