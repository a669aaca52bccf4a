"""Tests of mgas_jax.data: sources, splits, deterministic sharded batches (tiny sizes, offline).

TFDS data sets are exercised two ways, neither needing TensorFlow or a network:
  * `tfds.testing.mock_data`, which patches `tfds.data_source` to serve random records of the
    right features (its data_dir is ignored, so `load` runs its real code path);
  * a tiny real CIFAR-10 in array_record format, written by a subclass of TFDS's own CIFAR-10
    builder into a temporary data_dir (images handed over as PNG files so that TFDS does not
    need TensorFlow to encode them), then read back through `tfds.data_source`.
"""
from __future__ import annotations

import io

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mgas_jax import data
from mgas_jax.data import sources


def _cfg(name: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(name=name, data_dir=None, val_size=0, train_fraction=1.0, image_size=8, num_classes=4,
               synthetic_size=60, crop_padding=0, flip=False, cutout=0, autoaugment=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _all(split: data.Split, **kw) -> dict[str, np.ndarray]:
    """Every example of one epoch, concatenated."""
    kw = {"epoch": 0, "seed": 0, "shuffle": False, "drop_remainder": False, **kw}
    parts = list(split.batches(kw.pop("batch_size", 16), **kw))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}


def _assert_split(split: data.Split, ds: data.Dataset, num_examples: int):
    assert split.num_examples == num_examples
    if num_examples == 0:
        assert list(split.batches(4, epoch=0, seed=0, shuffle=True, drop_remainder=False)) == []
        return
    everything = _all(split)
    assert everything["image"].dtype == np.uint8 and everything["label"].dtype == np.int32
    assert everything["image"].shape == (num_examples, *ds.image_shape)
    assert everything["label"].min() >= 0 and everything["label"].max() < ds.num_classes


# ----------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_classes():
    ds = data.load(_cfg("digits", val_size=100))
    assert ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
    assert ds.mean.shape == ds.std.shape == (1,) and ds.mean.dtype == np.float32
    assert 0 < ds.mean[0] < 255 and ds.std[0] > 0
    assert ds.test.num_examples == 359                        # round(0.2 * 1797)
    for split, n in ((ds.train, 1797 - 359 - 100), (ds.val, 100), (ds.test, 359)):
        _assert_split(split, ds, n)
    test_labels = _all(ds.test)["label"]
    assert np.all(np.abs(np.bincount(test_labels, minlength=10) - 35.9) <= 2)   # stratified
    images = _all(ds.train)["image"]
    assert images.max() == 255 and images.min() == 0        # 0..16 scaled to 0..255


def test_digits_splits_are_disjoint_and_fixed():
    ds = data.load(_cfg("digits", val_size=50))
    again = data.load(_cfg("digits", val_size=50))
    keys = {}
    for name in ("train", "val", "test"):
        everything = _all(getattr(ds, name))
        np.testing.assert_array_equal(everything["image"], _all(getattr(again, name))["image"])
        keys[name] = {e.tobytes() for e in everything["image"]}
    # digits has a few duplicate images, so compare counts of distinct images
    assert len(keys["train"] & keys["test"]) < 10 and len(keys["val"] & keys["test"]) < 5


def test_train_fraction_is_class_stratified():
    ds = data.load(_cfg("digits", train_fraction=0.25))
    full = data.load(_cfg("digits"))
    assert ds.train.num_examples == round(0.25 * full.train.num_examples)
    counts = np.bincount(_all(ds.train)["label"], minlength=10)
    full_counts = np.bincount(_all(full.train)["label"], minlength=10)
    assert np.all(np.abs(counts - 0.25 * full_counts) <= 1)


def test_stratified_pick_proportions():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    picked = sources.stratified_pick(labels, 20, seed=0)
    assert len(set(picked)) == 20 and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(np.bincount(labels[picked]), [12, 6, 2])
    np.testing.assert_array_equal(picked, sources.stratified_pick(labels, 20, seed=0))
    assert not np.array_equal(picked, sources.stratified_pick(labels, 20, seed=1))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    cfg = _cfg("synthetic", image_size=8, num_classes=4, synthetic_size=80, val_size=8)
    ds = data.load(cfg)
    assert ds.image_shape == (8, 8, 3) and ds.num_classes == 4 and ds.mean.shape == (3,)
    _assert_split(ds.train, ds, 72)
    _assert_split(ds.val, ds, 8)
    _assert_split(ds.test, ds, 80)
    train, test = _all(ds.train), _all(ds.test)
    np.testing.assert_array_equal(train["image"], _all(data.load(cfg).train)["image"])
    # nearest class mean, fitted on train, classifies test almost perfectly
    x_train = train["image"].reshape(72, -1).astype(np.float64)
    means = np.stack([x_train[train["label"] == k].mean(0) for k in range(4)])
    x_test = test["image"].reshape(80, -1).astype(np.float64)
    predicted = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == test["label"]) > 0.95


# ----------------------------------------------------------------------------- batches


def test_batch_order_is_a_function_of_seed_and_epoch():
    ds = data.load(_cfg("synthetic", synthetic_size=50))

    def epoch_images(epoch, seed):
        batches = ds.train.batches(10, epoch=epoch, seed=seed, shuffle=True, drop_remainder=True)
        return np.concatenate([b["image"] for b in batches])

    first = epoch_images(2, 3)
    assert ds.train.steps_per_epoch(10, True) == 5 and len(first) == 50
    np.testing.assert_array_equal(first, epoch_images(2, 3))      # a resumed run sees the same batches
    assert not np.array_equal(first, epoch_images(3, 3))          # a new epoch, a new order
    assert not np.array_equal(first, epoch_images(2, 4))          # a new seed, a new order
    # one epoch visits every example once
    assert len({row.tobytes() for row in first}) == 50


def test_remainder_and_steps_per_epoch():
    ds = data.load(_cfg("synthetic", synthetic_size=23))
    sizes = [len(b["label"]) for b in ds.train.batches(5, epoch=0, seed=0, shuffle=True, drop_remainder=False)]
    assert sizes == [5, 5, 5, 5, 3] and ds.train.steps_per_epoch(5, False) == 5
    sizes = [len(b["label"]) for b in ds.train.batches(5, epoch=0, seed=0, shuffle=True, drop_remainder=True)]
    assert sizes == [5, 5, 5, 5] and ds.train.steps_per_epoch(5, True) == 4
    unshuffled = _all(ds.train, batch_size=5)
    np.testing.assert_array_equal(unshuffled["image"], ds.train.read(np.arange(23))["image"])


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_shards_are_disjoint_and_cover_each_global_batch(drop_remainder):
    cfg = _cfg("synthetic", synthetic_size=46)
    whole = data.load(cfg)
    shards = [data.load(cfg, process_index=p, process_count=2) for p in range(2)]
    kw = dict(epoch=1, seed=7, shuffle=True, drop_remainder=drop_remainder)
    global_batches = list(whole.train.batches(8, **kw))
    local = [list(s.train.batches(8, **kw)) for s in shards]
    assert len(local[0]) == len(local[1]) == len(global_batches) == whole.train.steps_per_epoch(8, drop_remainder)
    for g, p0, p1 in zip(global_batches, *local):
        if len(g["label"]) == 8:
            assert len(p0["label"]) == len(p1["label"]) == 4
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), g[key])


def test_batch_size_must_divide_among_processes():
    ds = data.load(_cfg("synthetic"), process_index=1, process_count=4)
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        next(ds.train.batches(10, epoch=0, seed=0, shuffle=True, drop_remainder=True))
    with pytest.raises(ValueError, match="process_index"):
        data.load(_cfg("synthetic"), process_index=2, process_count=2)


# ----------------------------------------------------------------------------- config errors


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, imagenet, synthetic"):
        data.load(_cfg("mnist"))


@pytest.mark.parametrize("overrides, match", [
    (dict(val_size=-1), "val_size"),
    (dict(train_fraction=0.0), "train_fraction"),
    (dict(train_fraction=1.5), "train_fraction"),
    (dict(val_size=10_000), "leaves no training examples"),
])
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        data.load(_cfg("digits", **overrides))


def test_missing_config_key_is_named():
    cfg = _cfg("digits")
    del cfg["val_size"]
    with pytest.raises(ValueError, match="config.data.val_size is missing"):
        data.load(cfg)


def test_check_examples_rejects_corrupted_arrays():
    good = np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 2])
    data.splits.check_examples(*good, num_classes=3, image_shape=(4, 4, 3), where="x")
    with pytest.raises(ValueError, match=r"labels span \[0, 2\] but the data set has 2 classes"):
        data.splits.check_examples(*good, num_classes=2, image_shape=(4, 4, 3), where="x")
    with pytest.raises(ValueError, match="images have shape"):
        data.splits.check_examples(good[0][..., :1], good[1], num_classes=3, image_shape=(4, 4, 3), where="x")
    with pytest.raises(ValueError, match="dtype"):
        data.splits.check_examples(good[0].astype(np.float32), good[1], num_classes=3, image_shape=(4, 4, 3),
                                   where="x")


# ----------------------------------------------------------------------------- TFDS: not prepared


def test_missing_tfds_data_names_dataset_dir_and_fix(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(data.DataNotFoundError) as info:
        data.load(_cfg("cifar10", data_dir=missing))
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for needle in ("cifar10", missing, "tfds build cifar10 --data_dir DIR", "array_record",
                   "--config.data.data_dir=DIR"):
        assert needle in message
    with pytest.raises(FileNotFoundError, match=r"imagenet2012(.|\n)*downloads/manual"):
        data.load(_cfg("imagenet", data_dir=missing))
    assert f"the directory {missing} does not exist" in message


def test_missing_tfds_data_says_what_the_directory_lacks(tmp_path):
    """Not tfds's 'already prepared ... in the FileFormat.TFRECORD format' (its guess without metadata)
    but what is really not there: the set's folder, its version, its finished preparation."""
    (tmp_path / "mnist").mkdir()
    version = str(tfds.builder_cls("cifar10").VERSION)
    messages = []
    for make in (None, "cifar10/2.0.0", f"cifar10/{version}"):
        if make:
            (tmp_path / make).mkdir(parents=True)
        with pytest.raises(data.DataNotFoundError) as info:
            data.load(_cfg("cifar10", data_dir=str(tmp_path)))
        messages.append(str(info.value))
    assert f"{tmp_path} has no cifar10/ folder (it holds: mnist)" in messages[0]
    assert f"{tmp_path / 'cifar10'} has no version {version}, the one this TFDS reads (it holds: 2.0.0)" in messages[1]
    assert f"{tmp_path / 'cifar10' / version} has no dataset_info.json: its preparation did not finish" in messages[2]
    for m in messages:
        assert "already prepared" not in m and "TFRECORD" not in m
        assert "tfds build cifar10 --data_dir DIR --file_format array_record" in m


# ----------------------------------------------------------------------------- TFDS: mocked


def test_mocked_cifar10_splits_shapes_and_sharding():
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load(_cfg("cifar10", data_dir="/ignored/by/the/mock", val_size=10))
        shards = [data.load(_cfg("cifar10", val_size=10), process_index=p, process_count=2) for p in range(2)]
    assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
    assert ds.mean.shape == ds.std.shape == (3,)
    _assert_split(ds.train, ds, 30)
    _assert_split(ds.val, ds, 10)
    _assert_split(ds.test, ds, 40)
    kw = dict(seed=1, shuffle=True, drop_remainder=False)
    first = [b["label"] for b in ds.train.batches(8, epoch=0, **kw)]
    np.testing.assert_array_equal(np.concatenate(first),
                                  np.concatenate([b["label"] for b in ds.train.batches(8, epoch=0, **kw)]))
    epoch0 = np.concatenate([b["image"] for b in ds.train.batches(8, epoch=0, **kw)])
    epoch1 = np.concatenate([b["image"] for b in ds.train.batches(8, epoch=1, **kw)])
    assert not np.array_equal(epoch0, epoch1)
    for g, p0, p1 in zip(ds.train.batches(8, epoch=4, **kw), *(s.train.batches(8, epoch=4, **kw) for s in shards)):
        np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), g["image"])


def test_mocked_cifar100_has_100_classes():
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(_cfg("cifar100", val_size=2, train_fraction=0.5))
    assert ds.num_classes == 100 and ds.train.num_examples == 5 and ds.val.num_examples == 2
    _assert_split(ds.train, ds, 5)


def test_mocked_imagenet_is_resized_and_cropped():
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(_cfg("imagenet", image_size=16, val_size=2, train_fraction=0.5))
        assert ds.num_classes == 1000 and ds.image_shape == (16, 16, 3)
        _assert_split(ds.train, ds, 5)
        _assert_split(ds.val, ds, 2)
        _assert_split(ds.test, ds, 12)
        shards = [data.load(_cfg("imagenet", image_size=16, val_size=2), process_index=p, process_count=2)
                  for p in range(2)]
        kw = dict(epoch=0, seed=0, shuffle=True, drop_remainder=True)
        whole = data.load(_cfg("imagenet", image_size=16, val_size=2))
        for g, p0, p1 in zip(whole.train.batches(4, **kw), *(s.train.batches(4, **kw) for s in shards)):
            np.testing.assert_array_equal(np.concatenate([p0["label"], p1["label"]]), g["label"])


def test_mocked_source_with_bad_labels_is_rejected():
    def bad_source(self, split, **kwargs):
        del self, split, kwargs
        return [{"image": np.zeros((32, 32, 3), np.uint8), "label": np.int64(i)} for i in range(12)]

    with tfds.testing.mock_data(as_data_source_fn=bad_source):
        with pytest.raises(ValueError, match=r"cifar10/train: labels span \[0, 11\] but the data set has 10"):
            data.load(_cfg("cifar10"))


def test_mocked_source_with_bad_shapes_is_rejected():
    def bad_source(self, split, **kwargs):
        del self, split, kwargs
        return [{"image": np.zeros((28, 28, 3), np.uint8), "label": np.int64(1)} for _ in range(4)]

    with tfds.testing.mock_data(as_data_source_fn=bad_source):
        with pytest.raises(ValueError, match=r"cifar10/train: images have shape \(4, 28, 28, 3\)"):
            data.load(_cfg("cifar10"))


# ----------------------------------------------------------------------------- TFDS: real array_record


_REAL_TRAIN, _REAL_TEST = 30, 7


def _fake_cifar_examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), (np.arange(n) % 10).astype(np.int64)


@pytest.fixture(scope="module")
def real_cifar_dir(tmp_path_factory) -> str:
    """A tiny CIFAR-10 in array_record format, prepared by TFDS itself (its own builder and
    metadata, our examples), so `tfds.data_source('cifar10', data_dir=...)` reads real files."""
    from tensorflow_datasets.image_classification import cifar

    def png(image: np.ndarray) -> io.BytesIO:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        buffer.seek(0)
        return buffer

    class TinyCifar10(cifar.Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"train": self._examples(_REAL_TRAIN, 0), "test": self._examples(_REAL_TEST, 1)}

        def _examples(self, n, seed):
            images, labels = _fake_cifar_examples(n, seed)
            for i in range(n):
                yield i, {"id": f"ex_{i}", "image": png(images[i]), "label": int(labels[i])}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyCifar10(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_real_array_record_cifar10_round_trip(real_cifar_dir):
    ds = data.load(_cfg("cifar10", data_dir=real_cifar_dir, val_size=10))
    assert ds.train.num_examples == 20 and ds.val.num_examples == 10 and ds.test.num_examples == _REAL_TEST
    train_images, train_labels = _fake_cifar_examples(_REAL_TRAIN, 0)
    test_images, test_labels = _fake_cifar_examples(_REAL_TEST, 1)
    # TFDS shuffles records at preparation: compare as sets of (image, label) pairs.
    def pairs(images, labels):
        return sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels))
    train, val, test = _all(ds.train), _all(ds.val), _all(ds.test)
    assert pairs(np.concatenate([train["image"], val["image"]]), np.concatenate([train["label"], val["label"]])) \
        == pairs(train_images, train_labels)
    assert pairs(test["image"], test["label"]) == pairs(test_images, test_labels)
    np.testing.assert_array_equal(np.bincount(val["label"], minlength=10), np.ones(10))   # stratified val
