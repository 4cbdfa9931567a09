"""`posttrain report`: the HTML (every metric family plotted, eval as a second series, overlays, diagnostics,
sampled completions, config and its differences, nothing fetched at view time), the page rendered in headless
Chromium and checked pixel by pixel, the report written at each checkpoint and at the end, the trackers
(`report_to`), and a real tiny GRPO run whose reward is always 0 end to end."""

import html
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import cli, report
from posttrain.config import UserError, load_config
from posttrain.report import PALETTE, load_run, render, screenshot, write_report
from posttrain.runlog import RunLog, resolve_report_to


def write_run(path: Path, command: str, rows: list[dict], config: dict | None = None, samples=None) -> Path:
    path.mkdir(parents=True)
    config = {"model": "tiny", "learning_rate": 1e-5, "num_generations": 8, "output_dir": str(path),
              "diagnostics": {"sparse_reward_frac": 0.9, "sparse_reward_steps": 5}, **(config or {})}
    (path / "config.yaml").write_text(f"# posttrain {command}: the resolved config of this run\n" + yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if samples:
        (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def grpo_rows(n=20, lr=1e-5, shift=0.0):
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "epoch": s / n, "loss": 0.05 * math.sin(s) + shift, "grad_norm": 1.0 + 0.5 * math.cos(s),
               "learning_rate": lr * (1 - s / n), "tokens_per_second": 900 + 20 * s, "reward": 0.2 + 0.02 * s + shift,
               "reward_std": 0.4 - 0.005 * s, "rewards/accuracy/mean": 0.1 + 0.02 * s + shift, "rewards/accuracy/std": 0.3,
               "rewards/format/mean": 0.5 + 0.01 * s, "rewards/format/std": 0.45 - 0.01 * s,
               "frac_reward_zero_std": 0.95 if s <= 6 else 0.5, "completions/mean_length": 12 - 0.2 * s,
               "completions/min_length": 3.0 + (s % 3), "completions/max_length": 16.0, "completions/clipped_ratio": 0.3 - 0.01 * s,
               "kl": 0.002 * s, "entropy": 0.8 - 0.01 * s, "clip_ratio/low_mean": 0.001 * s, "clip_ratio/high_mean": 0.002,
               "clip_ratio/region_mean": 0.002 + 0.001 * s, "generation_seconds": 2.0 + (s % 4)}
        if s == 5:
            row["diagnostics/grpo_sparse_reward"] = 1
        if s % 10 == 0:
            row["eval/accuracy"] = 0.2 + 0.01 * s + shift
        rows.append(row)
    rows.append({"step": n, "eval/accuracy": 0.45 + shift, "eval/format": 0.8})
    return rows


SAMPLES = [{"step": s, "prompt": "What is 2 + 2?", "completion": f"<b>{s}</b> is my answer",
            "rewards": {"accuracy": float(s == 4), "format": 1.0}, "advantage": 0.5} for s in range(1, 21)]


@pytest.fixture
def grpo_run(tmp_path):
    return write_run(tmp_path / "grpo-a", "grpo", grpo_rows(), samples=SAMPLES)


def figures(page: str) -> dict[str, str]:
    found = re.findall(r'<figure class="panel" data-title="([^"]+)".*?>(.*?)</figure>', page, re.S)
    return {html.unescape(title): body for title, body in found}


def polyline(figure: str, label: str) -> list[tuple[float, float]]:
    found = re.search(r'<polyline points="([^"]+)"[^>]*><title>([^<]*)</title>', figure)
    for pts, title in re.findall(r'<polyline points="([^"]+)"[^>]*><title>([^<]*)</title>', figure):
        if label in title.split(" = "):
            return [tuple(map(float, p.split(","))) for p in pts.split()]
    raise AssertionError(f"no series {label!r} in {found}")


def test_every_family_is_plotted_with_eval_beside_training(grpo_run):
    page = render([load_run(grpo_run)])
    figs = figures(page)
    assert list(figs)[:13] == [
        "loss", "learning rate", "gradient norm (before clipping)", "throughput (tokens / s)", "reward (mean)",
        "reward std", "held-out accuracy / reward accuracy", "groups with zero reward std", "completion length (tokens)",
        "clipped ratio (cut at max_completion_length)", "KL to the reference", "entropy (nats / token)", "clip ratios"]
    assert "generation_seconds" in figs  # a metric no family names gets its own plot
    # Reward: the total and each function's mean (+ the held-out mean of `format`, drawn dashed with markers).
    reward = figs["reward (mean)"]
    for label in ("reward", "rewards/accuracy/mean", "rewards/format/mean"):
        assert len(polyline(reward, label)) == 20
    assert re.search(r'<circle [^>]*><title>eval/format: 0.8 at step 20</title>', reward)
    acc = figs["held-out accuracy / reward accuracy"]
    assert re.search(r'stroke-dasharray="4 3"[^>]*><title>eval/accuracy</title>', acc)
    assert len(re.findall(r"<circle ", acc)) == 3  # steps 10, 20 and the final eval
    assert set(polyline(figs["reward std"], "rewards/format/std")) and polyline(figs["reward std"], "reward_std")
    # The learning rate falls linearly to 0: x grows left to right, y (screen, downwards) grows with it, and the
    # last point sits on the bottom of the range.
    lr = polyline(figs["learning rate"], "learning_rate")
    assert [x for x, _ in lr] == sorted(x for x, _ in lr) and [y for _, y in lr] == sorted(y for _, y in lr)
    assert lr[0][0] == report.PAD_L + report.INSET and lr[-1][0] == report.W - report.PAD_R - report.INSET
    # The diagnostic: listed with its condition, meaning and advice, and marked in the plot of its metric.
    assert re.search(r'class="fired">grpo_sparse_reward</td><td>5</td><td>frac_reward_zero_std &gt; 0.9 for 5 '
                     r"consecutive steps</td><td>no learning signal", page)
    assert 'class="diagnostic"' in figs["groups with zero reward std"] and 'class="diagnostic"' not in figs["loss"]
    # Completions: a few steps (first, last, evenly between), escaped.
    shown = re.findall(r"<tr><td>(\d+)</td><td class='prompt'", page)
    assert sorted(set(map(int, shown))) == [1, 7, 14, 20]
    assert "&lt;b&gt;20&lt;/b&gt; is my answer" in page and "<b>20</b>" not in page
    # Self-contained: nothing is fetched when the page opens.
    assert not re.search(r"(src|href)=|<link|url\(|@import|<script", page)
    assert "learning_rate: 1.0e-05" in page  # the resolved config


def test_overlay_colours_by_run_and_lists_the_keys_that_differ(tmp_path, grpo_run):
    other = write_run(tmp_path / "grpo-b", "grpo", grpo_rows(lr=3e-5, shift=0.1), {"learning_rate": 3e-5})
    out = write_report([grpo_run, other], tmp_path / "both.html")
    page = out.read_text()
    figs = re.findall(r'<figure class="panel" data-title="([^"]+)" data-colors="([^"]+)"', page)
    assert dict(figs)["loss"] == f"{PALETTE[0]} {PALETTE[1]}"  # one colour per run
    loss = figures(page)["loss"]
    a, b = polyline(loss, "grpo-a: loss"), polyline(loss, "grpo-b: loss")
    assert len(a) == len(b) == 20 and all(yb < ya for (_, ya), (_, yb) in zip(a, b))  # b is 0.1 higher everywhere
    # Metrics of one plot differ by dash when colours mean runs.
    reward = figures(page)["reward (mean)"]
    assert re.search(rf'stroke="{PALETTE[1]}" stroke-width="2" stroke-dasharray="7 3"[^>]*><title>grpo-b: rewards/accuracy/mean<', reward)
    # Equal series (the format reward is the same in both runs) are drawn once, named for both.
    assert "<title>grpo-a: rewards/format/mean = grpo-b: rewards/format/mean</title>" in reward
    diff = re.search(r"Keys that differ:</p><table>(.*?)</table>", page, re.S).group(1)
    assert "<td>learning_rate</td><td>1e-05</td><td>3e-05</td>" in diff and "output_dir" in diff
    assert "num_generations" not in diff


def test_ppo_and_dpo_metrics_join_their_families(tmp_path):
    ppo = [{"step": s, "objective/kl": 0.1 * s, "policy/entropy_avg": 2 - 0.01 * s, "objective/scores": 0.1 * s,
            "objective/rlhf_reward": 0.05 * s, "objective/non_score_reward": -0.01 * s, "policy/approxkl_avg": 0.01,
            "policy/clipfrac_avg": 0.1, "loss/policy_avg": -0.1, "loss/value_avg": 0.2 + 0.01 * s,
            "val/clipfrac_avg": 0.05, "val/explained_variance": 0.1 * s} for s in range(1, 6)]
    figs = figures(render([load_run(write_run(tmp_path / "ppo", "ppo", ppo))]))
    assert {"KL to the reference", "entropy (nats / token)", "reward (mean)", "non-score reward (KL penalty)",
            "approximate KL old -> new", "clip ratios", "loss", "value explained variance"} == set(figs)
    assert polyline(figs["loss"], "loss/value_avg") and polyline(figs["clip ratios"], "val/clipfrac_avg")
    dpo = [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
            "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.02 * s, "logps/chosen": -50.0, "logps/rejected": -52.0 - s,
            "logits/chosen": 1.0, "logits/rejected": 1.1, "eval/rewards/accuracies": 0.6} for s in range(1, 6)]
    figs = figures(render([load_run(write_run(tmp_path / "dpo", "dpo", dpo))]))
    assert {"loss", "implicit rewards", "held-out accuracy / reward accuracy", "log-probs (per sequence)", "mean logits"} == set(figs)


def test_cli_writes_the_page_and_errors_are_one_line(tmp_path, grpo_run, capsys, monkeypatch):
    assert cli.main(["report", str(grpo_run)]) == 0
    assert capsys.readouterr().out == f"report: {grpo_run / 'report.html'}\n"
    out = tmp_path / "x.html"
    assert cli.main(["report", str(grpo_run), str(grpo_run), "--out", str(out)]) == 0 and out.exists()
    bad = write_run(tmp_path / "bad", "grpo", [{"step": 1}])
    (bad / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    (tmp_path / "empty").mkdir()
    for argv, message in ((["report", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such run folder"),
                          (["report", str(tmp_path / "empty")], "not a posttrain run folder"),
                          (["report", str(bad)], f"{bad / 'metrics.jsonl'}:2: not a JSON line"),
                          (["report", str(grpo_run), "lr=1"], "takes run folders, not settings"),
                          (["report"], "usage: posttrain report RUN_DIR")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    # --png renders the page it wrote (the route test_chromium_draws_every_series_inside_its_plot checks).
    shots = []
    monkeypatch.setattr(report, "screenshot", lambda page, png: shots.append((Path(page), png)))
    assert cli.main(["report", str(grpo_run), "--out", str(out), "--png", str(tmp_path / "x.png")]) == 0
    assert shots == [(out, str(tmp_path / "x.png"))]
    assert capsys.readouterr().out == f"report: {out}\nscreenshot: {tmp_path / 'x.png'}\n"
    # A run still writing its last line is read up to it.
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert [r["step"] for r in load_run(bad).rows] == [1]


# ----------------------------------------------------------------------------------- headless Chromium


def _pixels_near(counts, color, tol=10) -> int:
    """Pixels within `tol` per channel of `color`, from a crop's getcolors() counts."""
    want = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return sum(n for n, rgb in counts if all(abs(a - b) <= tol for a, b in zip(rgb, want)))


@pytest.mark.skipif(report.find_browser() is None and not os.environ.get("CI"),
                    reason="no Chromium (apt-get install chromium; .ci/run installs it)")
def test_chromium_draws_every_series_inside_its_plot(tmp_path, grpo_run):
    """The page as a person sees it: rendered by headless Chromium, every plot area holds pixels of each of its
    series' colours (and not of a colour it does not use), and the page is not blank."""
    from PIL import Image

    # Two runs overlaid: one run's plots use up to 4 colours, the overlay's one per run.
    other = write_run(tmp_path / "grpo-b", "grpo", grpo_rows(lr=3e-5, shift=0.1), {"learning_rate": 3e-5})
    page = write_report([grpo_run, other], tmp_path / "page.html")
    png = tmp_path / "page.png"
    layout = screenshot(page, png)
    img = Image.open(png).convert("RGB")
    assert img.size[1] == math.ceil(layout["height"]) and img.size[0] == 1280
    assert [p["title"] for p in layout["plots"]] == list(figures(page.read_text()))
    for plot in layout["plots"]:
        box = (round(plot["x"]) + 2, round(plot["y"]) + 2, round(plot["x"] + plot["width"]) - 2,
               round(plot["y"] + plot["height"]) - 2)
        assert box[2] <= img.size[0] and box[3] <= img.size[1], plot
        assert plot["colors"], plot
        counts = img.crop(box).getcolors(1 << 16)
        for color in plot["colors"]:
            assert _pixels_near(counts, color) >= 8, (plot["title"], color)
        unused = next(c for c in PALETTE if c not in plot["colors"])
        assert _pixels_near(counts, unused, tol=4) == 0, (plot["title"], unused)
    colors = {rgb: n for n, rgb in img.getcolors(1 << 18)}
    background = colors.get((250, 250, 250), 0) + colors.get((255, 255, 255), 0)
    assert background / (img.size[0] * img.size[1]) < 0.97 and len(colors) > 50  # not blank


# ------------------------------------------------------------------------------- written by every run


def test_every_checkpoint_and_the_end_write_the_report(tmp_path, tokenizer, monkeypatch, capsys):
    from test_engine import config, examples, run

    from posttrain.testing import tiny_model

    written = []

    def record(paths, out):
        rows = (Path(paths[0]) / "metrics.jsonl").read_text().splitlines()
        written.append((len(rows), Path(out)))
        Path(out).write_text("page")

    monkeypatch.setattr(report, "write_report", record)
    run(config(tmp_path, max_steps=3, save_steps=2), tokenizer, tiny_model(tokenizer), examples(tokenizer))
    assert written == [(2, tmp_path / "report.html"), (3, tmp_path / "report.html")]  # checkpoint-2, then the end
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {tmp_path / 'report.html'}"


def test_report_to_names_and_missing_trackers(tmp_path, monkeypatch, caplog):
    import importlib.util

    from posttrain.algorithms import sft
    from posttrain.runlog import _OPENERS

    assert resolve_report_to(["none"]) == [] and resolve_report_to([]) == []
    assert resolve_report_to(["TensorBoard", "tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    installed = [n for n in ("tensorboard", "trackio", "wandb") if importlib.util.find_spec(n)]
    assert resolve_report_to(["all"]) == installed
    with caplog.at_level("WARNING", logger="posttrain"):
        assert resolve_report_to(["mlflow", "tensorboard"]) == ["tensorboard"]  # a TRL config still runs
    assert caplog.messages == ["report_to: mlflow is not supported by posttrain (supported: tensorboard, trackio, "
                               "wandb); the run goes on without it"]
    with pytest.raises(UserError, match=r"report_to: unknown tracker 'tensorbord' \(one of: tensorboard, trackio"):
        load_config(sft.Config, None, ["report_to=tensorbord"])
    assert load_config(sft.Config, None, ["report_to=tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]

    # Not installed: one warning line naming the package and how to install it; the run goes on.
    real = importlib.util.find_spec
    fake = {"tensorboard": None, "wandb": object()}  # wandb "installed" but failing to start
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake[name] if name in fake else real(name, *a))
    monkeypatch.setitem(_OPENERS, "wandb", lambda *a: (_ for _ in ()).throw(RuntimeError("api key\nmissing")))
    caplog.clear()
    cfg = load_config(sft.Config, None, [f"output_dir={tmp_path}", "report_to=tensorboard,wandb"])
    runlog = RunLog(cfg, tmp_path)
    with caplog.at_level("WARNING", logger="posttrain"):
        runlog.start(0)
        runlog.step({"step": 1, "loss": 1.0})
    assert runlog.trackers == {}
    assert caplog.messages == [
        "report_to: tensorboard is not installed (pip install tensorboard); the run goes on without it",
        "report_to: wandb could not start (RuntimeError: api key missing); the run goes on without it"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}


ZERO_REWARD = "def zero(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n"


def test_grpo_with_reward_always_zero_end_to_end(tmp_path, tiny_model_dir):
    """`python -m posttrain grpo` on the tiny model, reward always 0 for 5 steps: the sparse-reward warning is
    printed once (step 5), recorded in metrics.jsonl, listed in report.html, whose path is the last line printed;
    TensorBoard's own event reader (and trackio's storage, when installed) hold the same scalars as metrics.jsonl;
    wandb, not installed, costs one warning line."""
    import importlib.util

    (tmp_path / "zero_reward.py").write_text(ZERO_REWARD)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "4"}) + "\n" for p in ("2 + 2 =", "What is 2 + 2?")))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "e2e", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "grpo", f"model={tiny_model_dir}", f"dataset={data}", f"output_dir={out}",
         "reward_funcs=zero_reward:zero", "num_generations=4", "max_completion_length=4", "batch_size=2",
         "micro_batch_size=8", "max_steps=5", "progress=false", "report_to=tensorboard,trackio,wandb"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"report: {out / 'report.html'}"
    assert proc.stderr.count("diagnostic grpo_sparse_reward at step 5: frac_reward_zero_std above 0.9 for 5 steps") == 1
    assert "what to try: give partial credit" in proc.stderr
    if importlib.util.find_spec("wandb") is None:
        assert proc.stderr.count("report_to: wandb is not installed (pip install wandb); the run goes on without it") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("diagnostics/grpo_sparse_reward") for r in rows] == [None, None, None, None, 1]
    assert all(r["frac_reward_zero_std"] == 1.0 and r["reward"] == 0.0 for r in rows)
    page = (out / "report.html").read_text()
    assert 'class="fired">grpo_sparse_reward</td><td>5</td>' in page and "Sampled completions" in page
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [s for s in range(1, 6) for _ in range(4)]  # 4 a step by default
    assert all(s["rewards"] == {"zero_reward:zero": 0.0} and s["advantage"] == 0.0 for s in samples)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for name in ("loss", "reward", "frac_reward_zero_std", "entropy", "learning_rate", "completions/mean_length"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows], name
    assert [(e.step, e.value) for e in events.Scalars("diagnostics/grpo_sparse_reward")] == [(5, 1.0)]

    if importlib.util.find_spec("trackio") is not None:  # trackio's own storage, read in a process that points at it
        code = ("import json; from trackio.sqlite_storage import SQLiteStorage; "
                "print(json.dumps(SQLiteStorage.get_logs('e2e', 'run')))")
        logs = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                         timeout=120, check=True).stdout.splitlines()[-1])
        assert [(x["step"], x["entropy"]) for x in logs] == [(r["step"], pytest.approx(r["entropy"])) for r in rows]
        assert [x.get("diagnostics/grpo_sparse_reward") for x in logs] == [None, None, None, None, 1]
