"""Data for MGAS: sources (digits, synthetic, CIFAR, ImageNet via TFDS), splits, augmentation.

    from mgas_jax import data
    ds = data.load(config.data, process_index=0, process_count=1)
    for batch in ds.train.batches(96, epoch=0, seed=0, shuffle=True, drop_remainder=True):
        x = data.augment.augment_batch(key, batch['image'], config.data, ds.mean, ds.std, train=True)
"""
from mgas_jax.data import augment, autoaugment
from mgas_jax.data.sources import ALLOWED_NAMES, DataNotFoundError, Dataset, load
from mgas_jax.data.splits import Split

__all__ = ["ALLOWED_NAMES", "DataNotFoundError", "Dataset", "Split", "augment", "autoaugment", "load"]
