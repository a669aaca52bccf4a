"""Tests of mgas_jax.data.augment and mgas_jax.data.autoaugment (tiny batches, CPU)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mgas_jax.data import augment
from mgas_jax.data import autoaugment as aa


def _random_images(shape=(4, 16, 16, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _aug_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(crop_padding=4, flip=True, cutout=8, autoaugment=True)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


# ----------------------------------------------------------------------------- normalize


def test_normalize_values():
    images = np.array([[[[0, 128, 255]]]], np.uint8)                  # (1, 1, 1, 3)
    out = augment.normalize(images, np.array([0.0, 128.0, 255.0]), np.array([1.0, 2.0, 5.0]))
    assert out.dtype == jnp.float32 and out.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(out, [[[[0.0, 0.0, 0.0]]]])
    out = augment.normalize(images, np.array([10.0, 0.0, 5.0]), np.array([2.0, 4.0, 10.0]))
    np.testing.assert_allclose(out, [[[[-5.0, 32.0, 25.0]]]])


# ----------------------------------------------------------------------------- random crop


def test_random_crop_padding_zero_is_identity():
    images = _random_images()
    np.testing.assert_array_equal(augment.random_crop(jax.random.key(0), jnp.asarray(images), 0), images)


def test_random_crop_only_shifts_a_bright_pixel_within_padding():
    b, size, pad = 64, 12, 3
    images = np.zeros((b, size, size, 1), np.uint8)
    images[:, 6, 5] = 255
    out = np.asarray(jax.jit(augment.random_crop, static_argnums=2)(jax.random.key(1), images, pad))
    assert out.shape == images.shape and out.dtype == np.uint8
    offsets = set()
    for example in out:
        rows, cols, _ = np.nonzero(example)
        assert len(rows) == 1 and example.sum() == 255       # the pixel moved, nothing else appeared
        dy, dx = rows[0] - 6, cols[0] - 5
        assert abs(dy) <= pad and abs(dx) <= pad
        offsets.add((dy, dx))
    assert len(offsets) > 10                                  # offsets are per example


def test_random_crop_is_a_window_of_the_zero_padded_image():
    pad = 2
    images = _random_images((8, 10, 10, 3), seed=3)
    out = np.asarray(augment.random_crop(jax.random.key(2), jnp.asarray(images), pad))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for example, source in zip(out, padded):
        matches = [(y, x) for y, x in itertools.product(range(2 * pad + 1), repeat=2)
                   if np.array_equal(source[y:y + 10, x:x + 10], example)]
        assert len(matches) == 1


# ----------------------------------------------------------------------------- flip


def test_random_flip_mirrors_exactly_about_half_the_examples():
    images = _random_images((64, 6, 7, 3), seed=4)
    out = np.asarray(augment.random_flip(jax.random.key(3), jnp.asarray(images)))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))        # each example exactly one of the two
    assert 16 < sum(flipped) < 48


# ----------------------------------------------------------------------------- cutout


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeros_one_clipped_square_and_nothing_else(size):
    b, h, w = 128, 10, 12
    images = jnp.ones((b, h, w, 3), jnp.float32)
    out = np.asarray(augment.cutout(jax.random.key(size), images, size))
    assert out.shape == images.shape and out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 1.0}
    clipped = 0
    for example in out:
        zero = example[..., 0] == 0
        assert np.array_equal(zero[..., None].repeat(3, -1), example == 0)   # all channels alike
        rows, cols = np.nonzero(zero.any(axis=1))[0], np.nonzero(zero.any(axis=0))[0]
        assert len(rows) and len(cols)                                       # the centre is inside
        # A full rectangle of contiguous rows and columns, at most size x size.
        assert zero.sum() == len(rows) * len(cols)
        assert rows[-1] - rows[0] + 1 == len(rows) <= size and cols[-1] - cols[0] + 1 == len(cols) <= size
        touches_border = rows[0] == 0 or cols[0] == 0 or rows[-1] == h - 1 or cols[-1] == w - 1
        if not touches_border:
            assert zero.sum() == size * size
        clipped += zero.sum() < size * size
    assert clipped > 0                                                       # centres reach the border


def test_cutout_size_zero_is_identity():
    images = jnp.ones((2, 4, 4, 1))
    np.testing.assert_array_equal(augment.cutout(jax.random.key(0), images, 0), images)


# ----------------------------------------------------------------------------- autoaugment


def test_policy_table_is_the_cifar10_policy():
    assert len(aa.CIFAR10_POLICY) == 25
    for sub in aa.CIFAR10_POLICY:
        assert len(sub) == 2
        for op, prob, magnitude in sub:
            assert op in aa.OPS and op != "Identity"
            assert 0.0 <= prob <= 1.0 and 0 <= magnitude <= 9
    used = {op for sub in aa.CIFAR10_POLICY for op, _, _ in sub}
    assert used == set(aa.OPS) - {"Identity", "ShearX"}       # the CIFAR-10 policy never picked ShearX


def test_autoaugment_shape_dtype_range_determinism_under_jit():
    images = jnp.asarray(_random_images((4, 16, 16, 3), seed=5))
    f = jax.jit(aa.autoaugment_cifar)
    a = np.asarray(f(jax.random.key(0), images))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, f(jax.random.key(0), images))
    assert not np.array_equal(a, f(jax.random.key(1), images))
    # float input: same values, float output, integer-valued in [0, 255]
    b = np.asarray(f(jax.random.key(0), images.astype(jnp.float32)))
    assert b.dtype == np.float32 and b.min() >= 0 and b.max() <= 255
    np.testing.assert_array_equal(b, a.astype(np.float32))


def test_autoaugment_single_channel_runs():
    images = jnp.asarray(_random_images((3, 8, 8, 1), seed=6))
    out = jax.jit(aa.autoaugment_cifar)(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == jnp.uint8


def _pil_reference(pil: Image.Image, op: str, value: float) -> Image.Image:
    grey = (128, 128, 128)
    w, h = pil.size
    if op == "ShearX":
        return pil.transform(pil.size, Image.AFFINE, (1, value, 0, 0, 1, 0), Image.NEAREST, fillcolor=grey)
    if op == "ShearY":
        return pil.transform(pil.size, Image.AFFINE, (1, 0, 0, value, 1, 0), Image.NEAREST, fillcolor=grey)
    if op == "TranslateX":
        return pil.transform(pil.size, Image.AFFINE, (1, 0, value * w, 0, 1, 0), Image.NEAREST, fillcolor=grey)
    if op == "TranslateY":
        return pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, value * h), Image.NEAREST, fillcolor=grey)
    if op == "Rotate":
        return pil.rotate(value, fillcolor=grey)
    if op == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if op == "Invert":
        return ImageOps.invert(pil)
    if op == "Equalize":
        return ImageOps.equalize(pil)
    if op == "Solarize":
        return ImageOps.solarize(pil, value)
    if op == "Posterize":
        return ImageOps.posterize(pil, int(value))
    enhancer = {"Contrast": ImageEnhance.Contrast, "Color": ImageEnhance.Color,
                "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}[op]
    return enhancer(pil).enhance(value)


_EXACT = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Invert", "Equalize", "Solarize", "Posterize"}
# Shear factors avoid exact half-pixel ties, where float32 and PIL's float64 may floor apart.
_CASES = [("ShearX", 0.27), ("ShearY", -0.23), ("TranslateX", 0.25), ("TranslateY", -0.3), ("Rotate", 27.0),
          ("Rotate", -13.0), ("AutoContrast", 0.0), ("Invert", 0.0), ("Equalize", 0.0), ("Solarize", 100.0),
          ("Solarize", 256.0), ("Posterize", 5.0), ("Contrast", 0.4), ("Contrast", 1.7), ("Color", 0.2),
          ("Color", 1.9), ("Brightness", 0.5), ("Brightness", 1.4), ("Sharpness", 0.1), ("Sharpness", 1.8)]


def test_each_op_matches_pil():
    rng = np.random.default_rng(7)
    image = rng.integers(40, 180, (16, 16, 3)).astype(np.uint8)     # narrow range: AutoContrast has work
    image[4:10, 3:12] = rng.integers(0, 256, (6, 9, 3))
    apply_op = jax.jit(aa.apply_op)
    for op, value in _CASES:
        ours = np.asarray(apply_op(jnp.asarray(image, jnp.float32), jnp.int32(aa.OPS.index(op)),
                                   jnp.float32(value))).astype(int)
        ref = np.asarray(_pil_reference(Image.fromarray(image), op, value)).astype(int)
        tolerance = 0 if op in _EXACT else 1
        assert np.abs(ours - ref).max() <= tolerance, (op, value)
        assert np.mean(ours != ref) < 0.05, (op, value)       # off-by-one only from float rounding


def test_identity_op_is_exact():
    image = _random_images((1, 9, 7, 3))[0].astype(np.float32)
    out = jax.jit(aa.apply_op)(jnp.asarray(image), jnp.int32(0), jnp.float32(0.0))
    np.testing.assert_array_equal(out, image)


# ----------------------------------------------------------------------------- augment_batch


def test_augment_batch_eval_is_normalize_only():
    images = jnp.asarray(_random_images())
    mean, std = np.array([120.0, 115.0, 100.0]), np.array([60.0, 61.0, 62.0])
    out = augment.augment_batch(jax.random.key(0), images, _aug_cfg(), mean, std, train=False)
    np.testing.assert_allclose(out, augment.normalize(images, mean, std))


def test_augment_batch_all_off_is_normalize():
    images = jnp.asarray(_random_images())
    cfg = _aug_cfg(crop_padding=0, flip=False, cutout=0, autoaugment=False)
    out = augment.augment_batch(jax.random.key(0), images, cfg, np.zeros(3), np.ones(3), train=True)
    np.testing.assert_allclose(out, images.astype(np.float32))


def test_augment_batch_train_under_jit():
    images = jnp.asarray(_random_images())
    mean, std = np.full(3, 127.0), np.full(3, 64.0)
    f = jax.jit(lambda k, x: augment.augment_batch(k, x, _aug_cfg(), mean, std, train=True))
    a = f(jax.random.key(0), images)
    assert a.shape == images.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, f(jax.random.key(0), images))
    assert not np.array_equal(a, f(jax.random.key(1), images))
    # cutout acts after normalization, so each example has exact zeros (the mean colour)
    assert all((np.asarray(a[i]) == 0).all(axis=-1).sum() > 0 for i in range(a.shape[0]))
