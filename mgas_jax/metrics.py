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
    """Appends one JSON object per event to a file (opened at the first write: a run that stops
    before logging anything leaves the file as it was)."""

    def __init__(self, path: str):
        self.path = path
        self._file = None

    def _open(self):
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def write(self, step: int, epoch: int, split: str, values: Mapping[str, float]) -> None:
        record = {"step": int(step), "epoch": int(epoch), "split": split}
        record.update({k: _plain(v) for k, v in values.items()})
        f = self._open()
        f.write(json.dumps(record) + "\n")
        f.flush()

    def events(self) -> list[dict]:
        """Every event in the file so far ([] when there is none)."""
        if self._file is not None:
            self._file.flush()
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drops events after `step`: on resume, the interrupted epoch's lines are logged again.

        The file is rewritten only when it holds such lines, so resuming at its last line changes nothing.
        """
        events = self.events()
        kept = [e for e in events if e["step"] <= step]
        if len(kept) == len(events):
            return
        self.close()
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter:
    """Scalars to TensorBoard event files under `logdir`, tagged `<split>/<name>`.

    The event file is created at the first write, so a run that logs nothing adds no file. After
    `purge_after(step)` (a resumed run) the new file starts with a purge marker: TensorBoard then
    hides the earlier files' events after `step`, which the resumed run logs again.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = None
        self._purge_step = None

    def purge_after(self, step: int) -> None:
        self.close()  # the next event opens a new file that carries the marker
        self._purge_step = int(step) + 1

    def write(self, step: int, epoch: int, split: str, values: Mapping[str, float]) -> None:
        del epoch
        if self._writer is None:
            import tensorboardX  # lazy: only process 0 writes events
            self._writer = tensorboardX.SummaryWriter(logdir=self.logdir, purge_step=self._purge_step)
        for name, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{split}/{name}", value, int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
        """A resumed run: drops the JSON lines after `step` and hides TensorBoard's (see the writers)."""
        if self.enabled:
            self._jsonl.truncate_after(step)
            self._tb.purge_after(step)

    def logged(self, step: int, split: str) -> bool:
        """Whether an event of `split` at `step` is in metrics.jsonl (False on other processes)."""
        return self.enabled and any(e["step"] == step and e["split"] == split for e in self._jsonl.events())

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _route_logs_around_bars() -> None:
    """Sends absl's console lines through tqdm.write, which clears the progress bars, writes the line
    and draws the bars again below it: otherwise a log line starts where the bar's text ends and the
    bar's next redraw (a carriage return) overwrites the line. Without a bar, tqdm.write writes the
    line as it is. Idempotent."""
    from tqdm.contrib import DummyTqdmFile

    handler = logging.get_absl_handler().python_handler
    stream = handler.stream
    if not isinstance(stream, DummyTqdmFile):
        handler.setStream(DummyTqdmFile(stream))


def progress_bar(total: int, desc: str, *, enabled: bool, initial: int = 0):
    """A tqdm bar (closed by the caller; `leave=False`) on process 0 when `enabled`, with absl's log
    lines written above it instead of over it."""
    import tqdm

    enabled = enabled and jax.process_index() == 0
    if enabled:
        _route_logs_around_bars()
    return tqdm.tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not enabled)

