"""mgas_jax: MGAS multi-granularity differentiable architecture search in JAX / Flax.

The public names, loaded on first use (so `import mgas_jax.gates` stays as light as plain JAX, and
no data-pipeline dependency such as TFDS is imported with the package):

- `gates`: the discretization functions of the three granularities (plain JAX; docs/method.md section 2).
- `prune`: MGAS's filter- and weight-level search on any Flax Linen or NNX model's params pytree (spec by
  path pattern, gates, R_thr, the optimizer groups, commits, physical channel removal).
- `Genotype`, `parse_genotype(text)`, `get_genotype(name_or_text)`: DARTS-family genotypes, parsed safely
  from their published text or looked up in `genotype.GENOTYPES` (DARTS_V1, DARTS_V2, PC_DARTS, PDARTS).
- `CellSpec`, `OpSpec`: the cell description shared by the search, export and retraining (per-op
  channel counts included).
- `NetworkSpec`, `Network`, `build_network(...)`: the evaluation network built from cells or a genotype.
- `count_params(params, masks=None)`, `count_flops(spec, input_shape, masks=None)`: dense and non-zero
  parameter counts, multiply-adds.

Example:

    import mgas_jax
    net = mgas_jax.build_network("DARTS_V2", init_channels=36, layers=20, num_classes=10, auxiliary=True)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Genotype": "mgas_jax.genotype",
    "parse_genotype": "mgas_jax.genotype",
    "get_genotype": "mgas_jax.genotype",
    "CellSpec": "mgas_jax.genotype",
    "OpSpec": "mgas_jax.genotype",
    "Network": "mgas_jax.network",
    "NetworkSpec": "mgas_jax.network",
    "build_network": "mgas_jax.network",
    "count_params": "mgas_jax.network",
    "count_flops": "mgas_jax.network",
}

_MODULES = ("gates", "prune")

__all__ = [*_MODULES, *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from mgas_jax import gates, prune
    from mgas_jax.genotype import CellSpec, Genotype, OpSpec, get_genotype, parse_genotype
    from mgas_jax.network import Network, NetworkSpec, build_network, count_flops, count_params


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"mgas_jax.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mgas_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
