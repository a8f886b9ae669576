"""Prompt-batched SAM3 forward on cached image features (medsam3.model.forward), tiny random model."""

from __future__ import annotations

import pytest
import torch

from medsam3.model.forward import (
    BOX_PAD_LABEL,
    encode_image,
    encode_text,
    expand_vision,
    geometry_cls_token,
    predict_prompts,
)

FIELDS = ("pred_logits", "presence_logits", "pred_boxes", "pred_masks", "semantic_seg")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 224, 224, generator=g)
    ids = torch.randint(0, 49406, (3, 32), generator=g)
    ids[:, 0] = 49406
    mask = torch.zeros(3, 32, dtype=torch.long)
    for row, n in enumerate((4, 7, 3)):
        mask[row, :n] = 1
        ids[row, n - 1] = 49407
        ids[row, n:] = 49407
    return pixels, ids, mask


def assert_same(a, b, exact=True, atol=1e-5):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if exact:
            assert torch.equal(x, y), f"{name}: max diff {(x - y).abs().max().item()}"
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-4, msg=name)


def test_text_only_without_cls_is_plain_sam3model(tiny_model, inputs):
    pixels, ids, mask = inputs
    with torch.inference_mode():
        plain = tiny_model(pixel_values=pixels, input_ids=ids[:1], attention_mask=mask[:1])
        ours = predict_prompts(
            tiny_model,
            encode_image(tiny_model, pixels),
            input_ids=ids[:1],
            attention_mask=mask[:1],
            meta_text_cls=False,
        )
    assert_same(ours, plain, exact=True)


def test_text_and_box_is_plain_sam3model(tiny_model, inputs):
    pixels, ids, mask = inputs
    boxes = torch.tensor([[[0.4, 0.5, 0.3, 0.2], [0.7, 0.3, 0.1, 0.1]]])
    labels = torch.tensor([[1, 0]])
    with torch.inference_mode():
        plain = tiny_model(
            pixel_values=pixels,
            input_ids=ids[:1],
            attention_mask=mask[:1],
            input_boxes=boxes,
            input_boxes_labels=labels,
        )
        vision = encode_image(tiny_model, pixels)
        for cls in (True, False):  # the flag only concerns text-only prompts
            ours = predict_prompts(
                tiny_model,
                vision,
                input_ids=ids[:1],
                attention_mask=mask[:1],
                boxes=boxes,
                box_labels=labels,
                meta_text_cls=cls,
            )
            assert_same(ours, plain, exact=True)


def test_prompt_batch_matches_one_call_per_prompt(tiny_model, inputs):
    pixels, ids, mask = inputs
    with torch.inference_mode():
        vision = encode_image(tiny_model, pixels)
        batch = predict_prompts(tiny_model, vision, input_ids=ids, attention_mask=mask, meta_text_cls=False)
        for row in range(3):
            single = tiny_model(
                pixel_values=pixels, input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]
            )
            for name in FIELDS:
                torch.testing.assert_close(
                    getattr(batch, name)[row : row + 1], getattr(single, name), atol=1e-5, rtol=1e-4
                )


def test_meta_cls_equals_geometry_path_with_padding_box(tiny_model, inputs):
    """Meta's text-only sequence [text ; CLS] built two independent ways.

    transformers' own geometry path with a box that is only padding (label -10) gives the CLS token
    alone; our zero-box call must give the same outputs.
    """
    pixels, ids, mask = inputs
    pad_box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]).expand(3, 1, 4)
    pad_label = torch.full((3, 1), BOX_PAD_LABEL)
    with torch.inference_mode():
        vision = encode_image(tiny_model, pixels)
        ours = predict_prompts(tiny_model, vision, input_ids=ids, attention_mask=mask)
        reference = tiny_model(
            vision_embeds=expand_vision(vision, 3),
            input_ids=ids,
            attention_mask=mask,
            input_boxes=pad_box,
            input_boxes_labels=pad_label,
        )
        plain = predict_prompts(tiny_model, vision, input_ids=ids, attention_mask=mask, meta_text_cls=False)
    assert_same(ours, reference, exact=False, atol=1e-6)
    # The CLS token does change the prediction (it is not a no-op on random weights).
    assert (ours.pred_logits - plain.pred_logits).abs().max() > 1e-3


def test_meta_cls_prompt_sequence_is_text_then_one_token(tiny_model, inputs):
    pixels, ids, mask = inputs
    seen = {}

    def grab(module, args, kwargs):
        seen["text"] = kwargs["text_features"]
        seen["mask"] = kwargs["text_mask"]

    handle = tiny_model.detr_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            vision = encode_image(tiny_model, pixels)
            predict_prompts(tiny_model, vision, input_ids=ids, attention_mask=mask)
            text = encode_text(tiny_model, ids, mask).pooler_output
            cls, _ = geometry_cls_token(tiny_model, expand_vision(vision, 3))
    finally:
        handle.remove()
    assert seen["text"].shape == (3, 33, text.shape[-1])
    assert torch.equal(seen["text"][:, :32], text)
    assert torch.equal(seen["text"][:, 32:], cls)
    assert seen["mask"].tolist() == torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1).bool().tolist()


@pytest.mark.parametrize("per_row_images", [False, True])
def test_mixed_batch_without_cls_matches_separate_calls(tiny_model, inputs, per_row_images):
    pixels, ids, mask = inputs
    if per_row_images:  # features already one row per prompt (three different images)
        pixels = torch.cat([pixels, pixels.flip(-1), pixels.flip(-2)])
    boxes = torch.zeros(3, 1, 4)
    boxes[1, 0] = torch.tensor([0.3, 0.6, 0.2, 0.3])
    labels = torch.tensor([[BOX_PAD_LABEL], [1], [BOX_PAD_LABEL]])
    with torch.inference_mode():
        vision = encode_image(tiny_model, pixels)
        mixed = predict_prompts(
            tiny_model,
            vision,
            input_ids=ids,
            attention_mask=mask,
            boxes=boxes,
            box_labels=labels,
            meta_text_cls=False,
        )
        for row in range(3):
            kw = {}
            if row == 1:
                kw = {"input_boxes": boxes[1:2], "input_boxes_labels": labels[1:2]}
            image = pixels[row : row + 1] if per_row_images else pixels
            single = tiny_model(
                pixel_values=image, input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], **kw
            )
            for name in FIELDS:
                torch.testing.assert_close(
                    getattr(mixed, name)[row : row + 1], getattr(single, name), atol=1e-5, rtol=1e-4
                )


def test_cached_features_are_not_recomputed_or_copied(tiny_model, inputs):
    pixels, ids, mask = inputs
    calls = []
    handle = tiny_model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            vision = encode_image(tiny_model, pixels)
            grown = expand_vision(vision, 3)
            predict_prompts(tiny_model, vision, input_ids=ids, attention_mask=mask)
            predict_prompts(
                tiny_model, vision, input_ids=ids[:2], attention_mask=mask[:2], meta_text_cls=False
            )
    finally:
        handle.remove()
    assert len(calls) == 1
    assert grown.fpn_hidden_states[0].shape[0] == 3
    assert grown.fpn_hidden_states[0].data_ptr() == vision.fpn_hidden_states[0].data_ptr()


def test_bad_shapes_are_refused(tiny_model, inputs):
    pixels, ids, mask = inputs
    with torch.inference_mode():
        vision = encode_image(tiny_model, pixels)
        with pytest.raises(ValueError, match="exactly one"):
            predict_prompts(tiny_model, vision)
        with pytest.raises(ValueError, match="do not match"):
            predict_prompts(
                tiny_model,
                vision,
                input_ids=ids,
                attention_mask=mask,
                boxes=torch.rand(2, 1, 4),
                box_labels=torch.ones(2, 1, dtype=torch.long),
            )
        with pytest.raises(ValueError, match="expected 1 or 3"):
            predict_prompts(tiny_model, expand_vision(vision, 2), input_ids=ids, attention_mask=mask)
