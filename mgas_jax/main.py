"""Entry point: flags -> validated config -> the function of `config.mode` (modes.py).

    python -m mgas_jax.main --config=configs/digits.py --workdir=/tmp/digits
    python -m mgas_jax.main --config=configs/cifar10.py --workdir=/tmp/c10 --config.train.epochs=3

Running the same command again on the same workdir resumes from its latest checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from mgas_jax import config as config_lib
from mgas_jax import checkpoint, modes, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.multihost:
        parallel.initialize_multihost()
    checkpoint.quiet_orbax_logs()
    config = FLAGS.config
    # Before any compute: a typo in a key should cost seconds, not an epoch. Validated once for the run.
    with config_lib.validated(config):
        logging.info("mode=%s workdir=%s config hash=%s", config.mode, FLAGS.workdir, config_lib.config_hash(config))
        modes.setup_compilation_cache(config, FLAGS.workdir)
        modes.setup_host_memory(config)
        modes.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
