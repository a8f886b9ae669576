"""The bundled compact model ``medsam3-nano``: found by default, loads on the CPU, segments the samples.

The model was trained (``scripts/train_nano.sh``) without the two bundled samples, so these are held-out
checks. The Dice thresholds sit well below the values measured on the samples (MODEL_CARD.md); the
references are the samples' own reference masks, shipped beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medsam3

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"
MAX_WEIGHTS_BYTES = 40 * 1024 * 1024
MAX_BUNDLE_BYTES = 25_000_000  # the whole model folder, 25 MB


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_dice_helper_hand_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 pixels
    b[0, 2:4] = True  # 2 pixels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """The model that ``load_sam3()`` picks with no --model, no MEDSAM3_MODEL and a config without a model."""
    from medsam3.model.loading import load_sam3
    from medsam3.model.resolve import resolve_model

    config = tmp_path_factory.mktemp("nano") / "config.toml"
    config.write_text("# no model configured\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDSAM3_MODEL", raising=False)
        mp.setenv("MEDSAM3_CONFIG", str(config))
        resolved = resolve_model(None)
        loaded = load_sam3(None, device="cpu", dtype="fp32")
    return resolved, loaded


@pytest.fixture(scope="module")
def segmenter(default_model):
    from medsam3.predict.segmenter import Segmenter

    return Segmenter(default_model[1], presence_threshold=0.5)


def test_bundled_model_is_the_default_and_loads_in_fp32(default_model):
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import nano_sam3_config
    from medsam3.model.resolve import BUNDLED_MODEL_DIR

    resolved, loaded = default_model
    assert Path(resolved.source) == BUNDLED_MODEL_DIR
    assert Path(loaded.source) == BUNDLED_MODEL_DIR
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
    for name in ("config.json", "tokenizer.json", "processor_config.json", "LICENSE.md", "MODEL_CARD.md"):
        assert (BUNDLED_MODEL_DIR / name).is_file(), name

    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    fresh = Sam3Model(nano_sam3_config())
    assert sum(p.numel() for p in params) == sum(p.numel() for p in fresh.parameters())
    assert set(loaded.model.state_dict()) == set(fresh.state_dict())

    expected = nano_sam3_config()
    got = loaded.model.config
    vit, vit_expected = got.vision_config.backbone_config, expected.vision_config.backbone_config
    assert (vit.image_size, vit.hidden_size, vit.num_hidden_layers, list(vit.global_attn_indexes)) == (
        vit_expected.image_size,
        vit_expected.hidden_size,
        vit_expected.num_hidden_layers,
        list(vit_expected.global_attn_indexes),
    )
    assert got.detr_decoder_config.num_queries == expected.detr_decoder_config.num_queries == 20
    assert got.text_config.vocab_size == 49408


def test_bundle_size_and_its_compact_tokenizer(tmp_path):
    """The model folder stays within 25 MB; its tokenizer.json is the compact form of an indented one
    (what transformers writes) and tokenizes exactly as the indented file does."""
    from tokenizers import Tokenizer

    from medsam3.model.loading import compact_tokenizer_json
    from medsam3.model.resolve import BUNDLED_MODEL_DIR

    total = sum(p.stat().st_size for p in BUNDLED_MODEL_DIR.iterdir() if p.is_file())
    assert total <= MAX_BUNDLE_BYTES, f"{BUNDLED_MODEL_DIR}: {total} bytes"

    bundled = BUNDLED_MODEL_DIR / "tokenizer.json"
    indented = tmp_path / "indented.json"
    indented.write_text(
        json.dumps(json.loads(bundled.read_text(encoding="utf-8")), ensure_ascii=False, indent=2),
        encoding="utf-8",
    )
    assert indented.stat().st_size > 1.5 * bundled.stat().st_size
    compacted = tmp_path / "compacted.json"
    compacted.write_bytes(indented.read_bytes())
    compact_tokenizer_json(compacted)
    assert compacted.read_bytes() == bundled.read_bytes()
    compact_tokenizer_json(tmp_path / "absent.json")  # no file: nothing to do
    assert not (tmp_path / "absent.json").exists()

    a, b = Tokenizer.from_file(str(indented)), Tokenizer.from_file(str(bundled))
    texts = ("fetal head", "Foetal  Head", "hippocampi", "colon polyp", "left kidney cyst", "liver 肝臓 ü")
    for text in texts:
        assert a.encode(text).ids == b.encode(text).ids, text
    assert len(a.encode("fetal head").ids) == 4  # start, "fetal", "head", end


def test_fetal_head_sample_and_absent_polyp(segmenter):
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt

    image = read_image(SAMPLES / "hc18_400_HC.png")
    reference = read_image(SAMPLES / "hc18_400_HC_mask.png").array
    reference = (reference[..., 0] if reference.ndim == 3 else reference) > 127
    result = segmenter.segment(image, [Prompt(text="fetal head"), Prompt(text="polyp")])

    head, polyp = result.labels
    assert not head.absent
    assert dice(result.mask(head.value), reference) >= 0.80  # measured 0.91
    # an ultrasound image is outside the training domain of "polyp" (colonoscopy): not even asked
    assert polyp.absent and polyp.reason == "outside the training domain"
    assert not result.mask(polyp.value).any()
    # and the network itself, when asked, finds no polyp either
    asked = segmenter.segment(
        image, [Prompt(text="fetal head"), Prompt(text="polyp")], allow_out_of_domain=True
    )
    assert np.array_equal(asked.label_map, result.label_map)
    assert asked.labels[1].absent and asked.labels[1].reason in ("presence", "score")


def test_fetal_head_sample_with_test_time_mirroring(segmenter):
    """``--tta``: the four mirrored passes merged still find the head and still gate the absent polyp."""
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter

    image = read_image(SAMPLES / "hc18_400_HC.png")
    reference = read_image(SAMPLES / "hc18_400_HC_mask.png").array
    reference = (reference[..., 0] if reference.ndim == 3 else reference) > 127
    mirrored = Segmenter(segmenter.engine, tta=True)
    result = mirrored.segment(image, [Prompt(text="fetal head"), Prompt(text="polyp")])
    head, polyp = result.labels
    assert result.settings["image_encoder_runs"] == 4
    assert not head.absent
    assert dice(result.mask(head.value), reference) >= 0.85  # measured 0.93 (0.91 without mirroring)
    assert polyp.absent and not result.mask(polyp.value).any()


def test_hippocampus_sample_volume(segmenter):
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt

    names = json.loads((SAMPLES / "hippocampus_019_labels.json").read_text())
    image = read_image(SAMPLES / "hippocampus_019.nii.gz", modality="MR")
    labels = read_image(SAMPLES / "hippocampus_019_labels.nii.gz").array
    prompts = [Prompt(text=names["1"]), Prompt(text=names["2"])]
    result = segmenter.segment(image, prompts)

    assert result.label_map.shape == labels.shape
    anterior, posterior = result.labels
    # measured: anterior 0.80, posterior 0.76
    assert dice(result.mask(anterior.value), labels == 1) >= 0.70
    assert dice(result.mask(posterior.value), labels == 2) >= 0.65
    assert dice(result.label_map > 0, labels > 0) >= 0.75


def test_whole_hippocampus_and_absent_concepts_on_the_sample_volume(segmenter):
    """ "hippocampus" (the region anterior + posterior) in one prompt; other samples' concepts are absent."""
    from medsam3.io.readers import read_image
    from medsam3.predict.prompts import Prompt

    image = read_image(SAMPLES / "hippocampus_019.nii.gz", modality="MR")
    labels = read_image(SAMPLES / "hippocampus_019_labels.nii.gz").array
    result = segmenter.segment(
        image, [Prompt(text="hippocampus"), Prompt(text="fetal head"), Prompt(text="polyp")]
    )
    whole, head, polyp = result.labels
    assert dice(result.mask(whole.value), labels > 0) >= 0.75  # measured 0.86
    assert head.absent and polyp.absent and set(np.unique(result.label_map)) <= {0, whole.value}
