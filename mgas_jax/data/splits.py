"""A split of a data set and its deterministic, process-sharded batches.

A `Split` knows how many examples it holds and how to read any of them by position
(`0 .. num_examples - 1`); everything else (epoch order, global batches, the slice of each
batch that belongs to this process) is computed here, on the host, from integers only:

    for batch in ds.train.batches(256, epoch=3, seed=0, shuffle=True, drop_remainder=True):
        batch['image']   # np.uint8 (256 // process_count, H, W, C)
        batch['label']   # np.int32 (256 // process_count,)

The order of epoch `e` is a pure function of `(seed, e)`, so a run resumed at epoch `e` sees
exactly the batches the interrupted run would have seen.
"""
from __future__ import annotations

import concurrent.futures
import math
from typing import Callable, Iterator

import numpy as np

# reads positions (N,) int64 -> (images uint8 (N, H, W, C), labels int32 (N,))
Reader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def check_examples(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
                   image_shape: tuple[int, int, int], where: str) -> None:
    """Raises ValueError when a block of examples is not what the model will be fed.

    Args:
      images: (N, H, W, C) uint8.
      labels: (N,) integer, each in [0, num_classes).
      num_classes, image_shape: what the data set declares.
      where: names the data set and split in the message (e.g. "cifar10/train").
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{where}: images have shape {images.shape}, expected (N, *{tuple(image_shape)}); "
                         "the source is corrupted or the wrong data set was prepared in data_dir.")
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images have dtype {images.dtype}, expected uint8.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: labels have shape {labels.shape}, expected ({images.shape[0]},) "
                         "(one integer label per image).")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels have dtype {labels.dtype}, expected an integer type.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels span [{labels.min()}, {labels.max()}] but the data set has "
                         f"{num_classes} classes (labels must lie in [0, {num_classes})).")


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which epoch `epoch` visits the split: (num_examples,) int64 positions.

    A fresh generator seeded by (seed, epoch) rather than one generator advanced epoch by
    epoch: resuming at any epoch needs no replay of the earlier ones.
    """
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


def process_slice(global_batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous part of one global batch of positions.

    Full batches split exactly (the caller checks divisibility); a final partial batch is cut
    as evenly as possible, so processes may then differ by one example.
    """
    return np.array_split(global_batch, process_count)[process_index]


class Split:
    """Examples of one split (train, val or test), readable by position.

    Attributes:
      name: "<data set>/<split>", used in messages.
      num_examples: the number of examples across all processes.
    """

    def __init__(self, name: str, num_examples: int, reader: Reader, *,
                 process_index: int = 0, process_count: int = 1, prefetch: bool = False):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
        self.name = name
        self.num_examples = int(num_examples)
        self._reader = reader
        self._process_index = process_index
        self._process_count = process_count
        # Decoding (ImageNet) is slow enough to hide behind the training step; in-memory
        # splits read a batch in microseconds and need no thread.
        self._prefetch = prefetch

    def __repr__(self) -> str:
        return f"Split({self.name!r}, num_examples={self.num_examples})"

    def steps_per_epoch(self, batch_size: int, drop_remainder: bool) -> int:
        """Number of global batches in one epoch."""
        self._check_batch_size(batch_size)
        if drop_remainder:
            return self.num_examples // batch_size
        return math.ceil(self.num_examples / batch_size)

    def read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `positions` (N,) as {'image': uint8 (N,H,W,C), 'label': int32 (N,)}."""
        images, labels = self._reader(np.asarray(positions, dtype=np.int64))
        return {"image": images, "label": labels.astype(np.int32)}

    def batches(self, batch_size: int, *, epoch: int, seed: int, shuffle: bool,
                drop_remainder: bool) -> Iterator[dict[str, np.ndarray]]:
        """Yields this process's slice of every global batch of epoch `epoch`.

        Args:
          batch_size: the GLOBAL batch size, divisible by process_count.
          epoch, seed: the order is a pure function of these (and of shuffle).
          shuffle: False visits positions 0, 1, 2, ... (evaluation).
          drop_remainder: drop a final batch smaller than batch_size.
        Yields:
          {'image': np.uint8 (batch_size // process_count, H, W, C), 'label': np.int32 (same,)}
        """
        self._check_batch_size(batch_size)
        order = epoch_order(self.num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
        steps = self.steps_per_epoch(batch_size, drop_remainder)
        local = [process_slice(order[s * batch_size:(s + 1) * batch_size],
                               self._process_index, self._process_count) for s in range(steps)]
        if not self._prefetch:
            for positions in local:
                yield self.read(positions)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.read, local[0]) if local else None
            for s in range(len(local)):
                batch = pending.result()
                pending = pool.submit(self.read, local[s + 1]) if s + 1 < len(local) else None
                yield batch

    def _check_batch_size(self, batch_size: int) -> None:
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if batch_size % self._process_count:
            raise ValueError(f"The global batch_size {batch_size} is not divisible by process_count="
                             f"{self._process_count}; choose a multiple of {self._process_count}.")


def array_reader(images: np.ndarray, labels: np.ndarray) -> Reader:
    """A reader over in-memory arrays (N, H, W, C) uint8 and (N,) int."""
    labels = labels.astype(np.int32)
    return lambda positions: (images[positions], labels[positions])


def stratified_folds(labels: np.ndarray, folds: int, *, seed) -> np.ndarray:
    """The fold (0 .. folds-1) of every example: a stratified k-fold assignment.

    Within each class the examples are dealt out in a random order, round-robin over the folds, so a
    fold holds floor or ceil(n_c / folds) examples of class c; each class starts dealing where the
    previous one stopped, so the folds' total sizes differ by at most one as well.

    Args:
      labels: (N,) integer class labels.
      folds: k >= 2, at most N.
      seed: an int or a sequence of ints (np.random.default_rng's seed); the assignment is a pure
        function of (labels, folds, seed), and another seed is another repetition of the k-fold split.
    Returns:
      (N,) int64: fold of each example. Fold f's test set is np.flatnonzero(result == f); the k test
      sets partition the examples, so each is tested exactly once per repetition.
    """
    labels = np.asarray(labels)
    if int(folds) != folds or not 2 <= folds <= labels.size:
        raise ValueError(f"folds = {folds!r}: a k-fold split needs 2 <= k <= {labels.size} (the examples)")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(labels.size), labels))   # grouped by class, random within
    # dealing by the rank in this one order (not per class from fold 0) is what makes class c start
    # where class c-1 stopped, so no fold collects the remainders of every class
    fold = np.empty(labels.size, np.int64)
    fold[order] = np.arange(labels.size) % folds
    return fold


def fold_positions(labels: np.ndarray, *, folds: int, fold: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of fold `fold` of `stratified_folds(labels, folds, seed=seed)`; sorted int64.

    The test part is that fold, the training part every other fold: the two are disjoint and cover
    all examples. A validation split is carved from the training part afterwards (sources.hold_out).
    """
    if int(fold) != fold or not 0 <= fold < folds:
        raise ValueError(f"fold = {fold!r}: must lie in [0, folds = {folds})")
    assignment = stratified_folds(labels, folds, seed=seed)
    return np.flatnonzero(assignment != fold).astype(np.int64), np.flatnonzero(assignment == fold).astype(np.int64)
