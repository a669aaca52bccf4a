"""Where a run's files lie: the layout of a workdir, in one place (standard library only).

    workdir/search/                     mode=search (run by mode=all here): checkpoints/, records/,
                                        metrics.jsonl, search_result.json, export/arch_<target>.{json,npz}
    workdir/retrain/<name>/             one retraining per architecture: architecture.{json,npz} (a copy
                                        of the export), checkpoints/, config.json, metrics.jsonl, results.json
    workdir/retrain_result.json         {name: results} of the retrained architectures
    workdir/evaluation.json             mode=evaluate
    workdir/all_result.json             mode=all's summary
    workdir/report/                     reports.write_reports

A mode=train workdir holds checkpoints/, config.json, metrics.jsonl and results.json at its top level.
The functions take the run's top-level workdir (the one given with --workdir) unless said otherwise.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

SEARCH = "search"
RETRAIN = "retrain"
EXPORT = "export"
REPORT = "report"
CHECKPOINTS = "checkpoints"

ARCH_JSON = "architecture.json"   # the copy of the export inside each retraining directory
ARCH_NPZ = "architecture.npz"
RUN_CONFIG = "config.json"        # the config a training run was started with (train.py)
RESULTS = "results.json"          # a training run's test results (train.py, retrain.py)
METRICS = "metrics.jsonl"
SEARCH_RESULT = "search_result.json"
RETRAIN_RESULT = "retrain_result.json"
EVALUATION = "evaluation.json"
ALL_RESULT = "all_result.json"


def search_dir(workdir: str) -> str:
    """The search of mode=all (mode=search writes the same files into its own --workdir)."""
    return os.path.join(workdir, SEARCH)


def export_dir(workdir: str) -> str:
    """Where the search of mode=all exports its architectures."""
    return os.path.join(search_dir(workdir), EXPORT)


def retrain_dir(workdir: str, name: Optional[str] = None) -> str:
    """workdir/retrain, or the retraining directory of architecture `name` in it."""
    base = os.path.join(workdir, RETRAIN)
    return base if name is None else os.path.join(base, name)


def report_dir(workdir: str) -> str:
    return os.path.join(workdir, REPORT)


def target_of(path: str) -> int:
    """The target of an `arch_<target>.json` path (-1 for other names)."""
    m = re.search(r"arch_(\d+)\.json$", path)
    return int(m.group(1)) if m else -1


def architecture_name(path: str) -> str:
    """The retraining directory name of an architecture: its file name without .json."""
    return os.path.splitext(os.path.basename(path))[0]


def exports(workdir: str) -> list[str]:
    """Every arch_*.json in workdir/search/export, largest target first."""
    return sorted(glob.glob(os.path.join(export_dir(workdir), "arch_*.json")), key=lambda p: (-target_of(p), p))


def retrained(workdir: str) -> list[str]:
    """The architecture copies of every retraining (workdir/retrain/<name>/architecture.json), by name."""
    return sorted(glob.glob(os.path.join(retrain_dir(workdir), "*", ARCH_JSON)))


def architectures(workdir: str) -> dict[str, str]:
    """{name: JSON path}: the retrained architectures, then the exports that have no retraining."""
    out = {os.path.basename(os.path.dirname(p)): p for p in retrained(workdir)}
    for path in sorted(exports(workdir)):
        out.setdefault(architecture_name(path), path)
    return out


def resolve_architecture(name_or_path: str, workdir: str) -> str:
    """The JSON path of `config.export.architecture`.

    Accepted: a path (absolute or relative to the current directory), or a name in
    workdir/search/export with or without `.json` ("arch_700000", "arch_700000.json").
    Raises FileNotFoundError naming the places looked at and the exports there are.
    """
    candidates = [name_or_path, os.path.join(export_dir(workdir), name_or_path)]
    if not name_or_path.endswith(".json"):
        candidates.append(os.path.join(export_dir(workdir), name_or_path + ".json"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    found = [os.path.basename(p) for p in sorted(exports(workdir))]
    raise FileNotFoundError(
        f"export.architecture = {name_or_path!r}: no such file (looked at {', '.join(candidates)}). "
        f"Exports in {export_dir(workdir)}: {', '.join(found) if found else 'none (run mode=search there first)'}")


def architecture_paths(workdir: str, architecture: Optional[str] = None) -> list[str]:
    """`architecture` (config.export.architecture) resolved, or every export of the workdir's search."""
    if architecture:
        return [resolve_architecture(architecture, workdir)]
    paths = exports(workdir)
    if not paths:
        raise FileNotFoundError(
            f"no exported architecture in {export_dir(workdir)}: run mode=search with --workdir={workdir}/search "
            f"(or mode=all with --workdir={workdir}), or name one with --config.export.architecture=<path.json>")
    return [os.path.abspath(p) for p in paths]
