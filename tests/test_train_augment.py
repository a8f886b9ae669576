"""Training augmentation: exact geometry by hand, intensity ranges, determinism, and the item loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import kvasir_folder
from medsam3.data.indexing import prepare_dataset
from medsam3.data.sampler import SliceSample
from medsam3.errors import InputError
from medsam3.train import augment as aug
from medsam3.train.batches import ItemLoader
from medsam3.train.config import build_config


def _pattern(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A (3, S, S) image of distinct values in [0, 1] and two (S, S) masks."""
    image = torch.arange(3 * size * size, dtype=torch.float32).reshape(3, size, size) / (3 * size * size)
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 1:3, 0:2] = True
    masks[1, 5, 6] = True
    return image, masks


def test_identity_draw_changes_nothing():
    image, masks = _pattern()
    out, out_masks = aug.apply(image, masks, aug.Draw(geometric=True))
    assert torch.equal(out, image) and torch.equal(out_masks, masks)


@pytest.mark.parametrize(
    "hflip,vflip,dims", [(True, False, [-1]), (False, True, [-2]), (True, True, [-2, -1])]
)
def test_flips_are_exact_mirrors(hflip, vflip, dims):
    image, masks = _pattern()
    out, out_masks = aug.apply(image, masks, aug.Draw(geometric=True, hflip=hflip, vflip=vflip))
    torch.testing.assert_close(out, torch.flip(image, dims), atol=1e-6, rtol=0)
    assert torch.equal(out_masks, torch.flip(masks, dims))


def test_quarter_turn_is_rot90_counter_clockwise_as_displayed():
    image, masks = _pattern()
    out, out_masks = aug.apply(image, masks, aug.Draw(geometric=True, angle=90.0))
    # Counter-clockwise on screen (rows down): the top row becomes the left column, read bottom-up.
    torch.testing.assert_close(out, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(out_masks, torch.rot90(masks, 1, dims=(-2, -1)))


def test_shift_moves_content_by_the_fraction_of_the_side():
    image, masks = _pattern()
    out, out_masks = aug.apply(image, masks, aug.Draw(geometric=True, shift=(0.25, 0.0)))  # 2 of 8 pixels
    torch.testing.assert_close(out[..., 2:], image[..., :-2], atol=1e-6, rtol=0)
    assert torch.all(out[..., :2] == 0)  # what comes in from outside is black
    assert torch.equal(out_masks[..., 2:], masks[..., :-2]) and not out_masks[..., :2].any()


def test_zoom_two_enlarges_the_centre():
    image = torch.zeros(1, 8, 8)
    image[0, 3:5, 3:5] = 1.0
    masks = image.bool()
    out, out_masks = aug.apply(image, masks, aug.Draw(geometric=True, scale=2.0))
    assert out_masks[0].sum() == 16 and out_masks[0, 2:6, 2:6].all()
    assert out[0, 2:6, 2:6].min() > 0.4 and out[0, :1].max() == 0


def test_an_object_moved_out_of_view_becomes_an_empty_mask():
    image, masks = _pattern()
    _, out_masks = aug.apply(image, masks, aug.Draw(geometric=True, shift=(-0.5, 0.0)))
    assert not out_masks[0].any() and out_masks[1].any()


def test_intensity_by_hand():
    image = torch.full((3, 4, 4), 0.25)
    image[:, 0, 0] = 1.0  # mean 0.296875
    d = aug.Draw(gamma=2.0)
    out, _ = aug.apply(image, torch.zeros(0, 4, 4, dtype=torch.bool), d)
    torch.testing.assert_close(out, image**2)
    d = aug.Draw(contrast=2.0, brightness=0.1)
    out, _ = aug.apply(image, torch.zeros(0, 4, 4, dtype=torch.bool), d)
    mean = image.mean()
    torch.testing.assert_close(out, ((image - mean) * 2 + mean + 0.1).clamp(0, 1))
    d = aug.Draw(gains=(0.5, 1.0, 2.0))
    out, _ = aug.apply(image, torch.zeros(0, 4, 4, dtype=torch.bool), d)
    torch.testing.assert_close(out[:, 1, 1], torch.tensor([0.125, 0.25, 0.5]))
    assert out.max() == 1.0  # clipped


def test_draws_stay_in_their_ranges_and_repeat_with_the_seed():
    s = aug.AugmentSettings(
        enabled=True,
        probability=1.0,
        flip=0.5,
        rotate=15,
        scale=[0.8, 1.25],
        translate=0.1,
        brightness=0.1,
        contrast=0.2,
        gamma=0.5,
        color=0.1,
        noise=0.05,
    )
    draws = [aug.draw(s, np.random.default_rng(i)) for i in range(400)]
    assert all(abs(d.angle) <= 15 and 0.8 <= d.scale <= 1.25 and max(map(abs, d.shift)) <= 0.1 for d in draws)
    assert all(
        1 / 1.5 <= d.gamma <= 1.5 and 0.8 <= d.contrast <= 1.2 and abs(d.brightness) <= 0.1 for d in draws
    )
    assert all(all(0.9 <= g <= 1.1 for g in d.gains) and 0 <= d.noise <= 0.05 for d in draws)
    flips = np.mean([d.hflip for d in draws])
    assert 0.4 < flips < 0.6 and not any(d.vflip for d in draws)
    assert aug.draw(s, np.random.default_rng(7)) == aug.draw(s, np.random.default_rng(7))
    assert not any(aug.draw(s, np.random.default_rng(i), allow_flip=False).hflip for i in range(50))
    gray = [aug.draw(s, np.random.default_rng(i), is_color=False) for i in range(9)]
    assert all(d.gains == (1.0, 1.0, 1.0) for d in gray)


@pytest.mark.parametrize(
    "concept,positional",
    [
        ("anterior hippocampus", True),
        ("Left kidney", True),
        ("kidney_right", True),
        ("polyp", False),
        ("fetal head", False),
        ("lateral ventricle", True),
        ("leftover", False),
    ],
)
def test_positional_concepts_are_not_flipped(concept, positional):
    assert aug.is_positional(concept) is positional


def test_bad_settings_name_the_key():
    with pytest.raises(InputError, match="data.augment.*scale"):
        build_config(None, {"data": {"manifest": "m.jsonl", "augment": {"scale": [1.2, 0.8]}}})
    with pytest.raises(InputError, match="data.augment.*flip"):
        build_config(None, ["data.manifest=m.jsonl", "data.augment.flip=1.5"])
    with pytest.raises(InputError, match="unknown key 'data.augment.mirror'"):
        build_config(None, ["data.manifest=m.jsonl", "data.augment.mirror=0.5"])
    cfg = build_config(None, ["data.manifest=m.jsonl", "data.augment.enabled=true", "data.augment.rotate=10"])
    assert cfg.data.augment.enabled and cfg.data.augment.rotate == 10.0


class _Tokenizer:
    def __call__(self, texts, **_):
        return {"input_ids": torch.ones(1, 32, dtype=torch.long), "attention_mask": torch.ones(1, 32)}


def test_item_loader_moves_image_and_mask_together_on_real_polyps(data_dir, tmp_path):
    root = kvasir_folder(data_dir, tmp_path / "kvasir")
    records, _, _ = prepare_dataset("Kvasir-SEG", "folder2d", root, labels={1: "polyp"}, modality="RGB")
    settings = aug.AugmentSettings(enabled=True, probability=1.0, flip=1.0, rotate=0.0, noise=0.0)
    loader = ItemLoader(records, 64, _Tokenizer(), seed=3, augment=settings)
    plain_loader = ItemLoader(records, 64, _Tokenizer(), seed=3)
    item = SliceSample(0, 0, 0, "polyp", False, "Kvasir-SEG")
    flipped, plain = loader(item), loader.plain(item)
    # Without augmentation settings, and through plain(), the example is the unaugmented one.
    assert torch.equal(plain["pixel_values"], plain_loader(item)["pixel_values"])
    assert torch.equal(flipped["masks"], torch.flip(plain["masks"], [-1]))
    torch.testing.assert_close(
        flipped["pixel_values"], torch.flip(plain["pixel_values"], [-1]), atol=1e-5, rtol=0
    )
    # Boxes follow the moved masks: the centre mirrors, the size stays.
    cx, cy, w, h = plain["boxes"][0].tolist()
    assert flipped["boxes"][0].tolist() == pytest.approx([1 - cx, cy, w, h], abs=1e-6)
    assert np.array_equal(flipped["reference"], plain["reference"])  # the reference is never augmented
    # Same item, same example; another item index, another draw.
    assert torch.equal(loader(item)["pixel_values"], flipped["pixel_values"])
    jitter = ItemLoader(
        records,
        64,
        _Tokenizer(),
        seed=3,
        augment=aug.AugmentSettings(enabled=True, rotate=30, brightness=0.2),
    )
    a = jitter(item)["pixel_values"]
    b = jitter(SliceSample(1, 0, 0, "polyp", False, "Kvasir-SEG"))["pixel_values"]
    assert not torch.equal(a, b) and torch.equal(a, jitter(item)["pixel_values"])
