"""Entry point: flags -> config -> modes.run (the function of `config.mode`).

    python -m mgas_jax.main --config=configs/digits.py --workdir=/tmp/digits
    python -m mgas_jax.main --config=configs/cifar10.py --workdir=/tmp/c10 --config.train.epochs=3

Running the same command again on the same workdir resumes from its latest checkpoint.
`python -m mgas_jax.main --helpconfig` lists every config key with its type, default and doc.

An error you can act on ends the run with its message alone (add --traceback to see where it was
raised) and an exit status of its own; any other error shows its traceback (status 1):

    0  done
    3  ConfigError             the config: an unknown key (with the closest one), a wrong type or value,
                               a missing config file; nothing was run
    4  ConfigMismatchError     the workdir holds checkpoints of another config
    5  DataNotFoundError       the data set is not prepared where data.data_dir says
    6  CorruptCheckpointError  a checkpoint cannot be read back
    7  ExportError             an exported architecture that does not fit its network or the data
    8  Preempted               SIGTERM: the run checkpointed where it stood; run the same command again
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from absl import app, flags
from ml_collections import config_flags

from mgas_jax import checkpoint, export, modes, parallel
from mgas_jax import config as config_lib
from mgas_jax import data as data_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per host).")
flags.DEFINE_bool("traceback", False, "Show the traceback of the errors that otherwise end the run with their "
                                      "message alone.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CODES = {
    config_lib.ConfigError: 3,
    checkpoint.ConfigMismatchError: 4,
    data_lib.DataNotFoundError: 5,
    checkpoint.CorruptCheckpointError: 6,
    export.ExportError: 7,
    checkpoint.Preempted: 8,
}


def exit_code(error: BaseException) -> Optional[int]:
    """The exit status of an error that ends the run with its message alone (None for the others)."""
    for kind in type(error).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind]
    return None


def _stop(error: BaseException) -> None:
    message = f"{type(error).__name__}: {error}\n"
    if isinstance(error, checkpoint.Preempted):
        print(message, end="", file=sys.stderr, flush=True)
        sys.exit(exit_code(error))   # a normal exit: nothing may cut short what the stop just saved
    # The message must stay the last thing printed. orbax's and tensorstore's background threads and
    # event loops, shut down under them, can print tracebacks ("Event loop is closed", "sys.meta_path is
    # None") at any moment from here to the end of the process, even while the message is written. So
    # the message goes to a copy of the console's stderr, the process's own stdout and stderr go to
    # /dev/null first, and the process ends without the interpreter's teardown. These errors stop the
    # run before it writes anything, so skipping that teardown loses nothing.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    console = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.write(console, message.encode("utf-8", "replace"))
    os._exit(exit_code(error))


def _flag_value(argv, name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def missing_config_file(argv) -> Optional[config_lib.ConfigError]:
    """A ConfigError naming the --config file when it does not exist (ml_collections would raise an
    OSError at the first use of the config, with its traceback)."""
    value = _flag_value(argv, "config")
    path = None if value is None else value.split(":", 1)[0]  # config_flags passes what follows ':' on
    if path is None or os.path.isfile(path):
        return None
    return config_lib.ConfigError(
        f"--config={value}: no such config file ({os.path.abspath(path)}); pass a Python file with "
        f"get_config(), e.g. --config=configs/digits.py (configs/ holds the provided ones)")


def config_flag_problem(argv, error: BaseException) -> Optional[config_lib.ConfigError]:
    """The ConfigError behind a failure to parse the command line, or None when it is not the config's.

    The flag parser of ml_collections reports an unknown override key and an unreadable value in its
    own terms (AttributeError, IllegalFlagValueError); this names the dotted key, with the fix.
    """
    overrides = [a[len("--config."):].split("=", 1) for a in argv if a.startswith("--config.")]
    for name, *_ in overrides:
        try:
            config_lib.field(name)
        except config_lib.ConfigError as e:
            return e
    if isinstance(error, flags.IllegalFlagValueError):
        for name, *text in overrides:
            if f"--config.{name}=" in str(error):
                cause = error.__cause__ or error
                spec = config_lib.field(name)
                return config_lib.ConfigError(
                    f"{name} = {text[0] if text else ''!r}: cannot be read as "
                    f"{config_lib.type_name(spec.type)} ({cause}); {spec.doc}")
    return None


def parse_flags(argv):
    """absl's flag parsing, with the config's mistakes reported as a ConfigError (exit status 3)."""
    if "--helpconfig" in argv:  # before the parser, which requires --config and --workdir
        print(config_lib.describe())
        sys.exit(0)
    problem = missing_config_file(argv)
    if problem is None:
        try:
            return FLAGS(argv)
        except Exception as e:  # the parser raises many kinds; only the config's become a ConfigError
            problem = config_flag_problem(argv, e)
            if problem is None:
                raise
            if "--traceback" in argv:
                raise problem from e
    if "--traceback" in argv:
        raise problem
    _stop(problem)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = FLAGS.config
        # First of all, as it runs this command again with another malloc (jemalloc, for a CPU
        # retraining; modes.preload_allocator). Then malloc's settings: its arena limit only holds for
        # threads that have not allocated yet, and starting JAX's backend (which validation does, to
        # count devices) starts XLA's threads.
        modes.preload_allocator(config)
        modes.setup_host_memory(config)
        if FLAGS.multihost:
            parallel.initialize_multihost()
        checkpoint.quiet_orbax_logs()
        # Before any compute: a typo in a key should cost seconds, not an epoch. Validated once for the run.
        with config_lib.validated(config):
            modes.setup_compilation_cache(config, FLAGS.workdir)
            modes.run(config, FLAGS.workdir)
    except tuple(EXIT_CODES) as e:
        if FLAGS.traceback:
            raise
        _stop(e)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
