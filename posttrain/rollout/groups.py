"""Groups of completions: the typed steps that turn prompts into scored samples, for every online method.

    prompts --sample--> Rollout --score--> ScoredRollout --filter_groups--> ScoredRollout (informative groups)

`generate_and_score` is one round of the first two (per-prompt seeds), `collect` the step's groups with DAPO's
dynamic sampling over several rounds; GRPO and online DPO build their steps from them.

`sample` asks a `GenerationEngine` for G completions of each prompt, each prompt with its own seed
(`prompt_seed`), so what a prompt gets does not depend on its batch mates or on the process it runs in.
`score` runs the reward functions over them. `filter_groups` is DAPO's dynamic sampling: it keeps the groups
whose rewards vary. The online-RL algorithm builds its step from these (advantages and micro-batches follow in
`posttrain.algorithms.online`); `posttrain eval` samples and scores with the same two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.data.tokenize import encode_prompt, row_errors
from posttrain.rollout.generate import GenerationEngine, Rollout, pad_cat
from posttrain.rollout.rewards import compute_rewards


@dataclass
class PromptExample:
    """One prompt of a prompt dataset, tokenized once.

    index        its row in the dataset (with the seed and the round, it fixes the prompt's samples)
    prompt       text or messages, as in the data (what reward functions see)
    prompt_ids   the token ids the model continues
    columns      the row's other fields (e.g. `answer`), passed to reward functions as keyword arguments
    """

    index: int
    prompt: object
    prompt_ids: list[int]
    columns: dict


def prompt_examples(ds, tok, cfg) -> list[PromptExample]:
    """Tokenized prompts (+ their other columns), as `cfg.prompt_suffix`, `cfg.chat_prompts` and
    `cfg.max_prompt_length` say. Plain-text prompts become a user turn when `chat_prompts` is on and the
    tokenizer has a chat template: instruction-tuned models answer far better that way."""
    out = []
    max_prompt_length = cfg.max_prompt_length
    for i, row in enumerate(ds.rows):
        data = row.data
        prompt = data["prompt"]
        if cfg.prompt_suffix:
            if isinstance(prompt, str):
                prompt = prompt + cfg.prompt_suffix
            else:
                prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + cfg.prompt_suffix}]
        as_chat = isinstance(prompt, str) and cfg.chat_prompts and tok.chat_template
        # Reward functions see the prompt as the data has it (text stays text, as in TRL).
        with row_errors(row.source):
            ids = encode_prompt(tok, [{"role": "user", "content": prompt}] if as_chat else prompt,
                                getattr(cfg, "chat_template_kwargs", None))
        if max_prompt_length and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
        cols = {k: v for k, v in data.items() if k not in ("prompt", "completion", "chosen", "rejected")}
        out.append(PromptExample(i, prompt, ids, cols))
    return out


def prompt_seed(seed: int, round: int, index: int) -> int:
    """The sampling seed of prompt `index` in generation round `round` of a run seeded with `seed`."""
    return (seed * 1_000_003 + round * 7919 + index) % (2**63 - 1)


@dataclass
class ScoredRollout:
    """G sampled completions of each of P prompts, with their rewards. The G rows of a prompt are contiguous.

    prompts          the P prompts
    completion_ids   [P*G, T] right-padded;  completion_mask [P*G, T]: 1 on generated tokens, EOS included
    logps            [P*G, T] the sampler's log-probs of its tokens (0 on padding)
    truncated        [P*G] bool: no EOS within the token limit
    texts            the P*G decoded completions
    rewards          [P*G, R], one column per reward function; NaN where a function did not score a row
    failures, timeouts   reward-function calls that raised / ran out of time while scoring these rows
    baseline         [P*G] or None: ReMax's baseline, the score of the prompt's greedy completion on each row
    """

    prompts: list[PromptExample]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    rewards: torch.Tensor
    failures: int = 0
    timeouts: int = 0
    baseline: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return len(self.texts) // max(len(self.prompts), 1)

    def __len__(self) -> int:
        """The number of groups (prompts)."""
        return len(self.prompts)

    def select(self, groups: list[int]) -> ScoredRollout:
        """These groups only, in this order (the reward-call counts stay those of the whole)."""
        G = self.group_size
        rows = [g * G + j for g in groups for j in range(G)]
        return ScoredRollout([self.prompts[g] for g in groups], self.completion_ids[rows], self.completion_mask[rows],
                             self.logps[rows], self.truncated[rows], [self.texts[r] for r in rows], self.rewards[rows],
                             self.failures, self.timeouts, None if self.baseline is None else self.baseline[rows])

    @staticmethod
    def cat(parts: list[ScoredRollout], pad_id: int) -> ScoredRollout:
        """The groups of several rollouts (e.g. dynamic-sampling rounds) in one, padded to one width."""
        return ScoredRollout(
            [p for part in parts for p in part.prompts],
            pad_cat([p.completion_ids for p in parts], pad_id),
            pad_cat([p.completion_mask for p in parts], 0),
            pad_cat([p.logps for p in parts], 0.0),
            torch.cat([p.truncated for p in parts]),
            [t for p in parts for t in p.texts],
            torch.cat([p.rewards for p in parts]),
            sum(p.failures for p in parts),
            sum(p.timeouts for p in parts),
            None if parts[0].baseline is None else torch.cat([p.baseline for p in parts]),
        )


def sample(engine: GenerationEngine, prompts: list[PromptExample], num_generations: int, *, seeds: list[int],
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           **sampling) -> Rollout:
    """G = `num_generations` completions of every prompt (temperature 0: greedy), one seed per prompt.
    `sampling`: further options the engine takes (min_p, repetition_penalty); unset ones are not passed, so an
    engine without them still serves runs that do not use them."""
    extra = {k: v for k, v in sampling.items() if v is not None and not (k == "repetition_penalty" and v == 1.0)}
    return engine.generate([e.prompt_ids for e in prompts], num_generations, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k, seeds=seeds, **extra)


def score(funcs, prompts: list[PromptExample], rollout: Rollout, *, weights=None,
          timeout: float = 10.0) -> ScoredRollout:
    """Run the reward functions `[(name, fn)]` over a rollout of these prompts. A function sees the prompt as
    the data has it, the completion text, the prompt's other columns, and `completion_lengths` and `truncated`
    (see `posttrain.rollout.rewards.compute_rewards`, which also says what a failing function costs)."""
    G = len(rollout.texts) // len(prompts)
    columns = {k: [e.columns.get(k) for e in prompts for _ in range(G)] for k in prompts[0].columns}
    columns["completion_lengths"] = rollout.completion_lengths.tolist()
    columns["truncated"] = rollout.truncated.tolist()
    result = compute_rewards(funcs, [e.prompt for e in prompts for _ in range(G)], rollout.texts, columns,
                             weights=weights, timeout=timeout)
    return ScoredRollout(list(prompts), rollout.completion_ids, rollout.completion_mask, rollout.logps,
                         rollout.truncated, rollout.texts, result.rewards, sum(result.failures.values()),
                         sum(result.timeouts.values()))


def has_signal(group_rewards: torch.Tensor, weights=None, per_reward: bool = False) -> bool:
    """A group teaches something when the quantity its advantages normalise varies (unscorable rows ignored):
    the WEIGHTED total of the rewards (GRPO; unweighted, (1, 0) and (0, 1) would look equal under weights
    (1, 0.2)), or any single reward (`per_reward`: GDPO normalises each reward within the group)."""
    r = group_rewards[~group_rewards.isnan().all(-1)]
    if r.shape[0] < 2:
        return False
    if per_reward:
        columns = [c[~c.isnan()] for c in r.T]
        return any(c.numel() >= 2 and bool((c != c[0]).any()) for c in columns)
    w = torch.ones(r.shape[1]) if weights is None else torch.as_tensor(weights, dtype=r.dtype)
    total = (r * w).nansum(-1)
    return bool((total != total[0]).any())


def filter_groups(scored: ScoredRollout, weights=None, per_reward: bool = False) -> ScoredRollout:
    """Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476): the groups with a learning signal
    (`has_signal`); a group whose rewards are all equal has zero advantages and only dilutes the batch."""
    G = scored.group_size
    return scored.select([g for g in range(len(scored)) if has_signal(scored.rewards[g * G : (g + 1) * G], weights,
                                                                       per_reward)])


def generate_and_score(engine: GenerationEngine, prompts: list[PromptExample], funcs, *, num_generations: int,
                       seed: int, round: int, max_new_tokens: int, sampling: dict, weights=None,
                       timeout: float = 10.0) -> ScoredRollout:
    """One generation round: G completions of each prompt, each prompt seeded by (seed, round, its index), scored
    by the reward functions `[(name, fn)]`. `sampling`: temperature, top_p, top_k, min_p, repetition_penalty."""
    seeds = [prompt_seed(seed, round, e.index) for e in prompts]
    out = sample(engine, prompts, num_generations, seeds=seeds, max_new_tokens=max_new_tokens, **sampling)
    return score(funcs, prompts, out, weights=weights, timeout=timeout)


def draw_prompts(pool: list[PromptExample], n: int, *, seed: int, round: int, last: ScoredRollout) -> list[PromptExample]:
    """n prompts of `pool` for another dynamic-sampling round, without replacement (a prompt drawn twice would get
    the same seed and so the same completions), seeded by the run, the round and the last round's first prompt."""
    g = torch.Generator().manual_seed(prompt_seed(seed, round, last.prompts[0].index))
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]


def collect(rollout: Callable[[list[PromptExample]], ScoredRollout], examples: list[PromptExample],
            draw: Callable[[list[ScoredRollout]], list[PromptExample]], pad_id: int, *, dynamic: bool, max_rounds: int,
            keep: Callable[[ScoredRollout], ScoredRollout]) -> tuple[ScoredRollout, list[ScoredRollout], int]:
    """(the step's groups, every round as sampled, how many informative groups were found). `rollout(prompts)`
    runs one round. Without `dynamic`: one round of `examples`. With it (DAPO's dynamic sampling): `keep` the
    informative groups of each round and sample more prompts (`draw(rounds so far)` picks them) until
    `len(examples)` groups are kept or `max_rounds` rounds ran; when nothing at all is informative, the last
    round as it is."""
    rounds = [rollout(examples)]
    if not dynamic:
        return rounds[0], rounds, len(rounds[0])
    kept = [keep(rounds[0])]
    while sum(len(k) for k in kept) < len(examples) and len(rounds) < max_rounds:
        rounds.append(rollout(draw(rounds)))
        kept.append(keep(rounds[-1]))
    groups = ScoredRollout.cat(kept, pad_id)
    if not len(groups):
        return rounds[-1], rounds, 0
    return groups.select(list(range(min(len(groups), len(examples))))), rounds, len(groups)
