"""Property-based fuzzing of YAML configs and key=value overrides, for every command's config.

Random mappings of known keys (top level and nested `lora.*`), unknown and misspelt keys, values of every
YAML type (wrong types, non-finite numbers, dates, huge and deeply nested values, mappings where scalars
belong), plus damaged YAML text (truncated, bad indentation, tabs, control characters, duplicate keys, merge keys) and
YAML nested thousands deep. Every input ends either in
a config whose every field has its declared type, or in ONE line that names the config file (and the line of
the key at fault, when one key is): never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import types
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.algorithms import grpo, sft
from posttrain.cli import COMMANDS
from posttrain.config import LoraConfig, UserError, config_fields, load_config
from posttrain.evaluate import Config as EvalConfig

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZED = settings(max_examples=500 if FUZZ else 80, derandomize=not FUZZ, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# every command's config, including commands added later
CONFIGS = [importlib.import_module(module).Config for module, _ in COMMANDS.values()]
assert EvalConfig in CONFIGS and sft.Config in CONFIGS

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["1e-5", "none", "null", "true", "0.8,0.2", "q_proj,v_proj", "all-linear",
                                          "2020-01-01", "~", "linear", "sigmoid", "accuracy", "-1", "1.5", "[1, 2]"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)


def keys_of(cls):
    return [f.name for f in config_fields(cls)]


@st.composite
def config_mapping(draw, cls):
    known = keys_of(cls)
    lora_keys = [f"lora.{k}" for k in keys_of(LoraConfig)] if "lora" in known else []
    names = st.one_of(st.sampled_from(known + lora_keys), st.sampled_from(["learnig_rate", "lora.rank", "zz", "lora.r.x"]),
                      st.text(min_size=1, max_size=6))
    out: dict = {}
    for key in draw(st.lists(names, max_size=6, unique=True)):
        value = draw(VALUES)
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        d[parts[-1]] = value
    return out


def _is(value, tp) -> bool:
    """Whether a loaded config value has its field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp) and all(_is(getattr(value, f.name), typing.get_type_hints(tp)[f.name])
                                             for f in dataclasses.fields(tp))
    if tp is float:  # an int is a float here as in typing (defaults such as warmup_steps: float = 0)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    if tp is list:
        return isinstance(value, list)
    return isinstance(value, tp)


def check(cls, path, overrides=()):
    try:
        cfg = load_config(cls, str(path), list(overrides))
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        return msg
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        assert _is(getattr(cfg, f.name), hints[f.name]), (f.name, getattr(cfg, f.name))
    return None


@FUZZED
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_fuzzed_yaml_mappings(tmp_path_factory, cls, data):
    values = data.draw(config_mapping(cls))
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    except yaml.YAMLError:
        return
    msg = check(cls, path)
    if msg is not None and not msg.startswith(("the model", "reward_funcs", "lora.r must")):
        # A message about a key the file has names the file and the line that key is on.
        key = re.match(r"(?:[^:]+:\d+: )?([\w.]+)", msg)
        top = {k for k in values if isinstance(k, str)}
        if key and key.group(1).split(".")[0] in top and msg.split(":")[0] == str(path):
            assert re.match(rf"{re.escape(str(path))}:\d+: ", msg), msg


@FUZZED
@given(cls=st.sampled_from(CONFIGS), data=st.data(), cut=st.floats(0, 1),
       damage=st.sampled_from(["truncate", "tab", "indent", "duplicate", "binary", "anchor"]))
def test_fuzzed_yaml_text(tmp_path_factory, cls, data, cut, damage):
    values = data.draw(config_mapping(cls))
    text = yaml.safe_dump(values or {"seed": 1}, allow_unicode=True)
    lines = text.splitlines(keepends=True)
    i = int(cut * (len(lines) - 1))
    if damage == "truncate":
        text = text[: int(cut * len(text))]
    elif damage == "tab":
        text = "".join(lines[:i] + ["\t" + lines[i]] + lines[i + 1:])
    elif damage == "indent":
        text = "".join(lines[:i] + ["   " + lines[i]] + lines[i + 1:])
    elif damage == "duplicate":
        text = text + "".join(lines[i:i + 1])
    elif damage == "binary":
        text = text[: int(cut * len(text))] + "\x00\x07\ufffe" + text[int(cut * len(text)):]
    else:
        text = "base: &b {seed: 1}\n" + text + "<<: *b\n"
    path = tmp_path_factory.mktemp("cfgt") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    msg = check(cls, path)
    if msg is not None and damage in ("tab", "binary", "duplicate") and msg.startswith(str(path)):
        assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", msg), msg


@FUZZED
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_fuzzed_overrides(tmp_path_factory, cls, data):
    """key=value on the command line: the same types, the same one-line errors."""
    path = tmp_path_factory.mktemp("cfgo") / "c.yaml"
    path.write_text("seed: 3\n")
    known = keys_of(cls) + ([f"lora.{k}" for k in keys_of(LoraConfig)] if "lora" in keys_of(cls) else [])
    key = data.draw(st.one_of(st.sampled_from(known), st.text(min_size=1, max_size=5)))
    raw = data.draw(st.one_of(st.text(max_size=10), SCALARS.map(str), st.sampled_from(["[1,", "{a: ", "]", "!!x y",
                                                                                       "a\nb", "*x"])))
    check(cls, path, [f"{key}={raw}"])
    check(cls, path, [raw])  # not key=value at all


def test_duplicate_key_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys without a word; a config that sets a key twice is a mistake."""
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-5\nseed: 1\nlearning_rate: 1.0e-3\n")
    assert check(sft.Config, path) == f"{path}:3: learning_rate: set twice (first on line 1)"
    path.write_text("lora:\n  r: 4\n  r: 8\n")
    assert check(sft.Config, path) == f"{path}:3: lora.r: set twice (first on line 2)"


def test_non_finite_numbers_and_non_string_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nlearning_rate: .inf\n")
    assert check(sft.Config, path) == f"{path}:2: learning_rate: expected a finite number, got inf"
    path.write_text("2020-01-01: 3\n")
    assert check(sft.Config, path) == f"{path}:1: 2020-01-01: unknown key for 'sft'"
    path.write_text("seed: " + "[" * 3000 + "]" * 3000 + "\n")  # (a fuzzed case costs ~1 s: tested once here)
    assert check(sft.Config, path) == f"{path}: YAML nested too deeply"
    path.write_text("reward_weights: [1, two]\n")
    assert check(grpo.Config, path) == f"{path}:1: reward_weights[1]: expected a number, got 'two'"
    path.write_text("lora:\n  target_modules: [q_proj, {a: 1}]\n")
    assert check(sft.Config, path) == f"{path}:2: lora.target_modules[1]: expected a string, got {{'a': 1}}"
    path.write_text("lora:\n  r: 4\n")
    assert check(sft.Config, path, ["lora.r.x=3"]) == "lora.r: expected an integer, got {'x': 3}"
