"""Random image augmentations: the corrupted view x_aug that the VAE sees while it must reconstruct the clean x.

Each augmentation maps a float batch x in [0, 1] to a new batch x_aug = T_theta(x), drawing its own parameters
theta for every image (shape (B,)), so one batch mixes many corruptions. Geometric ones sample the input through
one affine map per image:  x_aug(p) = x(A p + t),  p in normalised coordinates [-1, 1]^2 (bilinear).
  crop / center-crop:  A = s * I, t = box centre  (a box of side s is stretched to the full image: a zoom-in)
  rotate:              A = rotation by the angle, corrected for the aspect ratio, t = 0
Colour ones act per pixel:  brightness_contrast  x_aug = b * (m + c * (x - m)),  m = the image's mean;
  hue_saturation  (h, s, v) = hsv(x),  h <- (h + shift) mod 1,  s <- min(s * f, 1),  x_aug = rgb(h, s, v).
Paper: the augmentations applied to the VAE's input in Rajagopalan (2021), "Learned Data Augmentation".
What we chose: the magnitudes (constants below), square crop boxes (no aspect-ratio draw), reflection padding,
torch's own F.affine_grid and F.grid_sample for the resampling, and `strength`, which scales every range
linearly so that strength 0 is the identity and 1 the defaults.
Everything is batched tensor arithmetic on x.device: no loop over images, and the input is never written.
Called by main.py through by_name, once per training batch: x_aug = by_name("crop")(x); names joined by "+"
("crop+hue-saturation") apply one after another.

Axes: B batch, C channels (3, RGB), H/W height/width.
"""

import functools

import torch
import torch.nn.functional as F

# crop keeps 50-100% of the side (25-100% of the area); torchvision's default lower bound, 8% of the area,
# would leave a 9x9 patch of a 32x32 CIFAR image.
CROP_MIN_SCALE = 0.5
CENTER_CROP_MIN_SCALE = 0.5  # zoom into the centre by up to 2x: the object stays, much of the background goes
ROTATE_DEGREES = 30.0  # +-30 degrees: clearly tilted, still upright enough to recognise
BRIGHTNESS = 0.4  # factors in [0.6, 1.4]: SimCLR's colour jitter at its CIFAR-10 strength 0.5 (Chen et al. 2020, B.9)
CONTRAST = 0.4  # factors in [0.6, 1.4], same source
SATURATION = 0.4  # factors in [0.6, 1.4], same source
HUE_SHIFT = 0.1  # shift up to +-0.1 of the colour wheel (+-36 degrees), same source
# Pixels that a rotation or zoom pulls from outside the image mirror the border instead of turning black:
# black wedges would be an easy, unnatural cue that the decoder must learn to paint over.
PADDING_MODE = "reflection"
# strength scales every range; at 2 the crops' smallest box has side 1 - 2 * 0.5 = 0 (and at 2.5 the colour factors
# reach 0), so every augmentation is defined for 0 <= strength < MAX_STRENGTH.
MAX_STRENGTH = min(1 / (1 - CROP_MIN_SCALE), 1 / (1 - CENTER_CROP_MIN_SCALE), 1 / BRIGHTNESS, 1 / CONTRAST,
                   1 / SATURATION)

# ----------------------------------------------------------------------------- random parameters


def uniform(x, low, high, generator=None):
    """One number per image, uniform in [low, high): shape (B,), on x's device and dtype.

    Drawn in float32 on the generator's device (main.py passes a CPU generator while x may be on a GPU), so one
    seed gives the same draws whatever x's device and dtype. A CPU draw bound for a GPU goes through pinned
    memory with a non-blocking copy: a copy from ordinary memory would make the host wait for the GPU every step.
    """
    device = generator.device if generator is not None else x.device
    pinned = device.type == "cpu" and x.device.type == "cuda"
    u = torch.rand(x.shape[0], generator=generator, device=device, pin_memory=pinned)  # (B,) float32 in [0, 1)
    u = u.to(x.device, non_blocking=True)  # (B,)
    return (low + (high - low) * u).to(x.dtype)  # (B,)


# ----------------------------------------------------------------------------- geometry: one affine map per image


def warp(x, theta):
    """Resample every image through its own affine map: output pixel p reads the input at theta @ (p, 1).

    theta: (B, 2, 3) in normalised coordinates, -1 and 1 being the outer edges of the border pixels
    (align_corners=False), so the map does not depend on the resolution.
    """
    grid = F.affine_grid(theta, x.shape, align_corners=False)  # (B, H, W, 2) xy where each output pixel reads
    x_aug = F.grid_sample(x, grid, mode="bilinear", padding_mode=PADDING_MODE, align_corners=False)  # (B, C, H, W)
    return x_aug.clamp(0, 1)  # bilinear weights sum to 1 only up to rounding


def zoom(x, scale, center):
    """Cut the square box of side `scale` (fraction of the image side, (B,)) centred at `center`
    ((B, 2), normalised xy) out of each image and stretch it to the full size. scale 1, centre 0 is the identity."""
    zero = torch.zeros_like(scale)  # (B,)
    theta = torch.stack([scale, zero, center[:, 0], zero, scale, center[:, 1]], dim=1)  # (B, 6)
    return warp(x, theta.view(-1, 2, 3))  # (B, C, H, W)


def rotate_by(x, degrees):
    """Rotate each image about its centre by `degrees` (a number or (B,)), counter-clockwise as displayed
    (row 0 at the top), like torch.rot90(x, 1, dims=(2, 3)) for 90 degrees."""
    angle = torch.deg2rad(torch.as_tensor(degrees, dtype=x.dtype, device=x.device).expand(x.shape[0]))  # (B,)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)  # each (B,)
    # In pixel units, output pixel (u, v) reads (u cos - v sin, u sin + v cos). Normalised x spans W pixels and
    # y spans H, so the off-diagonal terms carry the aspect ratio; without it a non-square image would be sheared.
    height, width = x.shape[-2:]
    theta = torch.stack([cos, -sin * height / width, zero, sin * width / height, cos, zero], dim=1)  # (B, 6)
    return warp(x, theta.view(-1, 2, 3))  # (B, C, H, W)


# ----------------------------------------------------------------------------- colour: deterministic helpers


def adjust_brightness_contrast(x, brightness, contrast):
    """x_aug = b * (m + c * (x - m)) with m each image's mean over all its pixels and channels.
    brightness b, contrast c: (B,) factors, 1 leaves the image unchanged."""
    b, c = brightness.view(-1, 1, 1, 1), contrast.view(-1, 1, 1, 1)  # each (B, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (b * (m + c * (x - m))).clamp(0, 1)  # (B, C, H, W) float in [0, 1]


def rgb_to_hsv(x):
    """RGB (B, 3, H, W) in [0, 1] -> HSV (B, 3, H, W), each of h, s, v in [0, 1], as colorsys.rgb_to_hsv.

    v = max(r, g, b), chroma d = v - min(r, g, b), s = d / v. The largest channel picks the sector of the
    hexagonal colour wheel (ties go to r, then g, as in colorsys): h = (g - b) / d, 2 + (b - r) / d or
    4 + (r - g) / d, then h = h / 6 mod 1. Grays (d = 0) get h = 0 and s = 0, like colorsys.
    """
    r, g, b = x.unbind(dim=1)  # each (B, H, W)
    v = x.amax(dim=1)  # (B, H, W)
    chroma = v - x.amin(dim=1)  # (B, H, W)
    # Clamping a divisor by the smallest positive float keeps 0 / 0 at 0 for grays and blacks (their
    # numerators are exactly 0 too) and changes no other pixel.
    tiny = torch.finfo(x.dtype).tiny
    s = chroma / v.clamp(min=tiny)  # (B, H, W)
    h = torch.where(r == v, g - b, torch.where(g == v, 2 * chroma + b - r, 4 * chroma + r - g))  # (B, H, W)
    h = (h / (6 * chroma.clamp(min=tiny))).remainder(1.0)  # (B, H, W) in [0, 1]
    return torch.stack([h, s, v], dim=1)  # (B, 3, H, W)


def hsv_to_rgb(hsv):
    """HSV (B, 3, H, W) in [0, 1] -> RGB (B, 3, H, W) in [0, 1], the inverse of rgb_to_hsv (as colorsys).

    Closed form of the six-sector rule: for channel n = 5, 3, 1 (r, g, b), k = (n + 6 h) mod 6 and
    value = v - v * s * clamp(min(k, 4 - k), 0, 1).
    """
    h, s, v = hsv.split(1, dim=1)  # each (B, 1, H, W)
    # n = 5, 3, 1 made on the device itself: torch.tensor([5., 3., 1.]) would be a blocking copy from the host
    n = torch.arange(5, 0, -2, dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    k = (n + 6 * h).remainder(6)  # (B, 3, H, W) in [0, 6)
    weight = torch.minimum(k, 4 - k).clamp(0, 1)  # (B, 3, H, W)
    return v - v * s * weight  # (B, 3, H, W)


def adjust_hue_saturation(x, hue_shift, saturation):
    """Turn each image's hue by hue_shift (B,) (a fraction of the colour wheel) and multiply its
    saturation by saturation (B,), capped at 1; v (the largest channel) is kept."""
    h, s, v = rgb_to_hsv(x).unbind(dim=1)  # each (B, H, W)
    h = (h + hue_shift.view(-1, 1, 1)).remainder(1.0)  # the hue circle wraps around
    s = (s * saturation.view(-1, 1, 1)).clamp(max=1)
    return hsv_to_rgb(torch.stack([h, s, v], dim=1))  # (B, 3, H, W) float in [0, 1]


# ----------------------------------------------------------------------------- the augmentations
# Every one: fn(x, strength=1.0, generator=None) -> new (B, C, H, W) tensor in [0, 1].


def exact_at_zero(augmentation):
    """Make strength 0 return a copy of x without drawing anything: an identity resample or HSV round trip is
    exact only up to rounding."""
    @functools.wraps(augmentation)
    def augment_or_copy(x, strength=1.0, generator=None):
        return x.clone() if strength == 0 else augmentation(x, strength, generator)
    return augment_or_copy


def none(x, strength=1.0, generator=None):
    """Identity (no draws): the clean-input baseline. Returns a copy, so callers may modify it freely."""
    return x.clone()


@exact_at_zero
def crop(x, strength=1.0, generator=None):
    """Random resized crop: per image, a square box of side uniform in [1 - 0.5 strength, 1] (of the image side)
    at a uniform position inside the image, stretched to the full size."""
    scale = uniform(x, 1 - strength * (1 - CROP_MIN_SCALE), 1.0, generator)  # (B,)
    # A box of side `scale` stays inside [-1, 1] when its centre is within +-(1 - scale).
    center = torch.stack([uniform(x, -1.0, 1.0, generator), uniform(x, -1.0, 1.0, generator)], dim=1)  # (B, 2)
    return zoom(x, scale, center * (1 - scale).unsqueeze(1))  # (B, C, H, W)


@exact_at_zero
def center_crop(x, strength=1.0, generator=None):
    """Central zoom: per image, the centred square box of side uniform in [1 - 0.5 strength, 1], stretched to
    the full size."""
    scale = uniform(x, 1 - strength * (1 - CENTER_CROP_MIN_SCALE), 1.0, generator)  # (B,)
    return zoom(x, scale, torch.zeros(x.shape[0], 2, dtype=x.dtype, device=x.device))  # (B, C, H, W)


@exact_at_zero
def rotate(x, strength=1.0, generator=None):
    """Rotation: per image, angle uniform in [-30 strength, 30 strength] degrees, counter-clockwise positive."""
    degrees = strength * ROTATE_DEGREES
    return rotate_by(x, uniform(x, -degrees, degrees, generator))  # (B, C, H, W)


@exact_at_zero
def brightness_contrast(x, strength=1.0, generator=None):
    """Per image, brightness and contrast factors each uniform in [1 - 0.4 strength, 1 + 0.4 strength]."""
    brightness = uniform(x, 1 - strength * BRIGHTNESS, 1 + strength * BRIGHTNESS, generator)  # (B,)
    contrast = uniform(x, 1 - strength * CONTRAST, 1 + strength * CONTRAST, generator)  # (B,)
    return adjust_brightness_contrast(x, brightness, contrast)  # (B, C, H, W)


@exact_at_zero
def hue_saturation(x, strength=1.0, generator=None):
    """Per image, hue shift uniform in [-0.1 strength, 0.1 strength] of the colour wheel and saturation factor
    uniform in [1 - 0.4 strength, 1 + 0.4 strength]."""
    hue_shift = uniform(x, -strength * HUE_SHIFT, strength * HUE_SHIFT, generator)  # (B,)
    saturation = uniform(x, 1 - strength * SATURATION, 1 + strength * SATURATION, generator)  # (B,)
    return adjust_hue_saturation(x, hue_shift, saturation)  # (B, C, H, W)


def mix(*augmentations):
    """One augmentation that applies the given ones in turn, each with its own per-image draws."""
    def mixed(x, strength=1.0, generator=None):
        for augment in augmentations:
            x = augment(x, strength, generator)  # (B, C, H, W), a new tensor each time
        return x
    return mixed


# Every augmentation above in turn; the two zooms compound, keeping 25-100% of the side.
all_augmentations = mix(crop, center_crop, rotate, brightness_contrast, hue_saturation)


AUGMENTATIONS = {
    "none": none,
    "crop": crop,
    "center-crop": center_crop,
    "rotate": rotate,
    "brightness-contrast": brightness_contrast,
    "hue-saturation": hue_saturation,
    "all": all_augmentations,
}


def by_name(name):
    """The augmentation called `name`; names joined by '+' (such as 'crop+hue-saturation') make their mix."""
    parts = [AUGMENTATIONS[part] for part in name.split("+")]
    return parts[0] if len(parts) == 1 else mix(*parts)
