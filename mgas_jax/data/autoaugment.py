"""The AutoAugment CIFAR-10 policy (Cubuk et al., CVPR 2019), in JAX.

Each example draws one of the 25 sub-policies; each sub-policy applies two operations in turn,
each with its own probability and magnitude (0..9). The image ops follow PIL's definitions
(which the paper's policy was searched with) on uint8 values, rounding after every op:

    x = autoaugment_cifar(key, images_uint8)          # (B, H, W, C) uint8 -> same

Static shapes throughout, so it runs under jit: the five geometric ops share one nearest-
neighbour affine warp (non-geometric ops use the identity matrix), and the ten pixel ops are
selected per example with `lax.switch`, which under `vmap` computes the branches and selects.
The two stages of a sub-policy run in a `lax.scan`, so the ops are traced (and compiled) once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert",
       "Equalize", "Solarize", "Posterize", "Contrast", "Color", "Brightness", "Sharpness")

# (op, probability, magnitude) twice per sub-policy: the policy found on reduced CIFAR-10
# (Cubuk et al. 2019, appendix). Magnitudes of ops without one (Invert, ...) are ignored.
CIFAR10_POLICY = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 8), ("Equalize", 0.6, 4)),
    (("Color", 0.9, 9), ("Equalize", 0.6, 6)),
    (("AutoContrast", 0.8, 4), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
)

# Magnitude 0..9 -> parameter, over the paper's ranges. Signed ops get a random sign per use.
_LEVELS = {
    "ShearX": np.linspace(0.0, 0.3, 10),             # shear factor
    "ShearY": np.linspace(0.0, 0.3, 10),
    "TranslateX": np.linspace(0.0, 150 / 331, 10),   # fraction of the side (150 px of 331 in the paper)
    "TranslateY": np.linspace(0.0, 150 / 331, 10),
    "Rotate": np.linspace(0.0, 30.0, 10),            # degrees
    "Contrast": np.linspace(0.0, 0.9, 10),           # enhancement factor 1 +- level
    "Color": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8.0, 4.0, 10)),   # bits kept
    "Solarize": np.linspace(256.0, 0.0, 10),            # threshold: values >= it are inverted
}
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Contrast", "Color", "Brightness",
           "Sharpness")
_FILL = 128.0   # grey for pixels a geometric op brings in from outside the image, as in the paper's code


def _policy_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The policy as arrays (25, 2): op index, probability, parameter, signed (bool)."""
    ops = np.array([[OPS.index(op) for op, _, _ in sub] for sub in CIFAR10_POLICY], np.int32)
    probs = np.array([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], np.float32)
    values = np.array([[_LEVELS[op][m] if op in _LEVELS else 0.0 for op, _, m in sub]
                       for sub in CIFAR10_POLICY], np.float32)
    signed = np.array([[op in _SIGNED for op, _, _ in sub] for sub in CIFAR10_POLICY])
    return ops, probs, values, signed


# ----------------------------------------------------------------------------- geometric ops


def _affine(op: jax.Array, value: jax.Array, h: int, w: int) -> jax.Array:
    """(2, 3) matrix mapping an output point (x, y, 1) to the input point it samples.

    Continuous coordinates, pixel (i, j) covering [j, j+1) x [i, i+1), as PIL's `transform` and
    `rotate` use them. The identity for every non-geometric op. Positive angles turn the image
    counter-clockwise about its centre, like PIL's `rotate`.
    """
    eye = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    cx, cy = w / 2.0, h / 2.0
    rad = jnp.deg2rad(value)
    cos, sin = jnp.cos(rad), jnp.sin(rad)
    rotate = jnp.array([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]])
    matrices = jnp.stack([
        eye,                                                        # Identity
        eye.at[0, 1].set(value),                                    # ShearX: x_in = x + s y
        eye.at[1, 0].set(value),                                    # ShearY: y_in = s x + y
        eye.at[0, 2].set(value * w),                                # TranslateX
        eye.at[1, 2].set(value * h),                                # TranslateY
        rotate,                                                     # Rotate
    ])
    return matrices[jnp.where(op < matrices.shape[0], op, 0)]


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Nearest-neighbour affine resampling of (H, W, C); outside pixels become _FILL.

    Each output pixel samples the input pixel containing the image of its centre.
    """
    h, w, _ = image.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                          indexing="ij")
    x_in = jnp.floor(matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]).astype(jnp.int32)
    y_in = jnp.floor(matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]).astype(jnp.int32)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    sampled = image[jnp.clip(y_in, 0, h - 1), jnp.clip(x_in, 0, w - 1)]
    return jnp.where(inside[..., None], sampled, _FILL)


# ----------------------------------------------------------------------------- pixel ops
# Each takes (H, W, C) float32 with integer values in [0, 255] and a scalar parameter.


def _grey(image: jax.Array) -> jax.Array:
    """PIL's 'L' conversion (ITU-R 601-2 luma), (H, W, C) -> (H, W, 1)."""
    if image.shape[-1] == 1:
        return image
    weights = jnp.array([0.299, 0.587, 0.114], jnp.float32)
    return jnp.round(image @ weights)[..., None]


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates.

    Truncated like PIL's integer result (then clipped by `apply_op`).
    """
    return jnp.floor(degenerate + factor * (image - degenerate))


def _identity(image, value):
    return image


def _auto_contrast(image, value):
    lo = image.min(axis=(0, 1))
    hi = image.max(axis=(0, 1))
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    return jnp.where(hi > lo, jnp.floor((image - lo) * scale), image)   # a flat channel is left alone


def _invert(image, value):
    return 255.0 - image


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """PIL's ImageOps.equalize on one (H, W) channel."""
    values = channel.astype(jnp.int32)
    hist = jnp.bincount(values.ravel(), length=256)
    last_present = 255 - jnp.argmax(hist[::-1] > 0)
    # PIL spreads all pixels but those of the brightest value present over 255 steps.
    step = (values.size - hist[last_present]) // 255
    below = jnp.cumsum(hist) - hist
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[values], values).astype(channel.dtype)


def _equalize(image, value):
    return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


def _solarize(image, threshold):
    return jnp.where(image < threshold, image, 255.0 - image)


def _posterize(image, bits):
    unit = 2.0 ** (8.0 - bits)
    return jnp.floor(image / unit) * unit


def _contrast(image, factor):
    return _blend(jnp.round(jnp.mean(_grey(image))), image, factor)


def _color(image, factor):
    return _blend(_grey(image), image, factor)


def _brightness(image, factor):
    return _blend(jnp.zeros_like(image), image, factor)


def _sharpness(image, factor):
    # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior; the border stays.
    h, w, _ = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    smooth = jnp.round((total + 4.0 * image) / 13.0)
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    return _blend(jnp.where(interior, smooth, image), image, factor)


_PIXEL_OPS = {"AutoContrast": _auto_contrast, "Invert": _invert, "Equalize": _equalize, "Solarize": _solarize,
              "Posterize": _posterize, "Contrast": _contrast, "Color": _color, "Brightness": _brightness,
              "Sharpness": _sharpness}
_BRANCHES = [_identity] + list(_PIXEL_OPS.values())
# op index -> switch branch (geometric ops and Identity: branch 0, their work is the warp)
_BRANCH_OF_OP = np.array([1 + list(_PIXEL_OPS).index(op) if op in _PIXEL_OPS else 0 for op in OPS], np.int32)


def apply_op(image: jax.Array, op: jax.Array, value: jax.Array) -> jax.Array:
    """Applies OPS[op] with parameter `value` to one image.

    Args:
      image: (H, W, C) float32, integer values in [0, 255].
      op: int32 scalar index into OPS.
      value: float32 scalar: the (signed) parameter from _LEVELS.
    Returns:
      (H, W, C) float32, integer values in [0, 255]: PIL's uint8 result for the same op, exactly
      for the geometric ops, Invert, Solarize, Posterize and Equalize, within one grey level
      (float rounding) for the others; tests/test_augment.py compares them.
    """
    h, w, _ = image.shape
    image = _warp(image, _affine(op, value, h, w))
    image = jax.lax.switch(jnp.asarray(_BRANCH_OF_OP)[op], _BRANCHES, image, value)
    return jnp.clip(jnp.round(image), 0.0, 255.0)


def autoaugment_cifar(key: jax.Array, images: jax.Array) -> jax.Array:
    """AutoAugment's CIFAR-10 policy, one random sub-policy per example.

    Args:
      key: PRNG key.
      images: (B, H, W, C) uint8 (or float with integer values in [0, 255]); C is 3 (or 1:
        Color is then the identity).
    Returns:
      (B, H, W, C), the input dtype, values in [0, 255].
    """
    ops, probs, values, signed = (jnp.asarray(t) for t in _policy_tables())
    b = images.shape[0]
    key_sub, key_apply, key_sign = jax.random.split(key, 3)
    sub = jax.random.randint(key_sub, (b,), 0, len(CIFAR10_POLICY))
    applied = jax.random.uniform(key_apply, (b, 2)) < probs[sub]
    sign = jnp.where(jax.random.bernoulli(key_sign, 0.5, (b, 2)), 1.0, -1.0)
    op = jnp.where(applied, ops[sub], 0)                                  # (B, 2); 0 = Identity
    value = values[sub] * jnp.where(signed[sub], sign, 1.0)               # (B, 2)

    def one_example(image, op_pair, value_pair):
        def stage(x, op_value):
            return apply_op(x, *op_value), None
        out, _ = jax.lax.scan(stage, image, (op_pair, value_pair))
        return out

    out = jax.vmap(one_example)(images.astype(jnp.float32), op, value)
    return out.astype(images.dtype)
