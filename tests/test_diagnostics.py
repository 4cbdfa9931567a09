"""Live diagnostics: every rule fires on a synthetic metrics stream that shows its failure (and only that rule
fires there), and stays quiet on a healthy stream of the same algorithm; RunLog prints a finding once, records
`diagnostics/<name>` = 1 on the step it fired (writing that row even when logging_steps skips it), and a
resumed run does not fire a recorded rule again. The end-to-end GRPO run is in test_report.py."""

import json
import logging

import pytest

from posttrain.algorithms import dpo, grpo, kto, online_dpo, ppo
from posttrain.config import DiagnosticsConfig
from posttrain.diagnostics import RULES, Context, Diagnostics, condition_text, steps_per_rollout
from posttrain.runlog import RunLog

STEPS = 40


def grpo_cfg(**kw):
    cfg = grpo.Config(max_completion_length=64, reward_weights=[1.0, 0.2], beta=0.04, **kw)
    cfg.validate()
    return cfg


def dpo_cfg(**kw):
    cfg = dpo.Config(**kw)
    cfg.validate()  # beta defaults to 0.1
    return cfg


def fired(command, cfg, rows, **context):
    d = Diagnostics(Context(command, cfg, **context))
    for row in rows:
        d.observe(row)
    return d.fired


def grpo_rows(n=STEPS, **override):
    """A healthy GRPO run: reward rising, a third of the groups without signal, short completions, KL creeping
    up from 0, entropy easing from 0.6 to 0.4, format reward rising with accuracy. `override` replaces a
    metric by a function of the step."""
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "loss": 0.01, "reward": 0.2 + 0.01 * s, "rewards/accuracy/mean": 0.2 + 0.01 * s,
               "rewards/format/mean": 0.3 + 0.01 * s, "frac_reward_zero_std": 0.35, "completions/mean_length": 20.0,
               "completions/clipped_ratio": 0.02, "kl": 0.001 * (s - 1), "entropy": 0.6 - 0.005 * s}
        row.update({k: f(s) for k, f in override.items()})
        rows.append(row)
    return rows


def dpo_rows(n=30, eval_every=10, **override):
    """A healthy DPO run (beta 0.1): loss easing from 0.69, accuracy 0.5 -> 0.8, the chosen log-probs steady and
    the rejected ones falling, margin of log-ratios 9 nats at the end, held-out accuracy improving."""
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "loss": 0.69 - 0.005 * s, "rewards/accuracies": 0.5 + 0.01 * s, "rewards/chosen": 0.01 * s,
               "rewards/rejected": -0.02 * s, "rewards/margins": 0.03 * s, "logps/chosen": -50.0 + 0.01 * s,
               "logps/rejected": -55.0 - 0.1 * s}
        if eval_every and s % eval_every == 0:
            row["eval/rewards/accuracies"] = 0.5 + 0.05 * s / eval_every
        row.update({k: f(s) for k, f in override.items()})
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def test_every_rule_is_covered_and_names_its_thresholds():
    names = {r.name for r in RULES}
    assert names == {"dpo_loss_collapse", "dpo_beta_drift", "grpo_sparse_reward", "kl_blowup", "length_exploit",
                     "entropy_collapse", "orpo_without_sft", "reward_hacking_format", "critic_not_learning"}
    thresholds = vars(DiagnosticsConfig())
    for rule in RULES:
        text = condition_text(rule, thresholds)
        assert "{" not in text, (rule.name, text)  # every placeholder is a real config key
        assert rule.meaning and rule.advice


def test_healthy_streams_fire_nothing():
    assert fired("grpo", grpo_cfg(), grpo_rows()) == {}
    assert fired("dpo", dpo_cfg(), dpo_rows(), has_eval=True) == {}
    assert fired("dpo", dpo_cfg(loss_type=["orpo"]), dpo_rows(), has_eval=True, has_chat_template=True) == {}
    kto_rows = [{"step": s, "loss": 0.5, "kl": 0.5 + 0.01 * s, "logps/chosen": -40.0, "logps/rejected": -45.0 - 0.1 * s,
                 "rewards/margins": 0.02 * s} for s in range(1, 31)]
    assert fired("kto", kto.Config(), kto_rows) == {}
    ppo_rows = [{"step": s, "objective/kl": 0.2 + 0.02 * s, "completions/mean_length": 10.0,
                 "policy/entropy_avg": 2.0 - 0.01 * s, "val/explained_variance": min(0.5, 0.02 * s)}
                for s in range(1, 41)]
    assert fired("ppo", grpo_cfg(), ppo_rows) == {}


def test_grpo_sparse_reward():
    rows = grpo_rows(frac_reward_zero_std=lambda s: 1.0 if s >= 3 else 0.5)
    assert fired("grpo", grpo_cfg(), rows) == {"grpo_sparse_reward": 7}  # steps 3..7: five above 0.9
    # One step with signal in between restarts the count.
    rows = grpo_rows(frac_reward_zero_std=lambda s: 0.5 if s % 5 == 0 else 0.95)
    assert fired("grpo", grpo_cfg(), rows) == {}
    cfg = grpo_cfg(diagnostics=DiagnosticsConfig(sparse_reward_steps=4))
    assert fired("grpo", cfg, rows) == {"grpo_sparse_reward": 4}


def test_kl_blowup_online_and_offline():
    rows = grpo_rows(kl=lambda s: 0.01 * 1.5 ** s)  # 0.01 -> x1.5 every step
    found = fired("grpo", grpo_cfg(), rows)
    assert list(found) == ["kl_blowup"] and found["kl_blowup"] == 10  # halves 0.040 -> 0.30: x7.6 >= 5
    rows = grpo_rows(kl=lambda s: 1.5 if s == 25 else 0.02)
    assert fired("grpo", grpo_cfg(), rows) == {"kl_blowup": 25}  # above kl_max = 1 per token
    # PPO joins through its own metric: objective/kl is nats per completion (TRL's), read per token.
    ppo = [{"step": s, "objective/kl": 10 * 0.01 * 1.5 ** s, "completions/mean_length": 10.0,
            "policy/entropy_avg": 2.0} for s in range(1, 41)]
    assert fired("ppo", grpo_cfg(), ppo) == {"kl_blowup": 10}
    # 5 nats per completion of 10 tokens is 0.5 per token: below kl_max = 1, though above it per completion.
    ppo = [{"step": s, "objective/kl": 5.0, "completions/mean_length": 10.0, "policy/entropy_avg": 2.0}
           for s in range(1, 41)]
    assert fired("ppo", grpo_cfg(), ppo) == {}
    # DPO: |rewards| / beta, the implicit log-ratio, above 30 nats per sequence (mean over the last 5 steps).
    rows = dpo_rows(n=15, **{"rewards/chosen": lambda s: -0.3 * s, "rewards/rejected": lambda s: -0.3 * s,
                             "rewards/margins": lambda s: 0.0})
    # 3s nats at step s; the mean of steps s-4..s is 3(s-2) > 30 first at s = 13.
    assert fired("dpo", dpo_cfg(), rows, has_eval=True) == {"kl_blowup": 13}
    # Reference-free losses have no log-ratio: the same stream says nothing for SimPO.
    assert fired("dpo", dpo_cfg(loss_type=["simpo"]), rows, has_eval=True) == {}


def test_length_exploit():
    # Most completions cut at the limit and not getting fewer: the first full window (10 steps) fires.
    assert fired("grpo", grpo_cfg(), grpo_rows(**{"completions/clipped_ratio": lambda s: 0.6})) == {"length_exploit": 10}
    # Length climbing to the limit (64) while the reward rises: the mean of steps s-4..s is 20 + 1.2(s-2), which
    # passes 0.9 x 64 = 57.6 first at s = 34.
    rows = grpo_rows(**{"completions/mean_length": lambda s: min(64.0, 20 + 1.2 * s)})
    assert fired("grpo", grpo_cfg(), rows) == {"length_exploit": 34}
    # The same lengths with a falling reward are not an exploit.
    rows = grpo_rows(**{"completions/mean_length": lambda s: min(64.0, 20 + 1.2 * s), "reward": lambda s: 0.6 - 0.01 * s})
    assert fired("grpo", grpo_cfg(), rows) == {}


def test_entropy_collapse():
    """0.6 x 0.85^s: its first five steps average 0.378; the mean of steps s-4..s is 0.445 x 0.85^(s-4), below
    a tenth of that first at s = 20."""
    rows = grpo_rows(entropy=lambda s: 0.6 * 0.85**s)
    assert fired("grpo", grpo_cfg(), rows) == {"entropy_collapse": 20}
    ppo = [{"step": s, "objective/kl": 0.1, "completions/mean_length": 10.0, "policy/entropy_avg": 0.6 * 0.85**s}
           for s in range(1, 41)]
    assert fired("ppo", grpo_cfg(), ppo) == {"entropy_collapse": 20}


def test_critic_not_learning():
    """PPO's val/explained_variance (1 - Var(R - V) / Var(R)): a zero-started head gives 0 at first, so nothing fires
    before critic_warmup = 20 steps; then the mean of the last window = 10 values must be above 0."""
    def ppo(ev):
        return [{"step": s, "objective/kl": 0.1, "completions/mean_length": 10.0, "policy/entropy_avg": 2.0,
                 "val/explained_variance": ev(s)} for s in range(1, 41)]
    # Stuck at 0 (values stay at their zero start): fires on the first step past the warm-up.
    assert fired("ppo", grpo_cfg(), ppo(lambda s: 0.0)) == {"critic_not_learning": 21}
    # A critic worse than a constant: the mean of steps s-9..s is 0.3 - 0.02(s - 4.5), at or below 0 from s = 20;
    # reported at 21, the first step past the warm-up.
    assert fired("ppo", grpo_cfg(), ppo(lambda s: 0.3 - 0.02 * s)) == {"critic_not_learning": 21}
    # Learning slowly, then well: the mean of steps s-9..s of -0.2 + 0.01s is -0.2 + 0.01(s - 4.5) > 0 once
    # s > 24.5; at steps 21..24 it is still <= 0, so it fires at 21...
    assert fired("ppo", grpo_cfg(), ppo(lambda s: -0.2 + 0.01 * s)) == {"critic_not_learning": 21}
    # ...and with a longer warm-up of 25 steps it never does.
    cfg = grpo_cfg(diagnostics=DiagnosticsConfig(critic_warmup=25))
    assert fired("ppo", cfg, ppo(lambda s: -0.2 + 0.01 * s)) == {}
    # A threshold: a critic explaining only 5% of the variance fires with explained_variance_min=0.1.
    cfg = grpo_cfg(diagnostics=DiagnosticsConfig(explained_variance_min=0.1))
    assert fired("ppo", cfg, ppo(lambda s: 0.05)) == {"critic_not_learning": 21}
    # The GRPO preset with a critic logs the same metric; without one (no such metric) nothing is read.
    assert fired("grpo", grpo_cfg(), [{**r, "val/explained_variance": 0.0} for r in grpo_rows()]) == {"critic_not_learning": 21}
    assert fired("grpo", grpo_cfg(), grpo_rows()) == {}
    # NaN (returns that do not vary) is not a value: a stream of NaNs says nothing.
    assert fired("ppo", grpo_cfg(), ppo(lambda s: float("nan"))) == {}


def ppo_cfg(**kw):
    cfg = ppo.Config(max_completion_length=64, reward_weights=[1.0, 0.2], **kw)
    cfg.validate()
    return cfg


def test_steps_per_rollout():
    assert steps_per_rollout(ppo_cfg()) == 4  # num_ppo_epochs = 4 over one mini-batch
    assert steps_per_rollout(ppo_cfg(num_mini_batches=2)) == 8
    assert steps_per_rollout(grpo_cfg()) == 1
    assert steps_per_rollout(grpo_cfg(num_iterations=2, generation_batch_size=3 * 8 * 8)) == 6  # 3 slices x 2
    assert steps_per_rollout(dpo_cfg()) == 1


def test_a_generation_counts_once_in_the_trends():
    """PPO (4 epochs a rollout) logs rollout r's rewards on steps 4r-3..4r. The format-hacking stream of
    test_reward_hacking_format, one value per ROLLOUT, fires on the first step of rollout 24 (step 93), as it does
    at step 24 when every step is a rollout; counted per row, ten rows would hold 2.5 rollouts and the rule would
    see a different stream. A metric that changes every step (policy/entropy_avg) still counts every step: the
    entropy collapse fires at step 20 as in test_entropy_collapse."""
    acc = lambda r: 0.2 + 0.02 * r if r <= 15 else 0.5 - 0.02 * (r - 15)  # noqa: E731
    fmt = lambda r: min(1.0, 0.3 + 0.05 * r)  # noqa: E731
    rows = [{"step": s, "loss": 0.01 * s, "objective/kl": 0.1, "completions/mean_length": 10.0,
             "policy/entropy_avg": 2.0, "rewards/accuracy/mean": acc((s + 3) // 4),
             "rewards/format/mean": fmt((s + 3) // 4)} for s in range(1, 161)]
    assert fired("ppo", ppo_cfg(), rows) == {"reward_hacking_format": 93}
    # The same rows read as one generation per step (num_iterations=1): each value counts 4 times, the halves of
    # the window hold 1.25 rollouts, and the rule fires already at step 82 (rollout 21).
    assert fired("ppo", ppo_cfg(num_iterations=1), rows) == {"reward_hacking_format": 82}
    collapsing = [{**r, "policy/entropy_avg": 0.6 * 0.85 ** r["step"], "rewards/accuracy/mean": 0.3,
                   "rewards/format/mean": 0.5} for r in rows[:40]]
    assert fired("ppo", ppo_cfg(), collapsing) == {"entropy_collapse": 20}


def test_reward_hacking_format():
    """The format reward saturates at 1.0 from step 14 while accuracy peaks at step 15 (best 5-step mean 0.476)
    and falls 0.02 a step: its 5-step mean 0.5 - 0.02(s - 17) is 0.1 below the best first at s = 24."""
    acc = {"rewards/accuracy/mean": lambda s: 0.2 + 0.02 * s if s <= 15 else 0.5 - 0.02 * (s - 15),
           "rewards/format/mean": lambda s: min(1.0, 0.3 + 0.05 * s)}
    assert fired("grpo", grpo_cfg(), grpo_rows(**acc)) == {"reward_hacking_format": 24}
    # Equal weights: the main reward is the first one listed, the same verdict.
    cfg = grpo_cfg()
    cfg.reward_weights = None
    assert fired("grpo", cfg, grpo_rows(**acc)) == {"reward_hacking_format": 24}
    # Accuracy falling while the format reward falls too: no hacking of the format.
    falling = {**acc, "rewards/format/mean": lambda s: 0.5 - 0.01 * s}
    assert fired("grpo", grpo_cfg(), grpo_rows(**falling)) == {}


def test_orpo_without_sft():
    rows = dpo_rows(n=5, eval_every=0)
    for loss in ("orpo", "simpo"):
        assert fired("dpo", dpo_cfg(loss_type=[loss]), rows, has_chat_template=False, has_eval=True) == {"orpo_without_sft": 1}
        assert fired("dpo", dpo_cfg(loss_type=[loss]), rows, has_chat_template=True, has_eval=True) == {}
    assert fired("dpo", dpo_cfg(), rows, has_chat_template=False, has_eval=True) == {}


def test_dpo_loss_collapse():
    collapsed = {"loss": lambda s: 0.01 if s >= 2 else 0.69, "rewards/accuracies": lambda s: 1.0 if s >= 2 else 0.5}
    flat_eval = {"eval/rewards/accuracies": lambda s: 0.55 if s % 10 == 0 else None}
    # Collapsed by step 4; the first held-out accuracy (step 10) is 0.45 below the training accuracy.
    assert fired("dpo", dpo_cfg(), dpo_rows(**collapsed, **flat_eval), has_eval=True) == {"dpo_loss_collapse": 10}
    # No eval set: fires once the collapse has held 3 steps.
    assert fired("dpo", dpo_cfg(), dpo_rows(eval_every=0, **collapsed), has_eval=False) == {"dpo_loss_collapse": 4}
    # Held-out accuracy improving with it: the pairs are easy but teach something.
    rising = {"eval/rewards/accuracies": lambda s: {10: 0.9, 20: 0.95, 30: 0.97}.get(s)}
    assert fired("dpo", dpo_cfg(), dpo_rows(**collapsed, **rising), has_eval=True) == {}
    # A loss that gets small only late (after collapse_within = 20 steps) is convergence, not collapse.
    late = {"loss": lambda s: 0.01 if s >= 25 else 0.6}
    assert fired("dpo", dpo_cfg(), dpo_rows(eval_every=0, **late), has_eval=False) == {}


def test_dpo_beta_drift():
    """Both log-probs falling: chosen -50 - 0.5s (first five steps -51.5; 5-step mean -50 - 0.5(s-2) is 5 below
    that first at s = 16), rejected -55 - 0.8s (5 below its start from s = 12)."""
    down = {"logps/chosen": lambda s: -50 - 0.5 * s, "logps/rejected": lambda s: -55 - 0.8 * s}
    assert fired("dpo", dpo_cfg(), dpo_rows(**down), has_eval=True) == {"dpo_beta_drift": 16}
    # The margin of log-ratios 0.2s / 0.1 = 2s nats; its 5-step mean 2(s-2) passes 40 at s = 23.
    wide = {"rewards/margins": lambda s: 0.2 * s}
    assert fired("dpo", dpo_cfg(), dpo_rows(**wide), has_eval=True) == {"dpo_beta_drift": 23}
    # Only the rejected side falling is what DPO is meant to do.
    assert fired("dpo", dpo_cfg(), dpo_rows(**{"logps/rejected": down["logps/rejected"]}), has_eval=True) == {}


def online_dpo_rows(n=STEPS, **override):
    """A healthy online DPO run (beta 0.1): the sampled pairs' DPO metrics as dpo_rows, plus the rollout's own
    (reward rising, a fifth of the prompts without a pair, short completions), as posttrain online-dpo logs them."""
    rows = dpo_rows(n=n, eval_every=0)
    for row in rows:
        s = row["step"]
        row.update({"reward": 0.2 + 0.01 * s, "rewards/accuracy/mean": 0.2 + 0.01 * s,
                    "rewards/format/mean": 0.3 + 0.01 * s, "frac_prompts_without_pair": 0.2,
                    "completions/mean_length": 14.0, "completions/clipped_ratio": 0.05})
        row.update({k: f(s) for k, f in override.items()})
    return rows


def test_online_dpo_joins_the_rules_it_logs_for():
    """Online DPO logs DPO's pair metrics and the rollout's: the DPO rules and the online ones read them."""
    cfg = online_dpo.Config(max_completion_length=16, reward_weights=[1.0, 0.2])
    cfg.validate()
    rules = {r.name for r in Diagnostics(Context("online-dpo", cfg)).rules}
    assert rules == {"dpo_beta_drift", "grpo_sparse_reward", "kl_blowup", "length_exploit", "reward_hacking_format"}
    assert fired("online-dpo", cfg, online_dpo_rows()) == {}
    # No pair for 95% of the prompts, steps 3..7: the sparse-reward rule (five steps above 0.9).
    rows = online_dpo_rows(frac_prompts_without_pair=lambda s: 0.95 if s >= 3 else 0.2)
    assert fired("online-dpo", cfg, rows) == {"grpo_sparse_reward": 7}
    # Completions cut at the 16-token limit: the first full window.
    rows = online_dpo_rows(**{"completions/clipped_ratio": lambda s: 0.7})
    assert fired("online-dpo", cfg, rows) == {"length_exploit": 10}
    # Both log-probs falling as in test_dpo_beta_drift: the same step.
    down = {"logps/chosen": lambda s: -50 - 0.5 * s, "logps/rejected": lambda s: -55 - 0.8 * s}
    assert fired("online-dpo", cfg, online_dpo_rows(**down)) == {"dpo_beta_drift": 16}
    # The format reward saturating while accuracy falls, as in test_reward_hacking_format.
    acc = {"rewards/accuracy/mean": lambda s: 0.2 + 0.02 * s if s <= 15 else 0.5 - 0.02 * (s - 15),
           "rewards/format/mean": lambda s: min(1.0, 0.3 + 0.05 * s)}
    assert fired("online-dpo", cfg, online_dpo_rows(**acc)) == {"reward_hacking_format": 24}


# ------------------------------------------------------------------------------------------- RunLog


def sparse_rows(n):
    return [{"step": s, "loss": 0.0, "reward": 0.0, "frac_reward_zero_std": 1.0} for s in range(1, n + 1)]


def test_runlog_prints_once_and_records_the_step(tmp_path, caplog):
    cfg = grpo_cfg(output_dir=str(tmp_path))
    runlog = RunLog(cfg, tmp_path)
    runlog.start(0)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        for row in sparse_rows(8):
            runlog.step(row, write=row["step"] % 2 == 0)  # logging_steps = 2
    warnings = [r.getMessage() for r in caplog.records if "grpo_sparse_reward" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("diagnostic grpo_sparse_reward at step 5: frac_reward_zero_std above 0.9 for 5 steps")
    assert "what it means: no learning signal" in warnings[0] and "what to try: give partial credit" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8]  # step 5 written although logging skips it
    assert [r.get("diagnostics/grpo_sparse_reward") for r in rows] == [None, None, 1, None, None]
    assert (tmp_path / "config.yaml").read_text().startswith("# posttrain grpo")


def test_runlog_resume_keeps_rows_and_does_not_fire_again(tmp_path, caplog):
    cfg = grpo_cfg(output_dir=str(tmp_path))
    first = RunLog(cfg, tmp_path)
    first.start(0)
    for row in sparse_rows(8):
        first.step(row)
        first.samples(row["step"], [{"prompt": "p", "completion": f"c{row['step']}", "rewards": {"a": 0.0}}])
    resumed = RunLog(cfg, tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        resumed.start(6)  # from checkpoint-6: rows 7 and 8 belong to the abandoned run
        for row in sparse_rows(12)[6:]:
            resumed.step(row)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in rows if "diagnostics/grpo_sparse_reward" in r] == [5]
    assert not [r for r in caplog.records if "grpo_sparse_reward" in r.getMessage()]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in samples] == [f"c{i}" for i in range(1, 7)]


def test_diagnostics_false_turns_them_off(tmp_path, caplog):
    from posttrain.config import UserError, describe, load_config

    cfg = load_config(grpo.Config, None, ["diagnostics=false", f"output_dir={tmp_path}"])
    assert cfg.diagnostics is None
    runlog = RunLog(cfg, tmp_path)
    runlog.start(0)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        for row in sparse_rows(8):
            runlog.step(row)
    assert not caplog.records
    assert "diagnostics/" not in (tmp_path / "metrics.jsonl").read_text()
    cfg = load_config(grpo.Config, None, ["diagnostics.sparse_reward_steps=2", "diagnostics.window=6"])
    assert cfg.diagnostics.sparse_reward_steps == 2 and cfg.diagnostics.window == 6 and cfg.diagnostics.kl_max == 1.0
    with pytest.raises(UserError, match="diagnostics.sparse_reward_step: unknown key .*did you mean 'sparse_reward_steps'"):
        load_config(grpo.Config, None, ["diagnostics.sparse_reward_step=2"])
    with pytest.raises(UserError, match="diagnostics: window must be >= 2"):
        load_config(grpo.Config, None, ["diagnostics.window=1"])
    text = describe(grpo.Config)
    assert "diagnostics (DiagnosticsConfig | None, default on)" in text and "diagnostics.kl_max (float, default 1.0)" in text


def test_a_long_run_keeps_only_the_ends_of_each_metric():
    """100k steps: the history stays small, and a collapse late in the run is still judged against the start."""
    d = Diagnostics(Context("grpo", grpo_cfg()))
    for s in range(1, 100_001):
        d.observe({"step": s, "entropy": 0.6 if s < 99_990 else 0.01, "frac_reward_zero_std": 0.3})
    assert max(len(v) for v in d._history.values()) <= 10 + 10 + 256
    assert d.fired == {"entropy_collapse": 99_994}  # 5 of the last 10 at 0.01: mean 0.01 < 0.06
