"""Tiny in-process models and tokenizers for tests and examples: built in about a second, no network.

They live in the package (not only under tests/) so users can smoke-test a config without a download.
"""

from __future__ import annotations

import functools

# SmolLM2/ChatML-style template: the same shape as the embedded default model's, so tests exercise the
# code paths real conversational data takes (system turn, generation prompt, <|im_end|> as EOS).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 7? The answer is 19.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake.",
    "0123456789 + - * = ? . , ! the a an is of to and in that it for you with on as are",
    "Reply with only the final number. Natalia sold clips to 48 of her friends in April.",
    "user assistant system You are a helpful assistant.",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text round-trips) with a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tokenizer=None, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, vocab_size: int | None = None):
    """A random Llama-style causal LM small enough to train for a few steps in a test."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(path, seed: int = 0) -> str:
    """Write a tiny model + tokenizer as a Hugging Face folder (for CLI tests) and return its path."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def assert_close_to_scale(actual, expected, rtol: float = 1e-5, name: str = "") -> None:
    """Assert max|actual - expected| <= rtol * max|expected| (plus a float32 epsilon for all-zero tensors).

    Equivalent computations in a different order (another kernel, a fused backward, packed rows) differ by float
    rounding relative to the tensor's largest entries, not to each entry: a gradient with entries of 79 carries
    errors of ~1e-5 in its tiny entries too, which an elementwise atol=1e-6 rejects although nothing is wrong. A
    real defect (a missing term, a wrong mask) moves entries by a sizeable fraction of the scale and still fails.
    """
    import torch

    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    bound = rtol * scale + 1e-7
    assert err <= bound, f"{name}: max abs difference {err:.3g} exceeds {rtol:g} x scale {scale:.3g}"
