"""Which malloc serves the host: jemalloc, preloaded by re-executing the run, for training on the CPU.

    library = host_allocator.preload_for(config.host_allocator, mode=config.mode, on_cpu=True, keep_freed=True)
    if library:
        host_allocator.reexec(library)       # the same command, with LD_PRELOAD=library; does not return
    host_allocator.describe()                # 'jemalloc 5.3.0 (/usr/lib/.../libjemalloc.so.2)' or ''

Why (benchmarks/README.md sections 15 and 16): XLA CPU takes a program's buffers as one aligned block
(posix_memalign). glibc 2.36 serves an aligned request by carving a larger chunk, so once the block is
freed into a bin instead of into the heap's free top (anything allocated during the step above it
does that), no later request of the same size can reuse it. A long retraining on the CPU with kept
memory (modes.keep_freed_host_memory) then comes to hold a second copy of its step's buffers: 13.1 GB
instead of 7.4 at C 36, batch 96, and slower steps. jemalloc serves such a block from an extent of its
own size, whatever lies around it; set to keep its freed pages (JEMALLOC_CONF) and to give back
what compiling freed (release_after_compiles), it reuses the step's pages every step without page
faults: 7.3 GB, against the PyTorch reference's 8.6-8.7 GB. A process's malloc
cannot change once it runs, so `mgas_jax.main` re-executes itself with LD_PRELOAD when
config.host_allocator asks for jemalloc. 'auto' asks for it on the CPU for the modes that train a
network ('train', 'retrain', 'all'), where the retraining's hundreds of epochs are the time. Not for
the search alone: under jemalloc its step was as fast but held 3.7 GB against glibc's 2.7.

jemalloc is a system library (Debian/Ubuntu: `apt install libjemalloc2`; conda: `conda install
jemalloc`), not a Python dependency: where it is absent, 'auto' keeps the C library's malloc.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import sysconfig
from typing import Callable, NoReturn, Optional, Sequence

import jax
from absl import logging

from mgas_jax.config import ConfigError

# Keep freed memory: no decay of dirty or muzzy pages back to the system, and large blocks from the
# arenas (whose freed extents are reused) rather than from a dedicated arena for oversized blocks.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set in the re-executed process: the library it was started to preload. A process that has it does not
# re-execute again, even where the preload did not take (describe() then names the malloc it got).
PRELOADED = "MGAS_JAX_PRELOADED"
AUTO_MODES = ("train", "retrain", "all")
LIBRARY_NAMES = ("libjemalloc.so.2", "libjemalloc.so")


def search_dirs() -> list[str]:
    """Where find_jemalloc looks: this Python's environment (a conda env's lib/), then the system's."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"), "/usr/local/lib",
            f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib"]
    return list(dict.fromkeys(dirs))


def find_jemalloc(dirs: Optional[Sequence[str]] = None) -> Optional[str]:
    """The path of a jemalloc shared library in `dirs` (default search_dirs()), or None."""
    for directory in search_dirs() if dirs is None else dirs:
        for name in LIBRARY_NAMES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def preload_for(setting: str, *, mode: str, on_cpu: bool, keep_freed: bool,
                find: Callable[[], Optional[str]] = find_jemalloc) -> Optional[str]:
    """The library a run should be re-executed with (LD_PRELOAD), or None to keep the process's malloc.

    `setting` is config.host_allocator: 'system' never preloads; 'auto' preloads jemalloc where it is
    found, on Linux, for a run on the CPU (`on_cpu`) of a mode that trains (AUTO_MODES), with freed
    memory kept (`keep_freed`, config.keep_freed_host_memory; off asks for the system's behaviour);
    'jemalloc' always preloads it and a path preloads that file. Raises ConfigError when 'jemalloc' is
    not found or the path is not a file.
    """
    if setting == "system":
        return None
    if setting == "auto":
        wanted = keep_freed and on_cpu and mode in AUTO_MODES and sys.platform.startswith("linux")
        return find() if wanted else None
    if setting == "jemalloc":
        path = find()
        if path is None:
            raise ConfigError(
                f"host_allocator = 'jemalloc': no {' or '.join(LIBRARY_NAMES)} in {', '.join(search_dirs())}; "
                f"install it (Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc), pass "
                f"its path as host_allocator, or use 'auto' (jemalloc where found) or 'system'")
        return path
    if not os.path.isfile(setting):
        raise ConfigError(f"host_allocator = {setting!r}: no such file; pass the path of a libjemalloc "
                          f"shared library, or 'auto', 'system' or 'jemalloc' (found in {', '.join(search_dirs())})")
    return os.path.abspath(setting)


def preloaded_env(library: str, env: Optional[dict] = None) -> dict:
    """`env` (default os.environ) with `library` first in LD_PRELOAD, JEMALLOC_CONF before any
    MALLOC_CONF of the user's (later options win, so theirs still do), and the PRELOADED marker."""
    env = dict(os.environ if env is None else env)
    others = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and p != library]
    env["LD_PRELOAD"] = ":".join([library] + others)
    env["MALLOC_CONF"] = ",".join(c for c in (JEMALLOC_CONF, env.get("MALLOC_CONF", "")) if c)
    env[PRELOADED] = library
    return env


def reexec(library: str, argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Replaces this process with the same command (`argv`, default sys.orig_argv: the interpreter's
    own options and `-m mgas_jax.main` included) run by the same interpreter under preloaded_env(library)."""
    argv = list(sys.orig_argv if argv is None else argv)
    logging.info("host malloc: re-executing with LD_PRELOAD=%s (config.host_allocator='system' keeps the "
                 "C library's malloc)", library)
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], preloaded_env(library))


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> Optional[str]:
    """The file of the shared library whose `malloc` this process calls (glibc's libc.so.6, or a
    preloaded allocator's), or None where that cannot be told (no dladdr, a static malloc)."""
    process, dladdr = ctypes.CDLL(None), None
    for where in (process, "libdl.so.2"):   # dladdr is in the C library from glibc 2.34, in libdl before
        try:
            dladdr = (where if isinstance(where, ctypes.CDLL) else ctypes.CDLL(where)).dladdr
            break
        except (OSError, AttributeError):
            continue
    if dladdr is None:
        return None
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    info = _DlInfo()
    if not dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _mallctl(name: bytes, old=None, old_size=None) -> int:
    """jemalloc's mallctl(name, oldp, oldlenp, NULL, 0): reads `name` into `old` (or just acts on it);
    0 on success. Only where jemalloc serves malloc (it is then in the process's global symbols)."""
    mallctl = ctypes.CDLL(None).mallctl
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return mallctl(name, old, old_size, None, 0)


def jemalloc_version() -> Optional[str]:
    """The version of the jemalloc serving this process's malloc, or None when malloc is another's."""
    library = malloc_library()
    if library is None or "jemalloc" not in os.path.basename(library):
        return None
    version, size = ctypes.c_char_p(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_char_p))
    if _mallctl(b"version", ctypes.byref(version), ctypes.byref(size)) != 0 or not version.value:
        return "unknown version"
    return version.value.decode().split("-", 1)[0]


def describe() -> str:
    """'jemalloc <version> (<library>)' when jemalloc serves this process's malloc, else ''."""
    version = jemalloc_version()
    return f"jemalloc {version} ({malloc_library()})" if version else ""


def release_freed() -> bool:
    """Returns the freed pages that jemalloc keeps (JEMALLOC_CONF) to the system; True where it did
    (jemalloc serves malloc), False elsewhere (glibc's kept memory is left alone)."""
    if jemalloc_version() is None:
        return False
    # "arena.<i>.purge" with i = MALLCTL_ARENAS_ALL (4096): the unused dirty and muzzy pages of every arena
    return _mallctl(b"arena.4096.purge") == 0


# JAX records this event when XLA has compiled a program (or loaded it from the persistent cache),
# before the program first runs.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_released_after_compiles = []   # the listener, once registered: [min_seconds]


def release_after_compiles(min_seconds: float = 1.0) -> bool:
    """From now on, release_freed() after every XLA compilation of at least `min_seconds`, before the
    program runs; True where registered (jemalloc serves malloc; once per process), else False.

    Why: kept memory holds everything freed so far, the compiler's working memory too, and jemalloc
    cannot put those scattered pages together into a step's one large block, so they would stay
    resident beside it. Released before the program's first run, they leave: the retraining step at
    C 36, batch 96 then holds 7.3 GB instead of 8.5 (benchmarks/README.md section 16). A release
    costs a fraction of a second, once per program compiled, and the next run of a program whose
    freed buffers it released maps them afresh once.
    """
    if _released_after_compiles:
        return True
    if jemalloc_version() is None:
        return False

    def listener(event: str, seconds: float, **_) -> None:
        if event == COMPILE_EVENT and seconds >= min_seconds:
            release_freed()

    jax.monitoring.register_event_duration_secs_listener(listener)
    _released_after_compiles.append(min_seconds)
    return True
