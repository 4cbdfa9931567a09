"""Which prompts an online method samples next: a pass-rate curriculum for sparse rewards.

A GRPO group teaches nothing when all G completions score the same (all wrong or all right): its advantages
are zero. With a small model on hard problems most groups are all wrong, so most of the generation time is
wasted (see shared/MEASUREMENTS.md). Dynamic sampling (DAPO) throws such groups away *after* generating
them; a curriculum avoids drawing them in the first place, from what earlier groups showed:

- each prompt remembers the pass rate of its most recent group;
- each difficulty (a column such as the built-in task's `level` or the shared arithmetic files' `type`; one
  shared bucket when the data has none) keeps the pass rates of its last `window` groups;
- a prompt's estimated pass rate p is its own last rate when it has been sampled, else its difficulty's
  recent mean, else 0.5 (nothing known yet);
- a prompt is useful while `band[0] < p < band[1]` (default: neither all wrong nor all right); useful
  prompts are drawn in proportion to the probability that a fresh group of G has a learning signal,
  1 - p^G - (1 - p)^G, and a share `explore` of every draw is uniform over all prompts, so estimates stay
  fresh and a difficulty written off early comes back when the model has grown into it.

The pass rate of a group is the mean of one reward (the main one: `GRPO` picks the highest-weighted) over
its scored completions, clamped to [0, 1]; with a 0/1 verifier it is the share of correct completions.
Draws are seeded (same seed, same draws) and the state is small and checkpointed (`state_dict`).
"""

from __future__ import annotations

import math
from collections import deque

import torch

DIFFICULTY_COLUMNS = ("difficulty", "level", "type")  # looked for in this order when the column is "auto"


def difficulty_column(rows_columns: list[dict], name: str) -> str | None:
    """The difficulty column to use: `name` itself (it must be in every row), None for "none", and for
    "auto" the first of DIFFICULTY_COLUMNS present in every row (None when there is none)."""
    if name == "none" or not rows_columns:
        return None
    if name != "auto":
        missing = next((i for i, c in enumerate(rows_columns) if name not in c), None)
        if missing is not None:
            raise ValueError(f"curriculum_column: row {missing + 1} has no column {name!r}")
        return name
    return next((c for c in DIFFICULTY_COLUMNS if all(c in cols for cols in rows_columns)), None)


def informative(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """Probability that G independent completions with pass probability p are neither all wrong nor all right."""
    return 1.0 - p.pow(group_size) - (1.0 - p).pow(group_size)


class PassRateCurriculum:
    """The sampler. `draw(k, seed)` picks k distinct prompt indices; `update(indices, rates)` records the pass
    rates of the groups just scored. `difficulties[i]` is prompt i's difficulty (any hashable; None when the
    data has no difficulty column)."""

    def __init__(self, difficulties: list, group_size: int, *, band=(0.0, 1.0), explore: float = 0.1,
                 window: int = 8):
        if not difficulties:
            raise ValueError("the curriculum needs at least one prompt")
        lo, hi = (float(b) for b in band)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"curriculum_band must be two numbers 0 <= low < high <= 1, got {list(band)}")
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"curriculum_explore must be in [0, 1], got {explore}")
        if window < 1:
            raise ValueError(f"curriculum_window must be >= 1, got {window}")
        self.group_size, self.band, self.explore, self.window = group_size, (lo, hi), float(explore), int(window)
        self.keys = sorted({str(d) for d in difficulties})
        key_id = {k: j for j, k in enumerate(self.keys)}
        self.level = torch.tensor([key_id[str(d)] for d in difficulties])  # prompt -> difficulty bucket
        self.last = torch.full((len(difficulties),), math.nan)  # each prompt's most recent group pass rate
        self.recent = [deque(maxlen=self.window) for _ in self.keys]  # each bucket's last `window` rates

    def __len__(self) -> int:
        return len(self.last)

    def level_rates(self) -> dict[str, float]:
        """Each difficulty's recent mean pass rate (NaN: not sampled yet)."""
        return {k: (sum(r) / len(r) if r else math.nan) for k, r in zip(self.keys, self.recent)}

    def estimates(self) -> torch.Tensor:
        """[n] each prompt's estimated pass rate (see the module docstring)."""
        per_level = torch.tensor([sum(r) / len(r) if r else 0.5 for r in self.recent])
        return torch.where(self.last.isnan(), per_level[self.level], self.last)

    def weights(self) -> torch.Tensor:
        """[n] unnormalised draw weights of the curriculum part: 0 outside the band."""
        p = self.estimates()
        lo, hi = self.band
        inside = (p > lo) & (p < hi)
        return torch.where(inside, informative(p, self.group_size).clamp(min=0.0), torch.zeros_like(p))

    def probabilities(self) -> torch.Tensor:
        """[n] the probability of each prompt being the next one drawn (explore share included)."""
        n = len(self)
        w = self.weights()
        uniform = torch.full((n,), 1.0 / n)
        if float(w.sum()) <= 0:  # nothing is known to be useful: every prompt is as good as another
            return uniform
        return (1.0 - self.explore) * w / w.sum() + self.explore * uniform

    def draw(self, k: int, seed: int, exclude=()) -> list[int]:
        """k distinct prompt indices (fewer when fewer remain), never one of `exclude`, seeded by `seed`."""
        probs = self.probabilities().clone()
        if len(exclude):
            probs[torch.as_tensor(list(exclude), dtype=torch.long)] = 0.0
        available = int((probs > 0).sum())
        if available < k:  # every useful prompt is taken: fill up uniformly from the rest
            rest = torch.ones_like(probs)
            if len(exclude):
                rest[torch.as_tensor(list(exclude), dtype=torch.long)] = 0.0
            probs = torch.where(probs > 0, probs, rest * 1e-12)
        k = min(k, int((probs > 0).sum()))
        if k == 0:
            return []
        g = torch.Generator().manual_seed(seed)
        return torch.multinomial(probs, k, replacement=False, generator=g).tolist()

    def update(self, indices: list[int], rates: list[float]) -> None:
        """Record the pass rate of each prompt's latest group (NaN rates, groups nothing scored, are skipped)."""
        for i, r in zip(indices, rates):
            r = float(r)
            if math.isnan(r):
                continue
            r = min(max(r, 0.0), 1.0)
            self.last[i] = r
            self.recent[int(self.level[i])].append(r)

    def stats(self) -> dict[str, float]:
        """`useful_frac`: share of prompts estimated inside the band; `pass_rate/<difficulty>`: recent means."""
        p = self.estimates()
        lo, hi = self.band
        out = {"useful_frac": float(((p > lo) & (p < hi)).float().mean())}
        if len(self.keys) > 1:
            out.update({f"pass_rate/{k}": v for k, v in self.level_rates().items() if not math.isnan(v)})
        return out

    def state_dict(self) -> dict:
        return {"last": self.last.clone(), "recent": [list(r) for r in self.recent], "keys": list(self.keys)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["keys"]) != self.keys or len(state["last"]) != len(self):
            raise ValueError("the checkpoint's curriculum was built on other prompts")
        self.last = state["last"].clone()
        self.recent = [deque(r, maxlen=self.window) for r in state["recent"]]


def group_pass_rates(rewards: torch.Tensor, group_size: int, column: int) -> list[float]:
    """Each group's mean of reward `column` over its scored rows (NaN when none was scored)."""
    col = rewards[:, column].view(-1, group_size)
    scored = ~col.isnan()
    counts = scored.sum(-1)
    sums = torch.where(scored, col, torch.zeros_like(col)).sum(-1)
    return [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts)]
