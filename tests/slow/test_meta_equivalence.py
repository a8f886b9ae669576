"""medsam3's conversion of a Meta-format SAM3 checkpoint reproduces Meta's own model (full size, CPU).

Meta's SAM3 image model (PyPI ``sam3``) is built with seeded random weights in which every parameter
holds distinct values (see ``meta_reference.randomize_parameters_``), saved as a trainer checkpoint
(``{"model": {"detector.<key>": ...}, "optimizer": ...}``), converted with
``medsam3.model.convert.convert_meta_checkpoint`` and loaded as ``transformers.Sam3Model`` in float32.
Both models then see the same 1008 x 1008 pixels and the same prompt:

* text only (the paper's mode): Meta's forward vs ``predict_prompts(..., meta_text_cls=True)``;
* text + one positive box: Meta's forward vs plain ``Sam3Model.forward`` and ``predict_prompts``.

Error measure, per output: ``rel = max|ours - meta| / max|meta|`` (must be <= 1e-4 in float32), with
``mae = mean|ours - meta|`` reported beside it. Outputs compared: ``pred_logits (1, 200)``,
``pred_boxes (1, 200, 4)`` (xyxy, normalised; Meta's ``pred_boxes_xyxy``), ``pred_masks
(1, 200, 288, 288)``, ``presence_logits (1, 1)`` and ``semantic_seg (1, 1, 288, 288)``.
``meta_text_cls=False`` (transformers' own text-only behaviour) is measured too and must differ.

Run: ``pytest -m slow tests/slow/test_meta_equivalence.py -s`` (CPU only; about 8 minutes on two shared
cores, 8.5 GB peak RSS with one full-size model in memory at a time, 7 GB of temporary disk). Results:
``benchmarks/results/meta_equivalence.md``.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

from .meta_reference import (
    IMAGE_SIZE,
    TEXT_LENGTH,
    build_meta_image_model,
    distinct_parameter_check,
    make_test_image,
    mean_abs_error,
    meta_pixel_values,
    meta_predict,
    meta_sam3_available,
    meta_token_ids,
    meta_vision,
    relative_error,
    save_trainer_checkpoint,
)

pytestmark = pytest.mark.slow

PROMPT = "left kidney"
#: One positive box prompt, normalised (cx, cy, w, h) of the 1008 x 1008 input (around the bright disc).
BOX = (0.40, 0.55, 0.40, 0.42)
TOLERANCE = 1e-4
OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")
SEED = 0


def _errors(ours: dict, meta: dict, names=OUTPUTS) -> dict[str, tuple[float, float]]:
    table = {}
    for name in names:
        a, b = ours[name].detach().float(), meta[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs Meta {tuple(b.shape)}"
        table[name] = (relative_error(a, b), mean_abs_error(a, b))
    return table


def _as_dict(output) -> dict[str, torch.Tensor]:
    return {name: getattr(output, name) for name in OUTPUTS}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Everything computed once: Meta's outputs, the conversion, our outputs, their differences."""
    if not meta_sam3_available():
        pytest.skip(
            "Meta's SAM3 package `sam3` is not installed (pip install sam3 --no-deps; it needs "
            "timm, ftfy, regex, iopath, einops, psutil)"
        )
    from transformers import Sam3Model

    from medsam3.model.convert import convert_meta_checkpoint
    from medsam3.model.forward import encode_image, encode_text, geometry_cls_token, predict_prompts
    from medsam3.model.tokenizer import build_clip_tokenizer

    start = time.perf_counter()
    tmp = tmp_path_factory.mktemp("meta_equivalence")
    info: dict = {}

    # ---- Meta's side: random full-size model, checkpoint, reference outputs -------------------------
    meta = build_meta_image_model(seed=SEED)
    info["fill"] = meta.fill_report
    info["clashes"] = distinct_parameter_check(meta)
    info["meta_params"] = sum(p.numel() for p in meta.parameters())
    ckpt = tmp / "checkpoint.pt"
    info["meta_keys"] = save_trainer_checkpoint(meta, ckpt)
    info["text_projection"] = meta.backbone.language_backbone.encoder.text_projection.detach().clone()

    image = make_test_image(IMAGE_SIZE, seed=SEED)
    meta_pixels = meta_pixel_values(meta, image)
    info["meta_ids"] = meta_token_ids(meta, PROMPT)
    vision = meta_vision(meta, meta_pixels)
    ref_text = meta_predict(meta, vision, PROMPT)
    ref_box = meta_predict(meta, vision, PROMPT, BOX)
    del meta, vision
    gc.collect()

    # ---- medsam3's side: convert, load, predict ---------------------------------------------------
    hf_dir = tmp / "converted"
    info["report"] = convert_meta_checkpoint(ckpt, hf_dir, dtype=torch.float32)
    ckpt.unlink()
    model, info["loading"] = Sam3Model.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    info["hf_params"] = sum(p.numel() for p in model.parameters())
    info["hf_text_projection"] = model.text_encoder.text_projection.weight.detach().clone()

    tokenizer = build_clip_tokenizer()
    enc = tokenizer(
        [PROMPT], padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    info["our_ids"], info["our_mask"] = enc["input_ids"], enc["attention_mask"]
    # SAM3 preprocessing by hand: the image is already 1008 x 1008; x / 255, then (x - 0.5) / 0.5.
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].double().div(255).sub(0.5).div(0.5).float()
    info["pixel_diff"] = (pixels - meta_pixels).abs().max().item()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    boxes = torch.tensor([[BOX]], dtype=torch.float32)
    labels = torch.ones(1, 1, dtype=torch.long)

    with torch.inference_mode():
        vis = encode_image(model, pixels)
        text = encode_text(model, ids, mask).pooler_output
        cls, _ = geometry_cls_token(model, vis)
        ours = {
            "text_cls": _as_dict(
                predict_prompts(model, vis, input_ids=ids, attention_mask=mask, meta_text_cls=True)
            ),
            "text_plain": _as_dict(
                predict_prompts(model, vis, input_ids=ids, attention_mask=mask, meta_text_cls=False)
            ),
            "box_forward": _as_dict(
                model(
                    vision_embeds=vis,
                    input_ids=ids,
                    attention_mask=mask,
                    input_boxes=boxes,
                    input_boxes_labels=labels,
                )
            ),
            "box_predict": _as_dict(
                predict_prompts(
                    model, vis, input_ids=ids, attention_mask=mask, boxes=boxes, box_labels=labels
                )
            ),
        }
    del model
    gc.collect()

    # ---- differences -------------------------------------------------------------------------------
    valid = ref_text["text_mask"][0]
    inter = {
        f"fpn_{i}": (
            relative_error(vis.fpn_hidden_states[i], ref_text[f"fpn_{i}"]),
            mean_abs_error(vis.fpn_hidden_states[i], ref_text[f"fpn_{i}"]),
        )
        for i in range(3)
    }
    inter["text_features (valid tokens)"] = (
        relative_error(text[0, valid], ref_text["text_features"][0, valid]),
        mean_abs_error(text[0, valid], ref_text["text_features"][0, valid]),
    )
    inter["geometry CLS token"] = (
        relative_error(cls[0, 0], ref_text["prompt"][0, -1]),
        mean_abs_error(cls[0, 0], ref_text["prompt"][0, -1]),
    )
    info["intermediate"] = inter
    info["errors"] = {
        "text-only, meta_text_cls=True": _errors(ours["text_cls"], ref_text),
        "text + box, Sam3Model.forward": _errors(ours["box_forward"], ref_box),
        "text + box, predict_prompts": _errors(ours["box_predict"], ref_box),
        "text-only, meta_text_cls=False": _errors(ours["text_plain"], ref_text),
    }
    info["top_query"] = (int(ours["text_cls"]["pred_logits"].argmax()), int(ref_text["pred_logits"].argmax()))
    info["seconds"] = time.perf_counter() - start
    _print_summary(info)
    return info


def _print_summary(info: dict) -> None:
    print("\n\n## Meta-format conversion equivalence (full-size SAM3, random weights, float32, CPU)")
    print(
        f"Meta params {info['meta_params']:,} in {info['meta_keys']} keys; "
        f"transformers params {info['hf_params']:,}"
    )
    fill = info["fill"]
    print(
        f"filled: {len(fill.non_finite)} non-finite, {len(fill.constant)} constant, "
        f"{len(fill.duplicate)} duplicated of {fill.total} parameters; clashes left {len(info['clashes'])}"
    )
    print("conversion: " + info["report"].summary().replace("\n", "\n    "))
    print(f"ignored checkpoint entries: {info['report'].ignored_entries}")
    print(f"pixel max diff vs Meta's transform: {info['pixel_diff']:.3g}")
    print(f"token ids: Meta {info['meta_ids'].tolist()[0][:6]}..., ours {info['our_ids'].tolist()[0][:6]}...")
    print("\n| intermediate | rel (max abs / max ref) | mean abs |\n|---|---|---|")
    for name, (rel, mae) in info["intermediate"].items():
        print(f"| {name} | {rel:.3g} | {mae:.3g} |")
    for case, table in info["errors"].items():
        print(f"\n### {case}\n| output | rel (max abs / max ref) | mean abs |\n|---|---|---|")
        for name, (rel, mae) in table.items():
            print(f"| {name} | {rel:.3g} | {mae:.3g} |")
    print(f"\ntop query ours/Meta (text-only): {info['top_query']}; total {info['seconds']:.0f} s")


def test_random_weights_are_distinct(comparison):
    """The fill left no constant or duplicated parameter, so a swapped or dropped key shows up."""
    assert comparison["fill"].non_finite, "expected Meta's build to leave NaN tensors to fill"
    assert comparison["clashes"] == []


def test_conversion_is_complete(comparison):
    """Every Meta key converted or dropped for a stated reason; the folder loads without leftovers."""
    report, loading = comparison["report"], comparison["loading"]
    assert report.ok, report.summary()
    assert report.model_class == "Sam3Model"
    assert len(report.converted) + len(report.dropped) == comparison["meta_keys"]
    assert "optimizer" in report.ignored_entries
    assert all(d["reason"] for d in report.dropped)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not loading.get(kind), f"{kind}: {loading.get(kind)}"


def test_token_ids_match_meta(comparison):
    """Our offline CLIP tokenizer gives Meta's ids; Meta pads with 0, ours with <|endoftext|> (masked)."""
    meta_ids, ids, mask = comparison["meta_ids"], comparison["our_ids"], comparison["our_mask"]
    assert torch.equal(mask.bool(), meta_ids != 0)
    assert torch.equal(ids[mask.bool()], meta_ids[meta_ids != 0])
    assert meta_ids[0, :4].tolist() == [49406, 1823, 14610, 49407]


def test_pixels_match_meta_preprocessing(comparison):
    assert comparison["pixel_diff"] <= 1e-6


def test_unused_text_projection_converted(comparison):
    """Meta's CLIP ``text_projection`` (unused by the forward pass) arrives transposed, not lost."""
    torch.testing.assert_close(
        comparison["hf_text_projection"], comparison["text_projection"].T, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "case",
    [
        "text-only, meta_text_cls=True",
        "text + box, Sam3Model.forward",
        "text + box, predict_prompts",
    ],
)
def test_outputs_match_meta(comparison, case):
    table = comparison["errors"][case]
    bad = {name: rel for name, (rel, _) in table.items() if not rel <= TOLERANCE}
    inter = comparison["intermediate"]
    assert not bad, f"{case}: relative error above {TOLERANCE}: {bad}; intermediates {inter}"


def test_intermediates_match_meta(comparison):
    bad = {name: rel for name, (rel, _) in comparison["intermediate"].items() if not rel <= TOLERANCE}
    assert not bad


def test_transformers_text_only_differs_from_meta(comparison):
    """Without the geometry CLS token the text-only outputs are measurably not Meta's."""
    table = comparison["errors"]["text-only, meta_text_cls=False"]
    assert max(rel for rel, _ in table.values()) > 100 * TOLERANCE
    assert np.isfinite([rel for rel, _ in table.values()]).all()
