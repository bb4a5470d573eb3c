"""Reward loading and combination: named functions, weights, and clear errors naming the culprit."""

import importlib
import math
import warnings
import sys
import types

import pytest
import torch

from rlhfkit.rewards import RewardError, build_reward, load_function, run_untrusted


@pytest.fixture
def reward_module(monkeypatch):
    """A user's reward module, importable as `user_rewards`."""
    mod = types.ModuleType("user_rewards")

    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    def uses_column(prompts, completions, target, **columns):
        return [float(c == t) for c, t in zip(completions, target)]

    def raises(prompts, completions, **columns):
        raise KeyError("oops")

    def nan(prompts, completions, **columns):
        return [math.nan] + [0.0] * (len(completions) - 1)

    def too_few(prompts, completions, **columns):
        return [1.0]

    def not_numbers(prompts, completions, **columns):
        return ["high"] * len(completions)

    def answers(prompts, completions, **columns):  # the extracted answer, not its score: float("4") would pass
        return ["4"] * len(completions)

    def huge(prompts, completions, **columns):  # a finite Python float, inf in float32
        return [1.0, 1e39][:len(completions)]

    def by_name(prompts, completions, **columns):  # a dict: iterated, its keys
        return {c: 1.0 for c in completions}

    def overflowing(prompts, completions, **columns):  # an int past any float
        return [10 ** 400] * len(completions)

    def as_tensor(prompts, completions, **columns):
        return torch.ones(len(completions))

    def math_only(prompts, completions, task, **columns):  # None: not this reward's completion (TRL's way)
        return [float(len(c)) if t == "math" else None for c, t in zip(completions, task)]

    def code_only(prompts, completions, task, **columns):
        return [10.0 if t == "code" else None for t in task]

    for fn in (length, uses_column, raises, nan, too_few, not_numbers, answers, huge, overflowing, by_name, as_tensor,
               math_only, code_only):
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "user_rewards", mod)
    return mod


def test_function_gets_prompts_completions_and_columns(reward_module):
    reward = build_reward(["user_rewards:uses_column", "user_rewards:length"], [2.0, 0.5])
    total, parts = reward(["p", "q"], ["a", "bcd"], {"target": ["a", "x"]})
    assert parts["uses_column"].tolist() == [1.0, 0.0]
    assert parts["length"].tolist() == [1.0, 3.0]
    assert total.tolist() == [2.0 * 1 + 0.5 * 1, 0.5 * 3]


def test_columns_a_function_needs_or_cannot_take_are_refused_before_sampling(reward_module):
    reward_module.no_kwargs = lambda prompts, completions, target: [1.0] * len(completions)
    reward_module.optional = lambda prompts, completions, target=None, **kw: [1.0] * len(completions)
    build_reward(["user_rewards:uses_column", "user_rewards:optional"]).check_columns(["prompt", "target"], "p.jsonl")
    build_reward(["user_rewards:optional"]).check_columns(["prompt"], "p.jsonl")  # a default: not required
    with pytest.raises(RewardError, match=r"reward 'uses_column' takes column 'target', which p\.jsonl does not "
                                          r"have \(its columns: prompt, id\)"):
        build_reward(["user_rewards:length", "user_rewards:uses_column"]).check_columns(["prompt", "id"], "p.jsonl")
    build_reward(["user_rewards:no_kwargs"]).check_columns(["prompt", "target"], "p.jsonl")
    reward_module.no_prompts = lambda completions, target: [1.0] * len(completions)
    with pytest.raises(RewardError, match="reward 'no_prompts' does not take 'prompts': every reward function is"):
        build_reward(["user_rewards:no_prompts"]).check_columns(["prompt", "target"], "p.jsonl")
    reward_module.singular = lambda prompt, completions, **kw: [1.0] * len(completions)
    with pytest.raises(RewardError, match="takes 'prompt': every reward function is given the prompts as 'prompts'"):
        build_reward(["user_rewards:singular"]).check_columns(["prompt"], "p.jsonl")
    with pytest.raises(RewardError, match="p.jsonl has a column 'completions', the name of an argument"):
        build_reward(["user_rewards:length"]).check_columns(["prompt", "completions"], "p.jsonl")
    with pytest.raises(RewardError, match="called with p.jsonl's column 'id'.*add \\*\\*kwargs"):
        build_reward(["user_rewards:no_kwargs"]).check_columns(["prompt", "target", "id"], "p.jsonl")


def test_tensor_return_is_accepted(reward_module):
    total, _ = build_reward(["user_rewards:as_tensor"])(["p"] * 3, ["a"] * 3)
    assert total.tolist() == [1.0, 1.0, 1.0]


def test_a_reward_that_does_not_apply_returns_none_and_counts_for_nothing(reward_module):
    reward = build_reward(["user_rewards:math_only", "user_rewards:code_only"], [1.0, 0.5])
    total, parts = reward(["p"] * 3, ["ab", "cde", "f"], {"task": ["math", "code", "math"]})
    assert total.tolist() == [2.0, 5.0, 1.0]
    assert parts["math_only"][[0, 2]].tolist() == [2.0, 1.0] and parts["math_only"][1].isnan()
    with pytest.raises(RewardError, match=r"no reward applies to completion 1 \(every reward returned None for it; "
                                          r"1 such in all; prompt 'q', task 'poetry'\)"):
        reward(["p", "q"], ["ab", "c"], {"task": ["math", "poetry"]})


def test_rows_without_a_column_a_reward_requires_are_pointed_out_before_sampling(reward_module):
    # with_every_column gives such a row None: a reward that does not apply there returns None (a file of several
    # tasks, TRL's way), so it is taken; one that cannot take None would raise mid-run, so the row is named first
    reward_module.optional = lambda prompts, completions, target=None, **kw: [1.0] * len(completions)
    rows = [{"prompt": "a", "target": "x"}, {"prompt": "b", "target": None}, {"prompt": "c", "target": None}]
    with pytest.warns(UserWarning, match=r"2 of 3 rows have no 'target' \(first: p\.jsonl, row 1, field 'target'\), "
                                         "which reward 'uses_column' takes: it gets None for them"):
        build_reward(["user_rewards:length", "user_rewards:uses_column"]).check_rows(rows, "p.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_reward(["user_rewards:optional", "user_rewards:length"]).check_rows(rows, "p.jsonl")  # a default
        build_reward(["user_rewards:uses_column"]).check_rows(rows[:1], "p.jsonl")


def test_chat_prompts_are_refused_before_sampling_where_a_reward_model_has_no_chat_template(reward_module):
    # it had failed at the first evaluation, mid-run, for held-out prompts of messages beside text training prompts
    import types

    from rlhfkit.data.formats import DataError

    def scorer(template):
        fn = lambda prompts, completions, **kw: [0.0] * len(completions)  # noqa: E731
        fn.reward_model = types.SimpleNamespace(tokenizer=types.SimpleNamespace(chat_template=template))
        return fn

    rows = [{"prompt": "Hi."}, {"prompt": [{"role": "user", "content": "Hi."}]}]
    reward_module.plain, reward_module.chat = scorer(None), scorer("{{ messages }}")
    with pytest.raises(DataError, match=r"e\.jsonl, row 1, field 'prompt': chat messages, which reward model "
                                        "'plain' cannot read: its tokenizer has no chat template"):
        build_reward(["user_rewards:length", "user_rewards:plain"]).check_rows(rows, "e.jsonl")
    build_reward(["user_rewards:chat"]).check_rows(rows, "e.jsonl")
    build_reward(["user_rewards:plain"]).check_rows(rows[:1], "e.jsonl")


def test_a_reward_that_raises_on_one_row_names_that_row_s_inputs(reward_module):
    reward_module.to_int = lambda prompts, completions, answer, **kw: [float(int(a)) for a in answer]
    reward = build_reward(["user_rewards:to_int"])
    with pytest.raises(RewardError, match=r"reward 'to_int' raised ValueError: invalid literal .* \(first on "
                                          r"completion 1: prompt 'What is 1\+1\?', answer 'two'\)"):
        reward(["What is 2+2?", "What is 1+1?", "x"], ["4", "2", "y"], {"answer": ["4", "two", "3"]})
    with pytest.raises(RewardError, match=r"reward 'raises' raised KeyError: 'oops' \(first on completion 0: "
                                          r"prompt 'p'\)$"):
        build_reward(["user_rewards:raises"])(["p", "q"], ["a", "b"])


@pytest.mark.parametrize("name, message", [
    ("raises", r"reward 'raises' raised KeyError"),
    ("nan", r"reward 'nan' returned nan for completion 0"),
    ("too_few", r"reward 'too_few' returned 1 values for 2 completions"),
    ("not_numbers", r"reward 'not_numbers' must return a list of numbers"),
    ("answers", r"reward 'answers' must return a list of numbers, one per completion: got the text '4'"),
    ("huge", r"reward 'huge' returned 1e\+39 for completion 1 \(1 non-finite values in all, in float32\)"),
    ("overflowing", r"reward 'overflowing' must return a list of numbers, one per completion: int too large"),
    ("by_name", r"reward 'by_name' returned a dict; it must return a list of numbers, one per completion"),
])
def test_bad_functions_are_named_in_the_error(reward_module, name, message):
    reward = build_reward([f"user_rewards:{name}"])
    with pytest.raises(RewardError, match=message):
        reward(["p", "q"], ["a", "b"])


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "neither a directory nor 'module:function'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("user_rewards:missing", "has no attribute 'missing'"),
])
def test_bad_names_are_clear(reward_module, spec, message):
    with pytest.raises(RewardError, match=message):
        load_function(spec)


def test_weights_must_match_rewards(reward_module):
    with pytest.raises(RewardError, match="2 reward weights for 1 rewards"):
        build_reward(["user_rewards:length"], [1.0, 2.0])
    with pytest.raises(RewardError, match="no reward given"):
        build_reward([])
    for weight in (math.nan, math.inf):  # NaN made the reward count as None everywhere
        with pytest.raises(RewardError, match=f"reward weight {weight} for 'user_rewards:length': weights must be"):
            build_reward(["user_rewards:length"], [weight])


def test_a_module_that_fails_as_it_is_imported_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_user_rewards.py").write_text("def score(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="importing module 'broken_user_rewards' raised SyntaxError"):
        load_function("broken_user_rewards:score")


def test_untrusted_code_runs_with_time_and_memory_limits():
    ok = run_untrusted("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert ok is not None and ok.returncode == 0 and ok.stdout == "ok\n"
    failing = run_untrusted("assert 1 + 1 == 3")
    assert failing is not None and failing.returncode != 0 and "AssertionError" in failing.stderr
    assert run_untrusted("while True: pass", timeout_s=1.0) is None
    for limit in ({"output_mb": 0}, {"memory_mb": -1}, {"timeout_s": 0}):  # 0 is no "unlimited": refused
        with pytest.raises(ValueError, match=f"{next(iter(limit))} must be positive"):
            run_untrusted("print('ok')", **limit)
    hog = run_untrusted("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert hog is not None and hog.returncode != 0 and "MemoryError" in hog.stderr
    # model output past a command line's 128 KiB, or with a NUL byte: a run that finishes, not an OSError
    long = run_untrusted("x = 1\n" + "#" * 200_000 + "\nprint(x)")
    assert long is not None and long.returncode == 0 and long.stdout == "1\n"
    nul = run_untrusted("print('a\x00b')")
    assert nul is not None and nul.returncode != 0


def test_untrusted_output_is_bounded():
    # printed without end, it filled the trainer's memory through the pipe (400 MB in 1.4 s)
    flood = run_untrusted("import sys\nwhile True: sys.stdout.write('x' * 65536)", output_mb=1)
    assert flood.returncode != 0 and len(flood.stdout) == 1 << 20 and "File too large" in flood.stderr
    quiet = run_untrusted("print('é' * 3)", output_mb=1)
    assert quiet.returncode == 0 and quiet.stdout == "ééé\n"


def test_what_untrusted_code_forks_does_not_outlive_it(tmp_path):
    import time

    marker = tmp_path / "grandchild"  # a forked process that went on after the run wrote this
    code = (f"import os, time\nif os.fork() == 0:\n    [os.close(fd) for fd in (0, 1, 2)]\n    time.sleep(0.5)\n"
            f"    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nprint('parent done')")
    done = run_untrusted(code)
    assert done is not None and done.stdout == "parent done\n"
    assert run_untrusted(code.replace("print('parent done')", "time.sleep(10)"), timeout_s=0.2) is None
    time.sleep(1.0)
    assert not marker.exists()


def test_a_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # the installed `rlhfkit` launcher does not put the working directory on sys.path as `python -m` does
    (tmp_path / "my_cwd_rewards.py").write_text("def score(prompts, completions, **columns):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert load_function("my_cwd_rewards:score")([], ["x"]) == [1.0]
    # only while the named module imports: a module of another name there is not found later (a library probing
    # for an optional one, brotli say, ran the working directory's brotli.py)
    assert str(tmp_path) not in sys.path
    (tmp_path / "optional_probe_xyz.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ImportError):
        importlib.import_module("optional_probe_xyz")
