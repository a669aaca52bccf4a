"""README.md's code runs as written.

The convention (also stated in the README's "Public API" section): every block fenced as ```python is
executed, each in a fresh interpreter (so a block imports what it uses), with the repository's
mgas_jax; a line that prints and ends with `# -> TEXT` must print exactly TEXT, in the order of the
lines. Commands, shell sessions and other text are fenced as ```text or ```bash, or indented, and are
not executed. A fence with no language or another one is refused, so that a new block says which
it is. Blocks must stay tiny (seconds on a CPU): large networks go through `jax.eval_shape`.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NOT_RUN = ("text", "bash", "console", "shell", "json")
FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(path=README):
    """[(line number, language, source)] of every fenced block."""
    out, lang, start, body = [], None, 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            m = FENCE.match(line.rstrip("\n"))
            if m and lang is None:
                lang, start, body = m.group(1), number, []
            elif line.rstrip("\n") == "```" and lang is not None:
                out.append((start, lang, "".join(body)))
                lang = None
            elif lang is not None:
                body.append(line)
    assert lang is None, f"README.md: the block opened at line {start} is never closed"
    return out


def expected_output(source: str) -> list[str]:
    return [line.split("# -> ", 1)[1].rstrip() for line in source.splitlines()
            if "print(" in line and "# -> " in line]


def test_every_fence_names_its_language():
    for start, lang, _ in blocks():
        assert lang == "python" or lang in NOT_RUN, (
            f"README.md line {start}: fence it as ```python (executed by this test) or as one of {NOT_RUN}")


PYTHON = [pytest.param(source, id=f"line{start}") for start, lang, source in blocks() if lang == "python"]


def test_there_are_python_blocks():
    assert len(PYTHON) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("source", PYTHON)
def test_python_block_runs_and_prints_what_it_says(source, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, f"the block fails:\n{source}\n{out.stderr[-3000:]}"
    printed = [line.rstrip() for line in out.stdout.splitlines()]
    assert printed == expected_output(source), out.stdout


def test_links_point_inside_the_repository():
    """A clone has only the repository: every relative link of the README exists in it, and no file
    names the method description by its old path outside the repository (it is docs/method.md)."""
    old_name = "mgas-" + "method.md"
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert "../shared" not in text.replace("../shared/bench", "")  # the benchmark yardstick lives beside it
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), f"README.md links {target}, not in the repository"
    assert os.path.exists(os.path.join(ROOT, "docs", "method.md"))
    for dirpath, _, files in os.walk(ROOT):
        if any(part.startswith(".") for part in os.path.relpath(dirpath, ROOT).split(os.sep)):
            continue
        for name in files:
            if name.endswith((".py", ".md", ".ipynb")) and name != "method.md":
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    assert old_name not in f.read(), f"{os.path.join(dirpath, name)} names {old_name}"
