"""Process setup of the run modes: the host allocator."""
import subprocess
import sys
import textwrap

import pytest

# Allocates, fills and frees a 64 MiB buffer five times; prints the minor page faults that took.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from mgas_jax import modes
    kept = modes.keep_freed_host_memory() if sys.argv[1] == "keep" else False
    def use():
        a = np.empty(64 << 20, np.uint8)
        a.fill(1)
    use()   # the first use maps new pages either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        use()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options are Linux-only")
def test_kept_host_memory_is_reused_without_page_faults():
    """With keep_freed_host_memory, a freed 64 MiB block is reused as it is: refilling it maps no
    new pages; with glibc's defaults each refill maps the block afresh."""
    assert _faults("keep")[0] == "True"
    kept, system = _faults("keep")[1], _faults("system")[1]
    assert system >= 20 and kept <= system // 20, (kept, system)
