"""ImageNet retraining in the DARTS mobile setting (Liu et al. 2019, train_imagenet.py).

250 epochs, batch 128, SGD lr 0.1 momentum 0.9, wd 3e-5, clip 5, label smoothing 0.1, 224 px inputs,
the ImageNet stem (three stride-2 convs), 14 cells with C = 48, auxiliary head weight 0.4, no drop-path.
The learning rate decays like DARTS's StepLR(step_size=1, gamma=0.97): x0.97 after every epoch
(train.lr_schedule = 'step'); set lr_schedule = 'cosine' for the later DARTS-family recipes.

Augmentation differs from DARTS: data/augment.py has pad-crop, flip and Cutout but no
RandomResizedCrop or ColorJitter; the loader resizes and centre-crops to 224, and training adds flips.
Training uses the full training set (train_fraction 1.0); the MGAS search uses 10 % (search config).

    python -m mgas_jax.main --config=configs/imagenet.py --workdir=/tmp/in --config.data.data_dir=DIR
"""
import os

from mgas_jax import config as config_lib


def get_config():
    config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
    config.data.name = "imagenet"
    config.data.num_classes = 1000
    config.data.image_size = 224
    config.data.val_size = 0          # ILSVRC2012 'validation' is the test split
    config.data.train_fraction = 1.0
    config.data.crop_padding = 0      # see the docstring: no RandomResizedCrop here
    config.data.flip = True
    config.data.cutout = 0

    config.model.init_channels = 48
    config.model.layers = 14
    config.model.imagenet_stem = True
    config.model.auxiliary = True
    config.model.auxiliary_weight = 0.4
    config.model.drop_path = 0.0      # DARTS's ImageNet default

    config.train.epochs = 250
    config.train.batch_size = 128
    config.train.eval_batch_size = 256
    config.train.lr = 0.1
    config.train.lr_schedule = "step"
    config.train.lr_decay_rate = 0.97
    config.train.lr_decay_epochs = 1
    config.train.momentum = 0.9
    config.train.weight_decay = 3e-5
    config.train.grad_clip = 5.0
    config.train.label_smoothing = 0.1
    config.train.log_every_steps = 200
    return config
