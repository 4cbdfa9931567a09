"""SIGKILL anywhere, then `resume_from_checkpoint=latest`: the run ends with bit-identical final weights,
metrics.jsonl rows identical to an uninterrupted run with the same seed (timing fields aside), and
completions.jsonl / samples.jsonl with no duplicated or missing row. For sft, dpo (reference copy, precomputed
reference, LoRA adapter), kto, rm, grpo (num_iterations=2 with dynamic sampling) and ppo (a separate critic, 2
mini-batches x 2 epochs a rollout, an adaptive KL coefficient; and LoRA with a shared critic): the critic too.

"Anywhere" is made deterministic: the run is a fork of the test process in which one function is wrapped to
SIGKILL the process at its n-th call (after an optimizer step, in the middle of a rollout, half-way through a
metrics row, while a checkpoint is being written, while the final model is moved into place), plus one kill
at a seeded random moment of the run. Every kill point is a place where a real kill can land; whichever it
is, the resumed run must end where the uninterrupted one did.
"""

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import posttrain.engine as engine_mod
import posttrain.rollout.groups as groups
from posttrain import cli
from posttrain.runlog import RunLog

pytestmark = pytest.mark.slow

TIMING = ("seconds", "per_second")

REWARDS = '''
def chars(prompts, completions, **kwargs):
    return [float(len(c) % 3) for c in completions]
'''


# --------------------------------------------------------------------------------------------- kill points


def kill_at(target, name, nth, when=None, after=False):
    """In the child: wrap target.name to SIGKILL the process at its nth call for which `when(*args)` holds
    (before the call, or just after it returns)."""

    def install():
        real = getattr(target, name)
        seen = [0]

        def wrapped(*args, **kwargs):
            hit = when is None or when(*args, **kwargs)
            if hit:
                seen[0] += 1
                if seen[0] == nth and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if hit and seen[0] == nth and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(target, name, wrapped)

    return install


def after_step(n):
    """Right after the n-th optimizer step: the step's row not yet written, its checkpoint not yet taken."""
    return kill_at(engine_mod.Engine, "_run_step", n, after=True)


def in_checkpoint(step):
    """While checkpoint-<step> is written: its weights are on disk, its optimizer state is not."""
    return kill_at(torch, "save", 1, when=lambda obj, path, *a, **k: f".checkpoint-{step}.tmp" in str(path))


def in_metrics_row(n):
    """Half-way through writing the n-th metrics.jsonl row (a cut last line is left behind)."""

    def install():
        real = RunLog.step
        seen = [0]

        def step(self, row, write=True):
            if write:
                seen[0] += 1
                if seen[0] == n:
                    with (self.out / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(row)[:25])
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(self, row, write)

        RunLog.step = step

    return install


def in_final_save():
    """While the final model is moved into place (the weights file is moved last)."""
    return kill_at(engine_mod.os, "replace", 1, when=lambda src, dst, *a: ".final.tmp" in str(src))


def in_rollout(n):
    """In the middle of the n-th rollout's scoring (after generation)."""
    return kill_at(groups, "compute_rewards", n)


# ------------------------------------------------------------------------------------------------ running


def _private_tqdm_locks():
    """Give this fork its own tqdm locks. tqdm guards its bars with one multiprocessing lock shared by every
    forked child; a child SIGKILLed while drawing a bar (transformers' weight-loading bar, say) leaves that lock
    held for good, and the test process's next bar waits on it forever (seen in CI: the resume after a random
    kill hung). A thread lock held by another thread at the fork would hang the child the same way."""
    from tqdm.std import TqdmDefaultWriteLock, TRLock, tqdm

    TqdmDefaultWriteLock.th_lock, TqdmDefaultWriteLock.mp_lock = TRLock(), None
    classes = [tqdm]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if isinstance(cls.__dict__.get("_lock"), TqdmDefaultWriteLock):
            cls._lock.locks = [TqdmDefaultWriteLock.th_lock]


def _child(argv, install, log):
    _private_tqdm_locks()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if install is not None:
        install()
    os._exit(cli.main(argv))


def killed_run(argv, install=None, after_seconds=None, log=None) -> int:
    """Run the command in a fork that dies as `install` arranges (or is SIGKILLed after `after_seconds`);
    return its exit code (-9 when killed)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, install, str(log)))
    proc.start()
    proc.join(after_seconds if after_seconds is not None else 300)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    return proc.exitcode


def final_weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    weights = load_file(str(out / name))
    for critic in ("critic.safetensors", "critic/model.safetensors"):  # PPO's, saved beside the policy
        if (out / critic).exists():
            weights |= {f"critic:{k}": v for k, v in load_file(str(out / critic)).items()}
    return weights


def lines(out, name):
    path = out / name
    return path.read_text().splitlines() if path.exists() else []


def untimed(out):
    return [{k: v for k, v in json.loads(r).items() if not any(t in k for t in TIMING)} for r in lines(out, "metrics.jsonl")]


def assert_same_run(resumed, straight):
    a, b = final_weights(resumed), final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    got, want = untimed(resumed), untimed(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want
    for name in ("completions.jsonl", "samples.jsonl"):
        assert lines(resumed, name) == lines(straight, name), name


# ------------------------------------------------------------------------------------------------- setups


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from posttrain.testing import save_tiny

    root = tmp_path_factory.mktemp("kill")
    nums = [(a, b) for a in range(1, 5) for b in range(1, 3)]
    data = {
        "sft": write_jsonl(root / "sft.jsonl", [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a, b in nums]),
        "pairs": write_jsonl(root / "pairs.jsonl", [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}",
                                                    "rejected": f" {a + b + 1}"} for a, b in nums]),
        "unpaired": write_jsonl(root / "unpaired.jsonl", [{"prompt": f"{a} + {b} =", "completion": f" {a + b + i % 2}",
                                                          "label": i % 2 == 0} for i, (a, b) in enumerate(nums)]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a, b in nums]),
    }
    (root / "kill_rewards.py").write_text(REWARDS)
    return root, save_tiny(root / "model"), data


COMMON = ["max_steps=4", "save_steps=1", "progress=false", "seed=3"]


def jobs(world):
    root, model, data = world
    base = [f"model={model}", *COMMON]
    return {
        "sft": ["sft", *base, f"dataset={data['sft']}", "batch_size=2", "micro_batch_size=1", "learning_rate=1e-3"],
        "dpo-copy": ["dpo", *base, f"dataset={data['pairs']}", "batch_size=2", "micro_batch_size=1", "learning_rate=1e-3"],
        "dpo-precomputed": ["dpo", *base, f"dataset={data['pairs']}", "batch_size=2", "micro_batch_size=2",
                            "learning_rate=1e-3", "precompute_ref_log_probs=true"],
        "dpo-lora": ["dpo", *base, f"dataset={data['pairs']}", "batch_size=2", "micro_batch_size=2",
                     "learning_rate=1e-2", "lora.r=2", "lora.target_modules=all-linear"],
        "kto": ["kto", *base, f"dataset={data['unpaired']}", "batch_size=4", "micro_batch_size=2", "learning_rate=1e-3"],
        "rm": ["rm", *base, f"dataset={data['pairs']}", "batch_size=2", "micro_batch_size=1", "learning_rate=1e-3"],
        "grpo": ["grpo", *base, f"dataset={data['prompts']}", "batch_size=2", "micro_batch_size=4", "num_generations=2",
                 "max_completion_length=4", "num_iterations=2", "dynamic_sampling=true", "max_sampling_rounds=2",
                 "reward_funcs=kill_rewards:chars", "log_completions=true", "learning_rate=1e-2",
                 "num_completions_to_print=2"],
        "ppo": ["ppo", *base, f"dataset={data['prompts']}", "batch_size=2", "micro_batch_size=2", "num_mini_batches=2",
                "max_completion_length=4", "num_iterations=2", "max_steps=8", "kl_coef=0.1", "kl_target=1",
                "reward_funcs=kill_rewards:chars", "log_completions=true", "learning_rate=1e-2"],
        "ppo-lora": ["ppo", *base, f"dataset={data['prompts']}", "batch_size=2", "micro_batch_size=2",
                     "critic=shared", "lora.r=2", "max_completion_length=4", "num_iterations=2",
                     "reward_funcs=kill_rewards:chars", "learning_rate=1e-2"],
    }


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """Each job run once without interruption (lazily), and how long it took."""
    done = {}
    root = world[0]

    def get(job):
        if job not in done:
            out = tmp_path_factory.mktemp("straight") / job
            t0 = time.time()
            assert cli.main([*jobs(world)[job], f"output_dir={out}"]) == 0
            done[job] = (out, time.time() - t0)
        return done[job]

    old = os.getcwd()
    os.chdir(root)  # kill_rewards.py is importable from the working directory
    yield get
    os.chdir(old)


@pytest.fixture(autouse=True)
def _env(world, monkeypatch):
    monkeypatch.chdir(world[0])
    monkeypatch.setenv("POSTTRAIN_CACHE", str(world[0] / "cache"))  # the precomputed reference's disk cache


CASES = [
    ("sft", after_step(2)),
    ("sft", in_checkpoint(3)),
    ("sft", in_metrics_row(2)),
    ("sft", in_final_save()),
    ("dpo-copy", in_checkpoint(2)),
    ("dpo-precomputed", after_step(3)),
    ("dpo-lora", in_checkpoint(3)),
    ("kto", after_step(1)),
    ("rm", in_checkpoint(2)),
    ("grpo", in_rollout(2)),  # the second batch's rollout, after checkpoint-2
    ("grpo", in_checkpoint(3)),  # resumes from checkpoint-2, a batch boundary: the batch is sampled again
    ("grpo", in_checkpoint(4)),  # resumes from checkpoint-3, mid-batch: step 4 trains on the saved rollouts
    ("grpo", after_step(1)),
    ("ppo", in_rollout(2)),  # the second rollout, after checkpoint-4
    ("ppo", in_checkpoint(3)),  # resumes from checkpoint-2: mid-rollout, the second of its mini-batches next
    ("ppo", in_final_save()),  # the critic is in place, the policy's weights not yet
    ("ppo-lora", after_step(3)),
]


@pytest.mark.parametrize("job,install", CASES, ids=[f"{j}-{i.__qualname__.split('.')[0]}-{n}" for n, (j, i) in enumerate(CASES)])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, world, straight, job, install, caplog):
    want, _ = straight(job)
    out = tmp_path / "run"
    argv = [*jobs(world)[job], f"output_dir={out}"]
    assert killed_run(argv, install, log=tmp_path / "killed.log") == -signal.SIGKILL
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    partial = sorted(p.name for p in out.glob(".checkpoint-*.tmp"))
    if partial:  # killed while writing a checkpoint: never renamed into place, the previous one is intact
        step = int(partial[0].split("-")[1].split(".")[0])
        assert done and done[-1] == step - 1 and (out / f"checkpoint-{step - 1}" / "trainer_state.json").exists()
    caplog.set_level("INFO", logger="posttrain")
    assert cli.main([*argv, "resume_from_checkpoint=latest"]) == 0
    if done:
        assert f"resumed from {out / f'checkpoint-{done[-1]}'} at step {done[-1]}" in caplog.text
    assert_same_run(out, want)


@pytest.mark.parametrize("job,seed", [("sft", 0), ("grpo", 1), ("dpo-copy", 2)])
def test_sigkill_at_a_random_moment(tmp_path, world, straight, job, seed):
    """A kill at a seeded random moment of the run (anywhere: loading, a step, a write); whatever it hit, one
    resume ends on the uninterrupted run."""
    want, seconds = straight(job)
    out = tmp_path / "run"
    argv = [*jobs(world)[job], f"output_dir={out}"]
    code = killed_run(argv, after_seconds=random.Random(seed).uniform(0.1, 1.0) * seconds, log=tmp_path / "k.log")
    assert code in (-signal.SIGKILL, 0)  # 0: the run won the race and finished; resuming it changes nothing
    assert cli.main([*argv, "resume_from_checkpoint=latest"]) == 0
    assert_same_run(out, want)


def test_two_kills_in_a_row(tmp_path, world, straight):
    """Killed, resumed, killed again (while writing a checkpoint), resumed: still the uninterrupted run."""
    want, _ = straight("grpo")
    out = tmp_path / "run"
    argv = [*jobs(world)["grpo"], f"output_dir={out}"]
    assert killed_run(argv, after_step(1), log=tmp_path / "a.log") == -signal.SIGKILL
    assert killed_run([*argv, "resume_from_checkpoint=latest"], in_checkpoint(3), log=tmp_path / "b.log") == -9
    assert cli.main([*argv, "resume_from_checkpoint=latest"]) == 0
    assert_same_run(out, want)
