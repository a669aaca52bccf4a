"""The data sets MGAS searches and trains on, each as train / val / test `Split`s.

    from mgas_jax import data
    ds = data.load(config.data)           # config.data: an ml_collections.ConfigDict
    ds.num_classes, ds.image_shape        # e.g. 10, (32, 32, 3)
    ds.mean, ds.std                       # (C,) float32, in [0, 255] units
    ds.train.batches(96, epoch=0, seed=0, shuffle=True, drop_remainder=True)

Sources:
  digits     sklearn's bundled 8x8 digits (offline, 1797 images, 1 channel).
  synthetic  learnable random images: a fixed low-frequency prototype per class plus noise.
  cifar10, cifar100, imagenet
             TFDS `array_record` files read through `tfds.data_source` (no TensorFlow at run time);
             prepared offline into `data_dir` (see `DataNotFoundError`).

digits' test split is a fixed stratified 20 %, or with `folds` = k > 0 fold `fold` of a stratified
k-fold split of all 1797 images (`fold_repeat` picks the repetition; splits.stratified_folds).
Validation is held out of the training split (`val_size` examples), the remaining training
examples can be thinned to `train_fraction` (MGAS searches ImageNet on 10%). Both choices
are deterministic (constant seeds) so every run and every process sees the same splits.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from mgas_jax.data.splits import Split, array_reader, check_examples, fold_positions

ALLOWED_NAMES = ("digits", "cifar10", "cifar100", "imagenet", "synthetic")

# Constant seeds: the held-out sets are part of the data set's definition, not of a run.
_HOLDOUT_SEED = 20190101
_DIGITS_TEST_FRACTION = 0.2
_SYNTHETIC_PROTOTYPE_SEED = 1234
_SYNTHETIC_NOISE_STD = 40.0   # on [0, 255]: clearly noisy, still far easier than the class gaps
_SYNTHETIC_GRID = 4           # prototypes are 4x4 colour blocks, so crops and flips keep them legible


class DataNotFoundError(FileNotFoundError):
    """A TFDS data set is not prepared in the data dir (and this machine cannot download it)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set.

    Attributes:
      name: the config name ('cifar10', ...).
      num_classes: labels lie in [0, num_classes).
      image_shape: (H, W, C) of the model input.
      mean, std: (C,) float32 in [0, 255] units, for `augment.normalize`.
      train, val, test: the splits; val has 0 examples when val_size == 0.
    """
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: np.ndarray
    std: np.ndarray
    train: Split
    val: Split
    test: Split


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    tfds_name: str
    test_split: str
    num_classes: int
    mean: tuple[float, ...]   # published per-channel statistics, in [0, 255] units
    std: tuple[float, ...]
    in_memory: bool           # small enough to decode once into one uint8 array
    image_shape: tuple[int, int, int] | None   # what the files must hold; None: resized to image_size


_TFDS = {
    "cifar10": _TfdsSpec("cifar10", "test", 10, (125.307, 122.961, 113.879), (62.993, 62.089, 66.705), True, (32, 32, 3)),
    "cifar100": _TfdsSpec("cifar100", "test", 100, (129.304, 124.070, 112.434), (68.170, 65.392, 70.418), True, (32, 32, 3)),
    "imagenet": _TfdsSpec("imagenet2012", "validation", 1000, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375),
                          False, None),
}


# ----------------------------------------------------------------------------- config


def _required(cfg: Any, key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"config.data.{key} is missing; add it to the data config "
                         f"(keys read here: name, data_dir, val_size, train_fraction, image_size, "
                         f"num_classes, synthetic_size).")
    return cfg[key]


def _check_config(cfg: Any) -> None:
    name = _required(cfg, "name")
    if name not in ALLOWED_NAMES:
        raise ValueError(f"Unknown data set config.data.name={name!r}; allowed names: {', '.join(ALLOWED_NAMES)}.")
    val_size = _required(cfg, "val_size")
    if int(val_size) != val_size or val_size < 0:
        raise ValueError(f"config.data.val_size must be an integer >= 0, got {val_size!r}.")
    fraction = _required(cfg, "train_fraction")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.train_fraction must lie in (0, 1], got {fraction!r}.")
    folds = cfg.get("folds", 0)
    if folds:
        if name != "digits":
            raise ValueError(f"config.data.folds = {folds}: k-fold splits are implemented for digits only "
                             f"(data.name = {name!r} has a fixed test split); set data.folds = 0.")
        if int(folds) != folds or folds < 2:
            raise ValueError(f"config.data.folds must be 0 (off) or an integer >= 2, got {folds!r}.")
        fold = _required(cfg, "fold")
        if int(fold) != fold or not 0 <= fold < folds:
            raise ValueError(f"config.data.fold must lie in [0, data.folds = {folds}), got {fold!r}.")
    if name in ("imagenet", "synthetic"):
        size = _required(cfg, "image_size")
        if int(size) != size or size < 1:
            raise ValueError(f"config.data.image_size must be a positive integer for {name}, got {size!r}.")
    if name == "synthetic":
        if _required(cfg, "num_classes") < 2:
            raise ValueError(f"config.data.num_classes must be >= 2 for synthetic, got {cfg.num_classes!r}.")
        if _required(cfg, "synthetic_size") < 1:
            raise ValueError(f"config.data.synthetic_size must be >= 1, got {cfg.synthetic_size!r}.")


# ----------------------------------------------------------------------------- split selection


def stratified_pick(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` positions whose class proportions match those of `labels`, chosen at random.

    Each example's key is its random rank within its class, as a quantile of the class size;
    the `count` smallest keys take (almost exactly) the same fraction of every class.

    Args:
      labels: (N,) integer class labels.
      count: how many to pick, 0 <= count <= N.
      seed: the choice is a pure function of (labels, count, seed).
    Returns:
      (count,) int64 sorted positions into labels.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(labels.size)            # a random order over all examples
    by_class = np.lexsort((tiebreak, labels))          # grouped by class, random within
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ends = np.searchsorted(sorted_labels, sorted_labels, side="right")
    quantile = np.empty(labels.size)
    quantile[by_class] = (np.arange(labels.size) - starts + 0.5) / (ends - starts)
    chosen = np.lexsort((tiebreak, quantile))[:count]
    return np.sort(chosen).astype(np.int64)


def hold_out(labels: np.ndarray | None, num_examples: int, *, val_size: int, train_fraction: float,
             where: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of (train, val) inside a training split.

    With labels, val and the train subset are class-stratified; without (ImageNet, whose labels
    are only known after decoding 1.28M records) they come from one seeded permutation, whose
    class proportions match in expectation (TFDS also shuffles records when preparing).

    Args:
      labels: (N,) labels of the training split, or None.
      num_examples: N.
      val_size: examples held out as validation.
      train_fraction: the share of the remaining examples kept for training.
      where: the data set's name, for messages.
    Returns:
      train positions (round(train_fraction * (N - val_size)),), val positions (val_size,);
      both sorted int64.
    """
    if val_size >= num_examples:
        raise ValueError(f"{where}: val_size={val_size} leaves no training examples out of {num_examples}; "
                         f"set config.data.val_size below {num_examples}.")
    rest = num_examples - val_size
    keep = max(1, int(round(train_fraction * rest)))
    if labels is None:
        order = np.random.default_rng(_HOLDOUT_SEED).permutation(num_examples)
        return np.sort(order[:keep]).astype(np.int64), np.sort(order[rest:]).astype(np.int64)
    val = stratified_pick(labels, val_size, _HOLDOUT_SEED)
    remaining = np.setdiff1d(np.arange(num_examples), val)
    train = remaining[stratified_pick(labels[remaining], keep, _HOLDOUT_SEED + 1)]
    return train.astype(np.int64), val


def _in_memory_dataset(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                       test_images: np.ndarray, test_labels: np.ndarray, *, cfg: Any, num_classes: int,
                       image_shape: tuple[int, int, int], mean: np.ndarray | None, std: np.ndarray | None,
                       process_index: int, process_count: int) -> Dataset:
    """Checks the arrays, holds out validation, and wraps everything as a `Dataset`.

    image_shape: (H, W, C) the arrays must have. mean/std None: computed per channel from the
    training split.
    """
    image_shape = tuple(int(d) for d in image_shape)
    check_examples(train_images, train_labels, num_classes=num_classes, image_shape=image_shape,
                   where=f"{name}/train")
    check_examples(test_images, test_labels, num_classes=num_classes, image_shape=image_shape,
                   where=f"{name}/test")
    train_pos, val_pos = hold_out(train_labels, len(train_labels), val_size=int(cfg.val_size),
                                  train_fraction=float(cfg.train_fraction), where=name)
    train_x, train_y = train_images[train_pos], train_labels[train_pos]
    if mean is None:
        pixels = train_x.reshape(-1, image_shape[-1])
        mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    shard = dict(process_index=process_index, process_count=process_count)
    return Dataset(
        name=name, num_classes=num_classes, image_shape=image_shape,
        mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
        train=Split(f"{name}/train", len(train_pos), array_reader(train_x, train_y), **shard),
        val=Split(f"{name}/val", len(val_pos), array_reader(train_images[val_pos], train_labels[val_pos]), **shard),
        test=Split(f"{name}/test", len(test_labels), array_reader(test_images, test_labels), **shard))


# ----------------------------------------------------------------------------- digits, synthetic


def _digits(cfg: Any, **shard: int) -> Dataset:
    from sklearn.datasets import load_digits  # sklearn only for this offline source
    raw = load_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]   # (1797, 8, 8, 1)
    labels = raw.target.astype(np.int32)
    folds = int(cfg.get("folds", 0))
    if folds:
        # all 1797 images take turns as the test split; the fold assignment belongs to the repetition,
        # not to the run's seed, so every method and seed of a study sees the same split of a fold
        train, test = fold_positions(labels, folds=folds, fold=int(cfg.fold),
                                     seed=[_HOLDOUT_SEED, int(cfg.get("fold_repeat", 0))])
    else:
        test = stratified_pick(labels, int(round(_DIGITS_TEST_FRACTION * len(labels))), _HOLDOUT_SEED - 1)
        train = np.setdiff1d(np.arange(len(labels)), test)
    return _in_memory_dataset("digits", images[train], labels[train], images[test], labels[test], cfg=cfg,
                              num_classes=10, image_shape=(8, 8, 1), mean=None, std=None, **shard)


def synthetic_examples(num_examples: int, *, image_size: int, num_classes: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable random images: class prototype + Gaussian noise.

    The prototypes depend only on (image_size, num_classes), so every split of the same
    configuration shares them; `seed` draws the labels and the noise.

    Returns:
      images (num_examples, image_size, image_size, 3) uint8, labels (num_examples,) int32
      (classes balanced to within one example).
    """
    grid = min(_SYNTHETIC_GRID, image_size)
    blocks = np.random.default_rng(_SYNTHETIC_PROTOTYPE_SEED).uniform(0, 255, (num_classes, grid, grid, 3))
    cell = np.arange(image_size) * grid // image_size                 # nearest-neighbour upsampling
    prototypes = blocks[:, cell][:, :, cell]                          # (K, S, S, 3)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, _SYNTHETIC_NOISE_STD, (num_examples, image_size, image_size, 3))
    images = np.clip(np.round(prototypes[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels


def _synthetic(cfg: Any, **shard: int) -> Dataset:
    kw = dict(image_size=int(cfg.image_size), num_classes=int(cfg.num_classes))
    train_x, train_y = synthetic_examples(int(cfg.synthetic_size), seed=1, **kw)
    test_x, test_y = synthetic_examples(int(cfg.synthetic_size), seed=2, **kw)
    return _in_memory_dataset("synthetic", train_x, train_y, test_x, test_y, cfg=cfg,
                              num_classes=int(cfg.num_classes), image_shape=train_x.shape[1:], mean=None,
                              std=None, **shard)


# ----------------------------------------------------------------------------- TFDS


def _what_is_missing(tfds_name: str, root: str) -> str:
    """What the data dir lacks, from the files themselves. tfds's own error is no guide: without
    metadata it assumes the TFRECORD format and says the set 'is already prepared ... in the
    FileFormat.TFRECORD format', also for a directory that does not exist."""
    import tensorflow_datasets as tfds

    def listing(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"

    if not os.path.isdir(root):
        return f"the directory {root} does not exist"
    folder = os.path.join(root, tfds_name)
    if not os.path.isdir(folder):
        return f"{root} has no {tfds_name}/ folder (it holds: {listing(root)})"
    try:
        version = str(tfds.builder_cls(tfds_name).VERSION)
    except Exception:  # an unknown name: tfds's own error below says so
        version = None
    versions = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    if version is not None and version not in versions:
        return (f"{folder} has no version {version}, the one this TFDS reads "
                f"(it holds: {', '.join(versions) or 'nothing'})")
    prepared = os.path.join(folder, version or (versions[-1] if versions else ""))
    info_path = os.path.join(prepared, "dataset_info.json")
    if not os.path.exists(info_path):
        return f"{prepared} has no dataset_info.json: its preparation did not finish"
    try:
        with open(info_path, encoding="utf-8") as f:
            file_format = json.load(f).get("fileFormat", "tfrecord")
    except (OSError, ValueError) as e:
        return f"{info_path} cannot be read ({e})"
    if file_format != "array_record":
        return (f"{prepared} holds the set in {file_format} format; the loaders read array_record "
                f"(random access)")
    return f"{prepared} lacks files of the set"


def _not_prepared_message(tfds_name: str, data_dir: str | None, error: BaseException) -> str:
    import tensorflow_datasets as tfds
    root = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
    looked_at = data_dir if data_dir is not None else f"{root} (the TFDS default)"
    missing = _what_is_missing(tfds_name, root)
    if not isinstance(error, NotImplementedError):  # a missing shard or split: tfds names it
        missing += f" (tfds: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]})"
    manual = ""
    if tfds_name == "imagenet2012":
        manual = ("ImageNet cannot be downloaded by TFDS: first put ILSVRC2012_img_train.tar and "
                  "ILSVRC2012_img_val.tar into DIR/downloads/manual/. ")
    return (
        f"The TFDS data set '{tfds_name}' is not prepared (in array_record format) in data_dir {looked_at}: "
        f"{missing}.\n"
        f"This machine does not download data. Prepare it offline: {manual}on a machine with internet run\n"
        f"  tfds build {tfds_name} --data_dir DIR --file_format array_record\n"
        f"or\n"
        f"  python -c 'import tensorflow_datasets as tfds; tfds.builder(\"{tfds_name}\", data_dir=\"DIR\")"
        f".download_and_prepare(file_format=\"array_record\")'\n"
        f"then copy DIR to this machine and pass --config.data.data_dir=DIR "
        f"(or use config.data.name='digits' or 'synthetic', which need no files).")


def _open_tfds(tfds_name: str, split: str, data_dir: str | None):
    """`tfds.data_source` without any download attempt; missing files raise DataNotFoundError."""
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    # What tfds raises for "not there" depends on what is missing: no metadata gives an empty
    # split dict (KeyError) or the default TFRECORD format (NotImplementedError, also raised
    # for data prepared as tfrecord), missing shards an OSError.
    except (KeyError, NotImplementedError, OSError) as e:
        # Not chained: tfds's NotImplementedError claims the set "is already prepared"; what is true of
        # it (a missing shard or split) is in the message.
        raise DataNotFoundError(_not_prepared_message(tfds_name, data_dir, e)) from None


def _record_parts(record: dict, where: str) -> tuple[np.ndarray, int]:
    image = np.asarray(record["image"])
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):   # a few ImageNet JPEGs are grey
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}: a decoded image has shape {image.shape}, expected (H, W, 3).")
    return image, int(record["label"])


def _read_all(source: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every record of a small split: images (N, H, W, C) uint8, labels (N,) int32."""
    logging.info("Reading %s into memory (%d examples).", where, len(source))
    # Record by record: `__getitems__` of tfds' mocked source is broken, and for 50k CIFAR
    # images the batched read is no faster (~0.1 ms per record either way).
    records = [source[i] for i in range(len(source))]
    shapes = {np.shape(r["image"]) for r in records}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images of different shapes {sorted(shapes)[:4]} in a data set read "
                         "whole into memory; the prepared files are not this data set.")
    images = np.stack([np.asarray(r["image"]) for r in records]) if records else np.zeros((0, 1, 1, 1), np.uint8)
    labels = np.array([int(r["label"]) for r in records], dtype=np.int32)
    return images, labels


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` (antialiased bilinear) and crops the centre square.

    Args:
      image: (h, w, 3) uint8.
    Returns:
      (size, size, 3) uint8.
    """
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _record_reader(source: Any, record_ids: np.ndarray, *, image_size: int, num_classes: int,
                   pool: concurrent.futures.Executor, where: str):
    """A reader that decodes and resizes records of a large split in a thread pool."""

    def one(record_id: int) -> tuple[np.ndarray, int]:
        image, label = _record_parts(source[int(record_id)], where)
        return resize_center_crop(image, image_size), label

    def read(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = list(pool.map(one, record_ids[positions]))
        images = np.stack([p[0] for p in parts]) if parts else np.zeros((0, image_size, image_size, 3), np.uint8)
        labels = np.array([p[1] for p in parts], dtype=np.int32)
        check_examples(images, labels, num_classes=num_classes, image_shape=(image_size, image_size, 3),
                       where=where)
        return images, labels

    return read


def _tfds(cfg: Any, name: str, *, process_index: int, process_count: int) -> Dataset:
    spec = _TFDS[name]
    data_dir = _required(cfg, "data_dir")
    train_source = _open_tfds(spec.tfds_name, "train", data_dir)
    test_source = _open_tfds(spec.tfds_name, spec.test_split, data_dir)
    if spec.in_memory:
        train_x, train_y = _read_all(train_source, f"{name}/train")
        test_x, test_y = _read_all(test_source, f"{name}/test")
        return _in_memory_dataset(name, train_x, train_y, test_x, test_y, cfg=cfg, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, mean=spec.mean, std=spec.std,
                                  process_index=process_index, process_count=process_count)

    size = int(cfg.image_size)
    train_pos, val_pos = hold_out(None, len(train_source), val_size=int(cfg.val_size),
                                  train_fraction=float(cfg.train_fraction), where=name)
    # PIL decodes and resizes without holding the GIL, so threads use all cores.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 4)
    splits = {}
    for split, source, ids in (("train", train_source, train_pos), ("val", train_source, val_pos),
                               ("test", test_source, np.arange(len(test_source), dtype=np.int64))):
        reader = _record_reader(source, ids, image_size=size, num_classes=spec.num_classes, pool=pool,
                                where=f"{name}/{split}")
        splits[split] = Split(f"{name}/{split}", len(ids), reader, process_index=process_index,
                              process_count=process_count, prefetch=True)
    return Dataset(name=name, num_classes=spec.num_classes, image_shape=(size, size, 3),
                   mean=np.asarray(spec.mean, np.float32), std=np.asarray(spec.std, np.float32), **splits)


# ----------------------------------------------------------------------------- entry point


def load(cfg: Any, *, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Loads the data set that `cfg` (= config.data) names.

    Args:
      cfg: ConfigDict with name, data_dir, val_size, train_fraction, and for imagenet/synthetic
        image_size; for synthetic num_classes and synthetic_size.
      process_index, process_count: this process's place among the hosts; every split then
        yields this process's 1/process_count of each global batch.
    Returns:
      a `Dataset`.
    Raises:
      ValueError: unknown name, bad config values, or examples that fail the sanity checks.
      DataNotFoundError (a FileNotFoundError): a TFDS data set not prepared in data_dir.
    """
    _check_config(cfg)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    shard = dict(process_index=process_index, process_count=process_count)
    if cfg.name == "digits":
        return _digits(cfg, **shard)
    if cfg.name == "synthetic":
        return _synthetic(cfg, **shard)
    return _tfds(cfg, cfg.name, **shard)
