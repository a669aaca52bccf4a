"""On-device augmentation: pure JAX, jit-able, explicit PRNG keys, batches (B, H, W, C).

The DARTS recipe for CIFAR, in the order `augment_batch` applies it for training:

    [AutoAugment] -> zero-pad + random crop -> horizontal flip -> normalize -> cutout

    x = augment.augment_batch(key, batch['image'], config.data, ds.mean, ds.std, train=True)

Every function draws its own per-example randomness from `key`, so one key per step gives a
different augmentation for each example and the same one again for the same key.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mgas_jax.data.autoaugment import autoaugment_cifar  # re-exported: data.augment.autoaugment_cifar

__all__ = ["normalize", "random_crop", "random_flip", "cutout", "autoaugment_cifar", "augment_batch"]


def normalize(images: jax.Array, mean: Any, std: Any) -> jax.Array:
    """(images - mean) / std per channel.

    Args:
      images: (B, H, W, C) uint8 (or float) in [0, 255].
      mean, std: (C,) in [0, 255] units.
    Returns:
      (B, H, W, C) float32.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Zero-pads each side by `padding`, then crops back to (H, W) at a random offset per example.

    Args:
      key: PRNG key.
      images: (B, H, W, C), any dtype.
      padding: a Python int; 0 returns the images unchanged.
    Returns:
      (B, H, W, C), same dtype: each image shifted by up to +-padding pixels in each direction.
    """
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2.

    Args:
      images: (B, H, W, C).
    Returns:
      (B, H, W, C), same dtype.
    """
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Sets one size x size square per example to 0 (DeVries & Taylor 2017, as in DARTS).

    The square's centre is uniform over the whole image, so near the border the square is
    clipped and fewer pixels are cut (DARTS's `Cutout(length)`); for an even size this is
    exactly DARTS's square, for an odd size the square has `size` rows rather than `size - 1`.

    Args:
      images: (B, H, W, C), normally already normalized (0 is then the mean colour).
      size: a Python int; 0 returns the images unchanged.
    Returns:
      (B, H, W, C), same dtype.
    """
    if size == 0:
        return images
    b, h, w, _ = images.shape
    key_y, key_x = jax.random.split(key)
    top = jax.random.randint(key_y, (b, 1, 1), 0, h) - size // 2
    left = jax.random.randint(key_x, (b, 1, 1), 0, w) - size // 2
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)   # (B, H, W)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def augment_batch(key: jax.Array, images: jax.Array, cfg: Any, mean: Any, std: Any, train: bool) -> jax.Array:
    """The full input transform of one batch.

    train=True: [autoaugment_cifar if cfg.autoaugment] -> random_crop(cfg.crop_padding) ->
    [random_flip if cfg.flip] -> normalize -> cutout(cfg.cutout). train=False: normalize only.
    `cfg` (config.data) is read in Python, so it is static under jit.

    Args:
      key: PRNG key (unused when train=False).
      images: (B, H, W, C) uint8.
      mean, std: (C,) in [0, 255] units.
    Returns:
      (B, H, W, C) float32.
    """
    if not train:
        return normalize(images, mean, std)
    key_aa, key_crop, key_flip, key_cut = jax.random.split(key, 4)
    if cfg.autoaugment:
        images = autoaugment_cifar(key_aa, images)
    images = random_crop(key_crop, images, int(cfg.crop_padding))
    if cfg.flip:
        images = random_flip(key_flip, images)
    out = normalize(images, mean, std)
    return cutout(key_cut, out, int(cfg.cutout))

