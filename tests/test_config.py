"""Config validation: every config file validates; each kind of mistake raises ConfigError naming the key."""
import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from mgas_jax import config as config_lib
from mgas_jax import modes
from mgas_jax.config import ConfigError, Field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def default():
    return config_lib.load_config(os.path.join(ROOT, "configs", "default.py"))


def with_value(dotted, value, config=None):
    """A copy of the default config (a plain dict round trip, so any type can be set) with key=value."""
    d = (config or default()).to_dict()
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return ml_collections.ConfigDict(d)


def assert_error(config, *fragments, device_count=1):
    with pytest.raises(ConfigError) as e:
        config_lib.validate(config, device_count=device_count)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"
    return str(e.value)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_validates(path):
    config = config_lib.load_config(path)
    config_lib.validate(config, device_count=1)
    # Every key is declared, so the file is fully covered by the schema; and it runs on 8 devices.
    config_lib.validate(config, device_count=8)


def test_config_files_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"default.py", "cifar10.py", "cifar100.py", "imagenet.py", "digits.py", "tiny.py"} <= names


def test_authors_settings():
    c10 = config_lib.load_config(os.path.join(ROOT, "configs", "cifar10.py"))
    assert (c10.train.epochs, c10.train.batch_size, c10.train.lr, c10.train.weight_decay) == (600, 96, 0.025, 3e-4)
    assert (c10.data.cutout, c10.data.crop_padding, c10.model.drop_path, c10.model.auxiliary_weight) == (16, 4, 0.2, 0.4)
    c100 = config_lib.load_config(os.path.join(ROOT, "configs", "cifar100.py"))
    assert (c100.train.batch_size, c100.train.lr, c100.train.weight_decay, c100.data.name) == (64, 0.02, 5e-4, "cifar100")
    inet = config_lib.load_config(os.path.join(ROOT, "configs", "imagenet.py"))
    assert (inet.train.epochs, inet.train.batch_size, inet.train.lr, inet.train.weight_decay) == (250, 128, 0.1, 3e-5)
    assert (inet.model.layers, inet.model.init_channels, inet.model.imagenet_stem, inet.data.image_size) == (14, 48, True, 224)
    assert inet.train.label_smoothing == 0.1 and inet.data.train_fraction == 1.0


def test_unknown_key_suggests_the_closest():
    config = default()
    config.train.batch_sise = 32
    message = assert_error(config, "train.batch_sise: unknown key", "Did you mean 'train.batch_size'?",
                           "batch_size", "eval_batch_size", "weight_decay")
    assert "section 'train'" in message


def test_unknown_section_and_top_level_key():
    config = default()
    config.optim = ml_collections.ConfigDict({"lr": 0.1})
    assert_error(config, "optim: unknown key", "the top level", "data", "model", "train")


def test_missing_key():
    d = default().to_dict()
    del d["model"]["auxiliary_weight"]
    assert_error(ml_collections.ConfigDict(d), "model.auxiliary_weight: missing key", "configs/default.py")


def test_section_where_a_value_belongs_and_back():
    assert_error(with_value("train", 3), "train = 3: must be a section", "batch_size")
    assert_error(with_value("seed", {"a": 1}), "seed: is a section", "int")


@pytest.mark.parametrize("dotted,value,fragment", [
    ("train.batch_size", 96.0, "must be of type int, not float"),
    ("train.epochs", True, "must be of type int, not bool"),          # bool is not an int here
    ("train.lr", "0.1", "must be of type float, not str"),
    ("model.auxiliary", 1, "must be of type bool, not int"),
    ("data.data_dir", 3, "must be of type str or None, not int"),
])
def test_wrong_type(dotted, value, fragment):
    assert_error(with_value(dotted, value), f"{dotted} = {value!r}: {fragment}")


def test_int_is_a_float():
    config_lib.validate(with_value("train.lr", 1), device_count=1)


@pytest.mark.parametrize("dotted,value,fragment", [
    ("train.batch_size", -8, "must be > 0"),
    ("train.epochs", 0, "must be > 0"),
    ("model.init_channels", 0, "must be > 0"),
    ("data.val_size", -1, "must be >= 0"),
    ("data.cutout", -16, "must be >= 0"),
    ("train.weight_decay", -3e-4, "must be >= 0"),
    ("train.momentum", 1.0, "must lie in [0, 1)"),
    ("model.drop_path", 1.5, "must lie in [0, 1)"),
    ("data.train_fraction", 0.0, "must lie in (0, 1]"),
    ("train.lr", float("nan"), "must be a finite number"),
    ("model.layers", 2, "must be >= 3"),   # two reductions (L//3, 2L//3) need three cells
    ("search.programs", "cells", "must be one of 'auto', 'step', 'cell', 'edge' (did you mean 'cell'?)"),
])
def test_impossible_values(dotted, value, fragment):
    assert_error(with_value(dotted, value), f"{dotted} = ", fragment)


def test_unknown_mode_and_data_set():
    assert_error(with_value("mode", "serch"), "mode = 'serch'", "'train'", "'search'", "'retrain'",
                 "'evaluate'", "'all'", "did you mean 'search'?")
    assert_error(with_value("data.name", "cifar11"), "data.name = 'cifar11'", "'digits'", "'cifar10'",
                 "'imagenet'", "'synthetic'")
    assert_error(with_value("model.dtype", "float16"), "model.dtype", "'float32', 'bfloat16'")
    assert_error(with_value("train.lr_schedule", "linear"), "train.lr_schedule", "'cosine', 'step'")


def test_mode_and_data_names_match_their_modules():
    from mgas_jax import data
    assert config_lib.DATASETS == data.ALLOWED_NAMES
    assert tuple(modes.MODES) == config_lib.MODE_NAMES == ("train", "search", "retrain", "evaluate", "all")


def test_genotype_with_unknown_op_or_name():
    assert_error(with_value("model.genotype", "DARTS_V3"), "model.genotype = 'DARTS_V3'", "DARTS_V2")
    text = ("Genotype(normal=[('sep_conv_9x9', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
    assert_error(with_value("model.genotype", text), "model.genotype", "sep_conv_9x9")
    config_lib.validate(with_value("model.genotype", text.replace("9x9", "5x5")), device_count=1)


def test_batch_not_divisible_by_devices():
    config = with_value("train.batch_size", 20)
    config_lib.validate(config, device_count=4)
    assert_error(config, "train.batch_size = 20", "divisible by the number of devices (8)", device_count=8)
    assert_error(with_value("train.eval_batch_size", 100), "train.eval_batch_size = 100", "(8)", device_count=8)


def test_lr_min_above_lr():
    assert_error(with_value("train.lr_min", 0.5), "train.lr_min = 0.5", "<= train.lr")


def test_extension_op_lists_and_targets(monkeypatch):
    """A new section is entries in SCHEMA: op lists and target sizes are checked the same way."""
    monkeypatch.setitem(config_lib.SCHEMA, "extension", {
        "ops": Field(tuple, config_lib.op_list(), "candidate ops of every edge"),
        "targets": Field(tuple, config_lib.each(config_lib.positive), "parameter budgets (M)"),
        "debug": Field(bool, None, "extra logging", semantic=False),
    })
    config = default()
    config.extension = ml_collections.ConfigDict({"ops": ("sep_conv_3x3", "skip_connect"), "targets": (0.7, 2.3),
                                               "debug": False})
    config_lib.validate(config, device_count=1)
    assert_error(with_value("extension.ops", ("sep_conv_3x3", "sep_cnv_5x5"), config),
                 "extension.ops", "unknown op 'sep_cnv_5x5'", "did you mean 'sep_conv_5x5'?", "max_pool_3x3")
    assert_error(with_value("extension.ops", ("none",), config), "extension.ops", "unknown op 'none'")
    assert_error(with_value("extension.ops", (), config), "extension.ops", "at least one op")
    assert_error(with_value("extension.ops", ("skip_connect", "skip_connect"), config), "twice")
    assert_error(with_value("extension.targets", (0.7, -1.0), config), "extension.targets", "element 1 (-1.0)", "> 0")
    assert_error(with_value("extension.targets", (0.7, 0), config), "extension.targets", "element 1 (0)")
    # A declared section the config lacks is reported, pointing at the default config.
    assert_error(default(), "extension: missing section")
    # Non-semantic keys do not enter the hash.
    flipped = with_value("extension.debug", True, config)
    assert config_lib.config_hash(flipped) == config_lib.config_hash(config)


def test_config_hash_ignores_non_semantic_keys():
    base = config_lib.config_hash(default())
    for dotted, value in [("train.progress", False), ("train.log_every_steps", 7), ("train.keep_checkpoints", 5),
                          ("mode", "search"), ("data.data_dir", "/elsewhere"), ("search.programs", "cell")]:
        assert config_lib.config_hash(with_value(dotted, value)) == base, dotted
    for dotted, value in [("train.lr", 0.1), ("seed", 1), ("model.layers", 8), ("data.cutout", 0)]:
        assert config_lib.config_hash(with_value(dotted, value)) != base, dotted


def _fields(schema, path=""):
    for key, spec in schema.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            yield from _fields(spec, dotted)
        else:
            yield dotted, spec


def test_describe_lists_every_key():
    text = config_lib.describe()
    for key in ("train.batch_size", "model.genotype", "data.autoaugment", "mode"):
        assert key in text
    lines = {line.split()[0]: line for line in text.splitlines()}
    for dotted, spec in _fields(config_lib.SCHEMA):
        assert spec.doc and spec.doc in lines[dotted], dotted
        assert f"= {spec.default!r}" in lines[dotted], dotted


@pytest.mark.slow
def test_helpconfig_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "mgas_jax.main", "--helpconfig"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == config_lib.describe().strip()


def test_config_files_load_to_their_frozen_values():
    """configs/default.py is built from the schema's defaults; every config file keeps the values it had
    when default.py spelled them out (tests/data/configs_frozen.json, taken before the move)."""
    with open(os.path.join(ROOT, "tests", "data", "configs_frozen.json")) as f:
        frozen = json.load(f)
    assert set(frozen) == {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    for name, values in frozen.items():
        config = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
        # json text, so that 1 and 1.0 differ
        assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(values, sort_keys=True), name


def test_default_config_is_the_schema_defaults():
    config = default()
    for dotted, spec in _fields(config_lib.SCHEMA):
        section, _, key = dotted.rpartition(".")
        value = config[section][key] if section else config[key]
        assert value == spec.default and type(value) is type(spec.default), dotted
    # optional keys stay typed, so that a --config.data.data_dir=<text> override parses as a str
    config.data.data_dir = "/data"
    with pytest.raises(TypeError):
        config.data.data_dir = 3


def test_main_rejects_a_bad_config_before_compute(tmp_path):
    """The CLI fails on the config alone (no workdir is created, nothing is compiled)."""
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "mgas_jax.main", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
         f"--workdir={workdir}", "--config.model.layers=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ConfigError: model.layers = 2: must be >= 3" in out.stderr
    assert not workdir.exists()
