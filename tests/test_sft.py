"""SFT end to end: through the CLI on a tiny model folder, packing equivalence, real GSM8K rows."""

import json

import pytest
import torch
from conftest import SHARED_DATA, needs_shared_data
from transformers import AutoModelForCausalLM

from posttrain import cli
from posttrain.algorithms.sft import SFT, Config, run
from posttrain.data.tokenize import encode_sft_row
from posttrain.engine import Engine
from posttrain.testing import tiny_model
from posttrain.testing import assert_close_to_scale

ROWS = [
    {"prompt": "What is 12 + 7?", "completion": " The answer is 19."},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"prompt": "Human: How do I bake bread?", "completion": " Mix flour, water, salt and yeast, then bake."},
    {"prompt": "What is 7 * 3?", "completion": " 21"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_sft_loss_falls(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    out = tmp_path / "run"
    rc = cli.main(["sft", f"model={tiny_model_dir}", f"dataset={data}", f"eval_dataset={data}", "max_steps=10",
                   "learning_rate=1e-3", "batch_size=4", "micro_batch_size=2", f"output_dir={out}", "progress=false"])
    assert rc == 0
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    # A random tiny model starts near ln(320) = 5.77 nats per token; 10 Adam steps at 1e-3 on 4 repeated
    # examples take it down by a few tenths (measured: 5.78 -> 5.47).
    assert train[0]["loss"] == pytest.approx(5.77, abs=0.05)
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    assert rows[-1]["step"] == 10 and rows[-1]["eval/loss"] < train[0]["loss"] - 0.2
    saved = (out / "config.yaml").read_text()
    assert "learning_rate: 0.001" in saved and "max_steps: 10" in saved
    AutoModelForCausalLM.from_pretrained(out)  # the final model is a plain transformers folder


def test_cli_conversations_and_skip_invalid(tmp_path, tiny_model_dir, caplog):
    good = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    bad = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "robot", "content": "4"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, bad, good, bad, good])
    out = tmp_path / "run"
    args = ["sft", f"model={tiny_model_dir}", f"dataset={data}", "max_steps=2", "batch_size=2",
            f"output_dir={out}", "progress=false"]
    assert cli.main(args) == 2  # the robot turn stops the run...
    with caplog.at_level("WARNING", logger="posttrain"):
        assert cli.main(args + ["skip_invalid=true"]) == 0  # ...unless skipped, and then it is reported
    assert f"{data}: skipped 2 row(s): field 'messages[1]': unknown role 'robot'" in caplog.text
    assert len(metrics(out)) == 2


def _examples(tok):
    return [encode_sft_row(tok, r, max_length=64, max_prompt_length=None, completion_only=True, assistant_only=True)
            for r in ROWS * 2]


def _cfg(tmp_path, **kw):
    return Config(**{**dict(output_dir=str(tmp_path), max_steps=2, batch_size=8, micro_batch_size=2,
                            learning_rate=1e-3, max_grad_norm=0.0, progress=False, max_length=64, seed=0), **kw})


def test_packing_gives_the_same_loss_and_gradients(tmp_path, tokenizer):
    """Packed rows (positions restart, block-diagonal mask) hold the same tokens as the padded batch and
    the loss is normalised by the same global token count, so loss and gradients agree to float error."""
    exs = _examples(tokenizer)
    results = {}
    for packing in (False, True):
        cfg = _cfg(tmp_path, packing=packing)
        model = tiny_model(tokenizer, seed=3)
        algo = SFT(cfg, tokenizer.pad_token_id)
        mbs = algo.prepare(model, exs)
        total = sum(algo.num_items(mb) for mb in mbs)
        loss = sum(algo.loss(model, mb, total)[0] for mb in mbs)
        loss.backward()
        results[packing] = (len(mbs), total, sum(algo.num_tokens(mb) for mb in mbs), float(loss.detach()),
                            {n: p.grad for n, p in model.named_parameters()})
    n_mb, total, tokens, loss, grads = results[False]
    n_mb_p, total_p, tokens_p, loss_p, grads_p = results[True]
    # 8 examples in micro-batches of 2 rows: 4 unpacked; packed into 64-token rows they need fewer.
    assert n_mb == 4 and n_mb_p < n_mb
    assert total_p == total == sum(sum(e.mask) for e in exs)
    assert tokens_p == tokens == sum(len(e) for e in exs)
    assert loss_p == pytest.approx(loss, abs=1e-5)
    for name in grads:
        assert_close_to_scale(grads_p[name], grads[name], name=name)


def test_packing_run_matches_unpacked_run(tmp_path, tokenizer):
    exs = _examples(tokenizer)
    finals = {}
    for packing in (False, True):
        model = tiny_model(tokenizer, seed=3)
        out = tmp_path / str(packing)
        Engine(_cfg(out, packing=packing), model, tokenizer, SFT(_cfg(out, packing=packing), 0), exs).train()
        finals[packing] = ([r["loss"] for r in metrics(out)], dict(model.named_parameters()))
    assert finals[True][0] == pytest.approx(finals[False][0], abs=1e-5)
    for name, p in finals[False][1].items():
        assert torch.allclose(finals[True][1][name], p, atol=1e-5), name


@needs_shared_data
def test_sft_on_gsm8k_rows(tmp_path, tiny_model_dir):
    """../shared/data/gsm8k_train.jsonl rows are {prompt, answer, solution}: SFT trains on prompt ->
    solution. 4 rows cut to 256 tokens (prompt end <= 128), 6 steps of 2 (3 epochs) at lr 3e-3: the loss
    on these rows falls."""
    cfg = Config(model=tiny_model_dir, dataset=str(SHARED_DATA / "gsm8k_train.jsonl"), max_samples=4,
                 max_length=256, max_prompt_length=128, max_steps=6, batch_size=2, micro_batch_size=2,
                 learning_rate=3e-3, output_dir=str(tmp_path), progress=False, lr_scheduler="constant")
    cfg.validate()
    result = run(cfg)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert result.steps == 6 and len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3


def test_chat_prompts_and_suffix_train_on_the_prompts_grpo_sees(tokenizer):
    """With prompt_suffix and chat_prompts, an SFT row's prompt tokens are exactly the ids GRPO and eval generate
    from for the same row (user turn + suffix + generation prompt), followed by the reply and the template's
    end of turn; without them the texts are concatenated as TRL does."""
    from posttrain.algorithms.grpo import Config as GRPOConfig
    from posttrain.algorithms.sft import as_prompted
    from posttrain.data.formats import Dataset, Row
    from posttrain.rollout.groups import prompt_examples

    row = {"prompt": "What is 47 + 38?", "completion": "47 + 38 = 85"}
    suffix = " Reply with only the final number."
    cfg = Config(prompt_suffix=suffix, chat_prompts=True)
    enc = encode_sft_row(tokenizer, as_prompted(row, cfg, True), max_length=512, max_prompt_length=None,
                         completion_only=True, assistant_only=True)
    grpo_ids = prompt_examples(Dataset([Row(row, "x:1")], "x", "prompt-completion"), tokenizer,
                               GRPOConfig(prompt_suffix=suffix))[0].prompt_ids
    n = len(grpo_ids)
    assert enc.input_ids[:n] == grpo_ids and sum(enc.mask[:n]) == 0
    reply = tokenizer.decode(enc.input_ids[n:])
    assert reply.startswith("47 + 38 = 85<|im_end|>") and all(enc.mask[n : n + 3])
    plain = as_prompted(row, Config(), True)
    assert plain == row
    assert as_prompted(row, Config(prompt_suffix="!"), True) == {"prompt": "What is 47 + 38?!", "completion": row["completion"]}
