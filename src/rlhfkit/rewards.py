"""Rewards for the online trainers: Python functions, reward models, and weighted sums of them.

A reward is named by a string:

* ``package.module:function`` — a Python function, imported with importlib and called as
  ``function(prompts=[...], completions=[...], **columns)``, where ``columns`` holds every other column of
  the prompts file as a list (``answer=[...]``, say). It returns one float per completion.
  **A named function is trusted code the user chose**: it runs in this process with the user's rights. It
  is the only code a config can make rlhfkit run (YAML is read with the safe loader; model weights load from
  safetensors). Functions that execute model output (unit tests, say) must do so in a subprocess with time
  and memory limits (DESIGN.md §3): ``run_untrusted`` does that.
* a directory — a reward model from `rlhfkit rm` (``rlhfkit.models.reward.RewardModel``), which scores
  (prompt, completion) and ignores the other columns.

``build_reward(names, weights)`` combines several: total = Σ_k w_k · r_k. A function that raises, returns the
wrong number of values, or a value that is not a finite number fails with a :class:`RewardError` that names it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import reprlib
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from rlhfkit.config import ConfigError

RewardFn = Callable[..., list[float]]  # (prompts=, completions=, **columns) → one float per completion


class RewardError(ConfigError):
    """A reward that cannot be loaded or returned something unusable; the message names it.
    A ConfigError, since the config named the reward: the CLI prints it as one line, no traceback."""


def load_function(spec: str) -> RewardFn:
    """The function named ``module:function`` (dots allowed after the colon for attributes)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise RewardError(f"reward {spec!r} is neither a directory nor 'module:function' "
                          "(e.g. rlhfkit.data.tasks.arithmetic:exact_answer)")
    # the working directory too, after the installed packages (which win a name they share), while the named module
    # imports (and with it what it imports at its top): my_rewards.py beside the command is found from the `rlhfkit`
    # launcher as from `python -m rlhfkit.cli`. Not for the rest of the run, where every optional module a library
    # probes for (brotli, gmpy2, ...) would be looked for there too and a file of that name run
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} (searched the installed packages "
                          f"and the working directory; PYTHONPATH adds folders): {e}") from e
    except Exception as e:  # the module's own code failed as it ran (a SyntaxError, a KeyError at its top)
        raise RewardError(f"reward {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}") from e
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r} is not callable")
    return obj


def reward_model_function(path: str, device: torch.device | str | None = None) -> RewardFn:
    """A reward model directory as a reward function (it reads prompts and completions only)."""
    from rlhfkit.models.reward import RewardModel

    model = RewardModel.from_pretrained(path, device)

    def score(prompts: list, completions: list[str], **columns) -> list[float]:
        return model.score(prompts, completions).tolist()

    score.reward_model = model  # for checks before sampling (``CombinedReward.check_rows``)
    return score


def check_values(name: str, values, n: int) -> torch.Tensor:
    """``values`` as a (n,) float tensor, or a RewardError naming reward ``name``. None, for a completion the
    reward does not apply to (TRL's convention for rewards of several tasks), is NaN: left out of the sum."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    if isinstance(values, (str, bytes, Mapping)):  # a dict's iteration is its keys
        what = f"the text {values!r}" if isinstance(values, (str, bytes)) else f"a {type(values).__name__}"
        raise RewardError(f"reward {name!r} returned {what}; it must return a list of numbers, one per completion")
    try:
        values = list(values)
        text = next((v for v in values if isinstance(v, (str, bytes))), None)
        if text is not None:  # float("4") would pass: an extracted answer returned in place of its score
            raise TypeError(f"got the text {text!r}")
        bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(float(v))]
        values = [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an int past a float (10**400)
        raise RewardError(f"reward {name!r} must return a list of numbers, one per completion: {e}") from e
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions; "
                          "it must return one float per completion")
    out = torch.tensor(values, dtype=torch.float32)
    bad = bad or [i for i, v in enumerate(out.tolist()) if math.isinf(v)]  # finite, but past float32's range
    if bad:
        raise RewardError(f"reward {name!r} returned {values[bad[0]]} for completion {bad[0]} "
                          f"({len(bad)} non-finite values in all, in float32); rewards must be finite numbers")
    return out


@dataclass
class Reward:
    """One named reward and its weight in the sum."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def column_fit(fn: RewardFn, columns: Iterable[str]) -> tuple[list[str], list[str]]:
    """(parameters ``fn`` requires that it is not given, keywords it is given that it cannot take), read from its
    signature: it is given ``prompts``, ``completions`` and each of ``columns``; a parameter without a default
    needs one of them; without a ``**kwargs`` it takes no others. Both empty when the signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return [], []
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = ["prompts", "completions", *columns]
    missing = [name for name, p in named.items() if p.default is p.empty and name not in given]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    unwanted = [] if takes_any else [c for c in given if c not in named]
    return missing, unwanted


class CombinedReward:
    """Σ_k w_k · r_k over several rewards; also reports each reward's values."""

    def __init__(self, rewards: list[Reward]):
        if not rewards:
            raise RewardError("no reward given: set rewards to 'module:function' names or reward-model directories")
        self.rewards = rewards

    def check_columns(self, columns: Iterable[str], source: str) -> None:
        """RewardError, before any sampling, for a reward function that requires a column ``source`` (a prompts
        file) lacks, or that cannot be called with one of its ``columns`` (every column reaches every function)."""
        columns = [c for c in columns if c != "prompt"]
        have = ", ".join(["prompt", *columns])
        clash = [c for c in columns if c in ("prompts", "completions")]
        if clash:
            raise RewardError(f"{source} has a column {clash[0]!r}, the name of an argument every reward function "
                              "is given (prompts, completions): rename the column")
        for r in self.rewards:
            missing, unwanted = column_fit(r.fn, columns)
            if "prompt" in missing:
                raise RewardError(f"reward {r.name!r} takes 'prompt': every reward function is given the prompts "
                                  "as 'prompts' (and the completions as 'completions'); rename the parameter")
            if missing:
                raise RewardError(f"reward {r.name!r} takes column {missing[0]!r}, which {source} does not have "
                                  f"(its columns: {have}); add it to the file, or give the parameter a default")
            if unwanted in (["prompts"], ["completions"], ["prompts", "completions"]):
                raise RewardError(f"reward {r.name!r} does not take {unwanted[0]!r}: every reward function is called "
                                  "as fn(prompts=..., completions=..., **columns)")
            if unwanted:
                column = next(c for c in unwanted if c not in ("prompts", "completions"))
                raise RewardError(f"reward {r.name!r} would be called with {source}'s column {column!r} "
                                  "(every column reaches every reward function, as in TRL), which it does not "
                                  "take: add **kwargs to its parameters")

    def check_rows(self, rows: list[dict], source: str) -> None:
        """Before any sampling: a DataError naming the first row of ``source`` (counted from 0, as every data error
        counts them) of chat messages where a reward model has no chat template to write them with; and a warning
        naming the first row without a column that a reward function requires (a parameter without a default),
        which it is called with None for: a reward that does not apply there returns None (TRL's way, a file of
        several tasks), one that cannot take None would raise mid-run (its error then names the row's inputs)."""
        from rlhfkit.data.formats import DataError, location

        for r in self.rewards:
            scorer = getattr(r.fn, "reward_model", None)
            if scorer is not None and not getattr(scorer.tokenizer, "chat_template", None):
                row = next((i for i, row in enumerate(rows) if isinstance(row.get("prompt"), list)), None)
                if row is not None:
                    raise DataError(source, f"chat messages, which reward model {r.name!r} cannot read: its tokenizer "
                                            "has no chat template (give the reward model one, or use text prompts)",
                                    row=row, field="prompt")
            required, _ = column_fit(r.fn, [])
            for column in (c for c in required if c != "prompt"):  # 'prompt': check_columns says what to rename
                gaps = [i for i, row in enumerate(rows) if row.get(column) is None]
                if gaps:
                    warnings.warn(f"{len(gaps)} of {len(rows)} rows have no {column!r} (first: "
                                  f"{location(source, gaps[0], column)}), which "
                                  f"reward {r.name!r} takes: it gets None for them, and must return None where it "
                                  "does not apply (or raise mid-run); give those rows one if it should apply",
                                  stacklevel=2)

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total (N,), {name: (N,) values}) for N completions; ``columns`` are the other dataset columns. A
        reward's None for a completion is NaN among its values and counts for nothing in the total; a completion
        that no reward applies to is an error."""
        columns = columns or {}
        parts = {}
        for r in self.rewards:
            try:
                values = r.fn(prompts=list(prompts), completions=list(completions), **columns)
            except Exception as e:
                raise RewardError(f"reward {r.name!r} raised {type(e).__name__}: {e}"
                                  + _first_failing(r.fn, prompts, completions, columns)) from e
            parts[r.name] = check_values(r.name, values, len(completions))
        stacked = torch.stack([r.weight * parts[r.name] for r in self.rewards])  # (K, N)
        unscored = stacked.isnan().all(0)
        if unscored.any():
            i = int(unscored.nonzero()[0])
            raise RewardError(f"no reward applies to completion {i} (every reward returned None for it; "
                              f"{int(unscored.sum())} such in all; {_inputs_of(i, prompts, columns)}): each "
                              "completion needs a reward")
        return stacked.nansum(0), parts


def _inputs_of(i: int, prompts: list, columns: dict[str, list]) -> str:
    """Completion ``i``'s prompt and columns, short, to find its row in the data by."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    return ", ".join([f"prompt {short.repr(prompts[i])}", *(f"{k} {short.repr(v[i])}" for k, v in columns.items())])


def _first_failing(fn: RewardFn, prompts: list, completions: list[str], columns: dict[str, list]) -> str:
    """Where a reward function that raised on a batch raises on one completion alone (called again one at a time,
    only after a failure, on the first 16 at most: a judge or a sandbox may be slow), the first such completion's
    inputs, as a clause for the error; else ''."""
    for i in range(min(len(completions), 16)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return f" (first on completion {i}: {_inputs_of(i, prompts, columns)})"
    return ""


def short_name(spec: str) -> str:
    """The name a reward is logged under: the function's name, or the directory's."""
    return spec.rpartition(":")[2] if ":" in spec and not Path(spec).is_dir() else Path(spec).name


def build_reward(specs: list[str], weights: list[float] | None = None,
                 device: torch.device | str | None = None) -> CombinedReward:
    """Rewards named by ``specs`` (directories or ``module:function``), weighted (default all 1)."""
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise RewardError(f"{len(weights)} reward weights for {len(specs)} rewards; give one weight per reward")
    rewards, seen = [], set()
    for spec, weight in zip(specs, weights):
        if not math.isfinite(float(weight)):  # NaN made the reward count as None everywhere; inf, totals of inf
            raise RewardError(f"reward weight {weight} for {spec!r}: weights must be finite numbers")
        fn = reward_model_function(spec, device) if Path(spec).is_dir() else load_function(spec)
        name = short_name(spec)
        name = name if name not in seen else spec  # two rewards with one short name keep their full names
        seen.add(name)
        rewards.append(Reward(name, fn, float(weight)))
    return CombinedReward(rewards)


def run_untrusted(code: str, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "",
                  output_mb: int = 16) -> subprocess.CompletedProcess | None:
    """Run Python ``code`` (model output, e.g. a program plus its unit tests) in a fresh isolated interpreter.

    Limits (DESIGN.md §3): wall time ``timeout_s`` (CPU time a second more), address space ``memory_mb``, a
    temporary working directory holding the code alone (``main.py``) and an empty environment, and ``output_mb``
    of stdout and of stderr each (and of any file it writes): a write past it fails (Python: OSError "File too
    large", so a non-zero ``returncode``), the output kept up to there. Returns the finished process
    (``returncode`` 0 when the code ran through; stdout and stderr as text), or None when it ran
    out of (wall or CPU) time. POSIX only.
    """
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("output_mb", output_mb)):
        if not value > 0:  # 0 would not mean "no limit": no time, no memory, no output at all
            raise ValueError(f"run_untrusted: {name} must be positive (a limit), got {value}")

    def limits() -> None:  # runs in the child, before Python starts
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        cpu = math.ceil(timeout_s) + 1  # a backstop: the wall-clock timeout normally fires first
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_mb << 20, output_mb << 20))  # its stdout/stderr files too

    # output into files, not pipes: the file-size limit bounds it (a pipe read whole held 400 MB in 1.4 s)
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # the code from a file: a command line holds neither a NUL byte nor more than 128 KiB in one argument
        (Path(cwd) / "main.py").write_text(code, encoding="utf-8", errors="surrogateescape")
        # its own process group: what it forks is killed with it, after a timeout too (unless it leaves the group)
        proc = subprocess.Popen([sys.executable, "-I", "main.py"], stdin=subprocess.PIPE, stdout=out, stderr=err,
                                text=True, preexec_fn=limits, cwd=cwd, env={}, start_new_session=True)
        try:
            proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read(output_mb << 20).decode("utf-8", errors="replace"))
        done = subprocess.CompletedProcess(proc.args, proc.returncode, *texts)
    return None if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else done  # killed by the CPU limit
