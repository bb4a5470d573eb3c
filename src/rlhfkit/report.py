"""The quickstart's report: one self-contained page ``run_dir/report.html``, PNG plots in ``run_dir/plots/``.

Reads what `rlhfkit quickstart` writes — ``summary.json`` and each trained stage's
``metrics.jsonl`` — and draws with matplotlib (Agg backend, imported only here). The page
opens offline: inline CSS, no scripts, images by relative path. Stages, files and metric
keys that are missing are left out of the page; only a missing ``summary.json`` is an error.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

# pipeline order: baselines, then methods
STAGE_ORDER = ("sft", "rm", "sft_chosen", "best_of_4", "ppo", "dpo", "orpo", "simpo", "kto")
SIDE_BY_SIDE = ("sft", "ppo", "dpo")
LOSS_KEYS = ("train/loss", "eval/loss", "loss/policy", "loss/value")
ABOUT = {"sft": "supervised fine-tuning on demonstrations (the starting point)",
         "sft_chosen": "baseline: SFT on the chosen responses only",
         "best_of_4": "baseline: best of 4 SFT samples ranked by the reward model (KL: the bound log 4 − 3/4)",
         "ppo": "PPO against the reward model, with a KL penalty to SFT",
         "dpo": "DPO on the preference pairs, no reward model",
         "orpo": "ORPO on the preference pairs: no reference, no reward model",
         "simpo": "SimPO on the preference pairs: length-averaged, no reference",
         "kto": "KTO on unpaired desirable / undesirable answers"}
GOLD_VS_PROXY = (
    "<b>Gold vs proxy.</b> The <i>gold reward</i> is the hidden &ldquo;human&rdquo;: a scoring rule of the "
    "built-in task that no method ever trains on; here it only grades answers to held-out test prompts. "
    "The <i>proxy score</i> is what the learned reward model thinks of the same answers &mdash; the signal "
    "PPO and best-of-4 actually optimise. When the proxy climbs but gold does not, the policy is exploiting "
    "the reward model's mistakes (reward hacking); the KL to SFT measures how far it has drifted to do so.")
CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta,.note{color:#555} img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;font:13px/1.4 ui-monospace,monospace} .gold{color:#8a5a00;font-size:13px}"""


def ordered(names) -> list[str]:
    """Stage names in reading order: the known ones first (STAGE_ORDER), then the rest as given."""
    return [n for n in STAGE_ORDER if n in names] + [n for n in names if n not in STAGE_ORDER]


def read_metrics(path: Path) -> list[dict]:
    """The records of one ``metrics.jsonl``; [] if it is missing. Unreadable lines are skipped."""
    if not path.is_file():
        return []
    records: list[dict] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a run killed mid-write leaves half a line
        if isinstance(record, dict) and is_number(record.get("step")):
            if records and record["step"] < records[-1]["step"]:  # the file is appended to: a rerun
                records = [r for r in records if r["step"] < record["step"]]  # replaces from its first step
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, over the records that have it as a finite number."""
    points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x, spec: str = ".3f") -> str:
    return format(x, spec) if is_number(x) else "–"


def pm(record: dict, key: str, err_key: str, spec: str = ".3f") -> str:
    """``mean ± stderr`` of two keys of a record, "–" for a missing value."""
    return f"{num(record.get(key), spec)} ± {num(record.get(err_key), spec)}"


def plot_ppo(plt, records: list[dict], path: Path) -> bool:
    """Proxy score and gold reward on two y-axes (top), KL to SFT below, over PPO steps."""
    proxy, gold, kl = (series(records, k) for k in ("rollout/score", "rollout/gold", "rollout/kl"))
    if not (proxy[0] or gold[0] or kl[0]):
        return False
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), height_ratios=(3, 2))
    top.plot(*proxy, color="tab:blue", marker=".", label="proxy score (reward model)")
    top.set_ylabel("proxy score", color="tab:blue")
    twin = top.twinx()
    twin.plot(*gold, color="tab:orange", marker=".", label="gold reward (hidden “human”)")
    twin.set_ylabel("gold reward", color="tab:orange")
    lines = top.get_lines() + twin.get_lines()
    top.legend(lines, [line.get_label() for line in lines], loc="lower right")
    bottom.plot(*kl, color="tab:green", marker=".", label="KL(policy ‖ SFT) per answer")
    bottom.set(xlabel="PPO step", ylabel="KL to SFT (nats)")
    integer_steps(bottom)
    bottom.legend(loc="upper left")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle("PPO: proxy score vs gold reward vs KL over steps (on training rollouts)")
    return save(plt, fig, path)


def plot_losses(plt, metrics: dict[str, list[dict]], path: Path) -> bool:
    """One panel per trained stage with every loss it logged."""
    curves = {stage: [(k, series(recs, k)) for k in LOSS_KEYS] for stage, recs in metrics.items()}
    panels = {stage: [(k, xy) for k, xy in c if xy[0]] for stage, c in curves.items() if any(xy[0] for _, xy in c)}
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (stage, curves) in zip(axes.flat, panels.items()):
        for key, (steps, values) in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 10 else None, label=key)
        ax.set(title=stage, xlabel="step", ylabel="loss")
        integer_steps(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Loss curves")
    return save(plt, fig, path)


def plot_gold(plt, stages: dict[str, dict], names: list[str], path: Path) -> bool:
    """Mean test gold reward ± one standard error per stage, SFT's level dashed across."""
    names = [n for n in names if is_number(stages[n].get("gold_reward_mean"))]
    if not names:
        return False
    means = [stages[n]["gold_reward_mean"] for n in names]
    errs = [stages[n].get("gold_reward_stderr") if is_number(stages[n].get("gold_reward_stderr")) else 0 for n in names]
    colors = ["tab:gray" if n in ("sft", "sft_chosen", "best_of_4") else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4))
    bars = ax.bar(names, means, yerr=errs, capsize=6, color=colors)
    ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=4, label_type="edge", fontsize=9)
    if "sft" in names:
        ax.axhline(stages["sft"]["gold_reward_mean"], color="black", linestyle="--", linewidth=1, label="SFT")
        ax.legend(loc="upper left")
    ax.set(ylabel="gold reward (test, mean ± stderr)", title="Gold reward per method (grey: SFT and baselines)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    return save(plt, fig, path)


def integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def methods_table(stages: dict[str, dict], names: list[str]) -> str:
    rows = ["<tr><th>stage</th><th>what it is</th><th>gold reward ± stderr</th><th>KL to SFT</th>"
            "<th>proxy score</th><th>seconds</th></tr>"]
    for n in names:
        s = stages[n]
        kl = pm(s, "kl_to_sft", "kl_to_sft_stderr", ".2f") if "kl_to_sft" in s else "–"
        rows.append(f"<tr><td><b>{html.escape(n)}</b></td><td>{html.escape(ABOUT.get(n, ''))}</td>"
                    f"<td class=num>{pm(s, 'gold_reward_mean', 'gold_reward_stderr')}</td>"
                    f"<td class=num>{kl}</td><td class=num>{num(s.get('proxy_reward_mean'), '.2f')}</td>"
                    f"<td class=num>{num(s.get('seconds'), '.0f')}</td></tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def samples_table(stages: dict[str, dict], names: list[str]) -> str:
    """The same held-out prompts (rows) answered by SFT, PPO and DPO (columns), each with its gold reward."""
    with_samples = [n for n in names if stages[n].get("samples")]
    cols = [n for n in SIDE_BY_SIDE if n in with_samples] or with_samples
    if not cols:
        return "<p class=note>No sample answers in summary.json.</p>"
    answers = {n: {s.get("prompt"): s for s in stages[n]["samples"] if isinstance(s, dict)} for n in cols}
    rows = ["<tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in cols) + "</tr>"]
    for prompt in answers[cols[0]]:
        cells = []
        for n in cols:
            a = answers[n].get(prompt)
            cells.append("<td>–</td>" if a is None else f"<td><pre>{html.escape(str(a.get('completion', '')))}</pre>"
                         f"<span class=gold>gold {num(a.get('gold'))}</span></td>")
        rows.append(f"<tr><td><pre>{html.escape(str(prompt))}</pre></td>{''.join(cells)}</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def verifiable_table(table: dict) -> str:
    """`--all`'s second table: the online methods on the arithmetic task, by held-out accuracy."""
    rows = ["<tr><th>method</th><th>test accuracy ± stderr</th><th>gain over SFT (paired)</th><th>seconds</th></tr>"]
    for name, r in table.items():
        if not isinstance(r, dict):
            continue
        gain = "–" if name == "sft" else pm(r, "gain_over_sft", "gain_stderr")
        rows.append(f"<tr><td><b>{html.escape(name)}</b></td><td class=num>{pm(r, 'accuracy', 'accuracy_stderr')}"
                    f"</td><td class=num>{gain}</td><td class=num>{num(r.get('seconds'), '.0f')}</td></tr>")
    return ("<h2>Verifiable task: single-digit sums</h2><p class=note>Critic-free online RL against an exact-answer "
            "reward; accuracy of 4 samples per held-out prompt at temperature 1.</p><table>" + "\n".join(rows)
            + "</table>")


def header(summary: dict, stages: dict[str, dict], models: list[str]) -> str:
    """Title (seed), then total time, number of test prompts, decoding and PPO's settings."""
    e = html.escape
    n_test = next((stages[n]["n"] for n in models if "n" in stages[n]), "?")
    ppo = summary["ppo"] if isinstance(summary.get("ppo"), dict) else {}
    meta = [f"total {num(summary.get('seconds'), '.0f')} s", f"{e(str(n_test))} held-out test prompts",
            f"decoding: {e(str(summary.get('decoding', 'not recorded')))}"]
    if ppo:
        meta.append(f"PPO: {e(str(ppo.get('steps', '?')))} steps, β = {e(str(ppo.get('beta', '?')))}")
    return (f"<h1>rlhfkit quickstart report (seed {e(str(summary.get('seed', '?')))})</h1>"
            f"<p class=meta>{' · '.join(meta)}</p>")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and its plots ``run_dir/plots/*.png``; returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'summary.json'} not found: run `rlhfkit quickstart --out {run_dir}` first")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    stages = {n: s for n, s in summary.get("stages", {}).items() if isinstance(s, dict)}
    names = ordered(stages)
    models = [n for n in names if "gold_reward_mean" in stages[n]]
    metrics = {n: records for n in names if (records := read_metrics(run_dir / n / "metrics.jsonl"))}
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    figures = {"gold.png": ("Gold reward per method", plot_gold(plt, stages, models, plots / "gold.png")),
               "ppo.png": ("PPO over training", plot_ppo(plt, metrics.get("ppo", []), plots / "ppo.png")),
               "losses.png": ("Loss curves", plot_losses(plt, metrics, plots / "losses.png"))}

    rm = stages.get("rm", {})
    body = [header(summary, stages, models), f"<p>{GOLD_VS_PROXY}</p>", "<h2>Methods</h2>",
            methods_table(stages, models)]
    if "accuracy" in rm:
        body.append(f"<p>Reward model (the proxy): held-out preference accuracy "
                    f"<b>{pm(rm, 'accuracy', 'accuracy_stderr')}</b> (label-noise ceiling "
                    f"{num(rm.get('accuracy_ceiling'))}); agrees with the gold reward on "
                    f"{pm(rm, 'gold_agreement', 'gold_agreement_stderr')} of held-out pairs.</p>")
    times = " · ".join(f"{html.escape(n)} {num(stages[n].get('seconds'), '.0f')} s" for n in names)
    body.append(f"<p class=note>Time per stage: {times}</p>")
    body += [f'<h2>{title}</h2><img src="plots/{file}" alt="{title}">'
             for file, (title, made) in figures.items() if made]
    if isinstance(summary.get("verifiable"), dict):
        body.append(verifiable_table(summary["verifiable"]))
    body += ["<h2>The same held-out prompts, side by side</h2>", samples_table(stages, models)]
    page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>rlhfkit quickstart report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
