"""CIFAR-100 retraining (docs/method.md section 6): the CIFAR-10 recipe with batch 64, lr 0.02, wd 5e-4.

    python -m mgas_jax.main --config=configs/cifar100.py --workdir=/tmp/c100 --config.data.data_dir=DIR
"""
import os

from mgas_jax import config as config_lib


def get_config():
    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py"))
    config.data.name = "cifar100"
    config.data.num_classes = 100
    config.train.batch_size = 64
    config.train.lr = 0.02
    config.train.weight_decay = 5e-4
    return config
