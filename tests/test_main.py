"""The command line as a user meets it: errors that end the run with their message alone, an exit status
per kind, and nothing written to the workdir when the run stops before any compute.

Every case here fails before anything is compiled (a few seconds of imports each).
"""
import os
import subprocess
import sys

import pytest

from mgas_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mgas_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def last_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def files_under(path) -> list:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def test_exit_codes_are_distinct():
    codes = list(main_lib.EXIT_CODES.values())
    assert len(set(codes)) == len(codes) == 6 and 0 not in codes and 1 not in codes


@pytest.mark.parametrize("override, fragments", [
    ("--config.train.epochz=1", ["ConfigError: train.epochz: unknown key.", "Did you mean 'train.epochs'?"]),
    ("--config.export.targets=abc", ["ConfigError: export.targets = ('abc',)", "must be a positive int"]),
    ("--config.export.targets=(1.5,)", ["ConfigError: export.targets = (1.5,)", "element 0 (1.5) must be a positive int"]),
    ("--config.export.targets=()", ["ConfigError: export.targets = ()", "must be a non-empty tuple of positive ints"]),
    ("--config.train.epochs=abc", ["ConfigError: train.epochs = 'abc': cannot be read as int"]),
    ("--config.model.layers=2", ["ConfigError: model.layers = 2: must be >= 3"]),
])
def test_a_config_mistake_ends_with_its_message_alone(tmp_path, override, fragments):
    workdir = tmp_path / "run"
    out = run_cli(f"--config={TINY}", f"--workdir={workdir}", override)
    assert out.returncode == 3, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last_line(out), last_line(out)
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_a_missing_config_file_is_one_line_naming_it(tmp_path):
    workdir = tmp_path / "run"
    out = run_cli("--config=configs/nope.py", f"--workdir={workdir}")
    assert out.returncode == 3
    line = last_line(out)
    assert line.startswith("ConfigError: --config=configs/nope.py: no such config file")
    assert os.path.join(ROOT, "configs", "nope.py") in line and "--config=configs/digits.py" in line
    assert "Traceback" not in out.stderr and not workdir.exists()


def test_the_traceback_is_behind_a_flag(tmp_path):
    out = run_cli(f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.model.layers=2", "--traceback")
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert "ConfigError: model.layers = 2" in out.stderr


def test_missing_data_ends_with_its_message_and_writes_no_file(tmp_path):
    workdir = tmp_path / "run"
    out = run_cli(f"--config={TINY}", f"--workdir={workdir}", "--config.mode=train", "--config.data.name=cifar10",
                  f"--config.data.data_dir={tmp_path / 'no_data'}")
    assert out.returncode == 5, out.stderr[-2000:]
    # the message (several lines: where the data set was looked for, how to prepare it) ends the output
    tail = out.stderr[out.stderr.rindex("DataNotFoundError: "):]
    assert "cifar10" in tail and str(tmp_path / "no_data") in tail
    assert not any(line[:1] in "IWE" and line[1:5].isdigit() for line in tail.splitlines()), tail  # no log line after it
    assert "Traceback" not in out.stderr
    assert files_under(workdir) == []
