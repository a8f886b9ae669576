"""Training-time data augmentation of one example on the model's input grid.

Applied by :class:`medsam3.train.batches.ItemLoader` after the square resize, to the image in ``[0, 1]``
(``(3, S, S)`` float32, before the ``(x - 0.5) / 0.5`` normalisation) and to its target masks
(``(N, S, S)`` bool), so that both move together:

1. **Geometry** (with probability ``probability``): a horizontal flip (``flip``), a vertical flip
   (``vflip``), a rotation by ``U(-rotate, rotate)`` degrees, an isotropic zoom by ``U(*scale)`` (> 1
   enlarges the content) and a shift by ``U(-translate, translate)`` of the side along each axis. One
   affine sampling grid serves the image (bilinear) and the masks (nearest); what comes in from outside
   the image is 0 (black). A target object moved entirely out of view is dropped (an example whose every
   object left the view becomes a negative: the concept is no longer visible).
2. **Intensity** (always, each part only when its amount is not 0): gamma ``g`` drawn log-uniformly in
   ``[1 / (1 + gamma), 1 + gamma]`` (``x ** g``), contrast ``c ~ U(1 - contrast, 1 + contrast)`` about
   the image mean, brightness ``b ~ U(-brightness, brightness)`` added, per-channel gains
   ``U(1 - color, 1 + color)`` on colour images only, Gaussian noise of standard deviation ``U(0, noise)``;
   then clipped to ``[0, 1]``.
3. **Endoscopy-like changes** (each off while its amount is 0, so the steps above draw and do exactly what
   they did without them), after the intensity part:

   - *saturation* (colour images): the colours pushed away from or towards each pixel's grey value
     (luma, ``0.299 R + 0.587 G + 0.114 B``) by ``s ~ U(1 - saturation, 1 + saturation)``;
   - *specular highlights* (colour images, with probability ``specular``): ``1`` to ``specular_spots``
     white elliptic spots, the reflections of an endoscope's light on wet tissue. Each has a centre
     anywhere in the image, half-axes ``U(0.25, 1) x specular_size`` of the side, and the weight
     ``min(1, 1.5 exp(-r^2 / 2))`` (``r``: the elliptic distance in half-axes), so that a saturated core
     fades into the tissue: ``x <- x (1 - w) + w``. The masks do not change (a highlight on a polyp is
     still the polyp);
   - *blur* (with probability ``blur_probability``): a Gaussian blur of standard deviation
     ``U(0, blur)`` pixels of the model's grid (out of focus, motion), reflected at the borders;

   then the noise, and clipped to ``[0, 1]``.

Concepts whose names carry a position or side (``left kidney``, ``anterior hippocampus``: see
:data:`POSITIONAL_WORDS`) are never flipped: a mirror image would teach the model the wrong side. Rotations
stay small enough (``rotate``) not to change those meanings.

Randomness comes only from the generator passed in (:class:`ItemLoader` seeds it from the run seed and the
item index), so an augmented example is a pure function of the item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medsam3.data.vocabulary import POSITIONAL_WORDS, is_positional  # noqa: F401 (re-exported)


@dataclass
class AugmentSettings:
    """How much to augment (module docstring); every amount 0 / range ``[1, 1]``: nothing changes.

    Attributes:
        enabled: augment training examples at all (validation examples never are).
        probability: chance that the geometric part is applied to an example.
        flip, vflip: probabilities of a horizontal (columns) / vertical (rows) mirror.
        rotate: largest rotation, degrees.
        scale: ``[low, high]`` zoom factors.
        translate: largest shift, as a fraction of the image side.
        brightness, contrast, gamma, color, noise: intensity amounts (module docstring).
        saturation: largest relative change of the colour saturation (colour images).
        specular: probability of specular highlights (colour images); specular_spots: most spots;
            specular_size: largest half-axis of a spot, as a fraction of the image side.
        blur: largest Gaussian blur standard deviation, pixels of the model's grid; blur_probability:
            the chance that an example is blurred at all.
    """

    enabled: bool = False
    probability: float = 1.0
    flip: float = 0.0
    vflip: float = 0.0
    rotate: float = 0.0
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    color: float = 0.0
    noise: float = 0.0
    saturation: float = 0.0
    specular: float = 0.0
    specular_spots: int = 3
    specular_size: float = 0.04
    blur: float = 0.0
    blur_probability: float = 1.0

    def problems(self) -> list[str]:
        """Descriptions of the values out of range (empty when all are valid)."""
        out = []
        for name in ("probability", "flip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"{name} = {getattr(self, name)!r} must be in [0, 1]")
        if not 0.0 <= self.rotate <= 180.0:
            out.append(f"rotate = {self.rotate!r} must be in [0, 180] degrees")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1]:
            out.append(f"scale = {self.scale!r} must be [low, high] with 0 < low <= high")
        if not 0.0 <= self.translate <= 1.0:
            out.append(f"translate = {self.translate!r} must be in [0, 1]")
        for name in ("brightness", "contrast", "color"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"{name} = {getattr(self, name)!r} must be in [0, 1)")
        for name in ("gamma", "noise", "blur"):
            if not getattr(self, name) >= 0.0:
                out.append(f"{name} = {getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.saturation < 1.0:
            out.append(f"saturation = {self.saturation!r} must be in [0, 1)")
        for name in ("specular", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"{name} = {getattr(self, name)!r} must be in [0, 1]")
        if not (isinstance(self.specular_spots, int) and self.specular_spots >= 1):
            out.append(f"specular_spots = {self.specular_spots!r} must be an integer >= 1")
        if not 0.0 < self.specular_size <= 0.5:
            out.append(f"specular_size = {self.specular_size!r} must be in (0, 0.5]")
        return out


@dataclass
class Draw:
    """One example's random choices (what :func:`apply` does)."""

    geometric: bool = False
    hflip: bool = False
    vflip: bool = False
    angle: float = 0.0  # degrees, counter-clockwise as displayed (rows down)
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # (x, y), fractions of the side
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise: float = 0.0
    noise_seed: int = 0
    saturation: float = 1.0
    # specular highlights: (centre x, centre y, half-axis x, half-axis y), fractions of the side
    spots: tuple[tuple[float, float, float, float], ...] = ()
    blur: float = 0.0  # Gaussian standard deviation, pixels


def draw(
    settings: AugmentSettings, rng: np.random.Generator, *, allow_flip: bool = True, is_color: bool = True
) -> Draw:
    """The random choices of one example.

    Always consumes the same number of draws from ``rng`` for given settings; the endoscopy-like parts
    draw only when their amount is not 0, after the others, so that settings without them give the draws
    (and results) they gave before those parts existed.
    """
    u = rng.random(12)
    out = Draw()
    out.geometric = bool(u[0] < settings.probability)
    if out.geometric:
        out.hflip = allow_flip and bool(u[1] < settings.flip)
        out.vflip = allow_flip and bool(u[2] < settings.vflip)
        out.angle = float((2 * u[3] - 1) * settings.rotate)
        low, high = settings.scale
        out.scale = float(low + (high - low) * u[4])
        out.shift = (float((2 * u[5] - 1) * settings.translate), float((2 * u[6] - 1) * settings.translate))
    if settings.gamma:
        out.gamma = float(math.exp((2 * u[7] - 1) * math.log1p(settings.gamma)))
    out.contrast = float(1 + (2 * u[8] - 1) * settings.contrast)
    out.brightness = float((2 * u[9] - 1) * settings.brightness)
    if is_color and settings.color:
        red, green, blue = (float(g) for g in 1 + (2 * rng.random(3) - 1) * settings.color)
        out.gains = (red, green, blue)
    else:
        rng.random(3)
    out.noise = float(u[10] * settings.noise)
    out.noise_seed = int(u[11] * 2**31)
    if settings.saturation:
        sat = float(rng.random())
        if is_color:
            out.saturation = float(1 + (2 * sat - 1) * settings.saturation)
    if settings.specular:
        n = settings.specular_spots
        sv = rng.random(2 + 4 * n)
        if is_color and sv[0] < settings.specular:
            count = 1 + min(int(sv[1] * n), n - 1)
            spots = sv[2:].reshape(n, 4)[:count]
            size = settings.specular_size
            out.spots = tuple(
                (float(cx), float(cy), float((0.25 + 0.75 * rx) * size), float((0.25 + 0.75 * ry) * size))
                for cx, cy, rx, ry in spots
            )
    if settings.blur:
        bv = rng.random(2)
        if bv[0] < settings.blur_probability:
            out.blur = float(bv[1] * settings.blur)
    return out


def sampling_matrix(d: Draw) -> torch.Tensor:
    """The ``(2, 3)`` matrix of :func:`torch.nn.functional.affine_grid` for a draw.

    Output pixel at normalised position ``p`` (``[-1, 1]``, x to the right, y down) samples the input at
    ``A p + b``: the inverse of "mirror, then rotate by ``angle``, zoom by ``scale``, shift by ``2 shift``".
    """
    a = math.radians(d.angle)
    # Forward map on displayed coordinates (y down): rotation by +angle counter-clockwise as displayed.
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    mirror = np.diag([-1.0 if d.hflip else 1.0, -1.0 if d.vflip else 1.0])
    forward = d.scale * rot @ mirror
    inverse = np.linalg.inv(forward)
    shift = 2 * np.array(d.shift)
    theta = np.concatenate([inverse, (-inverse @ shift)[:, None]], axis=1)
    return torch.tensor(theta, dtype=torch.float32)


def apply(image: torch.Tensor, masks: torch.Tensor, d: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment an image ``(C, S, S)`` float in ``[0, 1]`` and its masks ``(N, S, S)`` bool.

    Returns the new image (same shape, float32, in ``[0, 1]``) and masks (``(N, S, S)`` bool; objects that
    left the view are kept as empty masks, the caller drops them).
    """
    image = image.float()
    if d.geometric and (d.hflip or d.vflip or d.angle or d.scale != 1.0 or any(d.shift)):
        theta = sampling_matrix(d)[None]
        grid = F.affine_grid(theta, [1, 1, *image.shape[-2:]], align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
            0
        ]
        if len(masks):
            moved = F.grid_sample(
                masks[:, None].float(),
                grid.expand(len(masks), -1, -1, -1),
                mode="nearest",
                padding_mode="zeros",
                align_corners=False,
            )
            masks = moved[:, 0] > 0.5
    if d.gamma != 1.0:
        image = image.clamp(0, 1) ** d.gamma
    if d.contrast != 1.0:
        mean = image.mean()
        image = (image - mean) * d.contrast + mean
    if d.brightness:
        image = image + d.brightness
    if d.gains != (1.0, 1.0, 1.0) and image.shape[0] == 3:
        image = image * torch.tensor(d.gains, dtype=image.dtype)[:, None, None]
    if d.saturation != 1.0 and image.shape[0] == 3:
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = grey + d.saturation * (image - grey)
    if d.spots and image.shape[0] == 3:
        image = add_specular(image.clamp(0, 1), d.spots)
    if d.blur > 0:
        image = gaussian_blur(image, d.blur)
    if d.noise:
        gen = torch.Generator().manual_seed(d.noise_seed)
        image = image + d.noise * torch.randn(image.shape, generator=gen)
    return image.clamp(0, 1), masks.bool()


def specular_weight(size: int, spots: tuple[tuple[float, float, float, float], ...]) -> torch.Tensor:
    """The ``(S, S)`` weight in ``[0, 1]`` of white highlights at ``spots`` (module docstring, part 3).

    Pixel ``(row, col)`` sits at ``((col + 0.5) / S, (row + 0.5) / S)``; a spot ``(cx, cy, ax, ay)``
    weighs ``min(1, 1.5 exp(-r^2 / 2))`` with ``r^2 = ((x - cx) / ax)^2 + ((y - cy) / ay)^2``; several
    spots combine by maximum.
    """
    pos = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = pos[:, None], pos[None, :]
    weight = torch.zeros(size, size)
    for cx, cy, ax, ay in spots:
        r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        weight = torch.maximum(weight, (1.5 * torch.exp(-0.5 * r2)).clamp(max=1.0))
    return weight


def add_specular(image: torch.Tensor, spots: tuple[tuple[float, float, float, float], ...]) -> torch.Tensor:
    """``image`` (``(C, S, S)`` in ``[0, 1]``) with white highlights: ``x (1 - w) + w``."""
    weight = specular_weight(image.shape[-1], spots)
    return image * (1 - weight) + weight


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel of ``(C, H, W)``; radius ``ceil(3 sigma)``, reflected borders.

    The kernel sums to 1 (a constant image stays constant). A radius larger than the image is cut to fit
    the reflection (``side - 1``).
    """
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    x = image[None].float()
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]
