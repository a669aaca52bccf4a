"""Metric writers: JSON lines and TensorBoard (tensorboardX), written by process 0 only.

    writer = metrics.MetricWriter(workdir)
    writer.write(step=100, epoch=0, split='train', values={'loss': 2.3, 'top1': 0.12})
    writer.close()

One log event is one line of `workdir/metrics.jsonl`:

    {"step": 100, "epoch": 0, "split": "train", "loss": 2.3, "top1": 0.12}

and one scalar per value under `workdir/tb/` tagged `<split>/<name>`. No clu: its writers import
TensorFlow.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
from absl import logging


def _plain(value):
    """Device/numpy scalars -> Python numbers, so they serialize as JSON."""
    value = np.asarray(jax.device_get(value))
    return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter:
    """Appends one JSON object per event to a file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, step: int, epoch: int, split: str, values: Mapping[str, float]) -> None:
        record = {"step": int(step), "epoch": int(epoch), "split": split}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drops events after `step`: on resume, the interrupted epoch's lines are logged again."""
        self._file.close()
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(lines)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars to TensorBoard event files under `logdir`, tagged `<split>/<name>`."""

    def __init__(self, logdir: str):
        import tensorboardX  # lazy: only process 0 writes events
        self._writer = tensorboardX.SummaryWriter(logdir=logdir)

    def write(self, step: int, epoch: int, split: str, values: Mapping[str, float]) -> None:
        del epoch
        for name, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{split}/{name}", value, int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricWriter:
    """JSON lines + TensorBoard + the absl log, on process 0; a no-op on the others.

    Args:
      workdir: writes `workdir/metrics.jsonl` and `workdir/tb/`.
      enabled: default: jax.process_index() == 0.
    """

    def __init__(self, workdir: str, *, enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            self._jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
            self._tb = TensorBoardWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, epoch: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(step, epoch, split, values)
        self._tb.write(step, epoch, split, values)
        text = " ".join(f"{k}={_plain(v):.4g}" if isinstance(_plain(v), float) else f"{k}={_plain(v)}"
                        for k, v in values.items())
        logging.info("[%s] epoch %d step %d: %s", split, epoch, step, text)

    def truncate_after(self, step: int) -> None:
        if self.enabled:
            self._jsonl.truncate_after(step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
