"""Tests of the one-to-one (Hungarian) and one-to-many matchers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsam3.train.matcher import HungarianMatcher, OneToManyMatcher


def xyxy(cx: float, cy: float, w: float, h: float) -> list[float]:
    """cxcywh -> xyxy, written out by hand for the test inputs."""
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def outputs(logits: list[list[float]], boxes_xyxy: list[list[list[float]]]) -> dict[str, torch.Tensor]:
    return {"pred_logits": torch.tensor(logits), "pred_boxes": torch.tensor(boxes_xyxy)}


def as_pairs(match: tuple[torch.Tensor, torch.Tensor]) -> set[tuple[int, int]]:
    return set(zip(match[0].tolist(), match[1].tolist(), strict=True))


def test_hungarian_obvious_assignment_sorted_by_target():
    a, b = [0.2, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]
    out = outputs([[0.0, 0.0, 0.0]], [[xyxy(0.5, 0.9, 0.1, 0.1), xyxy(*b), xyxy(*a)]])
    ((query, target),) = HungarianMatcher()(out, [{"boxes": torch.tensor([a, b])}])
    assert target.tolist() == [0, 1]
    assert query.tolist() == [2, 1]
    assert query.dtype == torch.long and target.dtype == torch.long


def test_hungarian_is_optimal_where_greedy_fails():
    # L1 costs only (boxes differ in cx): target A is closest to q0 (0.08) but q0 is also the only
    # good query for B. Greedy A<-q0 then B<-q1 costs 0.08 + 0.30; optimal A<-q1, B<-q0 costs 0.10 + 0.12.
    a, b = [0.30, 0.5, 0.2, 0.2], [0.50, 0.5, 0.2, 0.2]
    queries = [xyxy(0.38, 0.5, 0.2, 0.2), xyxy(0.20, 0.5, 0.2, 0.2), xyxy(0.90, 0.5, 0.2, 0.2)]
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    out = outputs([[0.0, 0.0, 0.0]], [queries])
    targets = [{"boxes": torch.tensor([a, b])}]
    cost = matcher.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], targets[0]["boxes"])
    np.testing.assert_allclose(cost.numpy(), [[0.08, 0.12], [0.10, 0.30], [0.60, 0.40]], atol=1e-6)
    ((query, target),) = matcher(out, targets)
    assert as_pairs((query, target)) == {(1, 0), (0, 1)}


def test_focal_class_cost_by_hand():
    # p = 0.5: positive 0.25 * 0.5^2 * ln 2, negative 0.75 * 0.5^2 * ln 2.
    expected_half = 0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)
    # logit ln 3: p = 0.75, -log p = ln(4/3), -log(1 - p) = ln 4.
    expected_q = 0.25 * 0.25**2 * math.log(4 / 3) - 0.75 * 0.75**2 * math.log(4)
    cost = HungarianMatcher().class_cost(torch.tensor([0.0, math.log(3)]))
    np.testing.assert_allclose(cost.numpy(), [expected_half, expected_q], rtol=1e-5)


def test_giou_cost_by_hand():
    # xyxy (0,0,.5,.5) vs (.25,.25,.75,.75): IoU 1/7, enclosing area 9/7 of the union -> GIoU = 1/7 - 2/9.
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    cost = matcher.cost_matrix(
        torch.zeros(1), torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    )
    assert cost.item() == pytest.approx(-(1 / 7 - 2 / 9), rel=1e-5)


def test_class_cost_breaks_box_ties():
    box = [0.5, 0.5, 0.2, 0.2]
    out = outputs([[-3.0, 3.0]], [[xyxy(*box), xyxy(*box)]])
    ((query, _),) = HungarianMatcher()(out, [{"boxes": torch.tensor([box])}])
    assert query.tolist() == [1]


def test_batch_with_empty_image_and_more_targets_than_queries():
    out = outputs([[0.0], [0.0]], [[xyxy(0.3, 0.3, 0.2, 0.2)], [xyxy(0.3, 0.3, 0.2, 0.2)]])
    two = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": two}]
    first, second = HungarianMatcher()(out, targets)
    assert first[0].numel() == 0 and first[1].numel() == 0
    assert as_pairs(second) == {(0, 1)}


def test_logits_with_class_axis_and_batch_mismatch():
    out = {"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": torch.tensor([[xyxy(0.5, 0.5, 0.2, 0.2)] * 2])}
    assert len(HungarianMatcher()(out, [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])) == 1
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        HungarianMatcher()(out, [{"boxes": torch.zeros(0, 4)}] * 2)
    with pytest.raises(ValueError, match="not all 0"):
        HungarianMatcher(0.0, 0.0, 0.0)


def test_one_to_many_top_k_above_threshold():
    # Target xyxy (0, 0, .5, .5); a query (0, 0, .5 r, .5) inside it has IoU r. All logits 0 (p = .5):
    # quality = 0.3 * 0.5 + 0.7 * r = .85, .71, .57, .50, .29, .15.
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]])}
    ious = [1.0, 0.8, 0.6, 0.5, 0.2]
    boxes = [[0.0, 0.0, 0.5 * r, 0.5] for r in ious] + [[0.6, 0.6, 0.9, 0.9]]
    out = outputs([[0.0] * 6], [boxes])
    quality = OneToManyMatcher().quality(out["pred_logits"][0], out["pred_boxes"][0], target["boxes"])
    np.testing.assert_allclose(quality[:, 0].numpy(), [0.85, 0.71, 0.57, 0.50, 0.29, 0.15], atol=1e-6)
    ((query, tgt),) = OneToManyMatcher(topk=4, iou_threshold=0.4)(out, [target])
    assert sorted(query.tolist()) == [0, 1, 2, 3] and tgt.tolist() == [0, 0, 0, 0]
    ((query, _),) = OneToManyMatcher(topk=4, iou_threshold=0.55)(out, [target])
    assert sorted(query.tolist()) == [0, 1, 2]
    ((query, _),) = OneToManyMatcher(topk=2, iou_threshold=0.4)(out, [target])
    assert sorted(query.tolist()) == [0, 1]


def test_one_to_many_score_mix_and_shared_queries():
    # Equal IoU (0.5): the query with the higher score ranks first (alpha weighs the probability).
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]])}
    out = outputs([[-2.0, 2.0]], [[[0.0, 0.0, 0.25, 0.5], [0.0, 0.0, 0.25, 0.5]]])
    ((query, _),) = OneToManyMatcher(topk=1)(out, [target])
    assert query.tolist() == [1]
    # As in SAM3, one query may serve two overlapping targets.
    both = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])}
    ((query, tgt),) = OneToManyMatcher(topk=1)(out, [both])
    assert as_pairs((query, tgt)) == {(1, 0), (1, 1)}
    ((query, _),) = OneToManyMatcher()(out, [{"boxes": torch.zeros(0, 4)}])
    assert query.numel() == 0


def test_hungarian_recovers_permutation_of_real_nuclei(data_dir):
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(data_dir / "stardist_pkg" / "mask2d.tif")
    height, width = labels.shape
    boxes = []
    for value in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == value)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        boxes.append([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height])
    targets = torch.tensor(boxes, dtype=torch.float32)
    assert len(targets) > 100  # labels go up to 183 with gaps
    generator = torch.Generator().manual_seed(0)
    num_queries = 200
    permutation = torch.randperm(num_queries, generator=generator)[: len(targets)]  # query of each target
    queries = torch.rand(num_queries, 4, generator=generator) * 0.05 + torch.tensor([0.1, 0.1, 0.05, 0.05])
    queries[permutation] = targets + 0.002 * torch.randn(len(targets), 4, generator=generator)
    pred_xyxy = torch.cat([queries[:, :2] - queries[:, 2:] / 2, queries[:, :2] + queries[:, 2:] / 2], dim=1)
    out = {"pred_logits": torch.zeros(1, num_queries), "pred_boxes": pred_xyxy[None]}
    ((query, target),) = HungarianMatcher()(out, [{"boxes": targets}])
    assert target.tolist() == list(range(len(targets)))
    assert torch.equal(query, permutation)
