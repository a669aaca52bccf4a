"""Default config: retraining a fixed cell on CIFAR-10 with the authors' settings.

docs/method.md section 6: 600 epochs, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, wd 3e-4,
clip 5, crop (pad 4) + flip + Cutout 16, drop-path 0.2 ramped linearly, auxiliary weight 0.4,
pools followed by BN. Every other config starts from this one and overrides what differs.
Every key is declared (type, allowed values, doc) in mgas_jax/config.py; `validate` rejects the rest.

    python -m mgas_jax.main --config=configs/default.py --workdir=/tmp/run --config.train.epochs=3
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # 'train': train model.genotype from scratch and test it (train.py). 'search', 'retrain',
    # 'evaluate', 'all' are the MGAS modes (mgas_jax/modes.py).
    config.mode = "train"
    # Seeds the parameters, the data order (a pure function of (seed, epoch)), augmentation and
    # drop-path (keys fold_in(key(seed), step)); a resumed run therefore repeats the same numbers.
    config.seed = 0
    # Compiled XLA programs are kept on disk, so a resumed or repeated run of the same structure loads
    # them instead of compiling again (a full super-net step compiles for minutes on a CPU). '' =
    # JAX_COMPILATION_CACHE_DIR when set, else <workdir>/xla_cache; 'off' = no cache. Runs of the same
    # network (study seeds, reruns) can share one directory.
    config.compilation_cache_dir = ""
    # On Linux (glibc), malloc keeps freed memory for reuse instead of unmapping it: XLA's CPU backend
    # allocates every program's buffers afresh, and fresh pages cost a page fault each (a search step
    # on the CPU runs ~1.3x faster; benchmarks/README.md section 8). The process keeps its peak RSS.
    config.keep_freed_host_memory = True

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"          # digits | cifar10 | cifar100 | imagenet | synthetic
    # Where TFDS array_record data sets are prepared; None = the TFDS default (~/tensorflow_datasets).
    data.data_dir = config_dict.placeholder(str)
    # Training examples held out for validation. 0 for retraining: like DARTS and MGAS, train on all
    # 50k and report the test split. The search holds out a validation split (section 4).
    data.val_size = 0
    data.train_fraction = 1.0      # share of the (remaining) training split used, class-balanced
    # digits only: 0 = the fixed stratified 80/20 test split; k >= 2 = a stratified k-fold split of all
    # 1797 images whose fold `fold` is the test split and the other k-1 folds the training split
    # (validation is held out of those). `fold_repeat` seeds the assignment: repetition r of the k-fold
    # split tests every image once (experiments/digits_study.py runs folds x repetitions x seeds).
    data.folds = 0
    data.fold = 0
    data.fold_repeat = 0
    data.image_size = 32           # model input side; used by imagenet (resize) and synthetic
    data.num_classes = 10          # classes of 'synthetic'; the other data sets know their own
    data.synthetic_size = 1024     # examples per split of 'synthetic'
    data.crop_padding = 4          # zero-pad 4 then random 32x32 crop (0 = no crop)
    data.flip = True               # random horizontal flip
    data.cutout = 16               # Cutout square side (0 = off)
    data.autoaugment = False       # AutoAugment CIFAR policy: used while searching, not retraining

    config.model = model = ml_collections.ConfigDict()
    model.init_channels = 36       # C of the first cells (DARTS CIFAR evaluation: 36)
    model.layers = 20              # cells L; reduction cells at L//3 and 2L//3 (so L >= 3)
    model.stem_multiplier = 3      # stem conv: 3 -> stem_multiplier * C channels
    model.genotype = "DARTS_V2"    # a name of genotype.GENOTYPES or a DARTS "Genotype(...)" string
    model.auxiliary = True         # DARTS auxiliary head after cell 2L//3 (training only)
    model.auxiliary_weight = 0.4   # loss = CE + auxiliary_weight * CE(aux)
    model.drop_path = 0.2          # drop-path rate at the last epoch: rate * epoch / epochs (not on identity)
    model.pool_bn = True           # BatchNorm after the pooling ops (retraining network, section 6)
    model.imagenet_stem = False    # the DARTS ImageNet stem (3 stride-2 convs) for 224 px inputs
    model.dtype = "float32"        # compute dtype: float32 | bfloat16 (parameters stay float32)

    config.train = train = ml_collections.ConfigDict()
    train.epochs = 600
    train.batch_size = 96          # GLOBAL batch, split over all devices (must divide evenly)
    train.eval_batch_size = 256    # GLOBAL evaluation batch; the last batch is padded, not dropped
    train.steps_per_epoch = 0      # 0 = the full epoch; > 0 caps it (quick runs and tests)
    train.lr = 0.025               # initial SGD learning rate
    # 'cosine': lr -> lr_min over all steps (CIFAR, section 6); 'step': lr * lr_decay_rate every
    # lr_decay_epochs epochs (DARTS ImageNet: 0.97 every epoch).
    train.lr_schedule = "cosine"
    train.lr_min = 0.0
    train.lr_decay_rate = 0.97
    train.lr_decay_epochs = 1
    train.momentum = 0.9
    train.nesterov = False
    train.weight_decay = 3e-4      # added to the gradient (PyTorch SGD style), after clipping
    train.grad_clip = 5.0          # global gradient-norm clip (0 = off)
    train.label_smoothing = 0.0
    train.eval_every_epochs = 1    # validation every N epochs, when data.val_size > 0 (0 = never)
    train.keep_checkpoints = 2     # orbax keeps the latest N checkpoints (one per epoch)
    train.log_every_steps = 50     # training metrics (averaged since the last line) every N steps
    train.progress = True          # tqdm bar per epoch on process 0
    # A non-finite loss or gradient: "stop" (name the step and the last good checkpoint) or "rollback"
    # (restore the last checkpoint, multiply the learning rate by rollback_lr_factor, go on).
    train.nan_policy = "stop"
    train.rollback_lr_factor = 0.5
    train.max_rollbacks = 3

    # ---- MGAS search (mode=search; docs/method.md sections 1-5) -----------------------------------
    config.search = search = ml_collections.ConfigDict()
    # The search reads config.data with these three overrides (retraining uses data.* as they are):
    search.val_size = 5000         # held out of the training split; final-phase records report it
    search.train_fraction = 1.0    # ImageNet: 0.1 (a class-balanced 10 % subset)
    search.autoaugment = True      # AutoAugment CIFAR policy while searching (section 4)
    search.init_channels = 24      # C of the super-net (the authors searched at the evaluation size:
    search.layers = 8              #   small = 8 cells, C = 24; large = 14 cells, C = 44)
    search.steps = 4               # intermediate nodes per cell (14 edges)
    search.stem_multiplier = 3     # stem: 3 -> 3 C channels
    search.batch_size = 96         # GLOBAL batch
    search.eval_batch_size = 256   # GLOBAL batch of the validation passes at final-phase commits
    search.steps_per_epoch = 0     # 0 = full epochs; > 0 caps them (quick runs, tests)
    search.lr = 0.01               # network weights: SGD, constant learning rate (section 4)
    search.momentum = 0.9          # every group
    search.weight_decay = 3e-4     # network weights only
    search.grad_clip = 5.0         # global norm over the network weights only (0 = off)
    search.alpha_lr = 1.0          # op scores
    search.beta_lr = 1.0           # filter scores
    search.threshold_lr = 0.1      # t_op, t_k, preprocess thresholds
    search.weight_threshold_lr = 0.001  # t_w
    search.lambda0 = 1e-5          # adaptive lambda (GOLD-NAS style, section 3): first increment
    search.lambda_c0 = 2.0         #   growth / shrink factor
    search.lambda_n = 12           #   n: > 4n ops pruned in a round -> back off, < 2n -> push harder
    search.lambda_cap = 100.0      #   upper bound of lambda
    search.warmup_epochs = 5       # weight-only epochs at the start of each stage and of the final phase
    search.commit_every = 2        # epochs between commits of the live masks
    search.stage_size_ratio = 0.3  # a stage ends when its size proxy < ratio x its size at the start
    search.max_stage_epochs = 100  # safety cap on the pruning epochs of a stage
    search.final_size_floor = 100_000  # the final phase ends below this size proxy ...
    search.final_max_epochs = 200  # ... or after this many epochs, or when no op can be pruned
    search.regrow_fraction = 0.2   # after stages 2 and 3: regrow floor(0.2 x ops pruned in the stage)
    search.bilevel = False         # first-order bilevel variant: arch steps on the validation split
    search.filter_level = True     # search filters (False: op-level only, a DARTS-like baseline)
    search.weight_level = True     # search individual weights
    search.eval_records = True     # validation accuracy of every final-phase record
    search.impl = "auto"           # depthwise conv: auto (shift on CPU, lax elsewhere) | lax | shift
    search.remat = False           # rematerialise cells (edges) in the backward pass (less memory, more
                                   # compute; on a CPU about a third of the memory for the same step time)
    search.dtype = "float32"       # compute dtype: float32 | bfloat16 (parameters stay float32)
    search.programs = "edge"       # the step as a chain of per-edge programs: edges of the same structure and
                                   # shapes share one, and a structure change compiles only new edges |
                                   # "cell": per-cell programs | "step": one program (benchmarks/README.md 7, 8)
    search.keep_checkpoints = 3    # checkpoints are written at the end of every epoch
    search.progress = True         # tqdm bar per epoch
    search.nan_policy = "stop"     # or "rollback": last checkpoint, every group's lr x rollback_lr_factor
    search.rollback_lr_factor = 0.5
    search.max_rollbacks = 3

    # ---- Export (what mode=search writes, what mode=retrain reads) --------------------------------
    config.export = export = ml_collections.ConfigDict()
    # Parameter budgets (non-zero parameters of the derived network, auxiliary head excluded): for
    # each, the first final-phase architecture at or below it is exported to workdir/export/.
    export.targets = (700_000, 500_000, 300_000)
    # mode=retrain / evaluate: the exported architecture to use (None: every export found in
    # workdir/search/export, each retrained in workdir/retrain/<name>).
    export.architecture = config_dict.placeholder(str)

    # ---- Evaluation (mode=evaluate; mgas_jax/evaluation.py) ---------------------------------------
    config.evaluate = evaluate = ml_collections.ConfigDict()
    # Throughput = images/s of the jit-compiled forward pass (inference mode), timed after warm-up.
    evaluate.throughput_batch_size = 256   # GLOBAL batch of the timed forward passes
    evaluate.throughput_warmup = 3         # untimed passes first (the first one compiles)
    evaluate.throughput_steps = 20         # timed passes (0 = skip the measurement)

    return config
