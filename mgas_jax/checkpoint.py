"""Orbax checkpoints of a training state, with a JSON of metadata, and the same-run check.

A checkpoint at step `s` (the trainer uses the number of finished epochs) holds two items:

- `state`: the state pytree (a flax.struct.dataclass such as train.TrainState), packed into one flat
  array per dtype (`pack`) and saved with `ocp.args.StandardSave`; a super-net state has thousands of
  small leaves, and orbax writes each leaf as an array of its own (about 10 s for the digits
  super-net's 2,700 leaves on the 2-core CPU, 0.06 s packed: benchmarks/README.md section 11).
  Typed PRNG keys are stored as their raw `key_data` and rewrapped on restore, so any state with a
  `jax.random.key` field round-trips;
- `layout`: the path, shape and dtype of every leaf, which the restore checks against the state it
  restores into;
- `meta`: a small JSON dict, e.g. {'epoch': 3, 'step': 1200, 'config_hash': '...', 'config': {...}}.

Resuming is only correct when the checkpoint was written by the same experiment. `check_same_run`
compares the stored config hash with the current one and raises `ConfigMismatchError` naming both
workdir contents and the differing keys.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def quiet_orbax_logs() -> None:
    """Drops orbax's INFO lines (a dozen per save) from the absl log; its warnings and errors stay."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or "orbax" not in record.pathname

    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Filter) for f in logger.filters):
            logger.addFilter(_Filter())


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of a different config."""


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back (truncated, edited, written by other code)."""


class Preempted(SystemExit):
    """Raised after a SIGTERM or Ctrl-C once the run has checkpointed where it stood (exit status: the message)."""


class StopSignals:
    """A context in which SIGTERM (what TPU VMs and schedulers send before preemption) and SIGINT
    (Ctrl-C) only set a flag.

    The training or search loop polls `requested` between steps, checkpoints the exact position and
    raises `Preempted`: nothing is cut off mid-write (orbax commits atomically) and the next run resumes
    at the following step. A second Ctrl-C raises KeyboardInterrupt at once, for a user who would
    rather lose the steps since the last checkpoint than wait for the current step. Outside the main
    thread no handler can be installed; the loop's regular checkpoints still hold.
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: Optional[str] = None   # the name of the first signal received, e.g. 'SIGTERM'
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        del frame
        from absl import logging
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal == name:
            raise KeyboardInterrupt(f"a second {name}: stopped without checkpointing")
        logging.warning("%s received: checkpointing at the next step%s", name,
                        " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self.signal = self.signal or name

    def __enter__(self) -> "StopSignals":
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc) -> bool:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False


def _reason(error: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of `error`: orbax wraps tensorstore's precise error
    ('Requested byte range ... is not valid for value of size ...') in generic ones, and appends
    pages of array specs to them."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _corrupt(directory: str, step: int, error: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"the checkpoint of step {step} in {directory} cannot be read ({_reason(error)}). "
        f"Nothing was changed. To resume from the previous checkpoint, move {os.path.join(directory, str(step))} "
        f"out of the way; to start over, use another --workdir.")


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (what orbax stores)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_to_keys(restored: Any, like: Any) -> Any:
    """Rewraps the leaves that are typed keys in `like` (same structure as `restored`)."""
    return jax.tree.map(lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if _is_key(x) else r,
                        restored, like)


def _leaf_layout(tree: Any) -> list:
    """[(path, shape, dtype name)] of the leaves of `tree` (keys as their key data), in leaf order."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(x):
            x = jax.random.key_data(x)
        out.append([jax.tree_util.keystr(path), [int(d) for d in x.shape], np.dtype(x.dtype).name])
    return out


def _host(x) -> np.ndarray:
    """A leaf's value on this host (a replicated array's local copy on every process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def _replicated_like(tree: Any):
    """The replicated sharding of the mesh the tree's first jax.Array lives on (None: no jax.Array)."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if sharding is not None:
            return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))
    return None


def _put(host: np.ndarray, sharding) -> Any:
    """host data as a jax.Array with `sharding` (built from every process's own copy), or as it is."""
    if sharding is None:
        return host
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def pack(tree: Any) -> dict:
    """{dtype name: 1-D array} holding every leaf of `tree`, raveled in leaf order (see the module doc).
    On a mesh the arrays are replicated over it, as the leaves are."""
    groups: dict = {}
    for x in jax.tree.leaves(keys_to_data(tree)):
        host = _host(x)
        groups.setdefault(host.dtype.name, []).append(host.ravel())
    sharding = _replicated_like(tree)
    return {name: _put(np.concatenate(parts), sharding) for name, parts in groups.items()}


def unpack(packed: dict, like: Any) -> Any:
    """The tree of `like`'s structure whose leaves are cut from `packed` (inverse of `pack`), each with
    the sharding of its leaf in `like`; typed PRNG keys are rewrapped."""
    flat = {name: _host(a) for name, a in packed.items()}
    start = {name: 0 for name in flat}
    leaves, treedef = jax.tree.flatten(like)
    out = []
    for x in leaves:
        data = jax.random.key_data(x) if _is_key(x) else x
        name, size = np.dtype(data.dtype).name, int(np.prod(data.shape))
        host = flat[name][start[name]:start[name] + size].reshape(data.shape)
        start[name] += size
        out.append(_put(host, getattr(x, "sharding", None)))
    return data_to_keys(jax.tree.unflatten(treedef, out), like)


class Checkpointer:
    """An orbax CheckpointManager over `directory` keeping the latest `max_to_keep` steps.

    Args:
      directory: created if missing (absolute path; orbax needs one).
      max_to_keep: older checkpoints are deleted after each save.
    """

    def __init__(self, directory: str, *, max_to_keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves (asynchronously; `wait`/`close` block until written)."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(pack(state)),
                                                         layout=ocp.args.JsonSave(dict(leaves=_leaf_layout(state))),
                                                         meta=ocp.args.JsonSave(meta)))

    def meta(self, step: Optional[int] = None) -> dict:
        """The metadata dict of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for damaged files
            raise _corrupt(self.directory, step, e) from e
        if not isinstance(meta, dict):
            raise _corrupt(self.directory, step, TypeError(f"metadata is {type(meta).__name__}, not a dict"))
        return dict(meta)

    def restore(self, step: int, like: Any) -> Any:
        """The state of `step`, with the structure, dtypes and shardings of `like`."""
        expected = _leaf_layout(like)
        try:
            layout = self._manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore())).layout
        except Exception as e:  # orbax raises many types for damaged files
            raise _corrupt(self.directory, step, e) from e
        if not isinstance(layout, dict) or layout.get("leaves") != expected:
            stored = layout.get("leaves") if isinstance(layout, dict) else None
            where = next((f"{a[0]}: stored {a[1:]} vs expected {b[1:]}" for a, b in zip(stored or [], expected)
                          if a != b), f"{len(stored or [])} leaves stored vs {len(expected)} expected")
            raise _corrupt(self.directory, step, ValueError(f"its layout is not the state's ({where})"))
        sizes: dict = {}
        for _, shape, dtype in expected:
            sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape))
        sharding = _replicated_like(like)
        target = {name: jax.ShapeDtypeStruct((n,), np.dtype(name), sharding=sharding) for name, n in sizes.items()}
        try:
            packed = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target))).state
        except Exception as e:  # orbax raises many types for damaged or mismatched files
            raise _corrupt(self.directory, step, e) from e
        return unpack(packed, like)

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the writes in flight and stops orbax's threads (again: a no-op)."""
        if self._manager is None:
            return
        self._manager.wait_until_finished()
        self._manager.close()
        self._manager = None


def diff_dicts(old: dict, new: dict, path: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs (nested dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{path}.{key}" if path else key
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_dicts(a, b, dotted))
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def check_same_run(meta: dict, config_hash: str, config: dict, workdir: str) -> None:
    """Raises ConfigMismatchError when checkpoint metadata `meta` belongs to another config.

    Args:
      meta: the stored metadata, with 'config_hash' and 'config'.
      config_hash, config: the current run's hash and semantic config dict (config.semantic_dict).
      workdir: named in the message.
    """
    if meta.get("config_hash") == config_hash:
        return
    changes = diff_dicts(meta.get("config", {}), config)
    detail = "; ".join(changes[:20]) + ("; ..." if len(changes) > 20 else "") if changes else "no key differs"
    raise ConfigMismatchError(
        f"workdir {workdir!r} holds checkpoints (epoch {meta.get('epoch')}) of a different config: "
        f"stored hash {meta.get('config_hash')} vs this run's {config_hash} (stored -> now: {detail}). "
        f"Use another --workdir to start this config, or delete {workdir!r} to discard the old run; "
        f"to resume the old run, run it with its original config.")
