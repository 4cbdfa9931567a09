"""Typed config loading (YAML + key=value) and the CLI's contract: errors are one line on stderr, exit 2."""

import subprocess
import sys

import pytest

from posttrain import cli
from posttrain.config import LoraConfig, SFTConfig, UserError, describe, load_config


def test_defaults_and_typed_overrides():
    cfg = load_config(SFTConfig, None, ["learning_rate=1e-3", "batch_size=4", "packing=true", "max_prompt_length=null",
                                        "lr_scheduler=cosine", "seed=7", "dataset=data/x.jsonl"])
    # "1e-3" is a string to YAML 1.1; the float field still accepts it.
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert (cfg.batch_size, cfg.packing, cfg.max_prompt_length, cfg.lr_scheduler, cfg.seed) == (4, True, None, "cosine", 7)
    assert cfg.dataset == "data/x.jsonl" and cfg.lora is None
    assert load_config(SFTConfig, None, []).learning_rate == 2e-5


def test_a_choice_that_yaml_reads_as_a_boolean(tmp_path):
    """`eval_strategy=no` (TRL's spelling): YAML 1.1 reads `no` as false, the field's choice 'no' is what is
    meant, on the command line and in a file; a boolean where no choice is spelled that way stays an error."""
    assert load_config(SFTConfig, None, ["eval_strategy=no", "save_strategy=no"]).eval_strategy == "no"
    path = tmp_path / "run.yaml"
    path.write_text("eval_strategy: no\nsave_strategy: 'no'\n")
    cfg = load_config(SFTConfig, str(path), [])
    assert (cfg.eval_strategy, cfg.save_strategy) == ("no", "no")
    with pytest.raises(UserError, match="lr_scheduler: expected a string, got True"):
        load_config(SFTConfig, None, ["lr_scheduler=yes"])


def test_nested_lora_keys():
    cfg = load_config(SFTConfig, None, ["lora.r=8", "lora.target_modules=q_proj,v_proj"])
    assert cfg.lora == LoraConfig(r=8, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=False)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.001\nbatch_size: 16\nlora:\n  r: 4\n  merge: true\n")
    cfg = load_config(SFTConfig, str(path), ["batch_size=2", "lora.r=8"])
    assert cfg.learning_rate == 0.001
    assert cfg.batch_size == 2  # key=value wins over the file
    assert cfg.lora.r == 8 and cfg.lora.merge is True  # the rest of the YAML block is kept
    assert load_config(SFTConfig, None, ["lora=true"]).lora == LoraConfig()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("learning_rate: 0.001\nlearnig_rate: 2\n", "run.yaml:2: learnig_rate: unknown key for 'sft' (did you mean 'learning_rate'?)"),
        ("lora:\n  r: 8\n  alph: 2\n", "run.yaml:3: lora.alph: unknown key for 'LoraConfig' (did you mean 'alpha'?)"),
        ("seed: 1\nbatch_size: lots\n", "run.yaml:2: batch_size: expected an integer, got 'lots'"),
        ("lr_scheduler: cosin\n", "run.yaml:1: lr_scheduler: 'cosin' is not one of linear, cosine, constant"),
        ("seed: 1\nbatch_size: [1\n", "run.yaml:3: invalid YAML"),
        ("- a\n- b\n", "run.yaml:1: the config must be a mapping of key: value"),
    ],
)
def test_yaml_errors_point_at_the_line(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, str(path), [])
    assert str(e.value).startswith(f"{tmp_path}/{expected}")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("learnin_rate=1", "learnin_rate: unknown key for 'sft' (did you mean 'learning_rate'?)"),
        ("lora.rr=2", "lora.rr: unknown key for 'LoraConfig' (did you mean 'r'?)"),
        ("learning_rate=-1", "learning_rate must be >= 0"),
        ("learning_rate=fast", "learning_rate: expected a number, got 'fast'"),
        ("max_steps=1.5", "max_steps: expected an integer, got 1.5"),
        ("max_steps=0", "max_steps must be -1 or >= 1"),
        ("packing=maybe", "packing: expected true or false, got 'maybe'"),
        ("lr_scheduler=step", "lr_scheduler: 'step' is not one of linear, cosine, constant"),
        ("warmup_ratio=1", "warmup_ratio must be in [0, 1)"),
        ("lora.r=0", "lora.r must be >= 1"),
        ("batch_size", "argument 'batch_size': expected key=value"),
    ],
)
def test_bad_values(override, expected):
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, None, [override])
    assert str(e.value) == expected


def test_describe_lists_types_defaults_and_choices():
    text = describe(SFTConfig)
    assert "  learning_rate (float, default 2e-05)\n      Peak learning rate of AdamW." in text
    assert "  max_prompt_length (int | None, default None)" in text
    assert "  lr_scheduler (str, default 'linear') (one of: linear, cosine, constant)" in text
    assert "    lora.r (int, default 16)\n        Adapter rank." in text
    assert "    lora.target_modules (list, default ['q_proj', 'k_proj', 'v_proj', 'o_proj'])" in text


# ---------------------------------------------------------------------------------------------------
# The CLI


def test_cli_help(capsys):
    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("posttrain sft: supervised fine-tuning")
    assert "  batch_size (int, default 8)\n      GLOBAL batch" in out
    assert "  packing (bool, default False)" in out
    assert cli.main([]) == 0 and "usage: posttrain <command>" in capsys.readouterr().out


def test_cli_parse_args():
    assert cli.parse_args(["sft", "--config", "a.yaml", "lr_scheduler=cosine", "--seed=7"]) == (
        "sft", "a.yaml", ["lr_scheduler=cosine", "seed=7"], False)
    assert cli.parse_args(["sft", "--config=b.yaml", "-h"]) == ("sft", "b.yaml", [], True)


def _fails(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_cli_errors_are_one_line_exit_2(capsys, monkeypatch, tmp_path):
    import posttrain.algorithms.sft as sft

    def must_not_run(cfg):
        raise AssertionError("config errors must stop before any model is loaded")

    monkeypatch.setattr(sft, "run", must_not_run)
    assert _fails(capsys, ["sft", "learnin_rate=1"]) == (
        "posttrain: error: learnin_rate: unknown key for 'sft' (did you mean 'learning_rate'?)")
    assert _fails(capsys, ["sft", "learning_rate=-0.1"]) == "posttrain: error: learning_rate must be >= 0"
    assert _fails(capsys, ["sft", "lr_scheduler=step"]) == (
        "posttrain: error: lr_scheduler: 'step' is not one of linear, cosine, constant")
    assert _fails(capsys, ["sfft"]).startswith("posttrain: error: unknown command 'sfft' (did you mean 'sft'?)")
    assert _fails(capsys, ["sft", "-x"]) == "posttrain: error: unknown option '-x' (use key=value for settings)"
    assert _fails(capsys, ["sft", "--config"]) == "posttrain: error: --config needs a file path"
    assert _fails(capsys, ["sft", "--config", str(tmp_path / "no.yaml")]).startswith(
        f"posttrain: error: {tmp_path}/no.yaml: cannot read config")
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\nlora:\n  r: 8\n  dropout: high\n")
    assert _fails(capsys, ["sft", "-c", str(path)]) == (
        f"posttrain: error: {path}:4: lora.dropout: expected a number, got 'high'")


def test_cli_multiline_messages_become_one_line(capsys, monkeypatch):
    import posttrain.algorithms.sft as sft

    def fail(cfg):
        raise UserError("model: cannot load\nsecond line")

    monkeypatch.setattr(sft, "run", fail)
    assert _fails(capsys, ["sft"]) == "posttrain: error: model: cannot load second line"


def test_cli_data_errors_in_a_real_process(tmp_path):
    """`python -m posttrain`: a bad row stops the run before the model loads (the model path does not
    even exist), with exit 2 and a single stderr line naming file:line and field."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": ""}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", f"dataset={data}", f"model={tmp_path}/no-model", "max_steps=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"posttrain: error: {data}:2: field 'completion': empty text\n"
    assert proc.stdout == ""


def test_tool_commands_parse_positionals_flags_and_settings(monkeypatch, capsys, tmp_path):
    """Non-training commands (audit, memory, report, ...): positionals, declared flags in either form,
    key=value settings in order; unknown options and wrong counts are one-line errors (exit 2)."""
    import sys
    import types

    spec = cli.ToolSpec(usage="posttrain demo DATA [key=value ...] [--json] [--budget GB]", positionals=(1, 1),
                        flags={"--json": bool, "--budget": float, "--out": str}, help="Demo tool.")
    args = cli.parse_tool_args("demo", spec, ["d.jsonl", "model=m", "--budget", "24", "--json", "lora.r=16",
                                              "--out=r.html", "--config", "c.yaml"])
    assert args.positionals == ["d.jsonl"] and args.settings == ["model=m", "lora.r=16"]
    assert args.flags == {"--json": True, "--budget": 24.0, "--out": "r.html"} and args.config_file == "c.yaml"
    assert cli.parse_tool_args("demo", spec, ["./x=y.jsonl"]).positionals == ["./x=y.jsonl"]
    assert cli.parse_tool_args("demo", spec, ["arithmetic:levels=1-2,n=300"]).positionals == ["arithmetic:levels=1-2,n=300"]
    assert cli.parse_tool_args("demo", spec, ["x"]).flags == {"--json": False, "--budget": None, "--out": None}

    seen = {}
    module = types.SimpleNamespace(TOOL=spec, main=lambda a: seen.setdefault("args", a) and 0)
    monkeypatch.setitem(sys.modules, "posttrain._demo_tool", module)
    monkeypatch.setitem(cli.TOOLS, "demo", ("posttrain._demo_tool", "a demo"))
    assert cli.main(["demo", "data.jsonl", "--json"]) == 0 and seen["args"].flags["--json"] is True
    assert cli.main(["demo", "--help"]) == 0 and "Demo tool." in capsys.readouterr().out
    for argv, msg in ((["demo", "a", "--nope"], "unknown option '--nope'"), (["demo"], "usage: posttrain demo"),
                      (["demo", "a", "b"], "usage: posttrain demo"), (["demo", "a", "--budget", "x"], "expected float"),
                      (["demo", "a", "--json=1"], "takes no value")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
