"""Prunes a plain Flax Linen CNN on digits to a non-zero parameter budget: MGAS's learned filter and
weight thresholds (`mgas_jax.prune`) next to the same model magnitude-pruned to the same budget.

    PYTHONPATH=. python experiments/prune_flax_cnn.py --budget 1500

Both arms train the same CNN (conv16-BN-ReLU, conv32-BN-ReLU, global average pool, dense 10) for
`--epochs` epochs on scikit-learn's bundled 8x8 digits, reach `--budget` non-zero parameters, and are
fine-tuned for `--finetune` epochs with their weight masks held fixed; the test split is scored once,
at the end. MGAS: one loss CE + lam * R_thr, the thresholds learned, lam steered by MGAS's schedule
(`pruning.lambda_update`, raised while a commit removes too little of the way to the budget, lowered
when it removes too much), commits every 2 epochs, then `prune.fill_budget` commits the weights
nearest their threshold until the budget is met exactly, and `prune.remove` returns the smaller model.
Magnitude: dense training, then each kernel keeps its largest weights, one ratio for all kernels
(`baselines.uniform_keep_counts`, `baselines.magnitude_masks`). jaxpruner, the library this is the
yardstick for, does not run here: it is not on the package index this machine reaches, and its
source (google-research/jaxpruner HEAD) fails on JAX 0.10 (`jax.tree_map` is gone).
"""
import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mgas_jax import baselines, data, prune
from mgas_jax.pruning import LambdaState, lambda_update


# ------------------------------------------------------------------------------- user code (MGAS)
class CNN(nn.Module):
    widths: tuple = (16, 32)

    @nn.compact
    def __call__(self, x, train=False):
        for w in self.widths:
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(w, (3, 3))(x)))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def batches(x, y, epoch, size=64):
    order = np.random.default_rng(epoch).permutation(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y) - size + 1, size)]


def mgas_prune(xs, ys, budget, epochs):
    model = CNN()
    v = model.init(jax.random.key(0), xs[:1])
    forward = lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x)
    spec = prune.make_spec(v["params"], forward, xs[:1], extra=v["batch_stats"])
    trainable, stats = {"params": v["params"], "gates": prune.init_gates(spec)}, v["batch_stats"]
    masks, tx = prune.init_masks(spec), prune.optimizer()
    opt = tx.init(trainable)

    @jax.jit
    def step(trainable, opt, stats, masks, x, y, lam):
        def loss(t):
            p = prune.apply_gates(spec, t["params"], t["gates"], masks)
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            reg = lam * prune.threshold_penalty(spec, t["gates"], masks)
            return ce + reg, (new["batch_stats"], ce, reg)
        (_, (stats, ce, reg)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, stats, ce, reg

    size = lambda m: prune.nonzero_params(spec, trainable["params"], trainable["gates"], m)
    start = last = size(masks)
    n = (start - budget) / (3 * (epochs // 2))  # MGAS's "units per commit" aim: the way to go in equal rounds
    lam = LambdaState(0.0, 1e-3)
    for epoch in range(epochs):
        ces, regs = [], []
        for x, y in batches(xs, ys, epoch):
            trainable, opt, stats, ce, reg = step(trainable, opt, stats, masks, x, y, lam.lam)
            ces.append(ce), regs.append(reg)
        if epoch % 2 == 1 and last > budget:  # commit every 2nd epoch until the budget is reached
            masks = prune.commit(spec, trainable["params"], trainable["gates"], masks)
            now = size(masks)
            lam = lambda_update(lam, last - now, lambda0=1e-3, c0=2.0, n=n, mean_ce=float(np.mean(ces)),
                                mean_reg=float(np.mean(regs)))
            print(f"  epoch {epoch + 1}: non-zero {now}, lambda {lam.lam:.3g}, {prune.unit_counts(spec, masks)}")
            last = now
    reached = last
    masks = prune.fill_budget(spec, trainable["params"], trainable["gates"], masks, budget)
    small = prune.remove(spec, trainable["params"], trainable["gates"], masks, stats)
    widths = (small.widths["Conv_0/kernel"], small.widths["Conv_1/kernel"])
    return CNN(widths), small.params, small.extra, small.weight_masks, reached
# ------------------------------------------------------------------------------- end of user code


def masked_training(model, params, stats, weight_masks, xs, ys, epochs, seed0=1000):
    """SGD (the authors' weight optimizer) with the kernels held at their masks, in the forward pass
    and after every update, so pruned weights stay exactly zero."""
    tx = prune.optimizer()
    trainable = {"params": params}
    opt = tx.init(trainable)

    mask = lambda p: prune.mask_params(p, weight_masks)

    @jax.jit
    def step(trainable, opt, stats, x, y):
        def loss(t):
            logits, new = model.apply({"params": mask(t["params"]), "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]
        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return {"params": mask(optax.apply_updates(trainable, updates)["params"])}, opt, stats

    for epoch in range(epochs):
        for x, y in batches(xs, ys, seed0 + epoch):
            trainable, opt, stats = step(trainable, opt, stats, x, y)
    return trainable["params"], stats


def accuracy(model, params, stats, x, y) -> float:
    logits = model.apply({"params": params, "batch_stats": stats}, x)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def magnitude_prune(xs, ys, budget, epochs):
    """Dense training, then one keep ratio for every kernel (its largest weights); also returns the
    dense model (params, stats) as a reference."""
    model = CNN()
    v = model.init(jax.random.key(0), xs[:1])
    params, stats = masked_training(model, v["params"], v["batch_stats"], {}, xs, ys, epochs, seed0=0)
    paths, leaves = prune.leaf_paths(params), jax.tree.leaves(params)
    kernels = [p for p, leaf in zip(paths, leaves) if p.endswith("kernel")]
    fixed = sum(np.count_nonzero(np.asarray(leaf)) for p, leaf in zip(paths, leaves) if p not in kernels)
    sizes = [int(np.size(leaf)) for p, leaf in zip(paths, leaves) if p in kernels]
    counts = baselines.uniform_keep_counts(sizes, budget - fixed)
    masks = baselines.magnitude_masks(jax.device_get(params), [tuple(k.split("/")) for k in kernels], counts)
    return model, params, stats, masks, (params, stats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=1500, help="non-zero parameters to reach")
    ap.add_argument("--epochs", type=int, default=20, help="search (MGAS) or dense (magnitude) epochs")
    ap.add_argument("--finetune", type=int, default=10, help="epochs with the masks fixed, both arms")
    args = ap.parse_args()
    ds = data.load(ml_collections.ConfigDict(dict(name="digits", data_dir=None, val_size=0, train_fraction=1.0)))
    train, test = (s.read(np.arange(s.num_examples)) for s in (ds.train, ds.test))
    xs, ys = train["image"].astype(np.float32) / 255.0, train["label"]
    xt, yt = test["image"].astype(np.float32) / 255.0, test["label"]
    dense = sum(np.size(x) for x in jax.tree.leaves(CNN().init(jax.random.key(0), xs[:1])["params"]))
    print(f"digits: {len(ys)} train / {len(yt)} test images; CNN (16, 32): {dense} parameters; budget {args.budget}")

    t0 = time.time()
    model, params, stats, wmasks, reached = mgas_prune(xs, ys, args.budget, args.epochs)
    params, stats = masked_training(model, params, stats, wmasks, xs, ys, args.finetune)
    ours = (prune.count_nonzero(params), accuracy(model, params, stats, xt, yt), model.widths, reached, time.time() - t0)

    t0 = time.time()
    model, params, stats, masks, (dense_params, dense_stats) = magnitude_prune(xs, ys, args.budget, args.epochs)
    dense_acc = accuracy(model, dense_params, dense_stats, xt, yt)
    params, stats = masked_training(model, params, stats, masks, xs, ys, args.finetune)
    base = (prune.count_nonzero(params), accuracy(model, params, stats, xt, yt), model.widths, None, time.time() - t0)

    print(f"\n| method | budget | non-zero params | test accuracy | conv widths | time |")
    print(f"|---|---|---|---|---|---|")
    for name, (nz, acc, widths, r, secs) in (("MGAS gates (prune)", ours), ("magnitude, uniform ratio", base)):
        note = f" (thresholds alone: {r})" if r is not None else ""
        print(f"| {name} | {args.budget} | {nz}{note} | {acc:.4f} | {widths} | {secs:.0f} s |")
    print(f"| dense reference ({args.epochs} epochs, not pruned) | - | {dense} | {dense_acc:.4f} | (16, 32) | - |")


if __name__ == "__main__":
    main()
