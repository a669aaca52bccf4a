"""What a user sees from the CLI in mode=train (configs/tiny.py), run as a subprocess as a user runs it:
the last lines of the output, the exit status, and which files of the workdir changed.

One finished run (module fixture) is copied for each case: a rerun of the finished run, a corrupt
checkpoint, a data set that is not there, log lines beside a progress bar.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mgas_jax import host_allocator

# every test here runs the CLI in a subprocess (a tiny training, or its rerun)
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# What orbax's and tensorstore's threads print when the interpreter exits under them.
EXIT_NOISE = ("Event loop is closed", "sys.meta_path is None", "Exception ignored", "Traceback (most recent call last)"
              " during shutdown")


def cli(workdir, *overrides, cache, timeout=1200):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return subprocess.run([sys.executable, "-m", "mgas_jax.main", f"--config={TINY}", f"--workdir={workdir}",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def last_lines(text, n=3):
    return [line for line in text.splitlines() if line.strip()][-n:]


def snapshot(workdir):
    """{relative path: sha256} of every file, and every directory, outside xla_cache/ (the compilation
    cache is shared and may gain entries)."""
    out = {}
    for dirpath, dirs, files in os.walk(workdir):
        rel = os.path.relpath(dirpath, workdir)
        if rel.split(os.sep)[0] == "xla_cache":
            continue
        out.update({os.path.join(rel, d) + "/": "dir" for d in dirs})
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    out = cli(workdir, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def copy(finished, tmp_path, name):
    workdir = tmp_path / name
    shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns("xla_cache"))
    return workdir


def test_rerun_of_a_finished_training_logs_nothing_twice(finished, tmp_path, cache):
    """The rerun restores the last checkpoint, tests again and says so; metrics.jsonl keeps one test line,
    TensorBoard gets no new event file, and no file changes (results.json is rewritten identically)."""
    workdir = copy(finished, tmp_path, "rerun")
    before = snapshot(workdir)
    out = cli(workdir, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test top1" in last_lines(out.stderr, 1)[0]
    assert snapshot(workdir) == before
    if sys.platform.startswith("linux") and host_allocator.find_jemalloc():
        # a training on the CPU runs under jemalloc where it is installed (config.host_allocator='auto')
        assert "host malloc: re-executing with LD_PRELOAD=" in out.stderr
        assert "host malloc: jemalloc " in out.stderr
    elif sys.platform.startswith("linux"):
        # set up before validation starts JAX's threads, so that all of them share one arena
        assert "host malloc: keeps freed memory for reuse (kept,one-arena)" in out.stderr
    with open(workdir / "metrics.jsonl") as f:
        splits = [json.loads(line)["split"] for line in f]
    assert splits.count("test") == 1 and splits[-1] == "test"
    assert len(glob.glob(str(workdir / "tb" / "events.out.tfevents.*"))) == 1


def test_corrupt_checkpoint_ends_the_output_and_changes_no_file(finished, tmp_path, cache):
    """The reproduction of issue 18: the largest data file of the latest checkpoint cut to 70,000 bytes.
    The run stops with CorruptCheckpointError's message (the cause in one line, the fix) as the last
    lines of the output, a non-zero exit status, nothing printed after it by threads at exit, and every
    file of the workdir byte for byte as it was."""
    workdir = copy(finished, tmp_path, "corrupt")
    data = glob.glob(str(workdir / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d" / "*"))
    victim = max(data, key=os.path.getsize)
    assert os.path.getsize(victim) > 70_000
    os.truncate(victim, 70_000)
    before = snapshot(workdir)
    out = cli(workdir, cache=cache)
    assert out.returncode == 6, out.stderr[-3000:]  # main.py's status of this error
    tail = "\n".join(last_lines(out.stderr, 3))
    assert "CorruptCheckpointError" in tail, out.stderr[-3000:]
    assert f"the checkpoint of step 6 in {workdir / 'checkpoints'} cannot be read" in tail
    assert "is not valid for value of size 70000" in tail       # tensorstore's precise reason, in one line
    assert tail.endswith("out of the way; to start over, use another --workdir."), tail
    assert "TensorStore({" not in tail                          # not pages of array specs
    for noise in EXIT_NOISE:
        assert noise not in out.stderr, out.stderr[-3000:]
    assert snapshot(workdir) == before


def test_missing_data_set_says_what_is_missing(tmp_path, cache):
    """A data_dir without the set: the message names the directory and what is not in it, not tfds's
    'already prepared ... in TFRECORD format'; the new workdir gets no checkpoint, metrics or events."""
    data_dir = tmp_path / "tfds"
    (data_dir / "mnist").mkdir(parents=True)   # another data set is there, cifar10 is not
    workdir = tmp_path / "nodata"
    out = cli(workdir, "--config.data.name=cifar10", f"--config.data.data_dir={data_dir}", cache=cache)
    assert out.returncode == 5, out.stderr[-3000:]  # main.py's status of this error
    assert "DataNotFoundError" in out.stderr, out.stderr[-3000:]
    tail = "\n".join(last_lines(out.stderr, 12))
    assert f"{data_dir} has no cifar10/ folder" in tail and "holds: mnist" in tail, tail
    assert "tfds build cifar10 --data_dir DIR --file_format array_record" in tail
    assert "already prepared" not in out.stderr and "TFRECORD" not in out.stderr
    written = {p for p in snapshot(workdir) if not p.endswith("/")}
    assert not any(p.startswith(("checkpoints", "tb")) or p == "metrics.jsonl" for p in written), written


def render(stream: str) -> list[str]:
    """The lines a terminal shows for `stream`: a carriage return moves back to the line's start, and
    what follows overwrites the line from there."""
    screen = []
    for raw in stream.split("\n"):
        line = ""
        for k, part in enumerate(raw.split("\r")):
            line = part + line[len(part):] if k else part
        screen.append(line.rstrip())
    return screen


def test_log_lines_are_written_above_the_progress_bar(finished, tmp_path, cache):
    """With the bar on, every absl line is a line of its own on the screen (tqdm.write clears the bar
    first), and the bar is still drawn."""
    workdir = tmp_path / "bar"
    out = cli(workdir, "--config.train.progress=True", "--config.train.epochs=1", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch 1/1:" in out.stderr
    # the absl records themselves, wherever they start in the raw stream
    logged = re.findall(r"I\d{4} [\d:.]+ +\d+ metrics\.py:\d+\] \[train\][^\r\n]*", out.stderr)
    assert logged, out.stderr[-3000:]
    screen = render(out.stderr)
    for text in logged:
        assert text.rstrip() in screen, (text, [s for s in screen if "[train]" in s])
