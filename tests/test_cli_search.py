"""What a user sees from the CLI in mode=search (configs/tiny.py), run as a subprocess: a budget below
every record is said at the end of the output with a hint that fits this search, and a corrupt
checkpoint stops the rerun with its message last and every file of the workdir as it was."""
import glob
import json
import os
import shutil

import pytest

from test_cli_train import EXIT_NOISE, cache, cli, last_lines, snapshot  # noqa: F401 (cache: a fixture)


SEARCH = ("--config.mode=search",)   # configs/tiny.py as the shared search ran it (tiny_runs.search_config)


@pytest.fixture(scope="module")
def rerun(searched, tmp_path_factory, cache):
    """The CLI rerun on a copy of the session's finished tiny search (conftest.py): it resumes the
    finished search and exports again, as a user's second run of the same command does."""
    workdir = tmp_path_factory.mktemp("cli_search") / "run"
    shutil.copytree(searched[0], workdir)
    out = cli(workdir, *SEARCH, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_a_budget_below_every_record_is_said_last_with_a_fitting_hint(rerun):
    """tiny.py's targets are 1,000 (reachable) and 10 (below any network): the run exits 0 with the
    export of 1,000, and its last line says why 10 has none and what to change; with
    search.final_size_floor already 0 the hint does not name it."""
    workdir, out = rerun
    result = json.loads((workdir / "search_result.json").read_text())
    assert "path" in result["summary"]["1000"]
    error = result["summary"]["10"]["error"]
    smallest = min(r["params"]["nonzero"] for r in result["records"])
    assert error.startswith(f"no recorded architecture has <= 10 non-zero parameters: the smallest of the "
                            f"{len(result['records'])} records has {smallest:,} (final phase ended: ")
    assert f"choose a target of at least {smallest:,}" in error
    assert result["targets"]["10"]["why"] == error  # the search's own summary gives the same reason and hint
    assert "final_size_floor" not in error
    ended = next(line for line in result["log"] if line.startswith("final phase ends: "))
    if "final_max_epochs" in ended:
        assert "raise search.final_max_epochs (now 2)" in error  # configs/tiny.py's
    assert "search a smaller super-net (now search.init_channels = 4, search.layers = 3)" in error
    assert last_lines(out.stdout, 1) == [f"export.targets 10: {error}"]
    assert error in "\n".join(last_lines(out.stderr, 2))


def test_corrupt_search_checkpoint_ends_the_output_and_changes_no_file(searched, tmp_path, cache):
    src, _ = searched
    workdir = tmp_path / "corrupt"
    shutil.copytree(src, workdir, ignore=shutil.ignore_patterns("xla_cache"))
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    # every file of the latest step cut to a third (its largest data file alone may hold no array the
    # restore of a finished search reads)
    for victim in glob.glob(str(workdir / "checkpoints" / str(max(steps)) / "**" / "*"), recursive=True):
        if os.path.isfile(victim) and os.path.getsize(victim):
            os.truncate(victim, os.path.getsize(victim) // 3)
    before = snapshot(workdir)
    out = cli(workdir, *SEARCH, cache=cache)
    assert out.returncode == 6, out.stderr[-3000:]  # main.py's status of this error
    tail = "\n".join(last_lines(out.stderr, 3))
    assert "CorruptCheckpointError" in tail and f"the checkpoint of step {max(steps)} in" in tail, out.stderr[-3000:]
    assert tail.endswith("out of the way; to start over, use another --workdir."), tail
    for noise in EXIT_NOISE:
        assert noise not in out.stderr, out.stderr[-3000:]
    assert snapshot(workdir) == before
