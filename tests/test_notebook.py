"""experiments/colab_mgas.ipynb runs top to bottom on a CPU runtime (headless, with nbclient).

The notebook reads its parameters from MGAS_NB_* environment variables, which the kernel inherits: the
tiny config, a temporary workdir and the QUICK smoke settings (one epoch per stage, one final-phase
commit, one retraining epoch). The kernel starts in experiments/ of this checkout, as when the notebook
is opened from a clone, and PYTHONPATH makes this checkout's mgas_jax importable, so nothing is
installed: the test checks what a user reads in the outputs, and that the run went through the CLI.
"""
import json
import os

import nbformat
import pytest
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


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_the_tiny_config(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("MGAS_NB_PRESET", "auto")         # on this CPU: tiny
    monkeypatch.setenv("MGAS_NB_WORKDIR", str(workdir))
    monkeypatch.setenv("MGAS_NB_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
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
    assert "mgas_jax.main" in run and "--config.mode=all" in run
    assert "compiled programs cached in" in run            # the CLI's process setup ran
    exports = sorted((workdir / "search" / "export").glob("arch_*.json"))
    assert exports, run[-3000:]
    arch = json.loads(exports[0].read_text())
    assert arch["format"] == "mgas-architecture/1" and arch["cells"]
    budgets = shown(code[4])
    assert "budget 100000: " + str(workdir / "search" / "export" / "arch_100000.json") in budgets
    assert "budget 10: no recorded architecture has <= 10 non-zero parameters" in budgets
    assert "arch_100000: test top-1 " in shown(code[5])
    last = [line for line in shown(code[-1]).splitlines() if line.strip()][-1]
    assert last.endswith(f"PNG report(s) and summary.md in {workdir / 'report'}") and int(last.split()[0]) > 0
