"""experiments/colab_mgas.ipynb runs top to bottom on a CPU runtime (headless, with nbclient).

The notebook reads its parameters from MGAS_NB_* environment variables, which the kernel inherits: the
tiny config, a temporary workdir and the QUICK smoke settings (one epoch per stage, one final-phase
commit, one retraining epoch). The kernel starts in experiments/ of this checkout, as when the notebook
is opened from a clone, and PYTHONPATH makes this checkout's mgas_jax importable, so nothing is
installed: the test checks what a user reads in the outputs, and that the run went through the CLI.
"""
import json
import os
import shutil

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_mgas.ipynb")


def test_notebook_is_valid_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must hold the parameters"
    assert all(not c.get("outputs") for c in code), "commit the notebook without outputs"
    source = "\n".join(c.source for c in code)
    # one place names the source; no placeholder repository; the pipeline runs through the CLI
    assert source.count("MGAS_NB_SOURCE") == 1 and "YOUR-ORG" not in source
    assert '"-m", "mgas_jax.main"' in source and "search.search(" not in source
    # a working preinstalled jax is pinned, never replaced
    assert 'f"jax=={kept[0]}", f"jaxlib=={kept[1]}"' in source


def test_notebook_runs_on_cpu_with_the_tiny_config(searched, tiny_all, compilation_cache_dir, tmp_path, monkeypatch):
    """The notebook on a CPU runtime with PRESET 'auto' (tiny) and mode=all through the CLI. Its workdir
    holds a copy of the session's finished tiny search (conftest.py), which the run resumes and exports
    again, and its extra flags are the short retraining of `tiny_all`, whose compiled programs it loads
    from the session's cache: what runs is the notebook's own path (install, the CLI, retraining,
    evaluation, report, every display cell), not the search a second time."""
    workdir = tmp_path / "run"
    shutil.copytree(searched[0], workdir / "search")
    short = ("--config.train.epochs=1 --config.train.steps_per_epoch=2 --config.evaluate.throughput_batch_size=16 "
             "--config.evaluate.throughput_warmup=1 --config.evaluate.throughput_steps=2")  # tiny_runs.short_config
    monkeypatch.setenv("MGAS_NB_PRESET", "auto")         # on this CPU: tiny
    monkeypatch.setenv("MGAS_NB_WORKDIR", str(workdir))
    monkeypatch.setenv("MGAS_NB_FLAGS", short)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache_dir)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=2400, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "experiments")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    def shown(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    install, run = shown(code[1]), shown(code[2])
    assert f"mgas_jax from: {ROOT}" in install
    assert "runtime: cpu; keeping jax" in install and "pip" not in install
    assert "config: tiny on cpu" in run
    assert "mgas_jax.main" in run and "--config.mode=all" in run and "--config.train.epochs=1" in run
    assert "resumed the search at epoch" in run and "stage 1:" not in run   # the copied search, not a new one
    assert "compiled programs cached in" in run            # the CLI's process setup ran
    exports = sorted((workdir / "search" / "export").glob("arch_*.json"))
    assert exports, run[-3000:]
    arch = json.loads(exports[0].read_text())
    assert arch["format"] == "mgas-architecture/1" and arch["cells"]
    budgets = shown(code[4])
    assert "budget 1000: " + str(workdir / "search" / "export" / "arch_1000.json") in budgets
    assert "budget 10: no recorded architecture has <= 10 non-zero parameters" in budgets
    assert "arch_1000: test top-1 " in shown(code[5])
    last = [line for line in shown(code[-1]).splitlines() if line.strip()][-1]
    assert last.endswith(f"PNG report(s) and summary.md in {workdir / 'report'}") and int(last.split()[0]) > 0


def test_quick_flags_are_overrides_the_config_accepts():
    """QUICK's smoke settings (a cell's flag list, not run above): each names a config key, and the tiny
    config with all of them set passes validation."""
    import ast
    import re

    from mgas_jax import config as config_lib

    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and "if QUICK:" in c.source)
    quick = re.findall(r'"--config\.([\w.]+)=([^"]+)"', source.split("if QUICK:")[1].split("flags += EXTRA")[0])
    assert len(quick) >= 5, quick
    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    for name, text in quick:
        spec = config_lib.field(name)
        value = text if spec.type is str else ast.literal_eval(text)
        section, key = name.split(".")
        config[section][key] = value
    config_lib.validate(config)
    assert config.search.final_max_epochs == 1 and config.train.epochs == 1
