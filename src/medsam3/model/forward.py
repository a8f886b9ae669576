"""Prompt-conditioned SAM3 forward on cached image features, with Meta's text-only prompt sequence.

The image encoder is by far the most expensive part of SAM3 (a 32-block ViT at 1008 px). Every function
here takes the image features computed once by :func:`encode_image` and runs only the prompt-dependent
parts (geometry encoder, DETR encoder / decoder, scoring, mask head) for a *batch of prompts on one
image*: the features are broadcast over the prompt batch with ``Tensor.expand`` (no copy, no recompute).

Meta's text-only prompt sequence
--------------------------------
SAM3 builds its prompt sequence as ``[text tokens ; geometry tokens]``. Meta's implementation
(``Sam3Image._encode_prompt``) always runs the geometry encoder, even with no box: the encoder then
outputs its single CLS token (projected, normalised, cross-attended to the image), so a text-only prompt
is ``[text tokens ; geometry CLS]``. The released weights were trained that way. transformers'
``Sam3Model.forward`` skips the geometry encoder when no box is given, so its text-only sequence lacks
that token and its scores and masks differ from Meta's.

With ``meta_text_cls=True`` (the default) :func:`predict_prompts` restores Meta's sequence without
touching transformers' code: it calls ``model.geometry_encoder`` with zero boxes (which yields exactly the
CLS token) and passes ``[text ; CLS]`` to ``Sam3Model.forward`` through its documented ``text_embeds`` /
``attention_mask`` arguments. ``Sam3Model.forward`` builds the very same concatenation itself when boxes
are given, so prompts with boxes go through ``model(..., input_boxes=...)`` unchanged.

Coordinates at this level are the model's: boxes normalised ``(cx, cy, w, h)`` in ``[0, 1]`` of the
square model input; labels 1 (positive), 0 (negative), -10 (padding, ignored).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

#: Box label marking a padding entry (ignored by the geometry encoder), as in transformers.
BOX_PAD_LABEL = -10

#: Fields of :class:`Sam3ImageSegmentationOutput` that carry the prompt batch in their first axis.
_BATCHED_FIELDS = ("pred_masks", "pred_boxes", "pred_logits", "presence_logits", "semantic_seg")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Floating dtype of the model's parameters."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's parameters."""
    return next(model.parameters()).device


def encode_image(model, pixel_values: torch.Tensor) -> Sam3VisionEncoderOutput:
    """Run the image encoder once (``Sam3Model.get_vision_features``).

    Args:
        model: a ``transformers.Sam3Model``.
        pixel_values: ``(B, 3, S, S)`` normalised pixels at the model's input size ``S``; cast to the
            model's device and dtype here.

    Returns:
        ``Sam3VisionEncoderOutput`` with ``fpn_hidden_states`` / ``fpn_position_encoding`` (tuples of
        ``(B, C, h, w)`` maps, strides 4, 8, 16, 32 of the input) reusable by :func:`predict_prompts`.
    """
    pixel_values = pixel_values.to(device=model_device(model), dtype=model_dtype(model))
    return model.get_vision_features(pixel_values=pixel_values)


def encode_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Encode tokenised prompts (``Sam3Model.get_text_features``).

    Args:
        input_ids: ``(N, T)`` token ids (T = 32 for SAM3's tokenizer padding).
        attention_mask: ``(N, T)``, 1 for real tokens, 0 for padding.

    Returns:
        The text encoder output; ``.pooler_output`` is ``(N, T, D)``, the per-token features projected
        to the detector width ``D`` (that is what ``Sam3Model.forward`` consumes as ``text_embeds``).
    """
    device = model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    return model.get_text_features(input_ids=input_ids.to(device), attention_mask=mask, return_dict=True)


def expand_vision(vision: Sam3VisionEncoderOutput, batch: int) -> Sam3VisionEncoderOutput:
    """Broadcast batch-1 image features over ``batch`` prompts (a view: no memory copied).

    Features that already have ``batch`` rows are returned unchanged.
    """
    have = vision.fpn_hidden_states[0].shape[0]
    if have == batch:
        return vision
    if have != 1:
        raise ValueError(f"image features hold {have} images; expected 1 or {batch} (one per prompt)")

    def grow(value):
        if isinstance(value, torch.Tensor):
            return value.expand(batch, *value.shape[1:])
        if isinstance(value, (tuple, list)):
            return tuple(grow(v) for v in value)
        return value

    return Sam3VisionEncoderOutput(**{key: grow(value) for key, value in vision.items()})


def geometry_cls_token(model, vision: Sam3VisionEncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """The geometry encoder's output for an empty box set: its CLS token only.

    This is the token Meta's SAM3 appends to every text-only prompt. It depends on the image (the CLS
    cross-attends to the image features) but not on the text.

    Returns:
        ``(features, mask)``: ``(B, 1, D)`` in the model dtype and a ``(B, 1)`` boolean mask (all True).
    """
    feats = vision.fpn_hidden_states[:-1]
    pos = vision.fpn_position_encoding[:-1]
    batch = feats[-1].shape[0]
    device = feats[-1].device
    out = model.geometry_encoder(
        box_embeddings=torch.zeros(batch, 0, 4, dtype=feats[-1].dtype, device=device),
        box_mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        box_labels=torch.zeros(batch, 0, dtype=torch.long, device=device),
        img_feats=feats,
        img_pos_embeds=pos,
    )
    return out.last_hidden_state, out.attention_mask.bool()


def _text_inputs(model, input_ids, attention_mask, text_embeds):
    """Normalise the two ways of giving text into (encoder output with pooler_output, mask or None)."""
    if (input_ids is None) == (text_embeds is None):
        raise ValueError("give exactly one of input_ids or text_embeds")
    if text_embeds is None:
        text_embeds = encode_text(model, input_ids, attention_mask)
    elif isinstance(text_embeds, torch.Tensor):
        text_embeds = BaseModelOutputWithPooling(last_hidden_state=text_embeds, pooler_output=text_embeds)
    if attention_mask is not None:
        attention_mask = attention_mask.to(text_embeds.pooler_output.device)
    return text_embeds, attention_mask


def _vision_rows(vision: Sam3VisionEncoderOutput, rows: torch.Tensor) -> Sam3VisionEncoderOutput:
    """The image features of the prompt rows ``rows``: a broadcast view of batch-1 features, else a gather."""
    if vision.fpn_hidden_states[0].shape[0] == 1:
        return expand_vision(vision, len(rows))

    def pick(value):
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)]
        if isinstance(value, (tuple, list)):
            return tuple(pick(v) for v in value)
        return value

    return Sam3VisionEncoderOutput(**{key: pick(value) for key, value in vision.items()})


def _select_rows(text_embeds, attention_mask, rows: torch.Tensor):
    pooled = text_embeds.pooler_output[rows]
    sub = BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=pooled)
    return sub, None if attention_mask is None else attention_mask[rows]


def _merge_outputs(parts: list[tuple[torch.Tensor, Sam3ImageSegmentationOutput]], n: int):
    """Re-assemble outputs computed on disjoint row subsets into one batch of ``n`` rows."""
    merged = {}
    for name in _BATCHED_FIELDS:
        values = [(rows, getattr(out, name)) for rows, out in parts if getattr(out, name) is not None]
        if not values:
            continue
        first = values[0][1]
        full = first.new_empty((n, *first.shape[1:]))
        for rows, value in values:
            full[rows] = value
        merged[name] = full
    return Sam3ImageSegmentationOutput(**merged)


def predict_prompts(
    model,
    vision_embeds: Sam3VisionEncoderOutput,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    text_embeds=None,
    boxes: torch.Tensor | None = None,
    box_labels: torch.Tensor | None = None,
    meta_text_cls: bool = True,
) -> Sam3ImageSegmentationOutput:
    """Segment a batch of ``N`` prompts on one image from its cached features.

    Args:
        model: a ``transformers.Sam3Model`` (eval mode; wrap the call in ``torch.inference_mode`` for
            inference).
        vision_embeds: :func:`encode_image` output for one image (batch 1, broadcast over the prompts) or
            already one row per prompt.
        input_ids, attention_mask: ``(N, T)`` tokenised prompt texts (box-only prompts use the text
            ``"visual"``, as SAM3 does). Alternatively ``text_embeds`` from :func:`encode_text` (or its
            ``(N, T, D)`` ``pooler_output`` tensor) with the same ``attention_mask``.
        boxes: ``(N, K, 4)`` normalised ``cxcywh`` box prompts, padded per row with label -10; ``None`` or
            rows of padding only for text-only prompts.
        box_labels: ``(N, K)`` 1 positive / 0 negative / -10 padding; all positive when ``None``.
        meta_text_cls: append the geometry encoder's CLS token to text-only prompts as Meta's SAM3 does
            (see the module docstring). ``False`` reproduces plain ``Sam3Model.forward``.

    Returns:
        ``Sam3ImageSegmentationOutput`` with, per prompt row: ``pred_logits (N, Q)``, ``pred_boxes
        (N, Q, 4)`` normalised xyxy, ``pred_masks (N, Q, h, w)`` logits at stride 4 of the model input,
        ``presence_logits (N, 1)``, ``semantic_seg (N, 1, h, w)``. Rows keep the order of the inputs.
    """
    text_embeds, attention_mask = _text_inputs(model, input_ids, attention_mask, text_embeds)
    n = text_embeds.pooler_output.shape[0]
    vision = expand_vision(vision_embeds, n)
    device = vision.fpn_hidden_states[0].device

    has_box = torch.zeros(n, dtype=torch.bool, device=device)
    if boxes is not None and boxes.numel() > 0:
        boxes = boxes.to(device=device, dtype=vision.fpn_hidden_states[0].dtype)
        if box_labels is None:
            box_labels = torch.ones(boxes.shape[:2], dtype=torch.long, device=device)
        box_labels = box_labels.to(device=device, dtype=torch.long)
        if boxes.shape[0] != n or box_labels.shape != boxes.shape[:2]:
            raise ValueError(
                f"boxes {tuple(boxes.shape)} / labels {tuple(box_labels.shape)} do not match {n} prompts"
            )
        has_box = (box_labels != BOX_PAD_LABEL).any(dim=1)

    if bool(has_box.all()) or (bool(has_box.any()) and meta_text_cls):
        # One call through transformers' own geometry path. Rows of padding only get the CLS token
        # alone, which is Meta's text-only sequence.
        return model(
            vision_embeds=vision,
            text_embeds=text_embeds,
            attention_mask=attention_mask,
            input_boxes=boxes,
            input_boxes_labels=box_labels,
        )
    if not bool(has_box.any()):
        if not meta_text_cls:
            return model(vision_embeds=vision, text_embeds=text_embeds, attention_mask=attention_mask)
        return _text_with_cls(model, vision, text_embeds, attention_mask)

    # meta_text_cls=False with a mix of text-only and boxed prompts: two calls, rows put back in order.
    assert boxes is not None and box_labels is not None  # some row has a box
    box_rows = torch.nonzero(has_box).flatten()
    text_rows = torch.nonzero(~has_box).flatten()
    sub_text, sub_mask = _select_rows(text_embeds, attention_mask, text_rows)
    plain = model(
        vision_embeds=_vision_rows(vision_embeds, text_rows), text_embeds=sub_text, attention_mask=sub_mask
    )
    sub_text, sub_mask = _select_rows(text_embeds, attention_mask, box_rows)
    boxed = model(
        vision_embeds=_vision_rows(vision_embeds, box_rows),
        text_embeds=sub_text,
        attention_mask=sub_mask,
        input_boxes=boxes[box_rows],
        input_boxes_labels=box_labels[box_rows],
    )
    return _merge_outputs([(text_rows, plain), (box_rows, boxed)], n)


def _text_with_cls(model, vision, text_embeds, attention_mask) -> Sam3ImageSegmentationOutput:
    """Text-only prompts with the geometry CLS token appended: ``[text ; CLS]`` as in Meta's SAM3."""
    text = text_embeds.pooler_output
    cls, cls_mask = geometry_cls_token(model, vision)
    prompt = torch.cat([text, cls.to(text.dtype)], dim=1)
    if attention_mask is None:
        attention_mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    mask = torch.cat([attention_mask.to(torch.long), cls_mask.to(torch.long)], dim=1)
    combined = BaseModelOutputWithPooling(last_hidden_state=prompt, pooler_output=prompt)
    return model(vision_embeds=vision, text_embeds=combined, attention_mask=mask)
