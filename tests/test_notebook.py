"""experiments/colab_mgas.ipynb runs top to bottom on a CPU runtime (headless, with nbclient).

The notebook reads its parameters from MGAS_NB_* environment variables, which the kernel inherits: the
tiny config, a temporary workdir and the QUICK smoke settings (one epoch per stage, one final-phase
commit, one retraining epoch), so the run compiles as few structures as the pipeline allows.
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


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_the_tiny_config(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setenv("MGAS_NB_PRESET", "tiny")
    monkeypatch.setenv("MGAS_NB_WORKDIR", str(workdir))
    monkeypatch.setenv("MGAS_NB_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel starts in experiments/, as when the notebook is opened from a clone
    client = NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "experiments")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                        if o.get("output_type") == "stream")
    assert "config: tiny" in outputs and "cpu device" in outputs
    exports = sorted((workdir / "search" / "export").glob("arch_*.json"))
    assert exports, f"the search exported nothing:\n{outputs[-3000:]}"
    arch = json.loads(exports[0].read_text())
    assert arch["format"] == "mgas-architecture/1" and arch["cells"]
    assert (workdir / "search" / "search_result.json").exists()
    assert (workdir / "retrain_result.json").exists()
    assert "PNG report(s)" in outputs
