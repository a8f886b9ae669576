"""Training augmentation: exact geometry by hand, intensity ranges, determinism, and the item loader."""

from __future__ import annotations

from pathlib import Path

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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


# -- endoscopy-like parts: saturation, specular highlights, blur ----------------------------------------


def test_saturation_by_hand():
    image = torch.tensor([0.2, 0.5, 0.8]).reshape(3, 1, 1).expand(3, 2, 2).clone()
    grey = 0.299 * 0.2 + 0.587 * 0.5 + 0.114 * 0.8  # 0.4445
    out, _ = aug.apply(image, torch.zeros(0, 2, 2, dtype=torch.bool), aug.Draw(saturation=1.5))
    # grey + 1.5 (x - grey): 0.4445 - 0.36675, 0.4445 + 0.08325, 0.4445 + 0.53325
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.07775, 0.52775, 0.97775]), atol=1e-6, rtol=0)
    flat, _ = aug.apply(image, torch.zeros(0, 2, 2, dtype=torch.bool), aug.Draw(saturation=0.0))
    torch.testing.assert_close(flat, torch.full((3, 2, 2), grey), atol=1e-6, rtol=0)


def test_specular_highlight_by_hand():
    # A 10 x 10 grid: pixel (row, col) sits at ((col + 0.5) / 10, (row + 0.5) / 10). One spot centred on
    # pixel (3, 5), half-axes 0.2 (x) and 0.1 (y).
    spot = ((0.55, 0.35, 0.2, 0.1),)
    w = aug.specular_weight(10, spot)
    assert w[3, 5] == pytest.approx(1.0)  # 1.5 e^0 cut to 1: a saturated core
    assert w[3, 7] == pytest.approx(1.5 * np.exp(-0.5), abs=1e-6)  # one half-axis along x: 0.9098
    assert w[4, 5] == pytest.approx(1.5 * np.exp(-0.5), abs=1e-6)  # one half-axis along y
    assert w[5, 5] == pytest.approx(1.5 * np.exp(-2.0), abs=1e-6)  # two half-axes: 0.2030
    assert w[9, 0] < 1e-6
    image = torch.full((3, 10, 10), 0.2)
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 2:5, 4:7] = True
    out, out_masks = aug.apply(image, masks, aug.Draw(spots=spot))
    # x (1 - w) + w: white in the core, 0.2 * 0.0902 + 0.9098 = 0.9278 one half-axis away
    assert out[:, 3, 5].tolist() == pytest.approx([1.0] * 3)
    assert out[0, 3, 7].item() == pytest.approx(0.2 * (1 - 1.5 * np.exp(-0.5)) + 1.5 * np.exp(-0.5), abs=1e-6)
    assert out[0, 9, 0].item() == pytest.approx(0.2, abs=1e-6)
    assert torch.equal(out_masks, masks)  # a highlight on the polyp is still the polyp
    # two spots combine by maximum
    two = aug.specular_weight(10, spot + ((0.05, 0.95, 0.1, 0.1),))
    assert two[9, 0] == pytest.approx(1.0) and two[3, 5] == pytest.approx(1.0)


def test_gaussian_blur_by_hand():
    image = torch.zeros(3, 15, 15)
    image[:, 7, 7] = 1.0
    out = aug.gaussian_blur(image, 1.0)
    # radius 3: weights e^(-j^2 / 2), j = -3..3, sum 2.50595; the centre weight is 0.399050 per axis
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k = k / k.sum()
    assert k[3] == pytest.approx(0.399050, abs=1e-6)
    assert out[0, 7, 7].item() == pytest.approx(k[3] ** 2, abs=1e-6)  # 0.159241
    assert out[1, 7, 8].item() == pytest.approx(k[3] * k[4], abs=1e-6)  # 0.096585
    assert out[2, 4, 4].item() == pytest.approx(k[0] ** 2, abs=1e-7)
    assert out[0, 3, 7].item() == 0.0  # beyond the radius
    assert out.sum().item() == pytest.approx(3.0, abs=1e-5)  # nothing lost away from the borders
    flat = torch.full((3, 6, 5), 0.3)
    torch.testing.assert_close(aug.gaussian_blur(flat, 4.0), flat, atol=1e-6, rtol=0)  # reflected borders
    assert torch.equal(aug.gaussian_blur(image, 0.0), image)
    masks = torch.zeros(1, 15, 15, dtype=torch.bool)
    masks[0, 7, 7] = True
    blurred, out_masks = aug.apply(image, masks, aug.Draw(blur=1.0))
    torch.testing.assert_close(blurred, out, atol=1e-6, rtol=0)
    assert torch.equal(out_masks, masks)


def _endoscopy_settings(**extra) -> aug.AugmentSettings:
    return aug.AugmentSettings(
        enabled=True, probability=1.0, flip=0.5, rotate=15, brightness=0.1, color=0.1, noise=0.02, **extra
    )


def test_endoscopy_parts_are_off_by_default_and_keep_the_old_draws():
    defaults = aug.AugmentSettings()
    assert (defaults.saturation, defaults.specular, defaults.blur) == (0.0, 0.0, 0.0)
    plain = _endoscopy_settings()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        d = aug.draw(plain, rng)
        assert (d.saturation, d.spots, d.blur) == (1.0, (), 0.0)
        # 12 + 3 draws, as before the endoscopy-like parts existed
        ref = np.random.default_rng(seed)
        ref.random(12), ref.random(3)
        assert rng.random() == ref.random()
        # with them on, the earlier choices stay those of the same seed (the new draws come after)
        on_settings = _endoscopy_settings(saturation=0.2, specular=1.0, blur=1.0)
        on = aug.draw(on_settings, np.random.default_rng(seed))
        assert (on.hflip, on.angle, on.brightness, on.gains, on.noise_seed) == (
            d.hflip,
            d.angle,
            d.brightness,
            d.gains,
            d.noise_seed,
        )
    # the stage configs before stage 7 do not use them
    for name in ("nano_stage4", "nano_stage5", "nano_stage6"):
        cfg = build_config(CONFIGS / f"{name}.yaml", ["data.manifest=m.jsonl"])
        assert (cfg.data.augment.saturation, cfg.data.augment.specular, cfg.data.augment.blur) == (0, 0, 0)
    cfg = build_config(CONFIGS / "nano_stage7.yaml", ["data.manifest=m.jsonl"])
    assert cfg.data.augment.specular > 0 and cfg.data.augment.blur > 0 and cfg.data.augment.saturation > 0


def test_endoscopy_draws_stay_in_their_ranges():
    s = _endoscopy_settings(
        saturation=0.2, specular=0.5, specular_spots=3, specular_size=0.05, blur=2.0, blur_probability=0.5
    )
    draws = [aug.draw(s, np.random.default_rng(i)) for i in range(400)]
    assert all(0.8 <= d.saturation <= 1.2 for d in draws)
    with_spots = [d for d in draws if d.spots]
    assert 0.4 < len(with_spots) / len(draws) < 0.6
    assert {len(d.spots) for d in with_spots} == {1, 2, 3}
    for d in with_spots:
        for cx, cy, ax, ay in d.spots:
            assert 0 <= cx <= 1 and 0 <= cy <= 1
            assert 0.25 * 0.05 <= ax <= 0.05 and 0.25 * 0.05 <= ay <= 0.05
    blurred = [d.blur for d in draws if d.blur > 0]
    assert 0.4 < len(blurred) / len(draws) < 0.6 and max(blurred) <= 2.0
    # grey images get neither highlights nor a saturation change, but are blurred
    grey = [aug.draw(s, np.random.default_rng(i), is_color=False) for i in range(100)]
    assert all(d.saturation == 1.0 and d.spots == () for d in grey)
    assert any(d.blur > 0 for d in grey)
    assert aug.draw(s, np.random.default_rng(3)) == aug.draw(s, np.random.default_rng(3))
    # a whole draw applied: the image stays in [0, 1], the masks move only with the geometry
    image, masks = _pattern(16)
    d = next(d for d in draws if d.spots and d.blur > 0)
    d.geometric = False
    out, out_masks = aug.apply(image, masks, d)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out_masks, masks)


def test_bad_endoscopy_settings_name_the_key():
    for key, value in [
        ("saturation", "1.0"),
        ("specular", "1.5"),
        ("specular_spots", "0"),
        ("specular_size", "0.8"),
        ("blur", "-1"),
        ("blur_probability", "2"),
    ]:
        with pytest.raises(InputError, match=f"data.augment.*{key}"):
            build_config(None, ["data.manifest=m.jsonl", f"data.augment.{key}={value}"])
