"""Statistics, tables and plots for a results CSV of llm.py: the verdicts and the markdown report.

    python llm.py --preset smoke --out smoke.csv        # tiny CPU sweep; it ends with the verdicts
    python report.py smoke.csv                          # -> smoke_analysis.md + PNGs beside the CSV
    python report.py smoke.csv --summary --alpha 0.01   # the verdict lines only

Reading: a condition is the set of config values (config_json) that differ between rows, the data's
content hash (data_sha256) included, so two corpora are never pooled; a (condition, seed) given
twice is refused. A run is diverged when its status is not "ok" or its validation loss or perplexity
is not finite. A factor's reference level is its value in the CSV's first condition (llm.py's
default sweep starts with its defaults: noise_std 0.0, load_balancing_weight 0.01).

Statistics: one family of contrasts per metric, fixed by the design: each factor's main effects
(each level minus the reference, averaged over the other factors' levels) and every two-factor
interaction (difference of differences, averaged over the rest), paired by seed over the seeds ok in
every cell involved, paired t-test, Holm over the whole family. The primary metric is the final
validation loss (log perplexity, where effects add); best validation loss and worst-layer balance
are secondary.

Sections: reading, statistics, summary, plots, the markdown report, CLI."""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from scipy import optimize, stats

matplotlib.use("Agg")  # files only: works without a display

DEFAULT_CSV = "moe_routing_noise_experiment_results.csv"
FIRST_COLUMNS = ("seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy",
                 "val_perplexity", "training_time_minutes", "peak_memory_gb", "best_val_perplexity",
                 "expert_usage_cv")
REQUIRED = FIRST_COLUMNS + ("status", "config_json")
LOSS_COLUMNS = ("val_loss", "val_perplexity", "best_val_perplexity")  # non-finite: diverged
NUMERIC = FIRST_COLUMNS + (
    "diverged_step", "steps", "train_tokens", "tokens_per_s", "expert_usage_cv_worst_layer",
    "dead_expert_fraction", "expert_load_max_mean", "routing_entropy",
    "train_expert_usage_cv_worst_layer", "train_dead_expert_fraction")
NOT_RECORDED = "(not recorded)"  # the level of a differing config field a row's config_json lacks
POWER = 0.8


class ReportError(ValueError):
    """Bad input for the report: a one-line message for the user (the CLI prints it, exit 2)."""


class Metric(NamedTuple):
    column: str     # column of Design.runs
    name: str       # as the report says it
    short: str      # as a table heading says it
    up: str         # what a positive difference means
    down: str       # what a negative difference means


PRIMARY = Metric("val_loss", "final validation loss", "final val loss", "higher loss", "lower loss")
BEST = Metric("best_val_loss", "best validation loss (log of the best perplexity)", "best val loss",
              "higher loss", "lower loss")


class Design(NamedTuple):
    runs: pd.DataFrame      # the CSV's rows, numbers parsed, + cond (condition index), ok, why
    factors: dict           # factor -> levels, the reference (the first condition's value) first
    conditions: list        # per condition, its factors' values, in order of first appearance
    balance: Metric | None  # the per-layer balance measure tested; None when the CSV has none
    config: dict            # the config values every run shares


class Verdict(NamedTuple):
    factor: str
    contrast: str
    metric: str
    effect: float           # mean paired difference, level minus reference: negative = lower loss
    ci_low: float
    ci_high: float
    ci_adjusted: bool       # False: the (1 - alpha) t-interval of this contrast alone
    n: int                  # seed pairs used
    p_adjusted: float       # Holm within the metric's one family
    detectable: float       # smallest |difference| these n pairs detect with 80% power
    word: str               # "better" | "worse" | "no detectable difference"


class Summary(NamedTuple):
    csv: Path
    n_rows: int
    n_ok: int
    n_diverged: int
    conditions: list
    reference: dict
    verdicts: list
    alpha: float = 0.05     # beyond CONTRACT.md: the level of the verdicts and intervals


# --------------------------------------------------------------------------------------------------
# Reading

def _fmt(v) -> str:  # floats round-trip ("0.0", "0.01", "1e-05"); a sha256 shows 12 characters
    s = repr(v) if isinstance(v, float) else str(v)
    return s[:12] if len(s) == 64 and set(s) <= set("0123456789abcdef") else s


def cond_label(cond: dict) -> str:
    """'noise_std=0.5, load_balancing_weight=0.0'."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in cond.items()) or "all runs"


def _floats(v) -> list:
    """A ";"-joined list cell as floats ([] when blank or unreadable)."""
    try:
        return [float(x) for x in str(v).split(";") if x.strip()]
    except ValueError:
        return []


def _read_rows(csv_path) -> tuple[pd.DataFrame, list]:
    """The CSV's complete rows, numbers parsed, with `line` (the file's line); their configs."""
    p = Path(csv_path)
    if not p.is_file():
        raise ReportError(f"results CSV not found: {p}")
    parse = lambda src: pd.read_csv(src, dtype=str, keep_default_na=False)
    try:
        try:
            df = parse(p)
        except pd.errors.ParserError:  # a torn last line from a killed writer: read without it
            df = parse(io.StringIO("".join(p.read_text().splitlines(True)[:-1])))
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {p} as a results CSV: {str(e).splitlines()[0]}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ReportError(f"{p} is not a results CSV of llm.py: missing column(s) "
                          + ", ".join(missing))
    df, cfgs = df.fillna("").assign(line=np.arange(2, len(df) + 2)), []
    for s in df["config_json"]:
        try:
            cfgs.append(c if isinstance(c := json.loads(s), dict) else None)
        except ValueError:
            cfgs.append(None)
    if cfgs and cfgs[-1] is None:  # a torn last line from a killed writer
        df, cfgs = df.iloc[:-1], cfgs[:-1]
    if None in cfgs:
        raise ReportError(f"{p}: line {cfgs.index(None) + 2} has no readable config_json; fix or "
                          "delete that line")
    if df.empty:
        raise ReportError(f"{p} has no runs yet")
    for c in NUMERIC:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    bad = df["seed"].isna() | (df["seed"] % 1 != 0)
    if bad.any():
        raise ReportError(f"{p}: line {df.loc[bad, 'line'].min()} has no integer seed")
    df["seed"] = df["seed"].astype(int)
    df["best_val_loss"] = np.log(df["best_val_perplexity"].where(df["best_val_perplexity"] > 0))
    return df, cfgs


def _diverged(df) -> list:
    """Why each run is diverged ("" if ok): its status, or its first non-finite loss/perplexity."""
    step, why = df.get("diverged_step", pd.Series(np.nan, index=df.index)), []
    for status, k, *vals in zip(df["status"].str.strip(), step, *(df[c] for c in LOSS_COLUMNS)):
        bad = [f"{c} is not finite ({v})" for c, v in zip(LOSS_COLUMNS, vals) if not np.isfinite(v)]
        if status != "ok":
            bad = [f"status {status or '(empty)'}" + (f" at step {int(k)}" if k == k else "")]
        why.append(bad[0] if bad else "")
    return why


def _balance(df) -> Metric | None:
    """The per-layer balance measure to test: the worst layer's CV (its column, or the maximum of
    expert_usage_cv_per_layer), else the dead-expert fraction; None when the CSV has neither."""
    has = lambda c: c in df.columns and df[c].notna().any()
    col, name = "expert_usage_cv_worst_layer", "worst layer's expert-usage CV"
    short = "worst-layer CV"
    if not has(col) and "expert_usage_cv_per_layer" in df.columns:
        df[col := "worst_layer_cv"] = [max(_floats(v), default=math.nan)
                                       for v in df["expert_usage_cv_per_layer"]]
        name += " (max of expert_usage_cv_per_layer)"
    if not has(col):
        col, name, short = "dead_expert_fraction", "dead-expert fraction", "dead fraction"
    return Metric(col, name, short, "less even routing", "more even routing") if has(col) else None


def read_design(csv_path) -> Design:
    """The CSV as runs, factors and conditions (see the module docstring); ReportError if bad."""
    df, cfgs = _read_rows(csv_path)
    fields = [k for k in dict.fromkeys(k for c in cfgs for k in c) if k != "seed"]
    level = lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    levels = {k: [level(c.get(k, NOT_RECORDED)) for c in cfgs] for k in fields}
    if "data_sha256" in df.columns:
        levels["data_sha256"] = df["data_sha256"].str.strip().replace("", NOT_RECORDED).tolist()
    factors = sorted([k for k, v in levels.items() if len(set(map(repr, v))) > 1],
                     key=lambda k: k not in FIRST_COLUMNS)  # noise_std, load_balancing_weight first
    keys = list(zip(*(levels[k] for k in factors))) if factors else [()] * len(df)
    pos = {k: i for i, k in enumerate(dict.fromkeys(keys))}  # in order of first appearance
    df["cond"] = [pos[k] for k in keys]
    conditions = [dict(zip(factors, k)) for k in pos]
    dup = df.groupby(["cond", "seed"])["line"].agg(list)
    if len(dup := dup[dup.map(len) > 1]):
        said = "; ".join(f"{cond_label(conditions[c])}, seed {s} (lines {', '.join(map(str, ls))})"
                         for (c, s), ls in dup.items())
        raise ReportError(f"{Path(csv_path).name} has the same condition and seed more than once: "
                          f"{said}; keep one row per run")
    df["why"] = _diverged(df)
    df["ok"] = df["why"].eq("")
    if not df["ok"].any():
        raise ReportError(f"{Path(csv_path).name} has no successful runs "
                          f"({len(df)} run(s), all diverged)")
    ref = conditions[0]
    factor_levels = {f: [ref[f]] + [v for v in dict.fromkeys(c[f] for c in conditions)
                                    if v != ref[f]] for f in factors}
    shared = {k: cfgs[0][k] for k in fields if k not in factors}
    return Design(df, factor_levels, conditions, _balance(df), shared)


def report_paths(csv_path) -> tuple[Path, str]:
    """The markdown report's path and the prefix of the PNGs beside it."""
    p = Path(csv_path)
    prefix = "experiment" if p.name == DEFAULT_CSV else p.stem
    return p.parent / f"{prefix}_analysis.md", prefix


# --------------------------------------------------------------------------------------------------
# Statistics

def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values over the whole family; an untested contrast (NaN) counts
    in the family as p = 1 and stays NaN. By hand: scipy ships only BH/BY
    (stats.false_discovery_control)."""
    p = np.asarray(p, float)
    filled = np.where(np.isnan(p), 1.0, p)
    m, order = len(p), np.argsort(filled, kind="stable")
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * filled[order]))
    return np.where(np.isnan(p), np.nan, out)


def detectable_difference(n: int, sd: float, alpha: float, power: float = POWER) -> float:
    """Smallest |mean difference| a two-sided paired t-test of n pairs detects with `power` at
    level `alpha`, the observed sd of the differences taken as the true one: solves
    P(|T| > t_crit) = power for the noncentrality of scipy.stats.nct, n - 1 degrees of freedom (the
    lower tail as the upper tail at -nc: nct.cdf gives NaN far out). NaN below 2 pairs or with no
    spread."""
    if n < 2 or not sd > 0:
        return math.nan
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    gap = lambda nc: stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc) - power
    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
    return optimize.brentq(gap, 0.0, hi, xtol=1e-10) * sd / math.sqrt(n)


def _paired(d: np.ndarray, alpha: float, family: int) -> dict:
    """Paired t-test of the per-seed contrast values d (= ttest_rel of the cells they come from)."""
    n = len(d)
    r = {"n": n, "effect": d.mean() if n else math.nan, "ci_low": math.nan, "ci_high": math.nan,
         "p": math.nan, "detectable": math.nan, "constant": False}
    if n < 2:
        return r
    if np.ptp(d) <= 1e-12 * max(1.0, np.abs(d).max()):  # the same on every seed: no spread to test
        return {**r, "constant": True}
    res = stats.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(1 - alpha)
    # detectable at alpha / family: a p below it is significant under Holm whatever the others do
    return {**r, "ci_low": ci.low, "ci_high": ci.high, "p": res.pvalue,
            "detectable": detectable_difference(n, d.std(ddof=1), alpha / family)}


def contrast_weights(design: Design) -> list:
    """(factor, label, {condition: weight}) for every main effect and two-factor interaction the
    design has, each averaged over the settings of the other factors that have all its cells."""
    names, conds = list(design.factors), design.conditions
    index = {tuple(c[f] for f in names): i for i, c in enumerate(conds)}

    def average(fixed, signs):  # signs: [({factor: level}, +1 or -1)], the cells of one setting
        rest, sets, w = [f for f in names if f not in fixed], [], {}
        for s in dict.fromkeys(tuple(c[f] for f in rest) for c in conds):
            cells = [(index.get(tuple({**dict(zip(rest, s)), **lv}[f] for f in names)), sign)
                     for lv, sign in signs]
            sets += [cells] if all(c is not None for c, _ in cells) else []
        for c, sign in itertools.chain(*sets):
            w[c] = w.get(c, 0.0) + sign / len(sets)
        return w

    out = []
    for f in names:
        ref, *others = design.factors[f]
        for lv in others:
            w = average([f], [({f: lv}, 1), ({f: ref}, -1)])
            out += [(f, f"{f} {_fmt(lv)} vs {_fmt(ref)}", w)] if w else []
    for f, g in itertools.combinations(names, 2):
        (rf, *fs), (rg, *gs) = design.factors[f], design.factors[g]
        for lf, lg in itertools.product(fs, gs):
            w = average([f, g], [({f: lf, g: lg}, 1), ({f: rf, g: lg}, -1),
                                 ({f: lf, g: rg}, -1), ({f: rf, g: rg}, 1)])
            label = f"{f} {_fmt(lf)} vs {_fmt(rf)} x {g} {_fmt(lg)} vs {_fmt(rg)}"
            out += [(f"{f} x {g}", label, w)] if w else []
    return out


def contrast_table(design: Design, metric: Metric, alpha: float = 0.05) -> pd.DataFrame:
    """One row per contrast of the design on `metric`: paired test, Holm p, verdict word."""
    ok, ws, rows = design.runs[design.runs["ok"]], contrast_weights(design), []
    # seeds x conditions: the metric of each ok run, NaN where a condition lacks that seed ok
    cells = ok.pivot(index="seed", columns="cond", values=metric.column).reindex(
        columns=range(len(design.conditions)))
    for factor, label, w in ws:
        d = cells[list(w)].dropna().to_numpy(float) @ np.array(list(w.values()))  # seeds ok in all
        rows.append({"factor": factor, "contrast": label, **_paired(d, alpha, max(1, len(ws)))})
    cols = ["factor", "contrast", "n", "effect", "ci_low", "ci_high", "p", "detectable", "constant"]
    t = pd.DataFrame(rows, columns=cols)
    t["p_adjusted"] = holm(t["p"])
    t["word"] = np.where(t["p_adjusted"] < alpha, np.where(t["effect"] < 0, "better", "worse"),
                         "no detectable difference")
    return t


# --------------------------------------------------------------------------------------------------
# Summary: the verdicts on the primary metric, worded once for everyone

def _summary_of(design: Design, csv_path, alpha: float) -> Summary:
    t = contrast_table(design, PRIMARY, alpha)
    verdicts = [Verdict(r.factor, r.contrast, PRIMARY.column, float(r.effect), float(r.ci_low),
                        float(r.ci_high), False, int(r.n), float(r.p_adjusted),
                        float(r.detectable), r.word) for r in t.itertuples()]
    n, ok = len(design.runs), int(design.runs["ok"].sum())
    return Summary(Path(csv_path), n, ok, n - ok, design.conditions, design.conditions[0], verdicts,
                   alpha)


def summary(csv_path, alpha: float = 0.05) -> Summary:
    """Per main effect and interaction, the verdict on the final validation loss."""
    return _summary_of(read_design(csv_path), csv_path, alpha)


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _g(x: float, sign: bool = True) -> str:
    """3 significant digits: loss differences span 1e-4 to 1."""
    return "n/a" if x != x else f"{x:+.3g}" if sign else f"{x:.3g}"


def _num(x, d=3) -> str:
    return "n/a" if x != x else f"{x:.{d}f}"


def _signed(x: float, metric: Metric) -> str:
    return "0 (no change)" if x == 0 else f"{_g(x)} ({metric.up if x > 0 else metric.down})"


def verdict_line(v: Verdict, alpha: float) -> str:
    """One verdict in words: the wording used everywhere (summary_text, the report, the ledger)."""
    eff, n = _signed(v.effect, PRIMARY), f"n={v.n}"
    if v.n < 2:
        return f"{v.contrast}: {n} seed pair(s), too few to test: {v.word}"
    if math.isnan(v.p_adjusted):
        return (f"{v.contrast}: {eff} on every one of the n={v.n} seeds: the seeds agree exactly, "
                f"so they cannot estimate the spread and this is not tested: {v.word}")
    ci = f"unadjusted {100 * (1 - alpha):g}% CI {_g(v.ci_low)} to {_g(v.ci_high)}"
    line = f"{v.contrast}: {eff}, {ci}, {n}, p_holm {_p(v.p_adjusted)}"
    if v.word == "no detectable difference":
        line += f", smallest detectable difference {_g(v.detectable, sign=False)}"
    return f"{line}: {v.word}"


def summary_text(s: Summary) -> str:
    """A few plain lines: what was compared, then one line per verdict."""
    head = (f"{s.csv.name}: {s.n_rows} runs ({s.n_ok} ok, {s.n_diverged} diverged) in "
            f"{len(s.conditions)} condition(s); reference {cond_label(s.reference)}.")
    if not s.verdicts:
        return head + "\nA single condition: nothing to compare."
    m = len(s.verdicts)
    head += (f"\nFinal validation loss (primary), paired by seed, Holm over its {m} contrasts, "
             f"alpha {s.alpha:g}; detectable = 80% power at alpha/{m}:")
    return "\n".join([head] + [verdict_line(v, s.alpha) for v in s.verdicts])


# --------------------------------------------------------------------------------------------------
# Plots

def _strip(design: Design, columns: list, title: str, xlabel: str) -> Figure:
    """Each ok run's value (dots) and each condition's mean (diamond), one colour per column."""
    labels = [cond_label(c) for c in design.conditions]
    fig = Figure(figsize=(7, 1.4 + 0.45 * len(labels)), layout="constrained")
    ax, ok = fig.subplots(), design.runs[design.runs["ok"]]
    ys = np.arange(len(labels))[::-1]  # first condition on top
    for k, (col, name) in enumerate(columns):
        off = 0.15 * (k - (len(columns) - 1) / 2)
        ax.scatter(ok[col], ys[ok["cond"].to_numpy()] + off, s=14, color=f"C{k}", alpha=0.5)
        means = ok.groupby("cond")[col].mean().reindex(range(len(labels)))
        ax.plot(means, ys + off, "D", color=f"C{k}", label=f"{name} (mean)")
    ax.set(title=title, xlabel=xlabel, yticks=ys, yticklabels=labels)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _load_figure(design: Design) -> Figure | None:
    """Expert load / fair share per layer and expert, from each condition's smallest ok seed."""
    runs, loads = design.runs, []
    if "expert_load_per_layer" not in runs.columns:
        return None
    for k, g in runs[runs["ok"]].sort_values("seed").groupby("cond"):
        for seed, v in zip(g["seed"], g["expert_load_per_layer"]):
            m = [_floats(layer) for layer in str(v).split("|")]
            if m[0] and len({len(x) for x in m}) == 1:
                loads.append((k, seed, np.array(m) * len(m[0])))  # share x E: 1 = the fair share
                break
    if not loads:
        return None
    cols, rows = min(3, len(loads)), math.ceil(len(loads) / min(3, len(loads)))
    fig = Figure(figsize=(4.5 * cols + 1, (1.8 + 0.3 * len(loads[0][2])) * rows))
    fig.subplots_adjust(hspace=0.9, wspace=0.3)  # by hand: constrained layout triples the time
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, max(m.max() for *_, m in loads)))
    for ax, (k, seed, m) in zip(axes, loads):
        im = ax.imshow(m, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{cond_label(design.conditions[k])}\nseed {seed}", fontsize=7)
        ax.set(xlabel="expert", ylabel="layer", xticks=range(0, m.shape[1], -(-m.shape[1] // 8)),
               yticks=range(0, len(m), -(-len(m) // 8)))
    for ax in axes[len(loads):]:
        fig.delaxes(ax)
    fig.colorbar(im, ax=axes[:len(loads)], label="load / fair share (1 = balanced)")
    return fig


def write_plots(csv_path, design: Design) -> list:
    """The PNGs beside the CSV: (title, path) of each plot that has data."""
    out, prefix, bal = Path(csv_path).parent, report_paths(csv_path)[1], design.balance
    figs = [("loss", "Final validation loss per condition",
             _strip(design, [("val_loss", "final val loss")], "Final validation loss", "nats"))]
    if bal:
        cols = [(bal.column, "evaluation")]
        train = "train_" + bal.column.replace("worst_layer_cv", "expert_usage_cv_worst_layer")
        cols += [(train, "training, router noise included")] if train in design.runs else []
        figs.append(("balance", "Expert balance per condition",
                     _strip(design, cols, f"{bal.short} per condition", "higher = less even")))
    figs.append(("expert_load", "Expert load per layer (smallest ok seed of each condition)",
                 _load_figure(design)))
    paths = []
    for stem, title, fig in figs:
        if fig is not None:
            paths.append((title, out / f"{prefix}_{stem}.png"))
            fig.savefig(paths[-1][1], dpi=110)
    return paths


# --------------------------------------------------------------------------------------------------
# The markdown report

def _table(headers, rows, left=1) -> str:
    """A GitHub markdown table (DataFrame.to_markdown needs tabulate, not a dependency)."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    align = "|" + "|".join([":---"] * left + ["---:"] * (len(headers) - left)) + "|"
    return "\n".join([line(headers), align] + [line(r) for r in rows])


def _seeds_text(design: Design) -> str:
    """The seeds of each condition, truthfully: one sentence when all agree, else per condition."""
    per, join = [], lambda xs: ", ".join(map(str, sorted(xs)))
    for k, cond in enumerate(design.conditions):
        g = design.runs[design.runs["cond"] == k]
        per.append((cond, join(g.loc[g["ok"], "seed"]), join(g.loc[~g["ok"], "seed"])))
    if len({(s, b) for _, s, b in per}) == 1 and not per[0][2]:
        return f"Every condition has the seeds {per[0][1]}, all ok."
    return "Seeds per condition: " + "; ".join(
        f"{cond_label(c)}: {s or 'none'} ok" + (f", {b} diverged" if b else "")
        for c, s, b in per) + "."


def _setup(design: Design) -> list:
    runs, f = design.runs, design.factors
    n, ok = len(runs), int(runs["ok"].sum())
    text = [f"{n} runs ({ok} ok, {n - ok} diverged) in {len(design.conditions)} condition(s)."]
    text.append("Factors (the values that differ between rows; reference level first, the CSV's "
                "first condition's): " + "; ".join(f"`{k}` ∈ {{{', '.join(map(_fmt, v))}}}"
                                                  for k, v in f.items()) + "."
                if f else "No config value differs between the rows: a single condition.")
    text.append(_seeds_text(design))
    if "data" in runs.columns:
        cols = ["data"] + ["data_sha256"] * ("data_sha256" in runs.columns)
        text.append("Data: " + "; ".join(p[0] + "".join(f" (sha256 {h[:12]})" for h in p[1:])
                                         for p in runs[cols].drop_duplicates().to_numpy()) + ".")
    else:
        text.append("Data: not recorded in this CSV (no `data` column).")
    for col, what in (("steps", "Optimizer steps per run"), ("train_tokens", "Training tokens per "
                      "run"), ("device", "Device"), ("dtype", "Dtype")):
        if col in runs.columns:
            values = [f"{v:,.0f}" if col in NUMERIC else v for v in runs[col].dropna().unique()]
            text.append(f"{what}: {', '.join(values)}.")
    skip = ("dataset", "dataset_config") if "data" in runs.columns else ()  # `data` says it
    shared = ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v)}`"
                       for k, v in design.config.items() if k not in skip)
    return [" ".join(text), "", f"Configuration shared by every run: {shared or 'none'}."]


def _conditions_md(design: Design) -> list:
    runs, bal = design.runs, design.balance
    cols = [("val_loss", "Final val loss (mean ± sd)", 3, True),
            ("best_val_perplexity", "Best val PPL", 2, False)]
    head = bal.short[:1].upper() + bal.short[1:] if bal else ""
    cols += [(bal.column, head, 3, False)] if bal else []
    cols += [("expert_usage_cv", "Layer-summed CV", 3, False),
             ("training_time_minutes", "Minutes", 2, False)]
    rows = []
    for k, cond in enumerate(design.conditions):
        ok = (g := runs[runs["cond"] == k])[g["ok"]]
        cells = [_num(ok[c].mean(), d) + (f" ± {_num(ok[c].std(), d)}" if sd else "")
                 for c, _, d, sd in cols]
        rows.append([cond_label(cond), len(ok), len(g) - len(ok)] + cells)
    note = (f" {head}: {bal.name} on the last evaluation, the balance measure "
            "tested; layer-summed CV is the original's expert_usage_cv, which can read 0 while "
            "whole layers collapse." if bal else "")
    return ["", "## Results per condition", "",
            f"Mean over each condition's ok runs (sd: sample std over seeds).{note}", "",
            _table(["Condition", "ok", "Diverged"] + [h for _, h, _, _ in cols], rows)]


def _method(alpha: float, m: int) -> str:
    return ("Paired by seed over the seeds ok in every cell used (a diverged run drops its seed). "
            "Main effect: a level minus the reference, averaged over the other factors' levels. "
            "Interaction: the first factor's effect at the second's level minus at the second's "
            "reference (positive = more toward a higher value there), averaged over the rest; "
            f"higher-order interactions are not tested. Paired t-test; p_holm: Holm over all {m} "
            "contrasts of the metric, untestable ones included, one family for the whole report. "
            f"Intervals: unadjusted {100 * (1 - alpha):g}% t-intervals. Detectable: the smallest "
            "|difference| these n pairs detect with 80% power, two-sided paired t-test at "
            f"alpha/{m} = {alpha / m:.3g} (scipy's noncentral t, the observed sd taken as true); "
            "\"no detectable difference\" is not evidence of no effect.")


def _contrast_rows(t: pd.DataFrame, metric: Metric, alpha: float) -> list:
    rows = []
    for r in t.itertuples():
        if r.constant:
            stat = ["the seeds agree exactly", "not tested", "not tested", "spread unknown"]
        elif r.n < 2:
            stat = ["too few seeds", "not tested", "not tested", "n/a"]
        else:
            stat = [f"{_g(r.ci_low)} to {_g(r.ci_high)}", _p(r.p), _p(r.p_adjusted),
                    "—" if r.p_adjusted < alpha else _g(r.detectable, sign=False)]
        said = "significant" if r.p_adjusted < alpha else "not significant"
        rows.append([r.contrast, r.n, _signed(r.effect, metric)] + stat
                    + [r.word if metric is PRIMARY else said])
    return rows


def _analysis_md(design: Design, s: Summary, alpha: float) -> list:
    heads = ["Contrast", "n", "Effect", f"Unadjusted {100 * (1 - alpha):g}% CI", "p", "p_holm",
             "Detectable (80%)"]
    md = ["", "## Primary analysis: final validation loss", ""]
    if not design.factors:
        return md + ["A single condition: nothing to compare."]
    t = contrast_table(design, PRIMARY, alpha)
    md += [_method(alpha, len(t)), "", f"Reference: {cond_label(s.reference)}. Verdicts "
           "(better = lower final validation loss):", ""]
    md += [f"- {verdict_line(v, alpha)}" for v in s.verdicts]
    md += ["", _table(heads + ["Verdict"], _contrast_rows(t, PRIMARY, alpha))]
    for metric in [BEST] + ([design.balance] if design.balance else []):
        t = contrast_table(design, metric, alpha)
        md += ["", f"## Secondary: {metric.name}", "", f"The same contrasts in their own Holm "
               f"family of {len(t)}; significant = p_holm < {alpha:g}.", "",
               _table(heads + ["Holm"], _contrast_rows(t, metric, alpha))]
    if not design.balance:
        md += ["", "## Secondary: expert balance", "", "Not tested: this CSV has no per-layer "
               "balance measure (expert_usage_cv_worst_layer, expert_usage_cv_per_layer or "
               "dead_expert_fraction), and the layer-summed expert_usage_cv hides collapse."]
    return md


ROUTING = (("train_expert_usage_cv_worst_layer", "worst-layer CV, training"),
           ("dead_expert_fraction", "dead fraction, evaluation"), ("train_dead_expert_fraction",
           "dead fraction, training"), ("expert_usage_cv", "layer-summed CV (original's)"),
           ("routing_entropy", "entropy"), ("expert_load_max_mean", "max/mean load"))


def _routing_md(design: Design) -> list:
    runs, bal, ok = design.runs, design.balance, design.runs[design.runs["ok"]]
    have = [(bal.column, f"{bal.short}, evaluation")] if bal else []
    have += [(c, h) for c, h in ROUTING if c in runs.columns and ok[c].notna().any()
             and (not bal or c != bal.column)]
    rows = [[cond_label(c)] + [_num(ok.loc[ok["cond"] == k, col].mean()) for col, _ in have]
            for k, c in enumerate(design.conditions)]
    md = ["", "## Routing", "", "Means over ok seeds. Evaluation routes the validation batches "
          "without router noise; the training columns are the training batches of the last log "
          "window, noise included. Dead: an expert below a tenth of its fair share.", "",
          _table(["Condition"] + [h for _, h in have], rows)]
    absent = [c for c, _ in ROUTING if c not in runs.columns]
    if absent:
        md += ["", "Not in this CSV, so not shown: " + ", ".join(absent) + "."
               + (" Without training routing, noise conditions show noise-free routing only."
                  if ROUTING[0][0] in absent else "")]
    return md


def write_report(csv_path, alpha: float = 0.05) -> Path:
    """The markdown report and its PNGs beside the CSV; returns the report's path."""
    design = read_design(csv_path)
    s = _summary_of(design, csv_path, alpha)
    md = [f"# MoE routing sweep: analysis of `{Path(csv_path).name}`", ""] + _setup(design)
    md += _conditions_md(design) + _analysis_md(design, s, alpha) + _routing_md(design)
    bad = design.runs[~design.runs["ok"]]
    rows = [[getattr(r, "run_id", ""), cond_label(design.conditions[r.cond]), r.seed, r.why]
            for r in bad.itertuples()]
    md += ["", "## Diverged runs", "",
           _table(["Run", "Condition", "Seed", "Why"], rows, left=4) if rows else "None."]
    md += ["", "## Plots", ""]
    for title, path in write_plots(csv_path, design):
        md += [f"![{title}]({path.name})", ""]
    (report := report_paths(csv_path)[0]).write_text("\n".join(md).rstrip() + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The verdicts, markdown report and plots (written "
                                "beside the CSV) for a results CSV of llm.py.")
    p.add_argument("csv", help=f"results CSV (llm.py's default: {DEFAULT_CSV})")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--summary", action="store_true", help="print the verdicts, write no report")
    args = p.parse_args(argv)
    try:
        if not 0 < args.alpha < 1:
            raise ReportError(f"--alpha must be between 0 and 1, not {args.alpha:g}")
        if args.summary:
            print(summary_text(summary(args.csv, args.alpha)))
        else:
            print(f"report: {write_report(args.csv, args.alpha)}")
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
