"""The smallest real run, for tests: digits, 3 cells of width 4 with the auxiliary head, 2 epochs of 3 steps.

    python -m mgas_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
import os

from mgas_jax import config as config_lib


def get_config():
    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    config.data.val_size = 64
    config.model.init_channels = 4
    config.model.layers = 3           # the minimum: reductions at cells 1 and 2
    config.model.drop_path = 0.2      # exercised (ramped: 0 in epoch 0, 0.1 in epoch 1)
    config.model.auxiliary = True     # exercised: the head adapts to the 2x2 map of cell 2
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.train.batch_size = 16
    config.train.eval_batch_size = 128
    config.train.log_every_steps = 2
    config.train.progress = False

    # mode=search: 3 one-cell stages of 2 nodes, 2 steps an epoch, everything exercised once.
    config.search.val_size = 64
    config.search.init_channels = 4
    config.search.steps = 2
    config.search.batch_size = 16
    config.search.eval_batch_size = 64
    config.search.steps_per_epoch = 2
    config.search.warmup_epochs = 1
    config.search.first_commit_after = 1  # a commit at every pruning epoch
    config.search.max_stage_epochs = 2
    config.search.final_max_epochs = 2
    config.search.final_rebuild = True   # the default (digits.py turns it off); tests cover both
    config.search.progress = False
    # prune within a dozen steps: a strong penalty from the first commit, fast thresholds
    config.search.commit_every = 1
    config.search.lambda0 = 0.05
    config.search.lambda_n = 1
    config.search.threshold_lr = 5.0
    config.search.weight_threshold_lr = 0.5
    config.search.final_size_floor = 0
    # 1,000: reached by a budget commit of the final phase (an export with pruned weights to retrain);
    # 10: below any network of these cells, reported as unreachable
    config.export.targets = (1_000, 10)
    return config
