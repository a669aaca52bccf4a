"""A quick real run on sklearn's 8x8 digits (offline, 1797 images): DARTS_V2, 5 cells, C = 8.

Trains to a test accuracy far above chance in a few minutes on a laptop CPU:

    python -m mgas_jax.main --config=configs/digits.py --workdir=/tmp/digits

Digits are not mirror-symmetric, so no flips; an 8x8 image takes a 1-pixel pad-crop at most.
The auxiliary head is off: after two reductions the feature map is 2x2, where DARTS's head
(which network.py adapts to small maps) would hold ten times the parameters of the network itself.
"""
import os

from mgas_jax import config as config_lib


def get_config():
    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
    config.data.name = "digits"
    config.data.num_classes = 10
    config.data.image_size = 8
    config.data.val_size = 200        # of the 1438 training images; the test split has 359
    config.data.crop_padding = 1
    config.data.flip = False
    config.data.cutout = 0

    config.model.init_channels = 8
    config.model.layers = 5           # reductions at cells 1 and 3
    config.model.genotype = "DARTS_V2"
    config.model.auxiliary = False
    config.model.drop_path = 0.1

    config.train.epochs = 15
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.lr = 0.05
    config.train.weight_decay = 3e-4
    config.train.log_every_steps = 20

    # mode=search: a small super-net (3 cells of 3 nodes, C = 8) and a fast pruning schedule, so that
    # all three stages, both regrowths and the final phase run in minutes on a 2-core CPU. Digits are
    # easy: the cross-entropy soon nears 0 and the adaptive lambda (capped relative to it) stays small,
    # so the thresholds learn faster here than in the authors' CIFAR schedule.
    config.search.val_size = 200
    config.search.autoaugment = False  # AutoAugment's CIFAR policy is not meant for 8x8 digits
    config.search.init_channels = 8
    config.search.layers = 3
    config.search.steps = 3
    config.search.batch_size = 64
    config.search.eval_batch_size = 200
    config.search.steps_per_epoch = 10  # 640 of the 1238 search images an epoch
    config.search.lr = 0.05
    config.search.threshold_lr = 1.0
    config.search.weight_threshold_lr = 0.01
    config.search.warmup_epochs = 1
    config.search.first_commit_after = 2  # the released code's 3-then-2, at this schedule's pace of one
    config.search.commit_every = 1         # commit per epoch: the first one epoch later than the rest
    config.search.lambda0 = 1e-3       # the search is short: start the penalty where it already bites
    config.search.lambda_n = 2         # ~2-4 ops per round is the intended pace on 3 small cells
    config.search.stage_size_ratio = 0.5
    config.search.max_stage_epochs = 4
    config.search.final_max_epochs = 20  # the phase ends earlier, once every target has its record
    # Commits of the final phase switch masks instead of rebuilding the network: at 8x8 a step costs
    # milliseconds and each new structure a minute of compiling; the records are the same networks.
    config.search.final_rebuild = False
    config.search.final_size_floor = 0
    config.search.keep_checkpoints = 2
    config.export.targets = (60_000, 55_000, 20_000)  # the final phase starts near 90k-110k (seeds 0-2)
    return config
