"""Nothing posttrain reads can run code: weights from user paths are safetensors only, posttrain's own checkpoint
files are read with torch.load(weights_only=True) (rollout batches are tensors + JSON), and model code in a
model folder runs only with trust_remote_code."""

import json
import os
import pickle

import pytest
import torch

from posttrain import cli
from posttrain.algorithms.sft import SFT
from posttrain.config import UserError
from posttrain.engine import Engine
from posttrain.models import load_model, load_tokenizer
from posttrain.testing import tiny_model, tiny_tokenizer


class Boom:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_model_folder(folder):
    """A model folder whose weights are a pickle (pytorch_model.bin), as older tools wrote them."""
    model = tiny_model(tiny_tokenizer())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_model_weights_are_refused_and_never_unpickled(tmp_path):
    folder = pickled_model_folder(tmp_path / "model")
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:  # the pickle a hostile folder would hold
        pickle.dump({"x": Boom(marker)}, f)
    assert not any(folder.glob("*.safetensors"))
    with pytest.raises(UserError, match=r"model: only pickled weights \(pytorch_model.bin\); posttrain reads "
                                        r"safetensors only\. Convert once"):
        load_model(str(folder))
    with pytest.raises(UserError, match="only pickled weights"):
        load_model(str(folder), head="score")
    from posttrain.rollout.rewards import RewardModelReward

    with pytest.raises(UserError, match="only pickled weights"):
        RewardModelReward(str(folder))
    assert not marker.exists()


def test_pickled_adapter_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir,
                                                            "peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Boom(marker)}, f)
    with pytest.raises(UserError, match=r"adapter: only pickled weights \(adapter_model.bin\)"):
        load_model(str(folder))
    assert not marker.exists()


def test_model_code_in_a_folder_runs_only_with_trust_remote_code(tmp_path, tiny_model_dir):
    """A folder whose config maps the auto classes to its own code: without trust_remote_code that code is
    never imported (transformers' own Llama class is used)."""
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "pwned"
    (folder / "custom_code.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaForCausalLM as "
                                           "Custom, LlamaConfig as CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = load_model(str(folder))
        assert type(model).__name__ == "LlamaForCausalLM"
    except UserError as e:  # refusing is as good as ignoring it
        assert "trust_remote_code" in str(e) or "custom" in str(e)
    load_tokenizer(str(folder))
    assert not marker.exists()


def test_checkpoint_files_are_read_with_weights_only(tmp_path, tokenizer):
    """A checkpoint file replaced by a pickle that would run code is refused in one line, unexecuted."""
    from test_engine import config, examples

    cfg = config(tmp_path, max_steps=2, save_steps=1)
    Engine(cfg, tiny_model(tokenizer), tokenizer, SFT(cfg, tokenizer.pad_token_id), examples(tokenizer)).train()
    ckpt = tmp_path / "checkpoint-1"
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        original = (ckpt / name).read_bytes()
        torch.save({"state": Boom(marker)}, ckpt / name)
        resumed = config(tmp_path, max_steps=2, resume_from_checkpoint=str(ckpt))
        with pytest.raises(UserError, match=rf"^{ckpt / name}: not a checkpoint file posttrain can read"):
            Engine(resumed, tiny_model(tokenizer), tokenizer, SFT(resumed, tokenizer.pad_token_id),
                   examples(tokenizer)).train()
        assert not marker.exists(), name
        (ckpt / name).write_bytes(original)


def test_reference_cache_is_read_with_weights_only():
    import inspect

    from posttrain import reference

    src = inspect.getsource(reference)
    assert "weights_only=True" in src and "weights_only=False" not in src
    import posttrain.engine as engine

    assert "weights_only=False" not in inspect.getsource(engine)


def test_trust_remote_code_is_off_unless_set():
    import importlib

    from posttrain.cli import COMMANDS

    for module, _ in COMMANDS.values():  # every command, including those added later
        assert importlib.import_module(module).Config().trust_remote_code is False, module


def test_cli_refuses_a_pickled_model_folder(tmp_path, capsys):
    folder = pickled_model_folder(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert cli.main(["sft", f"model={folder}", f"dataset={data}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"posttrain: error: {folder}: only pickled weights (pytorch_model.bin)")
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
