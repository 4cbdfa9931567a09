"""Built-in tasks that need no data files: the synthetic ``arithmetic`` task.

Arithmetic problems are word-free questions with an exact integer answer, in five levels of difficulty
so that online RL can start where a small model sometimes succeeds and move on (a curriculum):

======  ==========================================================  ==================
level   problems                                                    example
======  ==========================================================  ==================
1       1-digit + 1-digit, 1-digit - 1-digit (operands 0..9)        ``7 + 5``, ``8 - 3``
2       2-digit + 2-digit, 2-digit - 2-digit (10..99)               ``47 + 38``
3       1-digit x 1-digit (2..9), 2-digit x 1-digit (10..99 x 2..9)  ``6 * 7``, ``47 * 3``
4       3-digit + 3-digit, 3-digit - 3-digit (100..999)             ``512 - 378``
5       2-digit x 2-digit (10..99)                                  ``47 * 38``
======  ==========================================================  ==================

Subtractions put the larger operand first, so every answer is a non-negative integer; ``*`` is the
multiplication sign (the same as ``../shared/data/arith_*.jsonl``).

Train/test separation: every distinct problem (operands of ``+`` and ``*`` taken as unordered) is assigned
to the test split or the train split by a hash of the problem, about 1 in 5 to test. So no test problem ever
appears in train whatever ``n`` and ``seed`` are, and the two splits also draw from different seed streams.
Within one call problems are not repeated while unused problems of the level are easy to find; the tiny
level-1 space (110 problems, ~22 in test) does repeat when ``n`` is large.
"""

from __future__ import annotations

import hashlib
import random

# The small embedded model answers far more often with this suffix than with the bare question (see
# shared/MEASUREMENTS.md: 8.7% vs ~2% greedy accuracy) and it makes the reply easy to grade.
ARITHMETIC_INSTRUCTION = "Reply with only the final number."

LEVELS = (1, 2, 3, 4, 5)
_TEST_BUCKETS = 2  # out of 10: the share of the problem space reserved for the test split
_D1, _D2, _D3 = (0, 9), (10, 99), (100, 999)
# level -> problem kinds (operator, range of the first operand, range of the second operand)
_KINDS = {
    1: [("+", _D1, _D1), ("-", _D1, _D1)],
    2: [("+", _D2, _D2), ("-", _D2, _D2)],
    3: [("*", (2, 9), (2, 9)), ("*", _D2, (2, 9))],
    4: [("+", _D3, _D3), ("-", _D3, _D3)],
    5: [("*", _D2, _D2)],
}


def _problem_key(a: int, op: str, b: int) -> str:
    if op in "+*":  # commutative: 3 + 5 and 5 + 3 are the same problem
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


def _split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10
    return "test" if bucket < _TEST_BUCKETS else "train"


def _draw(rng: random.Random, level: int) -> tuple[int, str, int]:
    op, ra, rb = rng.choice(_KINDS[level])
    a, b = rng.randint(*ra), rng.randint(*rb)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _check_args(n: int, levels, split: str) -> tuple[int, ...]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = tuple(int(x) for x in levels)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    return levels


def arithmetic_rows(n: int, *, seed: int = 0, levels=(1, 2, 3), split: str = "train") -> list[dict]:
    """``n`` prompt rows ``{"prompt", "answer", "solution", "level"}``, deterministic in (n, seed, levels, split).

    ``prompt`` is ``"What is 47 + 38? Reply with only the final number."`` (question + ARITHMETIC_INSTRUCTION),
    ``answer`` the integer as a string (``"85"``), ``solution`` the worked line (``"47 + 38 = 85"``). Each row's
    level is drawn uniformly from ``levels``. Uses its own ``random.Random``, never the global state.
    """
    levels = _check_args(n, levels, split)
    rng = random.Random(f"posttrain-arithmetic:{split}:{seed}")
    rows, seen = [], set()
    for _ in range(n):
        level = rng.choice(levels)
        # Rejection-sample a problem of this split, preferring unseen ones; give up on novelty (not on the
        # split) after a few tries, since small levels run out of distinct problems.
        for attempt in range(1000):
            a, op, b = _draw(rng, level)
            key = _problem_key(a, op, b)
            if _split_of(key) == split and (key not in seen or attempt >= 50):
                break
        else:  # unreachable for the level spaces above (each split holds a positive share of every level)
            raise RuntimeError(f"no {split} problem found for level {level}")
        seen.add(key)
        question = f"{a} {op} {b}"
        answer = _value(a, op, b)
        rows.append({
            "prompt": f"What is {question}? {ARITHMETIC_INSTRUCTION}",
            "answer": str(answer),
            "solution": f"{question} = {answer}",
            "level": level,
        })
    return rows


def arithmetic_sft_rows(n: int, *, seed: int = 0, levels=(1, 2, 3), split: str = "train") -> list[dict]:
    """``{"prompt", "completion"}`` rows whose completion is the bare answer (``"85"``).

    The bare number is what ARITHMETIC_INSTRUCTION asks for, so SFT on these rows teaches exactly the reply
    format the arithmetic GRPO rewards check. Same problems as ``arithmetic_rows`` with the same arguments.
    """
    return [{"prompt": r["prompt"], "completion": r["answer"]}
            for r in arithmetic_rows(n, seed=seed, levels=levels, split=split)]


def _wrong_answers(a: int, op: str, b: int) -> list[int]:
    """Plausible mistakes for ``a op b``: off by one/ten, a dropped carry or borrow, swapped digits."""
    c = _value(a, op, b)
    wrong = [c + 1, c - 1, c + 10, c - 10]
    da, db = str(a)[::-1], str(b)[::-1]  # least significant digit first
    width = max(len(da), len(db))
    da, db = da.ljust(width, "0"), db.ljust(width, "0")
    if op == "+":  # add column by column and forget every carry
        wrong.append(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))[::-1]))
    elif op == "-":  # subtract the smaller digit from the larger in each column (the classic borrow error)
        wrong.append(int("".join(str(abs(int(x) - int(y))) for x, y in zip(da, db))[::-1]))
    else:  # one partial product too many or too few
        wrong += [c + a, c - a]
    digits = str(c)
    if len(digits) >= 2:  # the last two digits swapped
        wrong.append(int(digits[:-2] + digits[-1] + digits[-2]))
    return sorted({w for w in wrong if w >= 0 and w != c})


def arithmetic_preference_rows(n: int, *, seed: int = 0, levels=(1, 2, 3), split: str = "train") -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows: the correct bare answer vs a plausible wrong one.

    The rejected answer is drawn from ``_wrong_answers`` (never equal to the correct answer, never negative)
    with a generator seeded from ``seed`` and ``split``, so rows are deterministic too.
    """
    rows = arithmetic_rows(n, seed=seed, levels=levels, split=split)
    rng = random.Random(f"posttrain-arithmetic-wrong:{split}:{seed}")
    out = []
    for r in rows:
        a, op, b = r["solution"].split(" = ")[0].split(" ")
        rejected = rng.choice(_wrong_answers(int(a), op, int(b)))
        out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(rejected)})
    return out


_BUILDERS = {"prompt": arithmetic_rows, "sft": arithmetic_sft_rows, "preference": arithmetic_preference_rows}
_DEFAULT_N = {"train": 2000, "test": 500}


def _parse_levels(text: str) -> tuple[int, ...]:
    """``"2"`` -> (2,), ``"1-3"`` -> (1, 2, 3), ``"1+3+5"`` -> (1, 3, 5)."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-", 1))
        return tuple(range(lo, hi + 1))
    return tuple(int(x) for x in text.split("+"))


def parse_task_name(name: str) -> tuple[str, dict]:
    """Split ``"arithmetic:level=1-3,n=2000,split=test"`` into ``("arithmetic", {"levels": (1, 2, 3), ...})``."""
    base, _, spec = name.partition(":")
    opts: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise ValueError(f"task {name!r}: option {item!r} is not key=value")
        try:
            if key in ("level", "levels"):
                opts["levels"] = _parse_levels(value)
            elif key in ("n", "seed"):
                opts[key] = int(value)
            elif key == "split":
                opts["split"] = value
            else:
                raise ValueError(f"unknown option {key!r} (known: level, n, seed, split)")
        except ValueError as e:
            raise ValueError(f"task {name!r}: {e}") from None
    return base.strip(), opts


def builtin_task(name: str, kind: str, **opts) -> list[dict] | None:
    """Rows of a built-in task, or None when ``name`` is not one (e.g. it is a file path).

    Name syntax: ``arithmetic`` or ``arithmetic:key=value,key=value`` with keys
    ``level`` (``2``, a range ``1-3`` or a list ``1+3+5``; default 1-3), ``n`` (rows; default 2000 for
    train, 500 for test), ``seed`` (default 0) and ``split`` (``train`` or ``test``; default train).
    ``kind`` is ``"prompt"`` (rows for online RL, with the ``answer`` column the accuracy reward reads),
    ``"sft"`` or ``"preference"``. ``opts`` (same keys, ``levels`` for level) are defaults that options
    written in the name override.
    """
    base, named = parse_task_name(name)
    if base != "arithmetic":
        return None
    if kind not in _BUILDERS:
        raise ValueError(f"task {name!r}: kind must be one of {sorted(_BUILDERS)}, got {kind!r}")
    if "level" in opts:
        opts["levels"] = opts.pop("level")
    unknown = set(opts) - {"n", "seed", "levels", "split"}
    if unknown:
        raise ValueError(f"task {name!r}: unknown options {sorted(unknown)}")
    merged = {**opts, **named}
    merged.setdefault("split", "train")
    n = merged.pop("n", _DEFAULT_N.get(merged["split"], 2000))
    return _BUILDERS[kind](n, **merged)
