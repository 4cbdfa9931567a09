"""Seeded synthetic preference pairs of a chosen token shape, for benchmarks.

The HH pairs of the main DPO benchmark have long prompts (a multi-turn dialogue) and short replies, so laying
each prompt out once saves much there. New users often have the opposite shape: a short question and long
answers. These pairs have that shape, measured in the benchmark model's own tokens: the prompt as the chat
template renders it (system turn and generation prompt included), and each completion with its end-of-turn
token. The words are drawn from a fixed list with a seeded generator, so a given seed and tokenizer always
give the same pairs.

    python benchmarks/synthetic.py 24 --out pairs.jsonl   # 24 short-prompt pairs (40-80 / 120-180 tokens)
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can about said up out them "
    "what some time could into only other two then first new like these any may over after also most very made "
    "where between well just before through back years much way down should because each people those how work "
    "water light garden river market bread winter engine number letter answer question simple history system "
    "method family reason morning student teacher paper music window station animal weather problem plan result "
    "small large early late quiet bright careful quick patient honest useful clear warm cold green heavy gentle "
    "explain describe compare build measure listen travel cook write read choose help start finish open carry"
).split()

SHORT = {"prompt": (40, 80), "completion": (120, 180)}  # the short-prompt, long-completion shape


def scaled_shape(max_length: int) -> dict:
    """Token ranges for pairs that fill about half to all of `max_length`: prompt 10-20%, each completion 45-75%
    (at 512: prompts of 51-102 tokens, completions of 230-384)."""
    return {"prompt": (max_length // 10, max_length // 5), "completion": (max_length * 45 // 100, max_length * 3 // 4)}


def _fill(rng: random.Random, count, target: int) -> str:
    """Words appended until `count(words)` reaches `target` tokens, dropping the last word if that lands closer.
    Words go in batches while far from the target (every word is at least one token), so long texts are quick."""
    words: list[str] = []
    n = count(words)
    while n < target:
        words += [rng.choice(WORDS) for _ in range(max(1, (target - n) // 2))]
        n = count(words)
    if len(words) > 1 and abs(count(words[:-1]) - target) < n - target:
        words.pop()
    return words


def synthetic_pairs(tokenizer, n: int, seed: int = 0, shape: dict = SHORT) -> list[dict]:
    """`n` conversational pairs {prompt: [user turn], chosen: [assistant turn], rejected: [assistant turn]} whose
    rendered prompt and completions have token counts drawn uniformly from `shape`'s (low, high) ranges."""
    from posttrain.data.tokenize import encode_pair

    rng = random.Random(seed)

    def question(words):
        return [{"role": "user", "content": " ".join(words).capitalize() + "?"}]

    def answer(words):
        return [{"role": "assistant", "content": " ".join(words).capitalize() + "."}]

    def prompt_len(words):
        return len(encode_pair(tokenizer, question(words), answer(["x"]))[0])

    def completion_len(words):
        return len(encode_pair(tokenizer, question(["q"]), answer(words))[1])

    rows = []
    for _ in range(n):
        user = _fill(rng, prompt_len, rng.randint(*shape["prompt"]))
        sides = [_fill(rng, completion_len, rng.randint(*shape["completion"])) for _ in range(2)]
        rows.append({"prompt": question(user), "chosen": answer(sides[0]), "rejected": answer(sides[1])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=0, help="scaled shape for this max_length (default: the short shape)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from posttrain.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    rows = synthetic_pairs(tok, args.n, args.seed, scaled_shape(args.max_length) if args.max_length else SHORT)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
