"""Reward functions for online RL, a loader for built-in and user rewards, and a guarded batch evaluator.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``: one value
per completion, None where the function does not apply to a row. ``columns`` holds the dataset's extra
columns (``answer``, ...; one value per completion) plus ``completion_lengths`` (token counts) and
``truncated`` (bool), which the caller adds. A function without ``**kwargs`` receives only the columns it
names. Prompts and completions are strings or conversations (lists of ``{"role", "content"}`` messages).

Built-ins, by name: ``accuracy``, ``format``, ``length`` (DAPO's soft overlong punishment) and
``reward_model`` (a trained sequence-classification reward model). ``compute_rewards`` runs every function
with a per-call timeout and turns failures into NaN columns instead of crashing a training run.

Isolation (``load_reward_funcs(..., isolation=...)``): ``thread`` (default) calls each function in a thread of
the training process, which survives an exception or a hang (the hung thread is abandoned) but not a segfault,
``os._exit`` or an allocation that exhausts memory. ``process`` runs each function in its own worker process
(`IsolatedReward`), killed and replaced after a crash, a timeout or a MemoryError under its address-space limit.

torch is imported only where needed, so a reward worker process starts without it (seconds saved per start).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_FORMAT_PATTERN = r"\\boxed\{.*\}"
# A bare integer reply: the format the built-in arithmetic task's instruction asks for.
ARITHMETIC_FORMAT_PATTERN = r"^\s*-?\d+\s*$"
# What the `format` reward checks by default on the built-in arithmetic task (`posttrain grpo`, `posttrain
# eval`): partial credit for a short one-line reply that ends in a number ("47 + 38 = 85" counts). The small
# model almost never replies with a bare number at first, so the bare-number pattern above gives no signal,
# and a heavy format reward is learned instead of the arithmetic.
BUILTIN_FORMAT_PATTERN = r"^[^\n]{0,40}?-?\d+\.?\s*$"


def _text(x) -> str:
    """A completion/prompt as text: strings pass through, a conversation gives its last message's content."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    return "" if x is None else str(x)


# --------------------------------------------------------------------------------------------- accuracy


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included.

    ``\\boxed 5`` (no braces) gives ``5``. Returns None when there is no box or its braces never close.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    after = start + (6 if text.startswith("\\boxed", start) else 5)
    i = after
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or (text[i] != "{" and i == after):  # nothing boxed, or another command (\boxedfoo)
        return None
    if text[i] != "{":  # \boxed 5: the next token
        return re.match(r"[^\s$]+", text[i:]).group(0)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{" and text[j - 1] != "\\":
            depth += 1
        elif text[j] == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# A number: thousands-grouped (1,234) or plain, optionally with decimals. A "-" is a sign only when it does not
# follow a word character or closing bracket, so "5-3" yields 5 and 3, while "= -3" yields -3.
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed ("1,234" -> "1234"), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str) -> str | None:
    """The graded part of a reply: the last ``\\boxed{}`` content if any, else the last number."""
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else last_number(text)


def _as_fraction(s: str) -> Fraction | None:
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s.strip().strip("$").strip())
    return Fraction(s) if _PLAIN_NUMBER.fullmatch(s) else None


def _drop_timeout_notice(record: logging.LogRecord) -> bool:
    # math_verify warns once that with its timeouts off "you must provide the logic for timeout interruption
    # yourself": compute_rewards does, so the notice would only confuse a training log.
    return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_timeout_notice)


def _in_dollars(s: str) -> str:
    return s if "$" in s.replace("\\$", "") else f"${s}$"


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # math_verify's own timeouts use signal.alarm, which works only in the main thread; elsewhere (as inside
    # compute_rewards' worker threads) they are switched off and compute_rewards' timeout bounds the call.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    # parse reads LaTeX most reliably between $...$ (it then reads "0.5" as 1/2, for instance)
    gold_parsed = parse(_in_dollars(gold), parsing_timeout=limit)
    pred_parsed = parse(_in_dollars(pred), parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))


def is_correct(gold: str, reply: str) -> bool:
    """Whether ``reply`` states ``gold``: plain numbers compare exactly, anything else through math_verify."""
    pred = extract_answer(reply)
    if pred is None:
        return False
    gold = str(gold).strip()
    gold = last_boxed(gold) or gold
    if re.sub(r"\s+", "", gold) == re.sub(r"\s+", "", pred):
        return True
    g, p = _as_fraction(gold), _as_fraction(pred)
    if g is not None and p is not None:  # the fast, exact path: integers and decimals
        return g == p
    return _math_verify_equal(gold, pred)


def accuracy(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer equals the ``answer`` column, else 0.0; None where a row has no gold.

    Without an ``answer`` column the ``solution`` column (TRL's accuracy_reward reads it) gives the gold: its
    last ``\\boxed{...}``, else the whole text. The prediction is the last ``\\boxed{...}`` content, else the
    last number (commas, negatives, decimals). Integers and decimals compare exactly; LaTeX (``\\frac{1}{2}``
    vs ``0.5``) goes through math_verify.
    """
    if answer is None:
        answer = solution
    if answer is None:
        return [None] * len(completions)
    return [None if gold is None or str(gold).strip() == "" else float(is_correct(str(gold), _text(c)))
            for c, gold in zip(completions, answer)]


# ------------------------------------------------------------------------------------------ format, length


def format_reward(prompts, completions, format_pattern: str | list[str] = DEFAULT_FORMAT_PATTERN,
                  **kwargs) -> list[float]:
    """Share of the regular expressions in ``format_pattern`` that the completion matches (``re.search``, DOTALL).

    With one pattern this is 1.0 or 0.0; a list of patterns gives partial credit (e.g. a reasoning block and
    a boxed answer: 0.5 for either alone). Partial credit is also what the weights in ``compute_rewards`` are
    for: the default pattern (contains ``\\boxed{...}``) at weight 0.2 next to ``accuracy`` at 1.0 pays a
    well-formed wrong answer a fifth of a right one, a learning signal while accuracy is still rare. On the
    built-in arithmetic task `posttrain grpo` and `posttrain eval` check ``BUILTIN_FORMAT_PATTERN`` (a short
    line ending in a number); ``ARITHMETIC_FORMAT_PATTERN`` is the strict form (a bare integer).
    """
    patterns = [format_pattern] if isinstance(format_pattern, str) else list(format_pattern)
    compiled = [re.compile(p, re.DOTALL) for p in patterns]
    return [sum(bool(p.search(_text(c))) for p in compiled) / len(compiled) for c in completions]


def length_reward(prompts, completions, completion_lengths=None, max_completion_length: int | None = None,
                  overlong_buffer: int | None = None, **kwargs) -> list[float]:
    """DAPO soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), with L_max and L_cache in tokens.

    R(L) = 0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max; -1 beyond.
    ``max_completion_length`` is L_max, ``overlong_buffer`` is L_cache (default L_max // 5, the paper's
    4096 of 20480). Lengths come from the ``completion_lengths`` column.
    """
    if max_completion_length is None:
        raise ValueError("the length reward needs max_completion_length")
    if completion_lengths is None:
        raise ValueError("the length reward needs the completion_lengths column")
    l_max = int(max_completion_length)
    l_cache = l_max // 5 if overlong_buffer is None else int(overlong_buffer)
    out = []
    for n in completion_lengths:
        n = int(n)
        if n <= l_max - l_cache:
            out.append(0.0)
        elif n <= l_max:
            out.append((l_max - l_cache - n) / l_cache)
        else:
            out.append(-1.0)
    return out


# ------------------------------------------------------------------------------------------- reward model


class RewardModelReward:
    """Scores prompt + completion with a saved sequence-classification reward model (one logit = the reward).

    Conversations are rendered with the tokenizer's chat template when it has one; otherwise the prompt
    and completion texts are concatenated.
    """

    __name__ = "reward_model"

    def __init__(self, path, device: str = "cpu", batch_size: int = 8, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import require_safetensors

        require_safetensors(str(path), str(path))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # the reward is read at the last token: keep the end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model at {path} has {self.model.config.num_labels} labels, expected 1")
        if self.model.config.pad_token_id is None:  # the model finds each row's last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def _render(self, prompt, completion) -> tuple[str, bool]:
        """(text, whether the text already carries special tokens)."""
        if isinstance(prompt, list) and self.tokenizer.chat_template:
            reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(prompt + reply, tokenize=False), True
        # Text data: scored as `posttrain rm` (and TRL) trained it, prompt + completion + EOS.
        text = _text(prompt) + _text(completion)
        eos = self.tokenizer.eos_token
        return (text if not eos or text.endswith(eos) else text + eos), False

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        import torch

        rendered = [self._render(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(rendered), self.batch_size):
            chunk = rendered[i:i + self.batch_size]
            enc = self.tokenizer([t for t, _ in chunk], add_special_tokens=not chunk[0][1], padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            with torch.no_grad():
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


# ------------------------------------------------------------------------------------------------ loading

BUILTIN_REWARDS = {"accuracy": accuracy, "format": format_reward, "length": length_reward}
REWARD_OPTIONS = {"format_pattern", "overlong_buffer", "max_completion_length", "reward_model",
                  "reward_model_device"}


def _import_callable(spec: str):
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):  # a file path: path/to/rewards.py:score
            mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0],
                                                              module_name)
            if mod_spec is None or not os.path.isfile(module_name):
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:  # a module name, importable from the current directory too (like `python -m`)
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except Exception as e:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name!r} has no callable {attr!r}")  # noqa: TRY004
    return fn


def load_reward_funcs(specs: list[str], *, isolation: str = "thread", memory_mb: int | None = None,
                      **options) -> list[tuple[str, object]]:
    """Resolve reward specs to ``(name, callable)`` pairs, in order.

    A spec is a built-in name (``accuracy``, ``format``, ``length``, ``reward_model``) or ``module:function``
    (``my_rewards:score`` with my_rewards.py in the current directory, a dotted module, or
    ``path/to/file.py:score``). Options ``format_pattern``, ``overlong_buffer``, ``max_completion_length`` are
    bound to the built-ins that take them; ``reward_model`` (path) and ``reward_model_device`` configure the
    ``reward_model`` built-in. Options set to None are ignored. User functions get no options.

    ``isolation="process"``: each function is loaded and called in its own worker process instead
    (`IsolatedReward`), with ``memory_mb`` its address-space limit; the workers start here, so a function
    that cannot be loaded fails now, not in the first training step.
    """
    if isolation == "process":
        _resolve(specs, options, load=False)  # name errors without starting any process
        workers = [IsolatedReward(spec, {k: v for k, v in options.items() if v is not None}, memory_mb)
                   for spec in specs]
        try:
            for w in workers:
                w.wait_ready()
        except BaseException:
            for w in workers:
                w.close()
            raise
        return [(w.name, w) for w in workers]
    if isolation != "thread":
        raise ValueError(f"unknown reward isolation {isolation!r}: thread or process")
    return _resolve(specs, options)


def _resolve(specs, options, load: bool = True) -> list[tuple[str, object]]:
    unknown = set(options) - REWARD_OPTIONS
    if unknown:
        raise ValueError(f"unknown reward options {sorted(unknown)} (known: {sorted(REWARD_OPTIONS)})")
    options = {k: v for k, v in options.items() if v is not None}
    if len(set(specs)) != len(specs):
        raise ValueError(f"duplicate reward functions in {list(specs)}")
    funcs = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"reward function {spec!r}: expected a name or module:function")
        if spec == "reward_model":
            if "reward_model" not in options:
                raise ValueError("reward function 'reward_model' needs the reward_model option (a model path)")
            fn = RewardModelReward(options["reward_model"], device=options.get("reward_model_device", "cpu")) if load else None
        elif spec in BUILTIN_REWARDS:
            fn = BUILTIN_REWARDS[spec]
            params = inspect.signature(fn).parameters
            bound = {k: v for k, v in options.items() if k in params}
            fn = functools.partial(fn, **bound) if bound else fn
        elif ":" in spec:
            fn = _import_callable(spec) if load else None
        else:
            raise ValueError(f"unknown reward function {spec!r}: use one of {sorted(BUILTIN_REWARDS) + ['reward_model']}"
                             " or module:function")
        funcs.append((spec, fn))
    return funcs


# ------------------------------------------------------------------------------------------------ running


# ----------------------------------------------------------------------------------- process isolation


class RewardTimeout(RuntimeError):
    """An isolated reward call ran past its timeout; its worker was killed."""


class RewardCrash(RuntimeError):
    """An isolated reward worker died (segfault, os._exit, killed by the OS) or ran out of its memory limit."""


def _mp_context():
    import multiprocessing

    # spawn: a fresh interpreter. fork would copy the trainer's threads (torch's pool) into the child, where a
    # reward function using torch could deadlock; forkserver is not available everywhere.
    return multiprocessing.get_context("spawn")


class IsolatedReward:
    """One reward function living in its own worker process (see the module docstring).

    `score(prompts, completions, columns, timeout)` sends the batch to the worker and waits at most `timeout`
    seconds. A worker that dies, hangs or hits MemoryError is killed, the call raises RewardCrash or
    RewardTimeout, and a replacement starts at once (in the background; the next call waits for it).
    """

    isolated = True

    def __init__(self, spec: str, options: dict, memory_mb: int | None = None, start_timeout: float = 120.0):
        self.spec, self.options, self.memory_mb, self.start_timeout = spec, options, memory_mb, start_timeout
        self.__name__ = self.name = spec
        self.replacements = 0
        self._proc = self._conn = None
        self._ready = False
        self._start()

    def _start(self) -> None:
        ctx = _mp_context()
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_reward_worker, args=(child, self.spec, self.options, self.memory_mb),
                                 name=f"reward-{self.spec}", daemon=True)
        self._proc.start()
        child.close()
        self._conn, self._ready = parent, False

    def wait_ready(self) -> None:
        """Block until the worker has loaded its function; ValueError if it cannot (bad module, memory limit)."""
        if self._ready:
            return
        if not self._conn.poll(self.start_timeout):
            self._kill()
            raise ValueError(f"reward function {self.spec!r}: its worker did not start within {self.start_timeout:.0f}s")
        try:
            status, detail = self._conn.recv()
        except (EOFError, OSError):
            status, detail = "load_error", f"its worker exited while loading ({self._exit_reason()})"
        if status != "ready":
            self._kill()
            raise ValueError(detail if detail.startswith("reward function") else f"reward function {self.spec!r}: {detail}")
        self._ready = True

    def score(self, prompts, completions, columns: dict, timeout: float) -> list:
        if self._proc is None:
            self._start()
        self.wait_ready()
        try:
            self._conn.send((list(prompts), list(completions), columns))
        except (BrokenPipeError, OSError, EOFError):
            self._replace()
            raise RewardCrash(f"worker gone before the call ({self._exit_reason()})") from None
        if not self._conn.poll(timeout):
            self._replace()
            raise RewardTimeout(f"no result within {timeout:g}s; worker killed and replaced")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            reason = self._exit_reason()
            self._replace()
            raise RewardCrash(f"worker died ({reason}); replaced") from None
        if status == "ok":
            return value
        if status == "memory":
            self._replace()  # the worker's heap may be in any state after a failed allocation
            raise RewardCrash(f"MemoryError: over reward_memory_mb={self.memory_mb}; worker replaced")
        raise RuntimeError(value)  # the function raised: the worker is fine and stays

    def __call__(self, prompts, completions, **columns):
        return self.score(prompts, completions, columns, timeout=600.0)

    def _exit_reason(self) -> str:
        if self._proc is None:
            return "not running"
        self._proc.join(1.0)
        code = self._proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5.0)
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def _replace(self) -> None:
        self._kill()
        self.replacements += 1
        self._start()

    def close(self) -> None:
        self._kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        raise TypeError("an IsolatedReward holds a process; pass its spec instead")


def _die_with_parent() -> None:
    """A worker must not outlive its trainer (a SIGKILLed trainer leaves a looping worker behind otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _address_space_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _reward_worker(conn, spec: str, options: dict, memory_mb: int | None) -> None:
    """Worker process main: load one reward function, then score batches until the pipe closes."""
    _die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group: the trainer handles it (a checkpoint, then exit,
    # which ends its workers); a worker must not die of it mid-call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing reward leaves no core file to write
    except (ImportError, ValueError, OSError):
        pass
    try:
        ((_, fn),) = _resolve([spec], options)
    except BaseException as e:  # noqa: BLE001 - reported to the trainer as a load error
        conn.send(("load_error", str(e) if isinstance(e, ValueError) else _one_line(e)))
        return
    if memory_mb:
        import resource

        # Set after loading, so imports are not counted against it; a limit below what loading took would
        # fail every call, so say so now.
        size = _address_space_mb()
        if size is not None and size >= memory_mb:
            conn.send(("load_error", f"reward_memory_mb={memory_mb} is below the {size:.0f} MiB its worker "
                                     "process already takes after loading it"))
            return
        limit = int(memory_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("ready", None))
    while True:
        try:
            prompts, completions, columns = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out = fn(prompts, completions, **_kwargs_for(fn, columns))
        except MemoryError:
            conn.send(("memory", None))
            return
        except BaseException as e:  # noqa: BLE001 - the function's own failure: reported, the worker stays
            conn.send(("error", _one_line(e)))
            continue
        try:
            # Converted here, so whatever the function returned never has to cross the pipe as an object.
            value = [None if v is None else float(v) for v in list(out)]
        except (TypeError, ValueError) as e:
            conn.send(("error", f"returned something other than a list of numbers ({_one_line(e)})"))
            continue
        conn.send(("ok", value))


@dataclass
class RewardResult:
    rewards: torch.Tensor  # [N, R] float32, NaN where a function returned None or failed
    total: torch.Tensor  # [N] weighted sum over functions, NaN ignored (TRL's nansum; all-NaN rows give 0)
    failures: dict[str, int]  # per function: 1 when it raised or returned a malformed result this batch
    timeouts: dict[str, int]  # per function: 1 when it exceeded the timeout this batch


def _kwargs_for(fn, columns: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return columns
    return {k: v for k, v in columns.items() if k in params}


def _one_line(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg[:200]}"


def compute_rewards(funcs, prompts, completions, columns: dict, *, weights=None, timeout: float = 10.0) -> RewardResult:
    """Evaluate every ``(name, fn)`` on the batch; a failing or hung function costs one NaN column, not the run.

    Each call runs in a fresh daemon thread joined with ``timeout`` seconds. Python cannot kill a thread, so a
    hung call is abandoned and keeps running in the background (its CPU and memory are not reclaimed until it
    ends; being a daemon it never blocks interpreter exit). A subprocess could be killed, but would have to
    pickle the function and the batch, pay a process start per call and copy any model a reward holds; hung
    rewards are rare, so the cheap thread wins. Functions run one after another, so the worst case is
    ``len(funcs) * timeout``. Functions loaded with ``isolation="process"`` (`IsolatedReward`) are called in
    their own worker processes instead, which are killed at the timeout and replaced after any crash.
    """
    import torch

    n = len(completions)
    weights = torch.ones(len(funcs)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if weights.numel() != len(funcs):
        raise ValueError(f"{weights.numel()} weights for {len(funcs)} reward functions")
    rewards = torch.full((n, len(funcs)), float("nan"))
    failures = {name: 0 for name, _ in funcs}
    timeouts = {name: 0 for name, _ in funcs}
    for j, (name, fn) in enumerate(funcs):
        box: dict = {}
        if getattr(fn, "isolated", False):  # its own process enforces the timeout: no thread needed
            try:
                box["value"] = fn.score(prompts, completions, columns, timeout)
            except RewardTimeout as e:
                timeouts[name] += 1
                logger.warning("reward %r timed out (%s); its column is NaN for this batch", name, e)
                continue
            except Exception as e:  # noqa: BLE001 - a crash or an exception of the function
                box["error"] = e
            _store(rewards, j, name, box, n, failures)
            continue

        def target(fn=fn, box=box):
            try:
                box["value"] = fn(prompts, completions, **_kwargs_for(fn, columns))
            except BaseException as e:  # noqa: BLE001  (reported below as a NaN column)
                box["error"] = e

        start = time.monotonic()
        worker = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            timeouts[name] += 1
            logger.warning("reward %r timed out after %.1fs; its column is NaN for this batch", name,
                           time.monotonic() - start)
            continue
        _store(rewards, j, name, box, n, failures)
    total = (rewards * weights[None]).nansum(dim=1)
    return RewardResult(rewards, total, failures, timeouts)


def _store(rewards, j: int, name: str, box: dict, n: int, failures: dict) -> None:
    """Column j from a call's outcome (`box`: "value" or "error"); a failure leaves it NaN and is counted."""
    import torch

    error = box.get("error")
    if error is None:
        try:
            values = list(box["value"])
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
            rewards[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
        except (TypeError, ValueError) as e:  # not a list of numbers / None
            error = e
    if error is not None:
        failures[name] += 1
        logger.warning("reward %r failed (%s); its column is NaN for this batch", name, _one_line(error))
