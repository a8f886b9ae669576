"""Tests of the SAM3 training losses: hand-computed terms, weighting, normalisation, tiny SAM3, real masks."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from medsam3.train import LossConfig, Sam3Loss, SimpleSegLoss, global_num_targets, record_decoder_layers
from medsam3.train.losses_find import (
    box_losses,
    iou_aware_classification_loss,
    presence_loss,
    sigmoid_focal_loss,
)
from medsam3.train.losses_seg import dice_loss

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
PLAIN = LossConfig(pad_num_queries=None, scale_by_batch_size=False)


def quadrant_mask(size: int = 4) -> torch.Tensor:
    """(1, size, size) bool mask whose top-left quadrant is on."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, : size // 2, : size // 2] = True
    return mask


def hand_example(batch: int = 1, masks: bool = True) -> tuple[dict, list[dict]]:
    """Two queries: q0 sits exactly on the target (logit 0), q1 far away (logit ln 3); all mask logits 0.

    The target is the box xyxy (0, 0, .5, .5) = cxcywh (.25, .25, .5, .5) and, when ``masks``, the
    top-left quadrant of a 4 x 4 mask.
    """
    outputs = {
        "pred_logits": torch.tensor([[0.0, LN3]] * batch, requires_grad=True),
        "pred_boxes": torch.tensor(
            [[[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]] * batch, requires_grad=True
        ),
        "presence_logits": torch.zeros(batch, 1, requires_grad=True),
        "pred_masks": torch.zeros(batch, 2, 2, 2, requires_grad=True),
        "semantic_seg": torch.zeros(batch, 1, 2, 2, requires_grad=True),
    }
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]])}
    if masks:
        target["masks"] = quadrant_mask()
    return outputs, [dict(target) for _ in range(batch)]


# ---------------------------------------------------------------- element terms, by hand


def test_sigmoid_focal_loss_two_elements_by_hand():
    # logit 0 (p = .5) with target 1: 0.25 * (1 - .5)^2 * ln 2;
    # logit ln 3 (p = .75) with target 0: 0.75 * .75^2 * -ln(1 - .75) = 0.75 * 0.5625 * ln 4.
    loss = sigmoid_focal_loss(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]), alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(loss.numpy(), [0.25 * 0.25 * LN2, 0.75 * 0.5625 * LN4], rtol=1e-6)
    assert loss.mean().item() == pytest.approx((0.0625 * LN2 + 0.421875 * LN4) / 2, rel=1e-6)


def test_dice_loss_by_hand():
    # p = (.5, .5), t = (1, 0): 1 - (2 * .5 + 1) / (1 + 1 + 1) = 1/3; a sure match gives ~0.
    loss = dice_loss(torch.tensor([[0.0, 0.0], [20.0, -20.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(loss.numpy(), [1 / 3, 0.0], atol=1e-6)


def test_l1_and_giou_by_hand():
    # xyxy (0,0,.5,.5) vs (.25,.25,.75,.75): L1 of cxcywh (.25,.25,.5,.5) vs (.5,.5,.5,.5) = 0.5;
    # GIoU = 1/7 - 2/9, loss 1 - GIoU.
    pred_xyxy, target_xyxy = torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    pred_c, target_c = torch.tensor([[0.25, 0.25, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    l1, giou = box_losses(pred_c, pred_xyxy, target_c, target_xyxy, num_targets=1.0)
    assert l1.item() == pytest.approx(0.5, rel=1e-6)
    assert giou.item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-5)
    l1, giou = box_losses(pred_c, pred_xyxy, target_c, target_xyxy, num_targets=2.0)
    assert l1.item() == pytest.approx(0.25, rel=1e-6)


def test_iou_aware_classification_by_hand():
    batch, query = torch.tensor([0]), torch.tensor([0])
    # Positive at logit 0: BCE(0, t) = ln 2 for any soft target t; negative at ln 3: BCE = ln 4, times .75^2.
    args = (torch.tensor([[0.0, LN3]]), batch, query, torch.tensor([1.0]), torch.tensor([True]))
    expected_sum = 10 * LN2 + 0.5625 * LN4
    assert iou_aware_classification_loss(*args, pad_num_queries=None).item() == pytest.approx(
        expected_sum / 2, rel=1e-6
    )
    assert iou_aware_classification_loss(*args).item() == pytest.approx(expected_sum / 200, rel=1e-6)
    absent = (torch.tensor([[0.0, LN3]]), batch[:0], query[:0], torch.zeros(0), torch.tensor([False]))
    assert iou_aware_classification_loss(*absent).item() == 0.0
    negatives = iou_aware_classification_loss(*absent, pad_num_queries=None, negatives_in_absent_images=True)
    assert negatives.item() == pytest.approx((LN2 * 0.25 + LN4 * 0.5625) / 2, rel=1e-6)
    # Soft target t = p^0.25 * IoU^0.75 at logit 2, IoU 0.5.
    p = 1 / (1 + math.exp(-2))
    t = p**0.25 * 0.5**0.75
    loss = iou_aware_classification_loss(
        torch.tensor([[2.0]]), batch, query, torch.tensor([0.5]), torch.tensor([True]), pad_num_queries=None
    )
    assert loss.item() == pytest.approx(-10 * (t * math.log(p) + (1 - t) * math.log(1 - p)), rel=1e-5)


def test_presence_loss_is_half_bce_by_hand():
    loss = presence_loss(torch.tensor([[0.0], [LN3]]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.5 * (LN2 + LN4) / 2, rel=1e-6)


# ---------------------------------------------------------------- Sam3Loss


def test_sam3_loss_terms_by_hand():
    outputs, targets = hand_example()
    terms = Sam3Loss(PLAIN)(outputs, targets)
    focal_mask = (4 * 0.25 * 0.25 + 12 * 0.75 * 0.25) * LN2 / 16  # alpha .25, p = .5 everywhere
    focal_semantic = (4 * 0.6 * 0.25 + 12 * 0.4 * 0.25) * LN2 / 16  # alpha .6
    dice = 1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)  # 8/13
    expected = {
        "loss_ce": 20 * (10 * LN2 + 0.5625 * LN4) / 2,
        "loss_presence": 20 * 0.5 * LN2,
        "loss_bbox": 0.0,
        "loss_giou": 0.0,
        "loss_mask": 200 * focal_mask,
        "loss_dice": 10 * dice,
        "loss_semantic_presence": 1 * LN2,
        "loss_semantic_seg": 20 * focal_semantic,
        "loss_semantic_dice": 30 * dice,
    }
    assert set(terms) == set(expected) | {"loss"}
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert terms["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_each_term_scales_with_its_weight():
    outputs, targets = hand_example()
    weights = {
        "ce_weight": "loss_ce",
        "presence_weight": "loss_presence",
        "bbox_weight": "loss_bbox",
        "giou_weight": "loss_giou",
        "mask_focal_weight": "loss_mask",
        "mask_dice_weight": "loss_dice",
        "semantic_focal_weight": "loss_semantic_seg",
        "semantic_dice_weight": "loss_semantic_dice",
        "semantic_presence_weight": "loss_semantic_presence",
    }
    assert set(weights) <= {f.name for f in fields(LossConfig)}
    # Move q0 off the target so that the box terms are not 0.
    outputs["pred_boxes"] = torch.tensor([[[0.05, 0.0, 0.5, 0.45], [0.6, 0.6, 0.9, 0.9]]])
    base = Sam3Loss(PLAIN)(outputs, targets)
    for name, key in weights.items():
        config = replace(PLAIN, **{name: 3 * getattr(PLAIN, name)})
        scaled = Sam3Loss(config)(outputs, targets)
        assert base[key].item() > 0, key
        assert scaled[key].item() == pytest.approx(3 * base[key].item(), rel=1e-5), key
        assert scaled["loss"].item() == pytest.approx(base["loss"].item() + 2 * base[key].item(), rel=1e-5)
        dropped = Sam3Loss(replace(PLAIN, **{name: 0.0}))(outputs, targets)
        assert key not in dropped


def test_duplicated_batch_keeps_per_target_loss():
    single = Sam3Loss(PLAIN)(*hand_example(batch=1))
    double = Sam3Loss(PLAIN)(*hand_example(batch=2))
    for key in single:
        assert double[key].item() == pytest.approx(single[key].item(), rel=1e-5, abs=1e-7), key
    scaled = Sam3Loss(replace(PLAIN, scale_by_batch_size=True))(*hand_example(batch=2))
    assert scaled["loss"].item() == pytest.approx(math.sqrt(2) * single["loss"].item(), rel=1e-5)
    # A global count twice the local one halves the per-target terms only.
    halved = Sam3Loss(PLAIN)(*hand_example(batch=2), num_targets_global=4.0)
    for key in ("loss_mask", "loss_dice"):
        assert halved[key].item() == pytest.approx(single[key].item() / 2, rel=1e-5)
    for key in ("loss_ce", "loss_presence", "loss_semantic_seg"):
        assert halved[key].item() == pytest.approx(single[key].item(), rel=1e-5)


def test_images_without_targets():
    outputs, _ = hand_example(batch=2)
    empty = [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}] * 2
    terms = Sam3Loss(PLAIN)(outputs, empty)
    assert all(torch.isfinite(v) for v in terms.values())
    # presence of a logit 0 vs "absent": 20 * 0.5 * ln 2 and 1 * ln 2; no classification, box or mask loss.
    assert terms["loss_presence"].item() == pytest.approx(10 * LN2, rel=1e-6)
    assert terms["loss_semantic_presence"].item() == pytest.approx(LN2, rel=1e-6)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_semantic_seg"):
        assert terms[key].item() == 0.0, key
    terms["loss"].backward()
    assert outputs["presence_logits"].grad.abs().sum() > 0
    assert not outputs["pred_logits"].grad.abs().sum() > 0
    outputs, _ = hand_example(batch=2)
    negatives = Sam3Loss(replace(PLAIN, negatives_in_absent_images=True))(outputs, empty)
    assert negatives["loss_ce"].item() == pytest.approx(20 * (0.25 * LN2 + 0.5625 * LN4) / 2, rel=1e-5)
    negatives["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_one_to_many_and_auxiliary_outputs():
    outputs, targets = hand_example()
    # One-to-many copies of the same queries: only q0 passes (quality .85 vs .225), so the o2m match equals
    # the one-to-one match and every o2m term is o2m_weight (2) times its one-to-one term.
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        outputs[key + "_o2m"] = outputs[key]
    outputs["aux_outputs"] = [{k: outputs[k] for k in ("pred_logits", "pred_boxes", "presence_logits")}]
    terms = Sam3Loss(PLAIN)(outputs, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert terms[key + "_o2m"].item() == pytest.approx(2 * terms[key].item(), rel=1e-6, abs=1e-7), key
    for key in ("loss_ce", "loss_presence", "loss_bbox", "loss_giou"):
        assert terms[key + "_aux0"].item() == pytest.approx(terms[key].item(), rel=1e-6, abs=1e-7), key
    assert "loss_presence_o2m" not in terms and "loss_mask_aux0" not in terms
    parts = sum(v.item() for k, v in terms.items() if k != "loss")
    assert terms["loss"].item() == pytest.approx(parts, rel=1e-6)
    no_aux = Sam3Loss(replace(PLAIN, aux_loss=False))(outputs, targets)
    assert not any(k.endswith("_aux0") for k in no_aux)


def test_targets_are_checked():
    outputs, targets = hand_example()
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        Sam3Loss()(outputs, targets * 2)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        Sam3Loss()(outputs, [{"boxes": targets[0]["boxes"], "masks": torch.zeros(2, 4, 4, dtype=torch.bool)}])


def test_global_num_targets(tmp_path):
    targets = [{"boxes": torch.rand(3, 4)}, {"boxes": torch.zeros(0, 4)}]
    assert global_num_targets(targets).item() == 3.0
    assert global_num_targets([{"boxes": torch.zeros(0, 4)}]).item() == 1.0
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert global_num_targets(targets).item() == 3.0
    finally:
        torch.distributed.destroy_process_group()


def test_simple_seg_loss_by_hand():
    pred_masks = torch.zeros(1, 2, 4, 4)
    pred_masks[0, 1] = torch.where(quadrant_mask()[0], 10.0, -10.0)  # query 1 matches the target
    outputs = {
        "pred_logits": torch.zeros(1, 2, requires_grad=True),
        "pred_masks": pred_masks.requires_grad_(),
        "semantic_seg": torch.zeros(1, 1, 4, 4, requires_grad=True),
        "presence_logits": torch.zeros(1, 1, requires_grad=True),
    }
    terms = SimpleSegLoss()(outputs, [{"masks": quadrant_mask()}])
    assert terms["loss_semantic_pixel"].item() == pytest.approx(LN2, rel=1e-6)
    assert terms["loss_semantic_dice"].item() == pytest.approx(8 / 13, rel=1e-6)
    assert terms["loss_query_dice"].item() < 1e-3  # the best query (1) was chosen
    assert terms["loss_score"].item() == pytest.approx(LN2, rel=1e-6)
    assert terms["loss_presence"].item() == pytest.approx(LN2, rel=1e-6)
    terms["loss"].backward()
    grad = outputs["pred_logits"].grad[0]
    assert grad[1] < 0 < grad[0]  # raise the best query, lower the other
    absent = SimpleSegLoss()(outputs, [{"masks": torch.zeros(0, 4, 4, dtype=torch.bool)}])
    assert absent["loss_semantic_dice"].item() == 0.0 and torch.isfinite(absent["loss"])
    with pytest.raises(ValueError, match="needs target masks"):
        SimpleSegLoss()(outputs, [{"boxes": torch.zeros(0, 4)}])


# ---------------------------------------------------------------- tiny SAM3


def square_target(size: int = 224) -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 40:120, 60:180] = True
    return {"boxes": torch.tensor([[120 / size, 80 / size, 120 / size, 80 / size]]), "masks": mask}


def tiny_inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (batch, 6), generator=generator)
    return {
        "pixel_values": torch.randn(batch, 3, 224, 224, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def test_gradients_flow_through_tiny_sam3_and_a_step_lowers_the_loss(tiny_config):
    from transformers import Sam3Model

    torch.manual_seed(0)
    model = Sam3Model(tiny_config)
    loss_fn = Sam3Loss()
    inputs, targets = tiny_inputs(), [square_target()]
    terms = loss_fn(model(**inputs), targets)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    for name in ("detr_decoder", "mask_decoder", "dot_product_scoring", "vision_encoder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(**inputs), targets)
    assert after["loss"].item() < terms["loss"].item()


def test_decoder_layers_give_auxiliary_losses(tiny_config):
    from transformers import Sam3Model

    from medsam3.model.configs import small_sam3_config

    torch.manual_seed(0)
    model = Sam3Model(small_sam3_config(detector_layers=2))
    with record_decoder_layers(model) as layers:
        outputs = model(**tiny_inputs(batch=2))
    per_layer = layers.layer_outputs()
    assert len(per_layer) == 2
    torch.testing.assert_close(per_layer[-1]["pred_boxes"], outputs.pred_boxes)
    torch.testing.assert_close(per_layer[-1]["pred_logits"], outputs.pred_logits)
    torch.testing.assert_close(per_layer[-1]["presence_logits"], outputs.presence_logits)
    absent = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 224, 224, dtype=torch.bool)}
    targets = [square_target(), absent]
    terms = Sam3Loss()({**outputs, "aux_outputs": layers.aux_outputs()}, targets)
    assert {"loss_ce_aux0", "loss_presence_aux0", "loss_bbox_aux0", "loss_giou_aux0"} <= set(terms)
    terms["loss"].backward()
    assert model.detr_decoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="Sam3Model"):
        with record_decoder_layers(torch.nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------- real masks


def test_real_fetal_head_mask_ranks_good_over_shifted_predictions(data_dir):
    from PIL import Image

    path = data_dir / "hc18_ultrasound" / "training_set" / "000_HC_Annotation.png"
    size, grid = 224, 56
    mask = np.asarray(Image.open(path).convert("L").resize((size, size), Image.NEAREST)) > 127
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    box = torch.tensor([[(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size]])
    target = {"boxes": box.float(), "masks": torch.from_numpy(mask)[None]}
    small = np.asarray(Image.fromarray(mask).resize((grid, grid), Image.BILINEAR), dtype=np.float32) > 0.5

    def predictions(shift: int) -> dict[str, torch.Tensor]:
        logits = torch.from_numpy(np.where(np.roll(small, shift, axis=1), 8.0, -8.0).astype(np.float32))
        xyxy = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32) / size + shift / grid * torch.tensor(
            [1.0, 0.0, 1.0, 0.0]
        )
        far = torch.tensor([[0.0, 0.0, 0.1, 0.1]] * 3)
        return {
            "pred_logits": torch.tensor([[4.0, -4.0, -4.0, -4.0]]),
            "pred_boxes": torch.cat([xyxy, far])[None],
            "presence_logits": torch.tensor([[8.0]]),
            "pred_masks": torch.cat([logits[None], torch.full((3, grid, grid), -8.0)])[None],
            "semantic_seg": logits[None, None],
        }

    good = Sam3Loss()(predictions(0), [target])
    shifted = Sam3Loss()(predictions(10), [target])
    assert good["loss_bbox"].item() == pytest.approx(0.0, abs=1e-5)
    assert good["loss_dice"].item() < 10 * 0.05 and good["loss_semantic_dice"].item() < 30 * 0.05
    keys = ("loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_semantic_seg", "loss_semantic_dice")
    for key in keys:
        assert shifted[key].item() > good[key].item() + 1e-3, key


def test_simple_seg_loss_matches_on_score_among_look_alike_queries():
    """Two queries draw the same mask: the one with the higher score is trained (not the first by Dice)."""
    same = torch.where(quadrant_mask()[0], 10.0, -10.0)
    pred_masks = torch.stack([same, same * 0.999])[None]  # query 0 a hair better by Dice
    logits = torch.tensor([[-2.0, 2.0]], requires_grad=True)
    outputs = {"pred_logits": logits, "pred_masks": pred_masks}
    SimpleSegLoss(pixel_weight=0, dice_weight=0)(outputs, [{"masks": quadrant_mask()}])["loss"].backward()
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]  # query 1 (score 0.88) is raised
    logits.grad = None
    by_dice = SimpleSegLoss(pixel_weight=0, dice_weight=0, match_score_weight=0.0)
    by_dice(outputs, [{"masks": quadrant_mask()}])["loss"].backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # by Dice alone query 0 is chosen
    # A clearly better mask still wins over a higher score.
    pred_masks = torch.stack([same, torch.full((4, 4), -10.0)])[None]
    logits = torch.tensor([[-2.0, 2.0]], requires_grad=True)
    SimpleSegLoss(pixel_weight=0, dice_weight=0)(
        {"pred_logits": logits, "pred_masks": pred_masks}, [{"masks": quadrant_mask()}]
    )["loss"].backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]
