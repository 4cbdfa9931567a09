"""Tokenization masks, truncation, dropping, collation and packing, checked token by token.

The tiny tokenizer (posttrain.testing) is byte-level BPE with a ChatML template; EOS is <|im_end|> (id 2),
pad is <|endoftext|> (id 0), there is no BOS.
"""

from collections import Counter

import pytest
import torch

from posttrain.config import UserError
from posttrain.data.tokenize import (
    Encoded,
    collate,
    collate_packed,
    encode_conversation,
    encode_pair,
    encode_rows,
    encode_sft_row,
    pack,
    truncate_pair,
)

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 2 + 3?"}
B = {"role": "assistant", "content": "5"}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def sft(tok, data, max_length=512, max_prompt_length=None, completion_only=True, assistant_only=True):
    return encode_sft_row(tok, data, max_length=max_length, max_prompt_length=max_prompt_length,
                          completion_only=completion_only, assistant_only=assistant_only)


def scored(enc):
    return [t for t, m in zip(enc.input_ids, enc.mask) if m]


@pytest.mark.parametrize(
    "prompt, completion",
    [
        # The prompt ends in a space: jointly, " is" is one token ('Ġis') straddling the boundary.
        ("What is 12 + 7? The answer ", "is 19."),
        # The prompt ends inside a number: jointly, '19' is one token straddling the boundary.
        ("What is 12 + 7? The answer is 1", "9."),
    ],
)
def test_prompt_completion_boundary_is_exact(tokenizer, prompt, completion):
    joint = ids(tokenizer, prompt + completion)
    separate = ids(tokenizer, prompt) + ids(tokenizer, completion)
    assert joint != separate  # the merge across the boundary really happens with this tokenizer
    enc = sft(tokenizer, {"prompt": prompt, "completion": completion})
    eos = tokenizer.eos_token_id
    assert enc.input_ids == ids(tokenizer, prompt) + ids(tokenizer, completion) + [eos]
    assert scored(enc) == ids(tokenizer, completion) + [eos]
    n_prompt = len(ids(tokenizer, prompt))
    assert enc.mask == [0] * n_prompt + [1] * (len(enc) - n_prompt)


def test_eos_appended_once(tokenizer):
    eos = tokenizer.eos_token_id
    assert ids(tokenizer, "4") == [22]
    assert encode_pair(tokenizer, "2 + 2 =", "4") == (ids(tokenizer, "2 + 2 ="), [22, eos])
    # A completion that already ends with the EOS text keeps exactly one EOS.
    assert encode_pair(tokenizer, "2 + 2 =", "4<|im_end|>")[1] == [22, eos]
    # Anything after the last EOS is cut (templates add a newline after it).
    assert encode_pair(tokenizer, "2 + 2 =", "4<|im_end|>\n")[1] == [22, eos]


def test_text_rows_train_on_every_token_but_the_first(tokenizer):
    enc = sft(tokenizer, {"text": "The answer is 19."})
    assert enc.input_ids == ids(tokenizer, "The answer is 19.") + [tokenizer.eos_token_id]
    assert enc.mask == [0] + [1] * (len(enc) - 1)


def test_completion_only_false_trains_on_the_prompt_too(tokenizer):
    enc = sft(tokenizer, {"prompt": "2 + 2 =", "completion": " 4"}, completion_only=False)
    assert enc.mask == [0] + [1] * (len(enc) - 1)


def test_conversational_prompt_completion(tokenizer):
    enc = sft(tokenizer, {"prompt": [U], "completion": [A]})
    prompt_text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(ids(tokenizer, prompt_text))
    # The reply "4" and its EOS; the template's newline after EOS is not part of the completion.
    assert enc.input_ids == ids(tokenizer, prompt_text) + [22, 2]
    assert enc.mask == [0] * n_prompt + [1, 1]


def test_single_turn_conversation_assistant_only(tokenizer):
    enc = encode_conversation(tokenizer, [U, A], assistant_only=True)
    full = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert tokenizer.decode(enc.input_ids) == full
    assert scored(enc) == [22, 2]  # "4" + EOS, not the trailing newline (id 201)
    assert enc.input_ids[-1] == 201 and enc.mask[-1] == 0


def test_multi_turn_conversation_masks_exactly_the_replies(tokenizer):
    system = {"role": "system", "content": "You are a helpful assistant."}
    msgs = [system, U, A, U2, B]
    enc = encode_conversation(tokenizer, msgs, assistant_only=True)
    assert tokenizer.decode(enc.input_ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    eos = tokenizer.eos_token_id
    assert scored(enc) == ids(tokenizer, "4") + [eos] + ids(tokenizer, "5") + [eos]
    # The scored tokens form two runs, each directly after an "<|im_start|>assistant\n" header.
    header = ids(tokenizer, "<|im_start|>assistant\n")
    runs = [i for i in range(1, len(enc)) if enc.mask[i] and not enc.mask[i - 1]]
    assert len(runs) == 2
    for start in runs:
        assert enc.input_ids[start - len(header) : start] == header


def test_conversation_without_assistant_only_trains_on_everything(tokenizer):
    enc = sft(tokenizer, {"messages": [U, A, U2, B]}, assistant_only=False)
    assert enc.mask == [0] + [1] * (len(enc) - 1)


def test_truncate_pair_keeps_prompt_end_and_completion_start():
    prompt, completion = list(range(10)), list(range(100, 110))
    assert truncate_pair(prompt, completion, 8, 5) == ([5, 6, 7, 8, 9], [100, 101, 102])
    assert truncate_pair(prompt, completion, 12, None) == (prompt, [100, 101])
    assert truncate_pair(prompt, completion, 10, None) is None  # the prompt fills max_length
    assert truncate_pair(prompt, completion, 100, None) == (prompt, completion)


def test_truncation_on_real_text(tokenizer):
    prompt, completion = "What is 12 + 7? The answer", " is 19. Bake the bread."
    p, c = ids(tokenizer, prompt), ids(tokenizer, completion) + [tokenizer.eos_token_id]
    enc = sft(tokenizer, {"prompt": prompt, "completion": completion}, max_length=7, max_prompt_length=4)
    assert enc.input_ids == p[-4:] + c[:3]
    assert enc.mask == [0, 0, 0, 0, 1, 1, 1]


def test_rows_without_completion_left_are_dropped_and_counted(tokenizer):
    rows = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "What is 12 + 7? The answer is", "completion": " 19"}]

    class R:
        def __init__(self, data):
            self.data, self.source = data, "rows.jsonl:1"

    # max_length 7: the first prompt has 6 tokens (room for one completion token), the second has 15.
    assert len(ids(tokenizer, rows[0]["prompt"])) == 6 and len(ids(tokenizer, rows[1]["prompt"])) == 15
    out, dropped = encode_rows([R(r) for r in rows], lambda d: sft(tokenizer, d, max_length=7))
    assert len(out) == 1 and len(out[0]) == 7 and out[0].mask == [0] * 6 + [1]
    assert dropped == Counter({"prompt fills max_length, no completion token left": 1})
    with pytest.raises(UserError, match="every example was dropped by truncation"):
        encode_rows([R(rows[1])], lambda d: sft(tokenizer, d, max_length=7))


def test_conversation_truncated_before_any_reply_is_dropped(tokenizer):
    header = len(ids(tokenizer, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"))
    assert sft(tokenizer, {"messages": [U, A]}, max_length=header) is None
    enc = sft(tokenizer, {"messages": [U, A]}, max_length=header + 1)
    assert scored(enc) == [22]  # truncation keeps the start: the reply's first token, no EOS


def test_bos_only_on_the_first_segment(tokenizer):
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.pad_token_id  # reuse <|endoftext|> as BOS for this test
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer.bos_token = "<|endoftext|>"
    p, c = encode_pair(tokenizer, "2 + 2 =", " 4")
    assert p == [bos] + ids(tokenizer, "2 + 2 =")
    assert c == ids(tokenizer, " 4") + [tokenizer.eos_token_id]


def test_collate_right_pads(tokenizer):
    batch = collate([Encoded([5, 6, 7], [0, 1, 1]), Encoded([8, 9], [0, 1])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch.position_ids is None and batch.num_tokens == 5 and len(batch) == 2


def test_pack_and_collate_packed():
    a = Encoded([1, 2, 3, 4, 5], [0, 1, 1, 1, 1])
    b = Encoded([6, 7, 8], [0, 1, 1])
    c = Encoded([9], [0])
    rows = pack([c, b, a], max_length=6)
    # First-fit by decreasing length: a (5) opens row 0; b (3) does not fit there, opens row 1; c (1)
    # fits in row 0 (5 + 1 = 6).
    assert [r.lengths for r in rows] == [[5, 1], [3]]
    batch = collate_packed(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 9], [6, 7, 8, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]
    assert batch.attention_mask.shape == (2, 1, 6, 6) and batch.attention_mask.dtype == torch.bool
    expected0 = torch.zeros(6, 6, dtype=torch.bool)
    expected0[:5, :5] = torch.ones(5, 5, dtype=torch.bool).tril()  # example a: causal within itself
    expected0[5, 5] = True  # example c attends only to itself
    expected1 = torch.zeros(6, 6, dtype=torch.bool)
    expected1[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()  # padding attends to nothing
    assert torch.equal(batch.attention_mask[0, 0], expected0)
    assert torch.equal(batch.attention_mask[1, 0], expected1)
    assert batch.num_tokens == 9  # real tokens, not T*T mask entries


def test_encode_dataset_reports_skipped_and_dropped(tokenizer, caplog):
    from posttrain.data import encode_dataset
    from posttrain.data.formats import Dataset, Row

    rows = [Row({"prompt": "2 + 2 =", "completion": " 4"}, "d.jsonl:1"),
            Row({"prompt": "What is 12 + 7? The answer is", "completion": " 19"}, "d.jsonl:2")]
    ds = Dataset(rows, "d.jsonl", "prompt_completion", Counter({"field 'text': empty text": 3}))
    with caplog.at_level("WARNING", logger="posttrain"):
        out = encode_dataset(ds, lambda d: sft(tokenizer, d, max_length=7))
    assert len(out) == 1
    assert caplog.messages == ["d.jsonl: skipped 3 row(s): field 'text': empty text",
                               "d.jsonl: dropped 1 row(s): prompt fills max_length, no completion token left"]
