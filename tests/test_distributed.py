"""Data parallelism on the CPU: 2 processes (torchrun, gloo) against 1 process with the same GLOBAL batch.

Why the numbers must agree (posttrain.parallel): with batch_size 4 the single process runs micro-batches of
examples {0, 1} and {2, 3} of a step; rank 0 gets {0, 2} and rank 1 {1, 3}. Every micro-batch loss is divided
by the step's global count (tokens for SFT and dapo, pairs for DPO), all-reduced, and the ranks' gradients
are summed, so loss and gradient are the same sums in another order: equal to float32 rounding (1e-5 on
losses of ~1-6 and on weights after 2-3 Adam steps). GRPO samples with one seed per prompt (`GRPO._seed`), so
a prompt gets the same completions whichever rank generates it.

All 2-process jobs run one after another in ONE launch (`driver`), to pay torchrun's and the imports' start
once; the single-process runs go through the same CLI in this process. The stop-and-resume test starts
`torchrun -m posttrain dpo` itself, sends SIGTERM to one rank after the first checkpoint, resumes the run
with `resume_from_checkpoint=latest`, and compares with the uninterrupted 2-process run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import cli
from posttrain.testing import save_tiny

REPO = Path(__file__).resolve().parents[1]

SFT_ROWS = [
    {"prompt": "What is 12 + 7?", "completion": " The answer is 19."},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"prompt": "Human: How do I bake bread?", "completion": " Mix flour, water, salt and yeast, then bake."},
    {"prompt": "What is 7 * 3?", "completion": " 21"},
    {"prompt": "the a an", "completion": " is of to and in that it for you with on as are"},
    {"prompt": "Reply with only the final number. 48 + 1 =", "completion": " 49"},
    {"prompt": "user", "completion": " You are a helpful assistant."},
    {"prompt": "Natalia sold clips to 48 of her friends in April.", "completion": " She sold 48."},
]
PAIRS = [
    {"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21 is the answer."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Human: How do I bake bread?", "chosen": " Mix flour, water, salt and yeast, then bake.",
     "rejected": " No."},
    {"prompt": "What is 7 * 3?", "chosen": " 21", "rejected": " 73"},
    {"prompt": "the a an", "chosen": " is of to", "rejected": " and in that it for you"},
    {"prompt": "user", "chosen": " You are a helpful assistant.", "rejected": " assistant"},
]
PROMPTS = ["What is 12 + 7?", "2 + 2 =", "Human: How do I bake bread?", "the a an is of", "What is 7 * 3?",
           "user"]
REWARDS = "def chars(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"

DRIVER = """
import json, os, sys, time
from posttrain import cli, engine, parallel

gate = os.environ.get("GATE")
if gate:  # hold every rank after each checkpoint until the file `gate` exists
    save = engine.Engine.save_checkpoint
    def held(self, step):
        path = save(self, step)
        while not os.path.exists(gate):
            time.sleep(0.01)
        return path
    engine.Engine.save_checkpoint = held

parallel.init()  # one process group for every job (cli.main then leaves it open)
for args in json.load(open(sys.argv[1])):
    rc = cli.main(args)
    if rc:
        raise SystemExit(rc)
parallel.shutdown()
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child_env(tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join([str(REPO), str(tmp)]))
    env.pop("RANK", None)
    return env


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def kill(launch):
    """SIGKILL a torchrun launch still running and its workers (each in a session of its own)."""
    if launch.poll() is None:
        workers = worker_pids(launch.pid)
        launch.kill()
        for pid in workers.values():
            os.kill(pid, signal.SIGKILL)
        launch.wait()


def worker_pids(parent):
    """{LOCAL_RANK: pid} of torchrun's worker processes (its children that carry LOCAL_RANK), from /proc."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else 0
            if ppid == parent:
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
                if "LOCAL_RANK" in env:
                    found[int(env["LOCAL_RANK"])] = int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return found


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out, name="model.safetensors"):
    return load_file(str(Path(out) / name))


def assert_equal_weights(a, b):
    assert a.keys() == b.keys() and len(a) > 5
    for n in a:
        assert torch.equal(a[n], b[n]), (n, float((a[n] - b[n]).abs().max()))


def assert_same_training(a, b, start=None, rel=1e-3, job=""):
    """Two runs that should be the same training ended on the same weights, up to float rounding.

    Compared per tensor as a norm, relative to how far training moved it (`start`: the initial weights; without
    them the tensor's own norm): AdamW's first steps move every entry by about +-lr whatever its gradient's size,
    so an entry whose gradient is at rounding level (~1e-9, near Adam's eps) lands anywhere in that range in
    either run, which an elementwise atol flags at random (seen in CI: 1.2e-5 on one entry of a reward model).
    A real defect (a rank's data missing, a wrong reduction) moves most entries and fails by orders of magnitude.
    """
    assert a.keys() == b.keys() and len(a) >= 2, job
    for n in a:
        moved = a[n] - start[n] if start is not None and n in start else a[n]
        diff, scale = float((a[n] - b[n]).double().norm()), float(moved.double().norm())
        assert diff <= rel * scale + 1e-7, (job, n, diff, scale)


def assert_same_rows(a, b, keys, rel=1e-5, job=""):
    assert [r["step"] for r in a] == [r["step"] for r in b], job
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra or k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6 if rel else 0), (job, ra["step"], k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = save_tiny(tmp / "model")
    sft_data = write_jsonl(tmp / "sft.jsonl", SFT_ROWS)
    pairs = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    prompts = write_jsonl(tmp / "prompts.jsonl",
                          [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)])
    (tmp / "dist_test_rewards.py").write_text(REWARDS)
    common = [f"model={model}", "batch_size=4", "progress=false", "seed=0", "lr_scheduler=constant",
              "warmup_ratio=0"]
    sft = ["sft", *common, f"dataset={sft_data}", f"eval_dataset={sft_data}", "micro_batch_size=2",
           "max_steps=3", "eval_steps=2", "learning_rate=1e-3", "max_length=64"]
    dpo = ["dpo", *common, f"dataset={pairs}", "micro_batch_size=2", "max_steps=3", "learning_rate=1e-3",
           "max_length=64"]
    grpo = ["grpo", *common, f"dataset={prompts}", "reward_funcs=dist_test_rewards:chars",
            "num_generations=4", "max_completion_length=6", "temperature=0.8", "micro_batch_size=4",
            "max_steps=2", "learning_rate=1e-2", "scale_rewards=batch", "chat_prompts=false"]
    # PPO: a separate critic (full fine-tuning, reference copy) and LoRA with a shared critic (adapter-off
    # reference); 2 mini-batches x 2 epochs, so each rank's mini-batch is one prompt of the global mini-batch.
    ppo = ["ppo", *common, f"dataset={prompts}", "reward_funcs=dist_test_rewards:chars", "max_completion_length=6",
           "temperature=0.8", "micro_batch_size=2", "max_steps=4", "learning_rate=1e-3", "chat_prompts=false",
           "num_iterations=2", "num_mini_batches=2", "kl_coef=0.1"]
    jobs = {
        "ppo": ppo,
        "ppo_fsdp": ppo + ["distributed=fsdp"],
        "ppo_lora_shared": ppo + ["critic=shared", "lora.r=4", "lora.merge=true"],
        "sft": sft,
        "dpo": dpo,
        "grpo": grpo,
        "sft_fsdp": sft + ["distributed=fsdp"],
        "dpo_fsdp": dpo + ["distributed=fsdp"],
        "grpo_fsdp": grpo + ["distributed=fsdp"],
        "dpo_lora": dpo + ["lora.r=4", "lora.merge=true"],  # reference = the adapter switched off
        "dpo_lora_fsdp": dpo + ["lora.r=4", "lora.merge=true", "distributed=fsdp"],
        "dpo_pre": dpo + ["precompute_ref_log_probs=true"],
        "sft_lora_fsdp": sft + ["lora.r=4", "distributed=fsdp"],  # the adapter alone is saved
        "kto": ["kto", *common, f"dataset={pairs}", "micro_batch_size=2", "max_steps=2",
                "learning_rate=1e-3"],
        "rm": ["rm", *common, f"dataset={pairs}", "micro_batch_size=2", "max_steps=2", "learning_rate=1e-3"],
        # Resume tests: the uninterrupted 2-process runs (DDP, FSDP), and FSDP resumed in the same launch
        # from checkpoint-2 of its uninterrupted run by a fresh engine (shards read back through DCP).
        "resume_ref": dpo + ["max_steps=6", "save_steps=2"],
        "resume_ref_fsdp": dpo + ["max_steps=6", "save_steps=2", "distributed=fsdp"],
        "resumed_fsdp": dpo + ["max_steps=6", "distributed=fsdp",
                               f"resume_from_checkpoint={tmp / 'two' / 'resume_ref_fsdp' / 'checkpoint-2'}"],
    }
    one = {name: tmp / "one" / name for name in jobs if "resume" not in name}
    two = {name: tmp / "two" / name for name in jobs}
    runs = [args + [f"output_dir={two[name]}", "distributed=" + ("fsdp" if "fsdp" in name else "ddp")]
            for name, args in jobs.items()]
    (tmp / "jobs.json").write_text(json.dumps(runs))
    (tmp / "driver.py").write_text(DRIVER)
    env = child_env(tmp)
    env["POSTTRAIN_CACHE"] = str(tmp / "cache")
    launch = subprocess.Popen(torchrun(str(tmp / "driver.py"), str(tmp / "jobs.json")), env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Meanwhile, the single-process runs in this process (the cache of precomputed reference log-probs is
    # separate, so each side computes its own).
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("POSTTRAIN_CACHE", str(tmp / "cache1"))
            mp.syspath_prepend(str(tmp))
            for name, path in one.items():
                args = [a for a in jobs[name] if a != "distributed=fsdp"]
                assert cli.main(args + [f"output_dir={path}"]) == 0, name
        log, _ = launch.communicate(timeout=600)
    finally:
        kill(launch)  # after a failure here or a hang there: leave no process behind
    assert launch.returncode == 0, log[-4000:]
    return {"tmp": tmp, "one": one, "two": two, "jobs": jobs, "env": env, "log": log}


def test_two_processes_equal_one(setup):
    """SFT, DPO, GRPO and PPO (DDP and FSDP2; PPO's critic separate and shared), LoRA (the adapter-off reference; saved merged or as the adapter),
    precomputed reference, KTO (z0 over both ranks) and a reward model: the 2-process runs log the same
    losses and metrics and end on the same weights as 1 process."""
    one, two = setup["one"], setup["two"]
    start = weights(setup["tmp"] / "model")
    for name in one:
        a, b = metrics(one[name]), metrics(two[name])
        keys = ["loss", "learning_rate", "kl"]
        if name.startswith("sft"):
            keys += ["nll", "eval/loss"]  # token means over both ranks' micro-batches
        if name.startswith("dpo"):
            keys += ["rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]
        if name.startswith("grpo"):
            # reward statistics over the global batch (scale_rewards=batch: the batch std too)
            keys += ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy"]
        if name == "kto":  # sums and counts added over both ranks before dividing
            keys += ["rewards/chosen", "rewards/rejected", "logps/chosen", "count/desirable", "count/undesirable"]
        if name == "rm":  # the step's extremes over both ranks
            keys += ["min_reward", "max_reward", "accuracy"]
        if name.startswith("ppo"):  # GAE's whitening and the explained variance over the global batch
            keys += ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
                     "val/explained_variance", "policy/entropy_avg", "policy/approxkl_avg"]
        assert_same_rows(a, b, keys, job=name)
        # grad_norm is the norm of the SUMMED gradient: averaged over ranks (DDP's and FSDP's default) it
        # would be half as large, a difference the weights alone would hide (Adam's update ignores the scale).
        assert_same_rows(a, b, ["grad_norm"], rel=1e-4, job=name)
        file = "adapter_model.safetensors" if name == "sft_lora_fsdp" else "model.safetensors"
        a, b = weights(one[name], file), weights(two[name], file)
        assert len(a) > 5, name
        assert_same_training(a, b, start if file == "model.safetensors" else None, job=name)
        if name.startswith("ppo"):  # and the critic, saved beside the policy (a shared head has 2 tensors)
            file = "critic.safetensors" if "shared" in name else "critic/model.safetensors"
            assert_same_training(weights(one[name], file), weights(two[name], file), job=name)
    # The comparisons are not vacuous: training moved the weights and the GRPO rewards differed.
    assert any(not torch.allclose(start[n], w, atol=1e-4) for n, w in weights(two["dpo"]).items())
    assert all(r["reward_std"] > 0 for r in metrics(two["grpo"]))
    assert any(not torch.allclose(start[n], w, atol=1e-5) for n, w in weights(two["ppo"]).items())
    assert weights(two["ppo"], "critic/model.safetensors")["score.weight"].abs().max() > 0  # trained from zero
    assert all(r["loss/value_avg"] > 0 and r["policy/approxkl_avg"] >= 0 for r in metrics(two["ppo"]))
    # One process wrote the run directory: one metrics row per step, one config, nothing from rank 1.
    assert [r["step"] for r in metrics(two["sft"]) if "loss" in r] == [1, 2, 3]
    assert (two["sft"] / "config.yaml").read_text().count("distributed: ddp") == 1
    assert "eval/loss" in metrics(two["sft"])[1]


def test_fsdp_checkpoint_resumes(setup):
    """FSDP2 checkpoints hold each rank's shards (torch.distributed.checkpoint) and the RNG state of each
    rank; a fresh engine resumed from checkpoint-2 ends on the weights of the uninterrupted run."""
    ref, resumed = setup["two"]["resume_ref_fsdp"], setup["two"]["resumed_fsdp"]
    assert (ref / "checkpoint-2" / "sharded" / ".metadata").is_file()
    assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in (ref / "checkpoint-2").iterdir()}
    assert json.loads((ref / "checkpoint-2" / "trainer_state.json").read_text())["world_size"] == 2
    assert_equal_weights(weights(resumed), weights(ref))
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(ref)][2:]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_rank_killed_after_a_checkpoint_stops_both_and_the_run_resumes(setup):
    """A 2-process DPO run (6 steps, a checkpoint every 2) gets SIGTERM on rank 1 ONLY, after checkpoint-2.
    The ranks agree to stop after the same step (the flag is all-reduced every step; a rank stopping alone
    would leave the other waiting in a collective), write the checkpoint of that step (both ranks' RNG
    states in it) and exit non-zero. Resumed with `torchrun -m posttrain dpo ... resume_from_checkpoint=
    latest`, the run ends on the weights of the uninterrupted 2-process run, bit for bit (the same processes
    add the same numbers in the same order), and logs the same losses after the checkpoint.
    So that the signal always lands mid-run, the driver holds both ranks after each checkpoint until the test
    says go (GATE); the tiny run would otherwise finish within a few polling intervals."""
    tmp, env = setup["tmp"], dict(setup["env"], GATE=str(setup["tmp"] / "go"))
    out = tmp / "killed"
    args = setup["jobs"]["resume_ref"] + [f"output_dir={out}", "distributed=ddp"]
    (tmp / "killed.json").write_text(json.dumps([args]))
    run = subprocess.Popen(torchrun(str(tmp / "driver.py"), str(tmp / "killed.json")), env=env, cwd=tmp,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-2").is_dir() and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(worker_pids(run.pid)[1], signal.SIGTERM)
        (tmp / "go").touch()
        _, err = run.communicate(timeout=120)
    finally:
        kill(run)
    assert run.returncode != 0, err[-4000:]
    assert "interrupted at step 2; checkpoint saved" in err  # rank 0, which got no signal, stopped there too
    assert not (out / "model.safetensors").exists()  # stopped mid-run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # stopped after step 2
    assert {"rng-0.pt", "rng-1.pt"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
    for attempt in range(2):
        resumed = subprocess.run(torchrun("-m", "posttrain", *args, "resume_from_checkpoint=latest"), check=False,
                                 env=setup["env"], cwd=tmp, capture_output=True, text=True, timeout=600)
        # Once in CI (1 run in ~50 here) a gloo worker aborted inside torch with no Python error ("terminate
        # called without an active exception"). Resuming again is what a user would do, and it must still
        # land on the same weights; any other failure fails at once.
        if resumed.returncode == 0 or "terminate called without an active exception" not in resumed.stderr:
            break
        print(f"resume attempt {attempt + 1} aborted inside gloo; resuming again:\n{resumed.stderr[-2000:]}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    ref = setup["two"]["resume_ref"]
    assert_equal_weights(weights(out), weights(ref))
    assert_same_rows(metrics(out)[2:], metrics(ref)[2:], ["loss", "grad_norm", "rewards/margins"], rel=0)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
