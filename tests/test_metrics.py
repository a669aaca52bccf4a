"""mgas_jax.metrics on its own: JSON lines with plain numbers, truncation on resume, TensorBoard scalars
read back from the event file, and no files on a process that does not write."""
import glob
import json
import struct

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from mgas_jax import metrics


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_scalars(logdir) -> dict:
    """{(tag, step): value} of every scalar in the TensorBoard event files under logdir.

    An event file is a sequence of records: uint64 length, uint32 CRC, the Event proto, uint32 CRC.
    """
    out = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_jsonl_lines_hold_plain_numbers(tmp_path):
    writer = metrics.JsonlWriter(str(tmp_path / "sub" / "metrics.jsonl"))   # the directory is made
    writer.write(3, 1, "train", {"loss": jnp.float32(0.5), "n": np.int64(4), "hist": jnp.arange(3), "lr": 0.1})
    writer.close()
    [line] = read_jsonl(tmp_path / "sub" / "metrics.jsonl")
    assert line == {"step": 3, "epoch": 1, "split": "train", "loss": 0.5, "n": 4, "hist": [0, 1, 2], "lr": 0.1}
    assert type(line["n"]) is int and type(line["loss"]) is float


def test_truncate_after_drops_later_steps_and_appends_again(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = metrics.JsonlWriter(path)
    for step in (1, 2, 3, 4):
        writer.write(step, step, "train", {"loss": 1.0 / step})
    writer.truncate_after(2)   # a resume from step 2: steps 3 and 4 are logged again
    writer.write(3, 3, "val", {"top1": 0.5})
    writer.close()
    assert [(line["step"], line["split"]) for line in read_jsonl(path)] == [(1, "train"), (2, "train"), (3, "val")]
    reopened = metrics.JsonlWriter(path)   # a new run appends
    reopened.write(4, 4, "train", {"loss": 0.1})
    reopened.close()
    assert [line["step"] for line in read_jsonl(path)] == [1, 2, 3, 4]


def test_metric_writer_writes_jsonl_and_tensorboard_scalars(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.write(10, 0, "train", {"loss": jnp.float32(2.5), "top1": 0.25, "hist": [1, 2]})
    writer.write(20, 1, "val", {"top1": np.float64(0.75)})
    writer.truncate_after(20)
    writer.close()
    assert [line["split"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == ["train", "val"]
    # scalars only, tagged <split>/<name>, at their step; the list is not a scalar
    assert read_scalars(tmp_path / "tb") == {("train/loss", 10): 2.5, ("train/top1", 10): 0.25,
                                              ("val/top1", 20): 0.75}


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, 0, "train", {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not (tmp_path / "w").exists()
