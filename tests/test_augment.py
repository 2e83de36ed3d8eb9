"""Tests for augment.py: invariants of every augmentation, then oracles for the deterministic helpers
(colorsys for HSV; torch.rot90, flips, pixel shifts and F.interpolate for the affine maps; hand-computed
brightness/contrast)."""

import colorsys

import pytest
import torch

import augment

NAMES = list(augment.AUGMENTATIONS)
RANDOM_NAMES = [name for name in NAMES if name != "none"]


def seeded(seed):
    """A fresh CPU generator, as main.py passes one."""
    return torch.Generator().manual_seed(seed)


def images(batch_size=4, height=12, width=16, seed=0):
    """Random float images in [0, 1]; non-square so that a mixed-up height and width shows."""
    return torch.rand(batch_size, 3, height, width, generator=seeded(seed))


def colorsys_map(fn, x):
    """Apply a colorsys function pixel by pixel: (B, 3, H, W) -> (B, 3, H, W), in float64."""
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    out = torch.tensor([fn(*p) for p in pixels], dtype=torch.float64)
    return out.reshape(x.shape[0], x.shape[2], x.shape[3], 3).permute(0, 3, 1, 2)


def special_pixels():
    """Blacks, whites, grays, primaries, secondaries and channel ties, as one (1, 3, 1, 12) image."""
    rgb = [(0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5), (1, 0, 0), (0, 1, 0), (0, 0, 1),
           (1, 1, 0), (0, 1, 1), (1, 0, 1), (0.7, 0.7, 0.2), (0.2, 0.7, 0.7), (0.7, 0.2, 0.7)]
    return torch.tensor(rgb, dtype=torch.float32).T.reshape(1, 3, 1, len(rgb))


# ----------------------------------------------------------------------------- invariants of every augmentation


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_device_and_range(name, dtype):
    x = images().to(dtype)
    x_aug = augment.AUGMENTATIONS[name](x)  # no generator: the global RNG
    assert x_aug.shape == x.shape and x_aug.dtype == dtype and x_aug.device == x.device
    assert x_aug.min() >= 0 and x_aug.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_strength_zero_is_the_identity_in_a_new_tensor(name):
    x = images()
    x_aug = augment.AUGMENTATIONS[name](x, strength=0.0, generator=seeded(0))
    assert torch.equal(x_aug, x)
    assert x_aug.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", NAMES)
def test_input_is_unchanged(name):
    x = images()
    x_before = x.clone()
    augment.AUGMENTATIONS[name](x, generator=seeded(0))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_each_image_gets_its_own_draw(name):
    x = images(batch_size=1).repeat(8, 1, 1, 1)  # one image, eight copies
    x_aug = augment.AUGMENTATIONS[name](x, generator=seeded(0))
    distance_to_first = (x_aug - x_aug[:1]).abs().flatten(1).amax(dim=1)  # (8,)
    assert (distance_to_first[1:] > 1e-3).all()


def test_none_returns_an_equal_copy_at_full_strength():
    x = images()
    x_aug = augment.none(x, generator=seeded(0))
    assert torch.equal(x_aug, x) and x_aug.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_seed_decides_the_output(name):
    fn, x = augment.AUGMENTATIONS[name], images()
    assert torch.equal(fn(x, generator=seeded(0)), fn(x, generator=seeded(0)))
    assert not torch.allclose(fn(x, generator=seeded(0)), fn(x, generator=seeded(1)))


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_smaller_strength_changes_the_image_less(name):
    fn, x = augment.AUGMENTATIONS[name], images(batch_size=16)
    weak = (fn(x, strength=0.2, generator=seeded(0)) - x).abs().mean()
    strong = (fn(x, strength=1.0, generator=seeded(0)) - x).abs().mean()
    assert 0 < weak < strong


def test_all_applies_every_augmentation_in_turn_with_its_own_draws():
    x, generator = images(), seeded(0)
    expected = x
    for fn in (augment.crop, augment.center_crop, augment.rotate, augment.brightness_contrast, augment.hue_saturation):
        expected = fn(expected, generator=generator)
    assert torch.equal(augment.all_augmentations(x, generator=seeded(0)), expected)


def test_a_mix_by_name_applies_its_parts_in_turn_with_their_own_draws():
    x, generator = images(), seeded(0)
    expected = augment.hue_saturation(augment.crop(x, 0.7, generator), 0.7, generator)
    assert torch.equal(augment.by_name("crop+hue-saturation")(x, 0.7, seeded(0)), expected)
    assert augment.by_name("rotate") is augment.rotate


@pytest.mark.parametrize("name", ["center-crop", "rotate"])
def test_centred_maps_keep_the_centre_pixel(name):
    x = images(height=9, width=9)  # odd size: one pixel sits exactly at the centre
    x_aug = augment.AUGMENTATIONS[name](x, generator=seeded(0))
    torch.testing.assert_close(x_aug[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- geometry oracles


def matrices(rows, batch_size=4):
    """One (2, 3) affine matrix given as nested lists, repeated for every image: (B, 2, 3)."""
    return torch.tensor(rows).expand(batch_size, 2, 3)


def test_warp_by_identity_and_mirror_matrices():
    x = images(height=6, width=10)
    torch.testing.assert_close(augment.warp(x, matrices([[1.0, 0, 0], [0, 1, 0]])), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.warp(x, matrices([[-1.0, 0, 0], [0, 1, 0]])), x.flip(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.warp(x, matrices([[1.0, 0, 0], [0, -1, 0]])), x.flip(2), atol=1e-6, rtol=0)


def test_warp_shift_is_in_half_image_units_on_a_non_square_image():
    x = images(height=6, width=10)  # normalised units: 2 / W per pixel in x, 2 / H per pixel in y
    x_aug = augment.warp(x, matrices([[1.0, 0, 2 * 2 / 10], [0, 1, 1 * 2 / 6]]))  # read 2 pixels right, 1 down
    # Would fail with x and y swapped, or with align_corners=True (then a pixel is 2 / (W - 1)).
    torch.testing.assert_close(x_aug[..., :5, :8], x[..., 1:, 2:], atol=1e-6, rtol=0)


def test_rotate_by_90_matches_rot90_counter_clockwise():
    x = images(height=8, width=8)
    torch.testing.assert_close(augment.rotate_by(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.rotate_by(x, -90.0), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_rotate_by_uses_one_angle_per_image():
    x = images(height=8, width=8)
    x_aug = augment.rotate_by(x, torch.tensor([0.0, 90.0, 180.0, 270.0]))
    for k in range(4):
        torch.testing.assert_close(x_aug[k], torch.rot90(x[k], k, dims=(1, 2)), atol=1e-5, rtol=0)


def test_rotate_by_180_on_a_non_square_image_flips_both_axes():
    x = images(height=6, width=10)
    torch.testing.assert_close(augment.rotate_by(x, 180.0), x.flip(2, 3), atol=1e-5, rtol=0)


def test_rotate_by_90_turns_the_central_square_of_a_wide_image():
    x = images(height=8, width=12)  # without the aspect-ratio terms the rotation would shear this image
    x_aug = augment.rotate_by(x, 90.0)
    torch.testing.assert_close(x_aug[..., 2:10], torch.rot90(x[..., 2:10], 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_zoom_of_the_full_box_is_the_identity():
    x = images()
    x_aug = augment.zoom(x, torch.ones(4), torch.zeros(4, 2))
    torch.testing.assert_close(x_aug, x, atol=1e-6, rtol=0)


def test_zoom_centre_is_xy_in_normalised_units():
    x = images(height=8, width=8)  # a shift of 0.5 in normalised units is 2 pixels here
    right = augment.zoom(x, torch.ones(4), torch.tensor([[0.5, 0.0]] * 4))
    down = augment.zoom(x, torch.ones(4), torch.tensor([[0.0, 0.5]] * 4))
    torch.testing.assert_close(right[..., :, :6], x[..., :, 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(down[..., :6, :], x[..., 2:, :], atol=1e-6, rtol=0)


def test_zoom_by_half_reads_only_the_middle_of_the_image():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 1:7, 1:7] = 1.0  # white, with a one-pixel black frame
    x_aug = augment.zoom(x, torch.tensor([0.5]), torch.zeros(1, 2))
    # Output pixel i reads input position 1.75 + i / 2 (pixel centres at integers): 1.75 to 5.25, always
    # between white pixels, so the frame is gone. A box of 0.75 still reaches it (position 0.875: 1/8 black).
    torch.testing.assert_close(x_aug, torch.ones_like(x), atol=1e-6, rtol=0)
    assert augment.zoom(x, torch.tensor([0.75]), torch.zeros(1, 2)).min() < 0.9


def test_zoom_into_a_box_matches_interpolating_the_sliced_box():
    x = images(height=8, width=8)
    x_aug = augment.zoom(x, torch.full((4,), 0.5), torch.zeros(4, 2))  # the central 4x4 pixels, stretched to 8x8
    expected = torch.nn.functional.interpolate(x[..., 2:6, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    # The border rows and columns differ: interpolate repeats the box's edge pixel, while the zoom reads the
    # pixels just outside the box (the rest of the image is there).
    torch.testing.assert_close(x_aug[..., 1:7, 1:7], expected[..., 1:7, 1:7], atol=1e-6, rtol=0)


def ramp(batch_size, size):
    """Images whose value is the normalised column position (u + 1) / 2 at every pixel centre."""
    u = (torch.arange(size) + 0.5) / size  # (W,) in (0, 1)
    return u.expand(batch_size, 3, size, size).clone()


@pytest.mark.parametrize("name", ["crop", "center-crop"])
def test_crop_boxes_stay_inside_and_keep_half_to_all_of_the_side(name):
    x_aug = augment.AUGMENTATIONS[name](ramp(64, 32), generator=seeded(0))
    # A box inside the image shows an increasing ramp; one reaching past an edge would show the mirror.
    assert (x_aug.diff(dim=3) >= -1e-6).all()
    side = (x_aug[..., -1] - x_aug[..., 0]).mean(dim=(1, 2)) * 32 / 31  # (64,) the box side kept
    assert side.min() > 0.5 - 1 / 32 and side.max() <= 1 + 1e-6
    assert side.min() < 0.6 and side.max() > 0.9


def test_rotate_angles_lie_within_30_degrees():
    x_aug = augment.rotate(ramp(64, 33), generator=seeded(0))
    # On the ramp, the output is (u cos - v sin + 1) / 2, so the gradient at the centre gives the angle.
    d_u = x_aug[:, 0, 16, 17] - x_aug[:, 0, 16, 15]  # (64,)
    d_v = x_aug[:, 0, 17, 16] - x_aug[:, 0, 15, 16]  # (64,)
    degrees = torch.rad2deg(torch.atan2(-d_v, d_u))  # (64,)
    assert degrees.abs().max() <= 30.0 + 1e-3
    assert degrees.min() < -20 and degrees.max() > 20


# ----------------------------------------------------------------------------- colour oracles


def test_rgb_to_hsv_matches_colorsys():
    x = torch.cat([images(batch_size=1, height=1, width=500).reshape(1, 3, 1, 500), special_pixels()], dim=3)
    hsv, expected = augment.rgb_to_hsv(x).double(), colorsys_map(colorsys.rgb_to_hsv, x.double())
    hue_error = (hsv[:, 0] - expected[:, 0]).abs()
    assert torch.minimum(hue_error, 1 - hue_error).max() < 1e-6  # hue lives on a circle: 0 and 1 agree
    torch.testing.assert_close(hsv[:, 1:], expected[:, 1:], atol=1e-6, rtol=0)
    assert (hsv[:, :2, 0, 500:503] == 0).all()  # black, white and gray: hue 0 and saturation 0 exactly


def test_hsv_to_rgb_matches_colorsys():
    hsv = torch.cat([images(batch_size=1, height=1, width=500).reshape(1, 3, 1, 500), special_pixels()], dim=3)
    expected = colorsys_map(colorsys.hsv_to_rgb, hsv.double())
    torch.testing.assert_close(augment.hsv_to_rgb(hsv).double(), expected, atol=1e-6, rtol=0)


def test_adjust_hue_saturation_matches_colorsys_per_image():
    x = images(batch_size=2, height=4, width=4)
    hue_shift, saturation = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 1.7])
    x_aug = augment.adjust_hue_saturation(x, hue_shift, saturation)
    hsv = colorsys_map(colorsys.rgb_to_hsv, x.double())
    hsv[:, 0] = (hsv[:, 0] + hue_shift.double().view(2, 1, 1)) % 1.0
    hsv[:, 1] = (hsv[:, 1] * saturation.double().view(2, 1, 1)).clamp(max=1)
    expected = colorsys_map(colorsys.hsv_to_rgb, hsv)
    torch.testing.assert_close(x_aug.double(), expected, atol=1e-6, rtol=0)


def test_adjust_brightness_contrast_by_hand():
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2).repeat(4, 1, 1, 1)  # every image: mean 0.4
    brightness = torch.tensor([1.0, 1.5, 2.0, 2.0])
    contrast = torch.tensor([2.0, 1.0, 0.5, 1.0])
    expected = torch.tensor([
        [0.0, 0.8],  # contrast 2 doubles the distance to the mean: 0.4 -+ 0.4
        [0.3, 0.9],  # brightness 1.5 scales every value
        [0.6, 1.0],  # contrast 0.5 halves the distance (0.3, 0.5), then brightness 2
        [0.4, 1.0],  # brightness 2: 1.2 is clamped to 1
    ]).view(4, 1, 1, 2)
    x_aug = augment.adjust_brightness_contrast(x, brightness, contrast)
    torch.testing.assert_close(x_aug, expected, atol=1e-6, rtol=0)


def test_brightness_and_contrast_factors_lie_between_0_6_and_1_4():
    x = torch.tensor([0.4, 0.6]).view(1, 1, 1, 2).repeat(256, 3, 1, 1)  # mean 0.5, distance 0.1 to it
    x_aug = augment.brightness_contrast(x, generator=seeded(0))
    low, high = x_aug[:, 0, 0, 0], x_aug[:, 0, 0, 1]  # b * (0.5 -+ 0.1 c), each (256,)
    brightness, contrast = low + high, 5 * (high - low) / (low + high)  # each (256,)
    for factor in (brightness, contrast):
        assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
        assert factor.min() < 0.65 and factor.max() > 1.35


def test_hue_shifts_lie_within_a_tenth_of_the_wheel():
    red = torch.zeros(256, 3, 2, 2)
    red[:, 0] = 1.0  # hue 0, saturation 1
    hue = augment.rgb_to_hsv(augment.hue_saturation(red, generator=seeded(0)))[:, 0, 0, 0]  # (256,)
    shift = torch.where(hue > 0.5, hue - 1, hue)  # back to [-0.5, 0.5)
    assert shift.abs().max() <= 0.1 + 1e-6
    assert shift.min() < -0.09 and shift.max() > 0.09


# ----------------------------------------------------------------------------- random parameters


def test_uniform_gives_one_draw_per_image_over_the_whole_range():
    x = images(batch_size=1000, height=1, width=1)
    draws = augment.uniform(x, -3.0, 5.0, seeded(0))
    assert draws.shape == (1000,) and draws.device == x.device and draws.dtype == x.dtype
    assert draws.min() >= -3.0 and draws.max() < 5.0
    assert draws.min() < -2.9 and draws.max() > 4.9


def test_uniform_draws_the_same_numbers_for_every_dtype():
    x = images(batch_size=10, height=1, width=1)
    draws32, draws64 = augment.uniform(x, 0.0, 1.0, seeded(0)), augment.uniform(x.double(), 0.0, 1.0, seeded(0))
    assert draws64.dtype == torch.float64
    torch.testing.assert_close(draws64, draws32.double(), atol=1e-7, rtol=0)


def test_uniform_draws_what_a_plain_cpu_draw_gives():
    # The numbers a seed gives must not depend on how they reach x's device: the same as drawing on the CPU
    # generator and scaling there, in float32.
    x = images(batch_size=50, height=1, width=1)
    expected = -2.0 + (3.0 - -2.0) * torch.rand(50, generator=seeded(7))
    assert torch.equal(augment.uniform(x, -2.0, 3.0, seeded(7)), expected)
