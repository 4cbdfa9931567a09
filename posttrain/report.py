"""`posttrain report RUN_DIR [RUN_DIR ...] [--out report.html] [--png report.png]`: one self-contained HTML page
(inline SVG and CSS, nothing fetched when it is opened) of one run or several overlaid.

It shows the resolved config (and, for several runs, the keys that differ), curves over steps for every metric
in metrics.jsonl grouped by family (`PANELS`; `eval/x` is drawn beside `x` as a dashed series with markers), the
diagnostics that fired (`posttrain.diagnostics`), and for online runs a table of sampled completions with their
rewards (samples.jsonl). Every training run writes one into its output_dir at each checkpoint and at the end.
A metric no family names still gets its own plot, so new algorithms' metrics show up before anyone lists them.

`--png` renders the page with headless Chromium (`screenshot`), the same route the tests use to check that
the curves are really drawn.
"""

from __future__ import annotations

import fnmatch
import html
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.cli import ToolArgs, ToolSpec
from posttrain.config import UserError
from posttrain.diagnostics import RULES_BY_NAME, condition_text

TOOL = ToolSpec(
    usage="posttrain report RUN_DIR [RUN_DIR ...] [--out report.html] [--png report.png]",
    positionals=(1, None),
    flags={"--out": str, "--png": str},
    help="""
RUN_DIR      a run's output_dir (config.yaml, metrics.jsonl); several are overlaid on the same axes.
--out FILE   where to write the page (default: RUN_DIR/report.html for one run, ./report.html for several).
--png FILE   also render the page to a PNG with headless Chromium (apt-get install chromium).
""",
)

# Metric families: (section, plot title, metric-name patterns). The first family whose pattern matches a metric
# (its name without `eval/`) gets it; a metric no family names gets a plot of its own under "Other".
PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Optimisation", "loss", ("loss", "*_loss", "loss/*")),
    ("Optimisation", "learning rate", ("learning_rate",)),
    ("Optimisation", "gradient norm (before clipping)", ("grad_norm",)),
    ("Optimisation", "throughput (tokens / s)", ("tokens_per_second",)),
    ("Rewards", "reward (mean)", ("reward", "rewards/*/mean", "objective/scores", "objective/rlhf_reward")),
    ("Rewards", "reward std", ("reward_std", "rewards/*/std")),
    ("Rewards", "held-out accuracy / reward accuracy", ("accuracy", "rewards/accuracies", "*/pass@*")),
    ("Rewards", "groups with zero reward std", ("frac_reward_zero_std",)),
    ("Completions", "completion length (tokens)", ("completions/*_length",)),
    ("Completions", "clipped ratio (cut at max_completion_length)", ("completions/clipped_ratio",)),
    ("Policy", "KL to the reference", ("kl", "objective/kl")),
    ("Policy", "KL coefficient (adaptive with kl_target)", ("objective/kl_coef",)),
    ("Policy", "entropy (nats / token)", ("entropy", "policy/entropy_avg")),
    ("Policy", "sampled tokens' negative log-prob (nats / completion)", ("objective/entropy",)),
    ("Policy", "clip ratios", ("clip_ratio/*", "policy/clipfrac_avg", "val/clipfrac_avg")),
    ("Policy", "approximate KL old -> new", ("policy/approxkl_avg",)),
    ("Policy", "importance ratio (mean)", ("val/ratio",)),
    ("Policy", "non-score reward (KL penalty)", ("objective/non_score_reward",)),
    ("Policy", "value explained variance", ("val/explained_variance",)),
    ("Preference", "implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("Preference", "log-probs (per sequence)", ("logps/*",)),
    ("Preference", "mean logits", ("logits/*",)),
    ("Preference", "reward model margin and range", ("margin", "mean_reward", "min_reward", "max_reward")),
]
HIDDEN = ("step", "epoch")
# Tableau-like colours, distinct from each other and from the diagnostics marker red and the grey axes.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#393b79"]
DASHES = ["", "7 3", "2 3", "10 3 2 3"]
MARKER = "#d62728"
W, H = 380, 220  # one plot's SVG
PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 10, 26
INSET = 6  # the first and last step sit this far inside the frame, so their markers are whole
MAX_POINTS = 1500  # per series; longer runs are thinned evenly (the last point is always kept)


@dataclass
class Run:
    path: Path
    label: str
    command: str
    config: dict
    rows: list[dict]
    samples: list[dict] = field(default_factory=list)

    def metric_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for k, v in row.items():
                if k not in HIDDEN and not k.startswith("diagnostics/") and _number(v) is not None:
                    seen.setdefault(k, None)
        return list(seen)

    def fired(self) -> list[tuple[str, int]]:
        out = []
        for row in self.rows:
            out += [(k.split("/", 1)[1], int(row.get("step", 0))) for k in row if k.startswith("diagnostics/")]
        return out


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # a run still writing: its last line may be half there
                break
            raise UserError(f"{path}:{i}: not a JSON line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def load_run(path: Path | str) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    metrics = path / "metrics.jsonl"
    config_file = path / "config.yaml"
    if not metrics.exists() and not config_file.exists():
        raise UserError(f"{path}: not a posttrain run folder (no metrics.jsonl or config.yaml)")
    config, command = {}, "train"
    if config_file.exists():
        text = config_file.read_text(encoding="utf-8")
        try:
            config = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{config_file}: invalid YAML ({e})") from None
        found = re.match(r"# posttrain (\S+)", text)
        command = found.group(1).rstrip(":") if found else command
    rows = _read_jsonl(metrics) if metrics.exists() else []
    samples = _read_jsonl(path / "samples.jsonl") if (path / "samples.jsonl").exists() else []
    label = config.get("run_name") or path.resolve().name
    return Run(path, label, command, config, rows, samples)


# ------------------------------------------------------------------------------------------------------
# Plots


@dataclass
class Series:
    run: int
    metric: str
    eval: bool
    points: list[tuple[float, float]]
    labels: list[str] = field(default_factory=list)
    color: str = ""
    dash: str = ""


@dataclass
class Panel:
    section: str
    title: str
    metrics: list[str]  # base names (without eval/), in the order they appear
    series: list[Series] = field(default_factory=list)


def _panel_for(base: str, names: set[str]) -> tuple[str, str] | None:
    for section, title, patterns in PANELS:
        if any(fnmatch.fnmatchcase(base, p) for p in patterns):
            return section, title
    if f"rewards/{base}/mean" in names:  # GRPO's held-out mean of a reward function: beside its training curve
        return "Rewards", "reward (mean)"
    return None


def build_panels(runs: list[Run]) -> list[Panel]:
    panels: dict[str, Panel] = {}
    order = {title: i for i, (_, title, _) in enumerate(PANELS)}
    names_by_run = [r.metric_names() for r in runs]
    for ri, (run, names) in enumerate(zip(runs, names_by_run)):
        all_names = set(names)
        for name in names:
            is_eval = name.startswith("eval/")
            base = name[5:] if is_eval else name
            section, title = _panel_for(base, all_names) or ("Other", base)
            panel = panels.setdefault(title, Panel(section, title, []))
            if base not in panel.metrics:
                panel.metrics.append(base)
            points = [(float(r["step"]), float(r[name])) for r in run.rows
                      if "step" in r and _number(r.get(name)) is not None and math.isfinite(r[name])]
            if points:
                panel.series.append(Series(ri, name, is_eval, _thin(points)))
    out = sorted(panels.values(), key=lambda p: (order.get(p.title, len(order)), p.section == "Other"))
    for panel in out:
        _style(panel, several=len(runs) > 1, labels=[r.label for r in runs])
    return [p for p in out if p.series]


def _thin(points: list) -> list:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]


def _style(panel: Panel, several: bool, labels: list[str]) -> None:
    """Colours: by metric for one run, by run for several (then the metrics of a plot differ by dash). A series
    equal to another (reward and the mean of its only reward function) is drawn once with both names."""
    merged: list[Series] = []
    for s in panel.series:
        name = f"{labels[s.run]}: {s.metric}" if several else s.metric
        same = next((m for m in merged if m.points == s.points and m.eval == s.eval), None)
        if same is not None:
            same.labels.append(name)
            continue
        s.labels = [name]
        k = panel.metrics.index(s.metric[5:] if s.eval else s.metric)
        s.color = PALETTE[(s.run if several else k) % len(PALETTE)]
        s.dash = "4 3" if s.eval else (DASHES[k % len(DASHES)] if several else "")
        merged.append(s)
    panel.series = merged


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [0.0 if abs(first + i * step) < step * 1e-6 else first + i * step
            for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float, step: float | None = None) -> str:
    """A number as short as it can be; with `step` (the tick spacing), just precise enough to tell ticks apart."""
    if v == 0:
        return "0"
    big = max(abs(v), step or 0.0)
    if 1e-3 <= big < 1e6:
        if step is None:
            return f"{v:.4g}"
        decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if f"{step:.1e}"[2] == "5" else 0))
        return f"{v:.{decimals}f}"
    digits = 4 if step is None else max(1, math.floor(math.log10(abs(v))) - math.floor(math.log10(step)) + 2)
    return f"{v:.{min(digits, 4)}g}".replace("e-0", "e-").replace("e+0", "e")


def render_svg(panel: Panel, x_range: tuple[float, float], markers: list[tuple[int, str]]) -> str:
    """One plot; every plot of a page spans the same steps, so they line up (a final eval sits at the end)."""
    ys = [y for s in panel.series for _, y in s.points]
    x_lo, x_hi = x_range
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.06 or max(abs(y_hi) * 0.1, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(x):
        return PAD_L + INSET + (x - x_lo) / (x_hi - x_lo) * (pw - 2 * INSET)

    def py(y):
        return PAD_T + (y_hi - y) / (y_hi - y_lo) * ph

    parts = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}">',
             f'<rect class="plot-area" x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="#ffffff" stroke="#c8c8c8"/>']
    ticks = _ticks(y_lo, y_hi)
    for t in ticks:
        y = py(t)
        label = _fmt(t, ticks[1] - ticks[0] if len(ticks) > 1 else None)
        parts.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ececec"/>'
                     f'<text x="{PAD_L - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for t in _ticks(x_lo, x_hi, 6):
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" stroke="#f3f3f3"/>'
                     f'<text x="{x:.1f}" y="{H - 8}" text-anchor="middle">{t:g}</text>')
    for step, name in markers:
        if x_lo <= step <= x_hi:
            x = px(step)
            parts.append(f'<line class="diagnostic" x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" '
                         f'stroke="{MARKER}" stroke-dasharray="3 3"><title>{html.escape(name)} at step {step}</title></line>')
    for s in panel.series:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        title = html.escape(" = ".join(s.labels))
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        if len(s.points) > 1:
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="2"{dash} '
                         f'stroke-linejoin="round"><title>{title}</title></polyline>')
        if len(s.points) == 1 or (s.eval and len(s.points) <= 60):
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{s.color}"><title>{title}: '
                      f'{_fmt(y)} at step {x:.0f}</title></circle>' for x, y in s.points]
    parts.append("</svg>")
    return "".join(parts)


def _legend(panel: Panel) -> str:
    items = []
    for s in panel.series:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        swatch = (f'<svg width="22" height="10"><line x1="0" x2="22" y1="5" y2="5" stroke="{s.color}" '
                  f'stroke-width="2"{dash}/></svg>')
        items.append(f"<span>{swatch} {html.escape(' = '.join(s.labels))}</span>")
    return '<div class="legend">' + "".join(items) + "</div>"


def _rule_metrics(name: str, command: str) -> list[str]:
    rule = RULES_BY_NAME.get(name)
    reads = rule.reads.get(command, {}) if rule else {}
    return [m for m in reads.values() if isinstance(m, str)]


# ------------------------------------------------------------------------------------------------------
# The page


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:24px;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin-bottom:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f2f2f2}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure.panel{box-sizing:border-box;margin:0;background:#fff;border:1px solid #e2e2e2;border-radius:4px;padding:6px 8px;width:398px}
figcaption{font-weight:600;margin-bottom:2px}
svg text{font-size:10.5px;fill:#555}
.legend{font-size:12px;color:#333;display:flex;flex-wrap:wrap;gap:2px 12px}
.legend span{white-space:nowrap}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.completion{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;max-width:520px}
.prompt{max-width:320px;font-size:12px}
.fired{color:#b00000;font-weight:600}
details{margin:6px 0}
"""


def _summary_table(runs: list[Run]) -> str:
    keys = ["loss", "reward", "rewards/accuracies", "eval/loss", "eval/accuracy", "eval/rewards/accuracies"]
    shown = [k for k in keys if any(k in r for run in runs for r in run.rows)]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", "command", "model", "steps"] + shown)
    body = []
    for run in runs:
        steps = max((int(r.get("step", 0)) for r in run.rows), default=0)
        last = {k: next((r[k] for r in reversed(run.rows) if _number(r.get(k)) is not None), None) for k in shown}
        cells = [run.label, run.command, str(run.config.get("model", "")), str(steps)]
        cells += ["" if last[k] is None else _fmt(last[k]) for k in shown]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _diagnostics_html(runs: list[Run]) -> str:
    out = []
    for run in runs:
        title = f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else ""
        thresholds = run.config.get("diagnostics")
        fired = run.fired()
        if not fired:
            note = ("Diagnostics were off (diagnostics: false)." if "diagnostics" in run.config and not thresholds
                    else "No diagnostic fired.")
            out.append(f"{title}<p>{note}</p>")
            continue
        rows = []
        for name, step in fired:
            rule = RULES_BY_NAME.get(name)
            cond = condition_text(rule, thresholds or {}) if rule else ""
            rows.append(f'<tr><td class="fired">{html.escape(name)}</td><td>{step}</td><td>{html.escape(cond)}</td>'
                        f"<td>{html.escape(rule.meaning if rule else '')}</td><td>{html.escape(rule.advice if rule else '')}</td></tr>")
        out.append(f"{title}<table><tr><th>diagnostic</th><th>step</th><th>condition</th><th>what it means</th>"
                   f"<th>what to try</th></tr>{''.join(rows)}</table>")
    return "".join(out)


def _pick_steps(steps: list[int], n: int = 4) -> list[int]:
    if len(steps) <= n:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


def _samples_html(runs: list[Run]) -> str:
    out = []
    for run in runs:
        if not run.samples:
            continue
        steps = _pick_steps(sorted({int(s.get("step", 0)) for s in run.samples}))
        rows = []
        for s in run.samples:
            if int(s.get("step", 0)) not in steps:
                continue
            rewards = s.get("rewards") or {}
            shown = ", ".join(f"{k} {'-' if v is None else _fmt(float(v))}" for k, v in rewards.items())
            adv = s.get("advantage")
            prompt = str(s.get("prompt", ""))
            rows.append(f"<tr><td>{s.get('step')}</td><td class='prompt' title='{html.escape(prompt)}'>"
                        f"{html.escape(prompt[:300])}{'...' if len(prompt) > 300 else ''}</td>"
                        f"<td class='completion'>{html.escape(str(s.get('completion', '')))}</td>"
                        f"<td>{html.escape(shown)}</td><td>{'' if adv is None else _fmt(float(adv))}</td></tr>")
        title = f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else ""
        out.append(f"{title}<table><tr><th>step</th><th>prompt</th><th>completion</th><th>rewards</th>"
                   f"<th>advantage</th></tr>{''.join(rows)}</table>")
    return "".join(out)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _config_html(runs: list[Run]) -> str:
    if len(runs) == 1:
        return f"<pre>{html.escape(yaml.safe_dump(runs[0].config, sort_keys=False))}</pre>"
    flats = [_flat(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(str(f.get(k, '')))}</td>" for f in flats)
                   + "</tr>" for k in differ)
    table = f"<table><tr><th>key</th>{head}</tr>{rows}</table>" if differ else "<p>The configs are identical.</p>"
    full = "".join(f"<details><summary>{html.escape(r.label)}: full config</summary><pre>"
                   f"{html.escape(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>" for r in runs)
    return f"<p>Keys that differ:</p>{table}{full}"


def render(runs: list[Run]) -> str:
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):  # two runs called `run`: tell them apart by their parent folder
        for r in runs:
            r.label = f"{r.path.resolve().parent.name}/{r.path.resolve().name}"
    panels = build_panels(runs)
    steps = [float(r["step"]) for run in runs for r in run.rows if _number(r.get("step")) is not None]
    x_range = (min(steps, default=0.0), max(steps, default=1.0))
    fired = [(run.command, name, step) for run in runs for name, step in run.fired()]
    body, section = [], None
    for panel in panels:
        if panel.section != section:
            if section is not None:
                body.append("</div>")
            body.append(f'<h2>{html.escape(panel.section)}</h2><div class="grid">')
            section = panel.section
        markers = [(step, name) for command, name, step in fired
                   if any(fnmatch.fnmatchcase(m, p) for m in panel.metrics for p in _rule_metrics(name, command))]
        colors = " ".join(dict.fromkeys(s.color for s in panel.series))
        body.append(f'<figure class="panel" data-title="{html.escape(panel.title)}" data-colors="{colors}">'
                    f"<figcaption>{html.escape(panel.title)}</figcaption>{render_svg(panel, x_range, markers)}"
                    f"{_legend(panel)}</figure>")
    if section is not None:
        body.append("</div>")
    plots = "".join(body) or "<p>No metrics logged yet.</p>"
    samples = _samples_html(runs)
    title = "posttrain report: " + ", ".join(r.label for r in runs)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<div class="sub">{", ".join(html.escape(str(r.path)) for r in runs)} &middot; written '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}</div>'
            f"{_summary_table(runs)}<h2>Diagnostics</h2>{_diagnostics_html(runs)}{plots}"
            + (f"<h2>Sampled completions</h2>{samples}" if samples else "")
            + f"<h2>Config</h2>{_config_html(runs)}</body></html>")


def write_report(paths: list, out: Path | str) -> Path:
    runs = [load_run(p) for p in paths]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs), encoding="utf-8")
    tmp.replace(out)  # a browser reloading the page never sees half of it
    return out


# ------------------------------------------------------------------------------------------------------
# Headless Chromium: the page as a person sees it


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Appended to a copy of the page: reports its height and where each plot area is, through the title (which
# changes nothing on screen), so a screenshot can be checked plot by plot.
_MEASURE = """<script>
document.title = JSON.stringify({height: document.documentElement.scrollHeight,
  plots: Array.from(document.querySelectorAll("figure.panel")).map(f => {
    const r = f.querySelector("rect.plot-area").getBoundingClientRect();
    return {title: f.dataset.title, colors: f.dataset.colors.split(" ").filter(c => c),
            x: r.x, y: r.y + window.scrollY, width: r.width, height: r.height};
  })});
</script>"""


def find_browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _chromium(browser: str, args: list[str], timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-dev-shm-usage", "--force-device-scale-factor=1", "--disable-extensions",
               f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise UserError(f"{browser} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def screenshot(page: Path | str, png: Path | str, width: int = 1280) -> dict:
    """Render `page` with headless Chromium into `png` (the full page, 1 CSS pixel = 1 pixel). Returns the
    layout: {"height", "plots": [{"title", "colors", "x", "y", "width", "height"} per plot area]}."""
    browser = find_browser()
    if browser is None:
        raise UserError("--png needs Chromium (Debian/Ubuntu: apt-get install chromium)")
    text = Path(page).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(text.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
        dom = _chromium(browser, [f"--window-size={width},900", "--dump-dom", copy.as_uri()])
        found = re.search(r"<title>(.*?)</title>", dom, re.S)
        if not found:
            raise UserError(f"{browser} returned no page")
        layout = json.loads(html.unescape(found.group(1)))
        height = int(math.ceil(layout["height"]))
        _chromium(browser, [f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}", copy.as_uri()])
    if not Path(png).exists():
        raise UserError(f"{browser} wrote no screenshot to {png}")
    return layout


def main(args: ToolArgs) -> int:
    if args.settings or args.config_file:
        raise UserError("posttrain report takes run folders, not settings")
    paths = [Path(p) for p in args.positionals]
    out = Path(args.flags["--out"] or (paths[0] / "report.html" if len(paths) == 1 else "report.html"))
    write_report(paths, out)
    print(f"report: {out}")
    if args.flags["--png"]:
        screenshot(out, args.flags["--png"])
        print(f"screenshot: {args.flags['--png']}")
    return 0
