"""`posttrain rm`: rewards read at the true last token (padding, pad == EOS), the Bradley-Terry loss with
margin and centering, metrics, a run that learns, the saved model reloading to the same scores, real data."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, needs_shared_data
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain import cli
from posttrain.algorithms import rm as R
from posttrain.config import LoraConfig, UserError
from posttrain.data.formats import Dataset, Row
from posttrain.engine import reduce_metrics
from posttrain.models import load_model
from posttrain.data.tokenize import encode_prompt
from posttrain.models import apply_lora
from posttrain.testing import assert_close_to_scale, tiny_tokenizer


def make_cfg(**kw):
    cfg = R.Config(**kw)
    cfg.validate()
    return cfg


def alone(model, ids):
    """Reward of one unpadded sequence: the score head on the backbone's hidden state at its last token."""
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(model.score(h))


def pad_batch(seqs, pad_id, left=False):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], attn[i, sl] = torch.tensor(s), 1
    return ids, attn


@pytest.fixture
def rm_model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir, head="score")


def test_reward_is_read_at_the_last_real_token(rm_model, tokenizer):
    seqs = [
        R.encode_for_reward(tokenizer, "What is 12 + 7?", t, 64)
        for t in (" 19", " The answer is 19.", " 19, or 21?")
    ]
    assert len({len(s) for s in seqs}) == 3 and all(s[-1] == tokenizer.eos_token_id for s in seqs)
    expected = torch.tensor([alone(rm_model, s) for s in seqs])
    for left in (False, True):
        ids, attn = pad_batch(seqs, tokenizer.pad_token_id, left)
        with torch.no_grad():
            torch.testing.assert_close(R.sequence_rewards(rm_model, ids, attn), expected, rtol=0, atol=1e-5)


def test_pad_equal_to_eos(rm_model):
    """pad == EOS: the completion's closing EOS is not padding. Our reward reads it; transformers' own forward
    (rightmost token != pad id) reads one token early until `distinct_pad_token` gives a different pad id."""
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    rm_model.config.pad_token_id = tok.eos_token_id
    short, longer = (R.encode_for_reward(tok, "Say hello.", t, 64) for t in (" hi", " hello there"))
    ids, attn = pad_batch([short, longer], tok.pad_token_id)
    assert ids[0, len(short) - 1] == ids[0, -1] == tok.eos_token_id  # own EOS, then EOS padding
    with torch.no_grad():
        ours = R.sequence_rewards(rm_model, ids, attn)
        native = rm_model(input_ids=ids, attention_mask=attn).logits[:, 0]
    torch.testing.assert_close(
        ours, torch.tensor([alone(rm_model, short), alone(rm_model, longer)]), rtol=0, atol=1e-5
    )
    assert (native - ours).abs().min() > 1e-4  # read at the token before EOS: wrong
    R.distinct_pad_token(tok, rm_model)
    assert (
        tok.pad_token == "<|endoftext|>"
        and rm_model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    )
    enc = tok(
        [tok.decode(short), tok.decode(longer)], padding=True, add_special_tokens=False, return_tensors="pt"
    )
    assert enc["input_ids"][0].tolist()[: len(short)] == short
    with torch.no_grad():
        native = rm_model(**enc).logits[:, 0]
    torch.testing.assert_close(native, ours, rtol=0, atol=1e-5)


def test_sequences_are_what_trl_and_plain_scorers_build(tokenizer):
    """Conversations: the whole chat-template render, tokenized as one text (ChatML ends "<|im_end|>\\n").
    Text: prompt + completion + EOS, tokenized as one text (TRL appends the EOS to text data)."""
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    reply = [{"role": "assistant", "content": "19"}]
    ids = R.encode_for_reward(tokenizer, prompt, reply, 1024)
    trl = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(trl) and tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|im_end|>", "Ċ"]
    text = R.encode_for_reward(tokenizer, "What is 12 + 7?", " 19", 1024)
    assert (
        text == tokenizer("What is 12 + 7? 19<|im_end|>")["input_ids"] and text[-1] == tokenizer.eos_token_id
    )
    assert R.encode_for_reward(tokenizer, "What is 12 + 7?", " 19<|im_end|>", 1024) == text  # EOS only once
    with pytest.raises(UserError):
        R.encode_for_reward(tokenizer, prompt, " 19", 1024)


def test_truncation_keeps_the_end(tokenizer):
    """The reward is read at the last token, so truncation drops tokens from the front: max_length keeps the
    last max_length ids; max_prompt_length first drops the prompt's leading tokens beyond it."""
    full = R.encode_for_reward(tokenizer, "What is 12 + 7?", " 19", 1024)
    n_prompt = len(tokenizer("What is 12 + 7?")["input_ids"])
    assert n_prompt > 3 and len(full) > n_prompt + 1
    assert R.encode_for_reward(tokenizer, "What is 12 + 7?", " 19", 4) == full[-4:]
    assert (
        R.encode_for_reward(tokenizer, "What is 12 + 7?", " 19", 1024, max_prompt_length=2)
        == full[n_prompt - 2 :]
    )


def test_distinct_pad_token_adds_one_when_every_special_token_is_used(rm_model):
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    tok.chat_template = "<|endoftext|><|im_start|>{{ messages }}<|im_end|>"  # uses all three special tokens
    R.distinct_pad_token(tok, rm_model)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 320 and len(tok) == 321
    assert rm_model.config.pad_token_id == 320 and rm_model.get_input_embeddings().weight.shape[0] == 321


def test_loss_equals_bradley_terry_with_margin_and_centering(rm_model, tokenizer):
    """Two micro-batches (2 + 1 pairs). By hand, with rewards r read from each sequence alone, margins
    m = (0.5, 0, -1) (the second row has no margin column: 0) and c = 0.01:
        loss = sum_i [-log sigmoid(r_c,i - r_r,i - m_i) + c (r_c,i + r_r,i)^2] / 3."""
    rows = [
        {"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21", "margin": 0.5},
        {"prompt": "What is 3 * 4?", "chosen": " 12", "rejected": " The answer is 7."},
        {"prompt": "Say hello.", "chosen": " hello", "rejected": " no", "margin": "-1"},  # CSV-style text
    ]
    ds = Dataset([Row(r, f"f.jsonl:{i + 1}") for i, r in enumerate(rows)], "f.jsonl", "preference")
    cfg = make_cfg(micro_batch_size=2, center_rewards_coefficient=0.01)
    pairs = R.encode_pairs(tokenizer, ds, cfg)
    assert [p.margin for p in pairs] == [0.5, 0.0, -1.0]
    with torch.no_grad():
        rc = torch.tensor([alone(rm_model, p.chosen) for p in pairs])
        rr = torch.tensor([alone(rm_model, p.rejected) for p in pairs])
    m = torch.tensor([0.5, 0.0, -1.0])
    expected = (-F.logsigmoid(rc - rr - m) + 0.01 * (rc + rr) ** 2).sum() / 3
    algo = R.RewardModel(cfg, tokenizer.pad_token_id, with_margin=True)
    mbs = algo.prepare(rm_model, pairs)
    assert [len(mb) for mb in mbs] == [2, 1]
    total, parts = 0.0, []
    for mb in mbs:
        loss, metrics = algo.loss(rm_model, mb, 3.0)
        total = total + loss
        parts.append(metrics)
    torch.testing.assert_close(total.detach(), expected, rtol=0, atol=1e-6)
    step = reduce_metrics(parts)  # as the engine reduces them over the step's micro-batches
    everything = torch.cat([rc, rr])
    assert step["accuracy"] == pytest.approx(float((rc > rr).float().mean()), abs=1e-6)
    assert step["margin"] == pytest.approx(float((rc - rr).mean()), abs=1e-5)
    assert step["mean_reward"] == pytest.approx(float(everything.mean()), abs=1e-5)
    assert step["min_reward"] == pytest.approx(
        float(everything.min()), abs=1e-5
    )  # the step's, not a mean of mins
    assert step["max_reward"] == pytest.approx(float(everything.max()), abs=1e-5)
    ev = algo.evaluate(rm_model, pairs)
    assert ev["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert ev["min_reward"] == pytest.approx(step["min_reward"], abs=1e-6)


def test_bad_margin_names_the_row(tokenizer):
    ds = Dataset(
        [Row({"prompt": "p", "chosen": " a", "rejected": " b", "margin": "big"}, "d.csv:7")],
        "d.csv",
        "preference",
    )
    with pytest.raises(UserError, match="d.csv:7: field 'margin'"):
        R.encode_pairs(tokenizer, ds, make_cfg())


def test_config():
    assert make_cfg().learning_rate == 1e-5
    cfg = make_cfg(lora=LoraConfig())
    assert cfg.learning_rate == 1e-4 and cfg.lora.merge  # saved merged: loads as a plain classifier
    with pytest.raises(UserError):
        make_cfg(center_rewards_coefficient=-1.0)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pad_is_eos_model_dir(tmp_path):
    """The tiny model saved with pad == EOS in its tokenizer and config, as SmolLM2 ships."""
    from posttrain.testing import tiny_model

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    model = tiny_model(tok)
    model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("lora", [False, True])
def test_learns_a_toy_preference_and_reloads_to_the_same_scores(tmp_path, lora):
    """8 pairs: the prompt asks for ' yes' or ' no' (4 each) and the chosen reply obeys. A reward that ignores
    the prompt gets exactly half right, so accuracy starts at 0.5 and must read the prompt to reach 1 within
    10 steps. The saved folder loads with AutoModelForSequenceClassification and its tokenizer (pad now
    distinct from EOS), and transformers' own forward on a right-padded batch gives the rewards the trainer
    reported: mean over the eval pairs = the logged eval/mean_reward."""
    base = pad_is_eos_model_dir(tmp_path)
    rows = [
        {"prompt": f"Question {i}: say {w}.", "chosen": f" {w}", "rejected": f" {v}"}
        for i in range(4)
        for w, v in (("yes", "no"), ("no", "yes"))
    ]
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "run"
    args = [
        "rm",
        f"model={base}",
        f"dataset={data}",
        f"eval_dataset={data}",
        "max_steps=10",
        "batch_size=8",
        "micro_batch_size=4",
        "learning_rate=3e-3",
        "progress=false",
        f"output_dir={out}",
    ]
    if lora:
        args += ["lora.r=8", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", "learning_rate=2e-2"]
    assert cli.main(args) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["accuracy"] == 0.5 and logged[-1]["eval/accuracy"] == 1.0, logged

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    seqs = [R.encode_for_reward(tok, r["prompt"], r[k], 1024) for r in rows for k in ("chosen", "rejected")]
    enc = tok([tok.decode(s) for s in seqs], padding=True, add_special_tokens=False, return_tensors="pt")
    assert all(enc["input_ids"][i, : len(s)].tolist() == s for i, s in enumerate(seqs))
    with torch.no_grad():
        native = model(**enc).logits[:, 0]
        ours = R.sequence_rewards(model, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(native, ours, rtol=0, atol=1e-5)
    assert float(native.mean()) == pytest.approx(logged[-1]["eval/mean_reward"], abs=1e-4)
    assert bool((native[0::2] > native[1::2]).all())


def test_rollout_reward_model_scores_conversations_like_training(tmp_path):
    """`posttrain.rollout.rewards.RewardModelReward` (reward_model: PATH in online training) on a saved reward
    model: for conversations it renders the same sequences, so it returns the trainer's rewards."""
    from posttrain.rollout.rewards import RewardModelReward

    base = pad_is_eos_model_dir(tmp_path)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {w}."}],
            "chosen": [{"role": "assistant", "content": w}],
            "rejected": [{"role": "assistant", "content": v}],
        }
        for w, v in (("yes", "no"), ("no", "yes"), ("hello", "bye"))
    ]
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "rm",
                f"model={base}",
                f"dataset={data}",
                "max_steps=2",
                "batch_size=3",
                "learning_rate=1e-2",
                "progress=false",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    scorer = RewardModelReward(str(out), batch_size=4)
    theirs = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        ours = [alone(model, R.encode_for_reward(tok, r["prompt"], r["chosen"], 1024)) for r in rows]
    assert theirs == pytest.approx(ours, abs=1e-5)


@needs_shared_data
def test_real_data_train_accuracy_rises(tiny_model_dir, tmp_path):
    """32 HH pairs (conversations), all 32 in every step, max_length 128: train accuracy climbs from chance to
    at least 0.8 over the last 4 of 12 steps and the loss falls by more than 0.3 (measured: accuracy 0.469 ->
    0.844, loss 0.694 -> 0.215)."""
    out = tmp_path / "hh"
    code = cli.main(
        [
            "rm",
            f"model={tiny_model_dir}",
            f"dataset={SHARED_DATA / 'hh_helpful_train.jsonl'}",
            "max_samples=32",
            "batch_size=32",
            "micro_batch_size=8",
            "max_length=128",
            "max_prompt_length=96",
            "max_steps=12",
            "learning_rate=3e-3",
            "lr_scheduler=constant",
            "progress=false",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [r["accuracy"] for r in rows]
    assert acc[0] <= 0.6 and min(acc[-4:]) >= 0.8, acc
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3


def test_shared_prefix_packing_gives_the_padded_rewards_and_gradients(tiny_model_dir, tokenizer):
    """Three pairs of conversations sharing a prompt (one of them a multi-turn one, one whose replies differ from
    the first token), packed with each prompt once: the rewards equal those of the right-padded sequences read
    alone, and so does every parameter's gradient of the loss, full fine-tuning and LoRA alike (the adapters of
    every target module get a gradient)."""
    convs = [
        ([{"role": "user", "content": "What is 12 + 7?"}], "19", "It is 21, I think."),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Bake bread?"}], "Mix flour, water, salt and yeast, then bake.", "No."),
        ([{"role": "user", "content": "Say a word."}], "word", "the a an is of"),
    ]
    ds = Dataset([Row({"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                       "rejected": [{"role": "assistant", "content": r}]}, f"f.jsonl:{i + 1}")
                  for i, (p, c, r) in enumerate(convs)], "f.jsonl", "preference")
    for lora in (None, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])):
        grads, rewards = {}, {}
        for shared in (False, True):
            torch.manual_seed(0)
            model = load_model(tiny_model_dir, head="score")
            if lora is not None:
                model = apply_lora(model, lora, "SEQ_CLS")
                with torch.no_grad():  # B = 0 at init would leave every A without a gradient
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.1)
            cfg = make_cfg(micro_batch_size=3, shared_prefix=shared, lora=lora)
            pairs = R.encode_pairs(tokenizer, ds, cfg)
            algo = R.RewardModel(cfg, tokenizer.pad_token_id)
            [mb] = algo.prepare(model, pairs)
            assert (mb.prefixes is not None) == shared
            if shared:  # each pair's prompt (and the template's opening of the reply) is run once
                assert all(len(p) >= len(encode_prompt(tokenizer, c[0])) for p, c in zip(mb.prefixes, convs))
                assert mb.num_tokens < sum(len(p.chosen) + len(p.rejected) for p in pairs)
            rewards[shared] = R.batch_rewards(model, mb)
            loss, _ = algo.loss(model, mb, 3.0)
            loss.backward()
            grads[shared] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if lora is None:
            expected = torch.tensor([alone(model, p.chosen) for p in pairs] + [alone(model, p.rejected) for p in pairs])
            torch.testing.assert_close(rewards[False].detach(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(rewards[True].detach(), rewards[False].detach(), rtol=0, atol=1e-5)
        assert set(grads[True]) == set(grads[False])
        for n, g in grads[False].items():
            assert float(g.abs().max()) > 0, n  # every trainable parameter is reached
            assert_close_to_scale(grads[True][n], g, rtol=1e-4, name=n)
