"""k-fold splits of digits (splits.stratified_folds, fold_positions; data.folds in sources.py)."""
import ml_collections
import numpy as np
import pytest

from mgas_jax import config as config_lib
from mgas_jax import data
from mgas_jax.data import splits

DIGITS_LABELS = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # digits' counts


def test_every_example_is_tested_exactly_once_per_repetition():
    labels = DIGITS_LABELS
    for seed in (0, [1, 2]):
        tested = np.zeros(labels.size, int)
        for fold in range(5):
            train, test = splits.fold_positions(labels, folds=5, fold=fold, seed=seed)
            assert np.intersect1d(train, test).size == 0                     # never in both
            assert np.array_equal(np.union1d(train, test), np.arange(labels.size))
            tested[test] += 1
        assert np.all(tested == 1)


def test_folds_are_stratified_and_balanced():
    labels = DIGITS_LABELS
    assignment = splits.stratified_folds(labels, 5, seed=0)
    sizes = np.bincount(assignment, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == labels.size
    for c in range(10):
        per_fold = np.bincount(assignment[labels == c], minlength=5)
        n = np.sum(labels == c)
        assert np.all(np.abs(per_fold - n / 5) < 1), (c, per_fold)   # within one image per class


def test_folds_are_deterministic_and_repetitions_differ():
    labels = DIGITS_LABELS
    a = splits.stratified_folds(labels, 5, seed=[3, 0])
    assert np.array_equal(a, splits.stratified_folds(labels, 5, seed=[3, 0]))
    assert not np.array_equal(a, splits.stratified_folds(labels, 5, seed=[3, 1]))
    with pytest.raises(ValueError, match="2 <= k"):
        splits.stratified_folds(labels, 1, seed=0)
    with pytest.raises(ValueError, match="fold = 5"):
        splits.fold_positions(labels, folds=5, fold=5, seed=0)


def _digits_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(name="digits", data_dir=None, val_size=100, train_fraction=1.0, image_size=8, num_classes=10,
               synthetic_size=8, crop_padding=1, flip=False, cutout=0, autoaugment=False,
               folds=0, fold=0, fold_repeat=0)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _images(split) -> set:
    batch = split.read(np.arange(split.num_examples))
    return {x.tobytes() + bytes([int(y)]) for x, y in zip(batch["image"], batch["label"])}


def test_digits_folds_cover_all_images_and_validation_comes_from_training():
    off = data.load(_digits_cfg())
    assert (off.train.num_examples, off.val.num_examples, off.test.num_examples) == (1338, 100, 359)
    every, test_sizes = set(), []
    for fold in range(3):
        ds = data.load(_digits_cfg(folds=3, fold=fold))
        train, val, test = _images(ds.train), _images(ds.val), _images(ds.test)
        assert not (test & train) and not (test & val) and not (train & val)
        assert ds.train.num_examples + ds.val.num_examples + ds.test.num_examples == 1797
        every |= test
        test_sizes.append(ds.test.num_examples)
    assert test_sizes == [599, 599, 599]
    # every distinct image appears in one of the test folds (digits has a few duplicate images)
    assert every == _images(off.train) | _images(off.val) | _images(off.test)
    with pytest.raises(ValueError, match="digits only"):
        data.load(_digits_cfg(name="synthetic", folds=3))


def test_config_keys_default_off_and_checked():
    config = config_lib.load_config("configs/digits.py")
    assert config.data.folds == 0
    config.data.folds, config.data.fold = 5, 4
    config_lib.validate(config, device_count=1)
    config.data.fold = 5
    with pytest.raises(config_lib.ConfigError, match="data.fold = 5"):
        config_lib.validate(config, device_count=1)
    config.data.fold, config.data.folds = 0, 1
    with pytest.raises(config_lib.ConfigError, match="k >= 2"):
        config_lib.validate(config, device_count=1)
    cifar = config_lib.load_config("configs/default.py")
    cifar.data.folds = 5
    with pytest.raises(config_lib.ConfigError, match="digits only"):
        config_lib.validate(cifar, device_count=1)
