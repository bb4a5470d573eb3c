"""`rlhfkit <command> [--config FILE.yaml] [--key value ...]`: parse → config → run.

Every command takes a typed config (a dataclass); `rlhfkit <command> --help` lists each
field with its doc line and default. Shorthands: `--model PATH` sets `model.path`, and
`--out DIR` / `--seed N` set `train.out` / `train.seed` for the trainers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Literal

from rlhfkit import __version__
from rlhfkit.config import (SEED_BOUNDS, ConfigError, GenerationConfig, ModelConfig, arg, columns_arg,
                            load_json_object, parse_args)


@dataclass
class TinyModelConfig:
    """`rlhfkit tiny-model`: a small random model of a real architecture + a local tokenizer."""

    arch: str = arg("llama", "architecture: llama, qwen2, qwen3, mistral, phi3, gemma, gpt2 or gpt_neox")
    out: str = arg("runs/tiny", "directory to write the model and tokenizer to")
    hidden_size: int = arg(128, "hidden size", ge=1)
    num_layers: int = arg(2, "transformer blocks", ge=1)
    num_heads: int = arg(4, "attention heads", ge=1)
    num_kv_heads: int = arg(0, "key/value heads for grouped-query attention (llama, qwen2, mistral; 0 = num_heads)",
                            ge=0)
    vocab_size: int = arg(1024, "BPE vocabulary size at most (the task's text may give fewer)", ge=1)
    max_positions: int = arg(256, "longest sequence the model accepts", ge=1)
    seed: int = arg(0, "seed of the random weights", **SEED_BOUNDS)


@dataclass
class MakeDataConfig:
    """`rlhfkit make-data`: write the built-in task as JSONL files."""

    out: str = arg("runs/data", "directory for the JSONL files")
    seed: int = arg(0, "seed of the task's random draws", **SEED_BOUNDS)
    task: Literal["describe", "arithmetic"] = arg("describe", "describe: preferences with a hidden gold reward; "
                                                  "arithmetic: single-digit sums with a verifiable reward")


@dataclass
class GenerateConfig:
    """`rlhfkit generate`: sample completions from any model directory."""

    prompt: list[str] = arg([], "prompt text (commas and all); repeat the flag for several", split=False)
    prompts: str = arg("", "file of prompts (a `prompt` column) to answer instead")
    columns: dict[str, str] = columns_arg()
    chat: bool = arg(False, "send each --prompt as a user message through the model's chat template (an "
                     "instruct model's format); a file's chat prompts always are")
    limit: int | None = arg(None, "answer at most this many prompts from the file (none: 10 printed, all with "
                            "--out; 0 = all)", ge=0)
    n: int = arg(1, "samples per prompt, each with its own seed (OpenRLHF's best_of_n); --n_samples N too (under "
                 "torchrun, whose parser takes --n for one of its own)", ge=1)
    rewards: list[str] = arg([], "score each sample with these: 'module:function' names (trusted code you chose) "
                             "and/or reward-model directories, summed with reward_weights")
    reward_weights: list[float] = arg([], "weight of each reward in the sum (empty = all 1)")
    select: Literal["all", "best", "pairs"] = arg(
        "all", "what --out holds: every sample (with its rewards); the best-scored one per prompt (rejection "
        "sampling: an `sft` data file); or the best and the worst as chosen and rejected (a `dpo` / `rm` data "
        "file, as OpenRLHF's iterative DPO makes them; prompts whose samples all score alike are left out)")
    min_margin: float = arg(0.0, "--select pairs: leave out a prompt whose best and worst rewards differ by this "
                            "much or less (0: only ties), where a reward's noise would make the pair a coin toss",
                            ge=0, lt=float("inf"))
    out: str = arg("", "write the samples to this JSONL file (the prompt file's other columns kept) instead of "
                   "printing them; written to OUT.partial as they are made, a stopped run run again with the same "
                   "settings goes on where it stopped")
    seed: int = arg(0, "sampling seed", **SEED_BOUNDS)
    model: ModelConfig = arg(ModelConfig, "the model to sample from")
    generation: GenerationConfig = arg(GenerationConfig, "decoding")

    def __post_init__(self) -> None:
        if self.select != "all" and not (self.rewards and self.out):
            raise ConfigError(f"--select {self.select} picks samples by their reward into a data file: pass "
                              "--rewards (reward-model directories or module:function names) and --out FILE.jsonl")
        if self.select == "pairs" and self.n < 2:
            raise ConfigError("--select pairs takes the best and the worst of each prompt's samples: pass --n 2 or "
                              "more")
        if self.min_margin and self.select != "pairs":
            raise ConfigError(f"--min_margin {self.min_margin} is the reward gap between a pair's chosen and rejected "
                              "answers: it needs --select pairs")
        if any(not p for p in self.prompt):  # no token to start from: sampling failed on a 0-sized tensor
            raise ConfigError("--prompt is empty: give the text to answer (or --prompts FILE)")
        if self.n > 1 and self.generation.temperature == 0:
            raise ConfigError(f"--n {self.n} with --generation.temperature 0 (greedy) makes {self.n} identical "
                              "samples of each prompt: sample at a temperature above 0, or pass --n 1")


@dataclass
class EvalConfig:
    """`rlhfkit eval`: mean reward ± standard error of one sample per held-out prompt: the built-in task's gold
    reward, or yours (--rewards)."""

    prompts: str = arg("runs/data/prompts_test.jsonl", "prompts file (the built-in task's test split, or yours "
                       "with --rewards)")
    columns: dict[str, str] = columns_arg()
    rewards: list[str] = arg([], "score with these instead of the built-in task's gold reward: 'module:function' "
                             "names (trusted code you chose) and/or reward-model directories, summed")
    reward_weights: list[float] = arg([], "weight of each reward in the sum (empty = all 1)")
    limit: int = arg(0, "evaluate only the first N prompts (0 = all)", ge=0)
    seed: int = arg(0, "sampling seed", **SEED_BOUNDS)
    out: str = arg("", "also write the figures and every completion to this JSON file")
    reference: str = arg("", "also the KL to this model (the one trained from, e.g. the SFT model): the mean over "
                         "prompts of sum_t log pi(y_t) - log pi_ref(y_t) on the model's own samples, nats per answer")
    model: ModelConfig = arg(ModelConfig, "the model to evaluate")
    generation: GenerationConfig = arg(GenerationConfig, "decoding (default: sampling at temperature 1)")

    def __post_init__(self) -> None:
        g = self.generation
        if self.reference and (g.temperature == 0 or g.top_k or g.top_p < 1 or g.min_p):
            raise ConfigError("--reference estimates the KL on the model's own samples, drawn from its whole "
                              "distribution: sample at a temperature above 0 without top_k, top_p or min_p (greedy "
                              "or cut-off answers gave estimates of no KL, negative ones too)")


@dataclass
class ExportConfig:
    """`rlhfkit export`: merge LoRA adapters into a standalone Hugging Face directory."""

    model: str = arg("", "directory holding a LoRA adapter (adapter_config.json)")
    out: str = arg("", "directory for the merged model (new or empty, unless overwrite)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "the merged weights' dtype (merged in float32); auto = the base model's saved dtype")
    overwrite: bool = arg(False, "write into an --out that holds files already (its model files are replaced, "
                          "other files stay)")
    allow_pickle: bool = arg(False, "allow pickled .bin base weights (unsafe)")


def _report(metrics: dict, saved: str) -> None:
    """The final metrics and where the model went, printed by the process that wrote it (rank 0)."""
    from rlhfkit import distributed

    if distributed.is_main():
        print(json.dumps(metrics, indent=2))
        print(saved)


def _check_out_dir(out: str, what: str) -> None:
    """ConfigError for an ``--out`` that cannot be the directory ``what`` goes to: a file, or a path under one
    (transformers had logged an error and rlhfkit said the model was written; make-data ended in a traceback)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory for {what}")
    _check_out_parents(out)


def _check_out_file(out: str, what: str) -> None:
    """ConfigError, before anything is computed, for an ``--out`` that cannot be the file ``what`` goes to: a
    directory, or a path under a file (the figures had been computed first, then lost to a traceback)."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a directory: name a file for {what}, e.g. {Path(out) / 'eval.json'}")
    _check_out_parents(out)


def _check_out_parents(out: str) -> None:
    """ConfigError when a directory on ``--out``'s path is a file, where its directories could not be made."""
    parent = next((p for p in Path(out).parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so no directory can be made there: name a path whose "
                          "directories are directories (or new)")


def cmd_tiny_model(cfg: TinyModelConfig) -> None:
    from rlhfkit.models.tiny import make_tiny_model

    _check_out_dir(cfg.out, "the model and its tokenizer")
    out = make_tiny_model(cfg.arch, cfg.out, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.vocab_size,
                          cfg.max_positions, cfg.seed, cfg.num_kv_heads or None)
    print(f"wrote a tiny {cfg.arch} model to {out}")


def cmd_make_data(cfg: MakeDataConfig) -> None:
    import importlib

    _check_out_dir(cfg.out, "the JSONL files")
    task = importlib.import_module(f"rlhfkit.data.tasks.{cfg.task}")
    paths = task.write(cfg.out, task.TaskSpec(seed=cfg.seed))
    for name, path in paths.items():
        print(f"{name:>14}: {path}")


def cmd_sft(cfg) -> None:
    from rlhfkit.trainers.sft import train

    metrics = train(cfg)
    _report(metrics, f"model saved to {cfg.train.out}")


def _prompt_file(path: str, limit: int, columns: dict[str, str]) -> list:
    from rlhfkit.data.formats import load_prompts

    prompts = [r["prompt"] for r in load_prompts(path, columns)]
    return prompts[:limit] if limit > 0 else prompts


def _load(model_cfg: ModelConfig):
    from rlhfkit.models.load import load_causal_lm

    tokenizer = _load_tokenizer(model_cfg)
    return load_causal_lm(model_cfg), tokenizer


def _load_tokenizer(model_cfg: ModelConfig):
    from rlhfkit.models.load import tokenizer_of

    if not model_cfg.path:
        raise ConfigError("no model given: pass --model PATH (a model directory or hub name)")
    return tokenizer_of(model_cfg)


def _fitting(prompts: list, tokenizer, cfg, source: str) -> list:
    """The ``prompts`` with room beside ``cfg.generation.max_new_tokens`` in ``cfg.model``'s positions; the
    others dropped and counted (a row past them failed with an IndexError, or ran past what the model learned)."""
    from rlhfkit.data.collate import drop_long_prompts
    from rlhfkit.models.load import prompt_room

    room = prompt_room(cfg.model, cfg.generation.max_new_tokens)
    return [r["prompt"] for r in drop_long_prompts([{"prompt": p} for p in prompts], tokenizer, 0, source, room)]


# the columns ``generate --out`` writes: a prompt file's own column of one of these names would be written over
_WRITTEN = ("completion", "messages", "chosen", "rejected", "margin", "label", "text", "sample", "ended", "reward",
            "chosen_reward", "rejected_reward")


def cmd_generate(cfg: GenerateConfig) -> None:
    from rlhfkit.data.collate import drop_long_prompts, render_prompt
    from rlhfkit import distributed
    from rlhfkit.data.formats import load_prompts
    from rlhfkit.data.resumable import ResumableJsonl
    from rlhfkit.models.load import load_causal_lm, prompt_room, resolve_device
    from rlhfkit.progress import progress
    from rlhfkit.rewards import build_reward
    from rlhfkit.rollout.generate import generate
    from rlhfkit.rollout.sampling import sample_seeds
    from rlhfkit.trainers.online import reward_inputs, with_every_column

    cfg = dataclasses.replace(cfg, generation=_model_sampling(cfg, greedy_ok=cfg.n == 1))
    typed = [p.replace("\\n", "\n") for p in cfg.prompt]
    rows = [{"prompt": [{"role": "user", "content": p}] if cfg.chat else p} for p in typed]
    if not rows and cfg.prompts:
        limit = (0 if cfg.out else 10) if cfg.limit is None else cfg.limit
        rows = load_prompts(cfg.prompts, cfg.columns)
        rows = rows[:limit] if limit else rows
    if not rows:
        raise ConfigError("nothing to answer: pass --prompt TEXT or --prompts FILE")
    source = cfg.prompts or "--prompt"
    if cfg.out:  # before hours of sampling
        _check_generate_out(cfg, rows, source)
    elif distributed.world_size() > 1:
        raise ConfigError("generate prints its samples in one process: with several (torchrun, accelerate launch) "
                          "pass --out FILE.jsonl, and each samples blocks of its own")
    device = distributed.setup(resolve_device())  # several processes: each its own GPU
    # refused before the model loads
    reward = build_reward(cfg.rewards, cfg.reward_weights, device) if cfg.rewards else None
    rows = with_every_column(rows)
    if reward:
        reward.check_columns(rows[0], source)
        reward.check_rows(rows, source)  # every row, before anything is sampled
    tokenizer = _load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device)
    place = {id(r): i for i, r in enumerate(rows)}  # each prompt's place in the file: its samples' seeds
    rows = drop_long_prompts(rows, tokenizer, 0, source, prompt_room(cfg.model, cfg.generation.max_new_tokens))

    def sample(block: list[dict]):
        prompts, columns = reward_inputs(block, cfg.n)  # each prompt n times in a row
        seeds = sample_seeds(cfg.seed, [place[id(r)] for r in block], cfg.n)
        gens = generate(model, tokenizer, prompts, cfg.generation, seeds=seeds)
        return prompts, gens, *(reward(prompts, gens.texts, columns) if reward else (None, {}))

    if not cfg.out:
        prompts, gens, total, _ = sample(rows)
        for i, (prompt, text) in enumerate(zip(prompts, gens.texts)):
            scored = f"[reward {total[i].item():.4f}] " if reward else ""
            print(f"{scored}{render_prompt(tokenizer, prompt)}{text}\n")  # a chat prompt as the model saw it
        return
    # a block of generation.batch_size prompts at a time, each written as it is made: a stopped run run again goes
    # on where it stopped; its samples are the ones an unstopped run makes (each batch of the same rows). With
    # several processes each samples and scores a block of its own, as one process would, and process 0 writes
    # them in order: the same file, whatever the number of processes (rewards and samples batched alike)
    defaults = dataclasses.asdict(GenerateConfig())  # a setting added since a stopped run: at its default, the same
    with _opened_on_main(lambda: ResumableJsonl(cfg.out, _generate_settings(cfg, rows, model), defaults)) as file:
        done = distributed.all_gather(file.done if file else 0)[0]
        if file and done:
            print(f"going on from {file.partial}: {done} of {len(rows)} prompts done")
        bar = progress(None, "generate", total=len(rows), initial=done, unit="prompt", disable=file is None)
        starts = range(done, len(rows), cfg.generation.batch_size)
        for first in range(0, len(starts), distributed.world_size()):  # a round: a block for each process
            these = starts[first: first + distributed.world_size()]
            mine = these[distributed.rank()] if distributed.rank() < len(these) else None
            share = None if mine is None else _sample_share(sample, rows[mine: mine + cfg.generation.batch_size])
            shares = distributed.all_gather(share)
            for start, (texts, ended, total, parts) in zip(these, shares):
                block = rows[start: start + cfg.generation.batch_size]
                if file:
                    written, left_out = select_samples(block, texts, ended, total, parts, cfg.n, cfg.select,
                                                       cfg.min_margin)
                    file.append(written, start + len(block), written=len(written), samples=len(texts),
                                left_out=left_out)
                bar.update(len(block))
        bar.close()
        if file:
            file.finish()
    if file:
        counts = file.counts
        left_out = counts.get("left_out", 0)
        print(f"wrote {counts.get('written', 0)} rows to {cfg.out} ({cfg.select}: {counts.get('samples', 0)} samples "
              f"of {len(rows)} prompts" + (f"; {left_out} prompts left out: no ended, non-blank sample" + (
                  (f", or best and worst within --min_margin {cfg.min_margin}" if cfg.min_margin else
                   ", or all scored alike") if cfg.select == "pairs" else "") + ")" if left_out else ")"))


@contextlib.contextmanager
def _opened_on_main(open_file):
    """``open_file()`` (a context) on process 0, None on the others; an error opening it raised in every process
    (the others would wait for process 0 for ever)."""
    from rlhfkit import distributed

    file, error, failed = None, None, None
    if distributed.is_main():
        try:
            file = open_file()
        except Exception as e:  # any: the others must hear of it (an OSError, a full disk)
            error, failed = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e), e
    error = distributed.all_gather(error)[0]
    if failed is not None:
        raise failed
    if error:
        raise ConfigError(f"process 0 could not open the output: {error}")
    with file if file else contextlib.nullcontext():
        yield file


def _sample_share(sample, rows: list[dict]) -> tuple:
    """A block sampled and scored by this process, on the CPU: (texts, ended, total, parts)."""
    _, gens, total, parts = sample(rows)
    return (gens.texts, gens.has_eos, None if total is None else total.cpu(),
            {k: v.cpu() for k, v in parts.items()})


def _generate_settings(cfg: GenerateConfig, rows: list[dict], model) -> dict:
    """What makes ``generate --out``'s rows, which a resumed run must share: the options, with the prompt rows, the
    model's and the reward models' directories by their contents (not how their paths are spelt), and the device
    and dtype the model samples in."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "prompt", "prompts", "limit")}
    settings["model"]["path"] = _fingerprint(cfg.model.path)
    settings["rewards"] = [_fingerprint(r) if Path(r).is_dir() else r for r in cfg.rewards]
    weight = next(model.parameters())
    return {**settings, "prompt_rows": _fingerprint(rows), "sampled_in": f"{weight.device.type} {weight.dtype}"}


def _fingerprint(what: list[dict] | str) -> str:
    """A short hash of prompt rows, or of a model directory's config and weight files (each one's name, size, and
    first and last 64 KiB: new weights change them); a hub name as it is."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    if isinstance(what, list):
        digest.update(json.dumps(what, default=str, sort_keys=True).encode())
    elif Path(what).is_dir():
        for f in sorted(Path(what).iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin") and not f.name.startswith("."):
                size = f.stat().st_size
                with open(f, "rb") as handle:
                    head = handle.read(65536)
                    handle.seek(max(size - 65536, 0))
                    digest.update(f"{f.name} {size}".encode() + head + handle.read())
    else:
        return what
    return digest.hexdigest()


def _check_generate_out(cfg: GenerateConfig, rows: list[dict], source: str) -> None:
    """ConfigError, before anything is sampled, for an --out the trainers could not read back (not .jsonl, a
    directory, the prompts file itself) or a prompt file column it would write over; its directory made."""
    out = Path(cfg.out)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {cfg.out}: generate writes JSON lines; name the file *.jsonl")
    if out.is_dir() or (cfg.prompts and out.resolve() == Path(cfg.prompts).resolve()):
        raise ConfigError(f"--out {cfg.out} is {'a directory' if out.is_dir() else 'the prompts file itself'}: "
                          "name a new .jsonl file")
    _check_out_parents(cfg.out)
    clash = next((c for c in dict.fromkeys(k for r in rows for k in r) if c in _WRITTEN or c.startswith("reward/")),
                 None)
    if clash:
        raise ConfigError(f"{source} has a column {clash!r}, which generate --out writes (the samples, their rewards "
                          "and the pairs): drop or rename it in the file")
    out.parent.mkdir(parents=True, exist_ok=True)


def select_samples(rows: list[dict], texts: list[str], ended: list[bool], total, parts: dict, n: int, select: str,
                   min_margin: float = 0.0) -> tuple[list[dict], int]:
    """The rows ``generate --out`` writes, and how many prompts were left out. ``rows``: P prompt rows; ``texts``
    and ``ended`` (whether it stopped at EOS): their P·n samples, prompt by prompt; ``total`` (P·n,) summed rewards
    (None: unscored) and ``parts`` each reward's (NaN where it does not apply: written as null). ``all``: a row per
    sample, its rewards beside it; ``best``: the highest-scored of each prompt's samples that ended and are not
    blank (SFT and DPO learn an answer as ended; they refuse a blank one), as SFT data; ``pairs``: that one as
    ``chosen`` and the lowest-scored as ``rejected``, as preference data, a prompt left out where their rewards
    differ by ``min_margin`` or less (0: where they score alike). Among equal scores the best is the first sample,
    the worst the last. A chat prompt (messages) gets its answers as messages, which those loaders require."""
    def answer(prompt, text):
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    def scores(i: int) -> dict:
        return {} if total is None else {"reward": total[i].item(), **{f"reward/{k}": None if v[i].isnan() else
                                                                        v[i].item() for k, v in parts.items()}}

    out, left_out = [], 0
    for p, row in enumerate(rows):
        ids = range(p * n, (p + 1) * n)
        if select == "all":
            out += [{**row, "completion": answer(row["prompt"], texts[i]), "sample": i - p * n, "ended": ended[i],
                     **scores(i)} for i in ids]
            continue
        ranked = sorted((i for i in ids if ended[i] and texts[i].strip()), key=lambda i: -total[i].item())
        if not ranked or (select == "pairs" and total[ranked[0]].item() - total[ranked[-1]].item() <= min_margin):
            left_out += 1
            continue
        best, worst = ranked[0], ranked[-1]
        if select == "best":
            if isinstance(row["prompt"], list):  # SFT reads a conversation as one messages list
                rest = {k: v for k, v in row.items() if k != "prompt"}
                out.append({**rest, "messages": row["prompt"] + answer(row["prompt"], texts[best]), **scores(best)})
            else:
                out.append({**row, "completion": texts[best], **scores(best)})
        else:
            out.append({**row, "chosen": answer(row["prompt"], texts[best]),
                        "rejected": answer(row["prompt"], texts[worst]),
                        "chosen_reward": total[best].item(), "rejected_reward": total[worst].item()})
    return out, left_out


def _refuse_foreign(prompts: list, source: str, use: str) -> None:
    """ConfigError when some ``prompts`` are not the built-in task's, whose gold reward would score them all 0 or
    at random; ``use`` says what reads it and what to do instead."""
    from rlhfkit.data.tasks.arithmetic import all_prompts
    from rlhfkit.data.tasks.describe import prompt_topic

    foreign = [p for p in prompts if not isinstance(p, str) or prompt_topic(p) is None]
    if foreign:
        sums = {r["prompt"] for r in all_prompts()}
        hint = ("; these are the arithmetic task's: its reward is --rewards rlhfkit.data.tasks.arithmetic:exact_answer"
                if all(p in sums for p in foreign) else "")
        raise ConfigError(f"{source}: {len(foreign)} of {len(prompts)} prompts are not the built-in describe task's "
                          f"(e.g. {foreign[0]!r}), whose gold reward {use}{hint}")


def _check_prompts_given(cfg) -> None:
    """ConfigError naming --prompts when it is empty (the data loader's own names --data, which these lack)."""
    if not cfg.prompts:
        raise ConfigError("no prompts file given: pass --prompts FILE (or set prompts in the config file)")


def cmd_eval(cfg: EvalConfig) -> None:
    from rlhfkit.evaluate import gold_eval

    _check_prompts_given(cfg)
    if cfg.out:  # before the sampling, not after it
        _check_out_file(cfg.out, "the figures and the samples")
    if cfg.rewards:
        return _eval_rewards(cfg)
    prompts = _prompt_file(cfg.prompts, cfg.limit, cfg.columns)
    _refuse_foreign(prompts, cfg.prompts, "`eval` measures by default: score your own prompts with --rewards "
                                          "(module:function names and/or reward-model directories)")
    model, tokenizer = _load(cfg.model)
    _check_reference(cfg, tokenizer)  # before the sampling, not after it
    prompts = _fitting(prompts, tokenizer, cfg, cfg.prompts)
    result = gold_eval(model, tokenizer, prompts, cfg.generation, seed=cfg.seed, progress=True)
    decoding = "greedy" if cfg.generation.temperature <= 0 else f"sampling, temperature {cfg.generation.temperature}"
    print(f"gold reward on {len(prompts)} prompts ({decoding}): {result.mean:.3f} ± {result.stderr:.3f}")
    kl = _kl_to_reference(cfg, model, tokenizer, result.generations)
    for p, c, r in list(zip(result.prompts, result.completions, result.rewards))[:3]:
        print(f"  [{r:.2f}] {p!r} → {c!r}")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**result.summary(), **kl, "model": cfg.model.path, "decoding": decoding,
                                             "samples": [{"prompt": p, "completion": c, "gold": r} for p, c, r in
                                                         zip(result.prompts, result.completions, result.rewards)]},
                                            indent=1))


def _eval_rewards(cfg: EvalConfig) -> None:
    """``eval`` with the user's rewards: one sample per prompt, each reward's mean ± standard error."""
    from rlhfkit.data.collate import drop_long_prompts
    from rlhfkit.data.formats import load_prompts
    from rlhfkit.models.load import prompt_room
    from rlhfkit.rewards import build_reward
    from rlhfkit.trainers.online import reward_figures, sample_rewards, with_every_column

    rows = load_prompts(cfg.prompts, cfg.columns)
    rows = rows[:cfg.limit] if cfg.limit > 0 else rows
    reward = build_reward(cfg.rewards, cfg.reward_weights)  # refused before the model loads
    rows = with_every_column(rows)
    reward.check_columns(rows[0] if rows else [], cfg.prompts)
    reward.check_rows(rows, cfg.prompts)  # every row, before anything is sampled
    model, tokenizer = _load(cfg.model)
    _check_reference(cfg, tokenizer)  # before the sampling, not after it
    room = prompt_room(cfg.model, cfg.generation.max_new_tokens)
    rows = drop_long_prompts(rows, tokenizer, 0, cfg.prompts, room=room)  # past the positions: an IndexError
    prompts, gens, total, parts = sample_rewards(model, tokenizer, rows, reward, cfg.generation, cfg.seed,
                                                 progress=True)
    texts = gens.texts
    figures = reward_figures(total, parts)
    decoding = "greedy" if cfg.generation.temperature <= 0 else f"sampling, temperature {cfg.generation.temperature}"
    print(f"on {len(rows)} prompts ({decoding}):")
    for key, value in figures.items():
        if not key.endswith("_stderr"):
            print(f"  {key.removeprefix('eval/')}: {value:.3f} ± {figures[key + '_stderr']:.3f}")
    figures.update(_kl_to_reference(cfg, model, tokenizer, gens))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        samples = [{"prompt": p, "completion": c, "reward": total[i].item(),
                    "rewards": {name: None if v[i].isnan() else v[i].item() for name, v in parts.items()}}
                   for i, (p, c) in enumerate(zip(prompts, texts))]
        Path(cfg.out).write_text(json.dumps({**figures, "n": len(rows), "model": cfg.model.path,
                                             "decoding": decoding, "samples": samples}, indent=1))


def _check_reference(cfg: EvalConfig, tokenizer) -> None:
    """ConfigError for an ``--reference`` that is not a model, or reads other token ids than the model's."""
    if not cfg.reference:
        return
    from rlhfkit.models.load import check_model_path, check_same_tokenizer

    check_model_path(cfg.reference, "--reference model")
    check_same_tokenizer(tokenizer, cfg.reference, "--reference", "Pass the model this one was trained from.",
                         cfg.model.trust_remote_code)


def _kl_to_reference(cfg: EvalConfig, model, tokenizer, gens) -> dict:
    """With ``--reference``: the model's KL to it on its own samples ``gens`` (``evaluate.kl_to_reference``,
    printed), as {"kl", "kl_stderr", "reference"}; else {}."""
    if not cfg.reference:
        return {}
    from rlhfkit.evaluate import kl_to_reference
    from rlhfkit.models.load import load_causal_lm

    reference = load_causal_lm(dataclasses.replace(cfg.model, path=cfg.reference))
    kl, stderr = kl_to_reference(model, reference, gens, tokenizer.pad_token_id,
                                 temperature=cfg.generation.logprob_temperature)
    print(f"KL to {cfg.reference}: {kl:.3f} ± {stderr:.3f} nats per answer (on the model's own samples)")
    return {"kl": kl, "kl_stderr": stderr, "reference": cfg.reference}


@dataclass
class RewardEvalConfig:
    """`rlhfkit eval-rm`: a reward model's accuracy on held-out pairs, and its agreement with the gold reward."""

    model: str = arg("", "reward-model directory (from `rlhfkit rm`)")
    data: str = arg("runs/data/preference_test.jsonl", "held-out preference pairs")
    columns: dict[str, str] = columns_arg()
    meta: str = arg("", "the task's meta.json, for the accuracy ceiling the label noise allows (default: beside data)")
    out: str = arg("", "also write the figures to this JSON file")


def cmd_rm(cfg) -> None:
    from rlhfkit.trainers.reward import train

    metrics = train(cfg)
    _report(metrics, f"reward model saved to {cfg.train.out}")


def _accuracy_ceiling(cfg: RewardEvalConfig, pairs: list[dict]) -> dict:
    """{"accuracy_ceiling": the accuracy the task's label noise allows} from its meta.json (``--meta``, else the
    one beside ``--data``) for the built-in task's ``pairs`` (None: a meta.json without it), else {}. Read before
    the evaluation; ConfigError naming the file and the field where it cannot be (an ``--meta`` given is read
    whatever the pairs, and must be a file)."""
    from rlhfkit.evaluate import task_pairs

    meta = Path(cfg.meta) if cfg.meta else Path(cfg.data).parent / "meta.json"
    if cfg.meta and not meta.is_file():
        raise ConfigError(f"--meta {cfg.meta} {'is a directory' if meta.is_dir() else 'does not exist'}: name the "
                          "task's meta.json (make-data writes it beside the data), or leave --meta out")
    if not meta.is_file() or not (cfg.meta or task_pairs(pairs)):
        return {}
    fix = "name the meta.json make-data wrote with --meta FILE"
    ceilings = load_json_object(meta, "(make-data's meta.json)", fix)
    split = Path(cfg.data).stem.rpartition("_")[2]  # preference_test → test
    key = next((k for k in (f"label_accuracy_ceiling_{split}", "label_accuracy_ceiling") if k in ceilings), None)
    value = ceilings[key] if key else None  # None: another meta.json
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise ConfigError(f"{meta}: '{key}' must be a number from 0 to 1 (the accuracy the label noise allows), got "
                          f"{value!r:.80}; {fix}")
    return {"accuracy_ceiling": value}


def cmd_eval_rm(cfg: RewardEvalConfig) -> None:
    from rlhfkit.data.formats import load_preference
    from rlhfkit.evaluate import reward_model_eval
    from rlhfkit.models.reward import RewardModel, check_reward_dir

    if not cfg.model:
        raise ConfigError("no reward model given: pass --model DIR")
    check_reward_dir(cfg.model)  # what is refused, before the pairs are read
    if cfg.out:  # before the scoring, not after it
        _check_out_file(cfg.out, "the figures")
    pairs = load_preference(cfg.data, cfg.columns)
    ceiling = _accuracy_ceiling(cfg, pairs)
    result = reward_model_eval(RewardModel.from_pretrained(cfg.model), pairs)
    if result["gold_agreement"] is not None:  # the built-in task's pairs: its label noise
        result.update(ceiling)
    print(f"reward model {cfg.model} on {result['n_pairs']} held-out pairs:")
    print(f"  accuracy vs labels     {result['accuracy']:.3f} ± {result['accuracy_stderr']:.3f}"
          + (f"   (ceiling the label noise allows: {result['accuracy_ceiling']:.3f})"
             if result.get("accuracy_ceiling") else ""))
    if result["gold_agreement"] is not None:  # the built-in task's pairs
        print(f"  agreement with gold    {result['gold_agreement']:.3f} ± {result['gold_agreement_stderr']:.3f}"
              f"   ({result['n_gold_untied']} pairs the gold reward does not tie; ceiling 1.0)")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))


def cmd_ppo(cfg) -> None:
    from rlhfkit.trainers.ppo import train

    _check_prompts_given(cfg)
    hooks = {}
    if cfg.task == "describe":  # gold reward for the report: the CLI injects it, the trainer never imports it
        from rlhfkit.evaluate import gold_eval
        from rlhfkit.quickstart import gold_probe

        use = "--task describe reports: leave --task out on your own prompts (--eval_prompts: the reward model scores)"
        _refuse_foreign(_prompt_file(cfg.prompts, 0, cfg.columns), cfg.prompts, use)
        hooks["probe"] = gold_probe
        if cfg.eval_prompts:
            eval_prompts = _prompt_file(cfg.eval_prompts, 0, cfg.columns)
            _refuse_foreign(eval_prompts, cfg.eval_prompts, use)
            tokenizer = _load_tokenizer(cfg.model)
            eval_prompts = _fitting(eval_prompts, tokenizer, cfg, cfg.eval_prompts)

            def evaluate(model, tokenizer):
                result = gold_eval(model, tokenizer, eval_prompts, cfg.generation, seed=cfg.train.seed)
                return {"eval/gold": result.mean, "eval/gold_stderr": result.stderr}

            hooks["evaluate"] = evaluate
    metrics = train(cfg, **hooks)
    _report(metrics, f"actor saved to {cfg.train.out} (critic in {cfg.train.out}/critic)")


def cmd_quickstart(cfg) -> None:
    from rlhfkit.quickstart import format_summary, run

    summary = run(cfg)
    print()
    print(format_summary(summary))
    print(f"\nsummary: {Path(cfg.out) / 'summary.json'}\nreport:  {summary['report']}")


@dataclass
class ChatConfig:
    """`rlhfkit chat`: talk to a model in the terminal (/reset clears the history, /exit leaves)."""

    system: str = arg("", "an optional system message (for chat-template models)")
    seed: int = arg(0, "sampling seed", **SEED_BOUNDS)
    model: ModelConfig = arg(ModelConfig, "the model to talk to")
    generation: GenerationConfig = arg(GenerationConfig(max_new_tokens=128, temperature=0.7), "decoding")


def _model_sampling(cfg, greedy_ok: bool = True) -> GenerationConfig:
    """``cfg.generation`` with the sampling settings of the model's generation_config.json (``load.model_sampling``)
    in place of those the user did not set, as Hugging Face's generate and vLLM take them; printed when any is.
    ``greedy_ok`` False: a model that says greedy keeps ours (several samples a prompt)."""
    from rlhfkit.config import given_keys
    from rlhfkit.models.load import model_sampling

    given = given_keys(cfg)
    taken = {k: v for k, v in model_sampling(cfg.model.path).items()
             if f"generation.{k}" not in given and not (k == "temperature" and v == 0 and not greedy_ok)}
    taken = {k: v for k, v in taken.items() if getattr(cfg.generation, k) != v}
    if not taken:
        return cfg.generation
    from rlhfkit import distributed

    if distributed.is_main():
        print(f"sampling as {cfg.model.path}'s generation_config.json says: "
              + ", ".join(f"{k} {v}" for k, v in taken.items()) + " (set --generation.NAME to change)")
    return dataclasses.replace(cfg.generation, **taken)


def _fitting_history(history: list[dict], start: list[dict], tokenizer, room: int | None) -> list[dict] | None:
    """``history`` (the system message ``start``, exchanges of a user and an assistant message, then the new user
    message) less its oldest exchanges, whole, until the prompt it makes fits in ``room`` tokens (None: the model
    names no limit): a template that wants users and assistants in turn still gets them so. None when the new
    message does not fit even alone, ``history`` then untouched."""
    from rlhfkit.data.collate import encode_prompt

    if room is None:
        return history
    if len(encode_prompt(tokenizer, [*start, history[-1]])) > room:
        return None
    kept, dropped = list(history), 0
    while len(kept) > len(start) + 1 and len(encode_prompt(tokenizer, kept)) > room:
        del kept[len(start): len(start) + 2]  # the oldest exchange after the system message
        dropped += 1
    if dropped:
        print(f"(the conversation outgrew the model's positions: its {dropped} oldest exchanges are left out)")
    return kept


def cmd_chat(cfg: ChatConfig) -> None:
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models.load import prompt_room
    from rlhfkit.rollout.generate import generate

    cfg = dataclasses.replace(cfg, generation=_model_sampling(cfg))
    model, tokenizer = _load(cfg.model)
    room = prompt_room(cfg.model, cfg.generation.max_new_tokens)  # past the positions: an IndexError, or drift
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history, turn = list(start), 0
    if not getattr(tokenizer, "chat_template", None):
        print("(this tokenizer has no chat template: each line is sent as a plain prompt, without history)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        chat = getattr(tokenizer, "chat_template", None)
        fitting = _fitting_history(history, start, tokenizer, room) if chat else history
        if fitting is None or not chat and room is not None and len(encode_prompt(tokenizer, line)) > room:
            print(f"(that message is longer than the {room} tokens the model has room for: say less, or lower "
                  "--generation.max_new_tokens)")
            history.pop()  # the conversation before it is kept
            continue
        history = fitting
        prompt = history if chat else line
        reply = generate(model, tokenizer, [prompt], cfg.generation, seed=cfg.seed + turn).texts[0].strip()
        print(f"assistant> {reply}", flush=True)
        history.append({"role": "assistant", "content": reply})
        turn += 1


def cmd_export(cfg: ExportConfig) -> None:
    from rlhfkit.models.load import merge_adapters

    if not cfg.model or not cfg.out:
        raise ConfigError("export needs --model ADAPTER_DIR and --out DIR")
    if Path(cfg.out).resolve() == Path(cfg.model).resolve():  # the merged model would replace the adapter
        raise ConfigError(f"--out {cfg.out} is the adapter directory itself: write the merged model to another one")
    from rlhfkit.models.load import adapter_base, check_model_path, is_adapter_dir

    check_model_path(cfg.model)
    if is_adapter_dir(cfg.model) and Path(cfg.out).resolve() == Path(adapter_base(cfg.model)).resolve():
        raise ConfigError(f"--out {cfg.out} is the adapter's base model, which the merged one would replace (and the "
                          "adapter would then apply twice): write it to another directory")
    out = Path(cfg.out)
    if out.is_file():
        raise ConfigError(f"--out {cfg.out} is a file: name a directory for the merged model")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        names = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"--out {cfg.out} holds files already ({', '.join(names[:4])}{', ...' * (len(names) > 4)}): "
                          "write the merged model to a new directory, or pass --overwrite true to write into it (a "
                          "model other adapters were trained on would change under them)")
    print(f"merged model written to {merge_adapters(cfg.model, cfg.out, cfg.allow_pickle, cfg.dtype)}")


def _sft_config():
    from rlhfkit.trainers.sft import SFTConfig

    return SFTConfig


def cmd_preference(cfg) -> None:
    from rlhfkit.trainers.preference import train

    metrics = train(cfg)
    _report(metrics, f"model saved to {cfg.train.out}")


def _preference_config(name: str):
    def get():
        from rlhfkit.trainers import preference

        return getattr(preference, name)

    return get


def _ppo_config():
    from rlhfkit.trainers.ppo import PPOConfig

    return PPOConfig


def _online_config(name: str):
    def get():
        from rlhfkit.trainers import online

        return getattr(online, name)

    return get


def cmd_online(cfg) -> None:
    from rlhfkit.trainers.online import train

    _check_prompts_given(cfg)
    metrics = train(cfg)
    _report(metrics, f"policy {'adapter' if cfg.lora.enabled else 'model'} saved to {cfg.train.out}")


def _quickstart_config():
    from rlhfkit.quickstart import QuickstartConfig

    return QuickstartConfig


def _rm_config():
    from rlhfkit.trainers.reward import RewardConfig

    return RewardConfig


# command → (config class, or a function returning it for heavy imports; runner; one-line summary)
COMMANDS = {
    "quickstart": (_quickstart_config, cmd_quickstart, "the whole pipeline on the built-in task (CPU; --device cuda)"),
    "tiny-model": (TinyModelConfig, cmd_tiny_model, "make a small random model of a real architecture"),
    "make-data": (MakeDataConfig, cmd_make_data, "write the built-in task (JSONL) to a directory"),
    "sft": (_sft_config, cmd_sft, "supervised fine-tuning on prompt/completion or messages data"),
    "dpo": (_preference_config("DPOConfig"), cmd_preference, "DPO from preference pairs (sigmoid, robust, ipo, hinge)"),
    "orpo": (_preference_config("ORPOConfig"), cmd_preference, "ORPO from preference pairs (no reference model)"),
    "simpo": (_preference_config("SimPOConfig"), cmd_preference, "SimPO from preference pairs (no reference model)"),
    "kto": (_preference_config("KTOConfig"), cmd_preference, "KTO from unpaired prompt/completion/label data"),
    "rm": (_rm_config, cmd_rm, "train a reward model on preference pairs (Bradley-Terry)"),
    "eval-rm": (RewardEvalConfig, cmd_eval_rm, "reward-model accuracy on held-out pairs, and agreement with gold"),
    "ppo": (_ppo_config, cmd_ppo, "PPO: actor, reference, critic and reward on one shared base (or four models)"),
    "grpo": (_online_config("GRPOConfig"), cmd_online,
             "GRPO / Dr. GRPO: G samples per prompt, group-normalised advantages"),
    "rloo": (_online_config("RLOOConfig"), cmd_online, "RLOO: G samples per prompt, leave-one-out baseline"),
    "reinforce-pp": (_online_config("ReinforcePPConfig"), cmd_online,
                     "REINFORCE++: KL-shaped token rewards, batch-whitened returns"),
    "chat": (ChatConfig, cmd_chat, "talk to any model directory in the terminal"),
    "generate": (GenerateConfig, cmd_generate, "sample completions from a model directory"),
    "eval": (EvalConfig, cmd_eval, "held-out mean gold reward ± standard error"),
    "export": (ExportConfig, cmd_export, "merge LoRA adapters into a standalone model directory"),
}

# torchrun's own parser takes `--n` for an abbreviation of its options and stops: `--n_samples` reaches generate
SHORTHANDS = {"model": "model.path", "out": "train.out", "seed": "train.seed", "n_samples": "n"}


def expand_shorthands(cls, argv: list[str]) -> list[str]:
    """Rewrite `--model X` to `--model.path X` (etc.) where that section exists and the
    name is not a plain field of the command's config; `--n_samples N` to `--n N` where there is an ``n``."""
    names = {f.name for f in fields(cls)}
    sections = {f.name for f in fields(cls) if f.default_factory is not MISSING and is_dataclass(f.default_factory())}
    out = []
    for token in argv:
        key, eq, value = token[2:].partition("=")
        target = SHORTHANDS.get(key.replace("-", "_")) if token.startswith("--") else None
        known = target and (target.split(".")[0] in sections if "." in target else target in names)
        if known and (key not in names or key in sections):
            token = f"--{target}{eq}{value}"
        out.append(token)
    return out


def usage() -> str:
    lines = [f"rlhfkit {__version__}: post-training language models from human preferences", "",
             "usage: rlhfkit <command> [--config FILE.yaml] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`rlhfkit <command> --help` lists every option with its default."]
    return "\n".join(lines)


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, which transformers imports wherever it is installed, warns on every command of a machine without
    an accelerator that it takes its CPU one: named first (DS_ACCELERATOR), it takes it quietly."""
    import torch

    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available() or any(
            backend is not None and backend.is_available() for backend in (xpu, mps)):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"rlhfkit: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    make_cls, runner, _ = COMMANDS[name]
    cls = make_cls if isinstance(make_cls, type) else make_cls()
    _quiet_deepspeed_on_cpu()
    cfg = None
    try:
        cfg = parse_args(cls, expand_shorthands(cls, rest), prog=f"rlhfkit {name}")
        runner(cfg)
        from rlhfkit import distributed

        distributed.teardown()
    except ConfigError as e:  # a config or data error (DataError is a ValueError too): one line, no traceback
        print(f"rlhfkit {name}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, NotImplementedError) as e:
        # what rlhfkit refuses, names and says how to fix: one line; the traceback on request, for a bug report
        from rlhfkit.data.formats import DataError

        if os.environ.get("RLHFKIT_TRACEBACK"):
            raise
        hint = "" if isinstance(e, DataError) else " (RLHFKIT_TRACEBACK=1 shows where it came from)"
        print(f"rlhfkit {name}: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (twice, in a trainer): the shell's status for it, and what stands
        if os.environ.get("RLHFKIT_TRACEBACK"):
            raise
        out = getattr(cfg, "out", "") if name == "generate" else ""
        out = out if out and Path(f"{out}.partial").exists() else ""  # stopped before its first block: nothing
        print(f"\nrlhfkit {name}: stopped by Ctrl-C" + (f"; the same command again goes on from {out}.partial"
                                                         if out else ""), file=sys.stderr)
        return 130
    finally:  # the command is over, however it ended: the run directories it locked are free
        loop = sys.modules.get("rlhfkit.trainers.loop")
        if loop is not None:
            loop.release_out_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
