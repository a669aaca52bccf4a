"""Session-wide test settings.

XLA's CPU backend spends most of a tiny run optimising code (threefry PRNG, many small fusions);
tests need correct numbers, not fast kernels, so they compile with backend optimisation off. A
persistent compilation cache lets later runs of the same structure (a resumed search, a rerun)
load their programs from disk instead of compiling again. Both must be set before JAX starts.
"""
import os
import tempfile

_flag = "--xla_backend_optimization_level=0"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

_cache = tempfile.mkdtemp(prefix="mgas_jax_test_cache_")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
