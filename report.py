"""Statistics, tables and plots from a results CSV written by llm.py: the markdown report of a sweep.

    python report.py moe_routing_noise_experiment_results.csv     # -> experiment_analysis.md + PNGs beside it
    python llm.py --preset smoke --out smoke.csv && python report.py smoke.csv --summary

llm.py calls this after every sweep (and for `llm.py --report CSV`); it needs pandas, scipy and matplotlib,
not torch. llm.py imports it at start-up for the CSV contract, so pandas, scipy and matplotlib are
imported inside the functions that use them. Sections: the CSV contract, reading, statistics, plots, the markdown
report, CLI.

Statistics: per-condition means with t-intervals (± is the sample std, ddof=1); every condition against one baseline
(paired by seed, Holm); for a factorial design, each factor's effect within each level of the others and the
interactions (differences of differences), paired by seed, on final validation loss, best validation perplexity and
expert-usage CV, Holm within each metric (see `contrasts`); routing tables and an expert-load heat map.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------------------
# The CSV contract: what llm.py writes and this file reads

DEFAULT_CSV = "moe_routing_noise_experiment_results.csv"
# Config fields that do not change a run's numbers: not part of a run's identity, never a condition.
RESULT_NEUTRAL = ("cache_dir", "log_every")
# Config fields added after results existed, with the value every earlier run had: at that value they stay out
# of a run's identity (llm.config_hash), and a row recorded before they existed is read as having that value.
LATER_FIELDS = {"router_z_loss_weight": 0.0, "balancing": "loss", "bias_update_rate": 1e-3}
NOT_RECORDED = "(not recorded)"  # the level of a differing config field that a row's config_json lacks

FIRST_COLUMNS = ("seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
                 "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv")
# Routing on the validation batches of the last evaluation (see llm.py's routing_metrics): overall, per layer
# (";"-joined), and the share of assignments per expert (experts ";"-joined, layers "|"-joined). CSVs written
# before these existed lack them: the reader accepts that and the report says what it cannot show.
LATER_ROUTING_COLUMNS = ("expert_load_max_mean", "routing_entropy", "dead_expert_fraction",
                         "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
                         "dead_expert_fraction_per_layer", "expert_load_per_layer")
TAIL_COLUMNS = ("status", "diverged_step", "steps", "train_tokens", "tokens_per_s", "expert_usage_cv_per_layer",
                *LATER_ROUTING_COLUMNS, "device", "dtype", "run_id", "config_hash", "config_json")
REQUIRED_COLUMNS = FIRST_COLUMNS + tuple(c for c in TAIL_COLUMNS if c not in LATER_ROUTING_COLUMNS)
_SHORT = {"noise_std": "noise", "load_balancing_weight": "lb"}
# Read as text: a hex hash can be all digits, and a one-layer list would otherwise become a float.
_TEXT_COLUMNS = ("status", "expert_usage_cv_per_layer", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
                 "dead_expert_fraction_per_layer", "expert_load_per_layer", "device", "dtype", "run_id",
                 "config_hash", "config_json")
# (overall column, per-layer column, table heading): the routing table's columns, in order
ROUTING_METRICS = (("expert_usage_cv", "expert_usage_cv_per_layer", "CV"),
                   ("expert_load_max_mean", "expert_load_max_mean_per_layer", "Max/mean load"),
                   ("routing_entropy", "routing_entropy_per_layer", "Entropy"),
                   ("dead_expert_fraction", "dead_expert_fraction_per_layer", "Dead fraction"))
# (column, name, decimals): what the factorial contrasts test. val_loss is the last evaluation's (log perplexity);
# best_val_perplexity is the best over all evaluations, as in the baseline comparison.
CONTRAST_METRICS = (("val_loss", "final validation loss", 3), ("best_val_perplexity", "best validation perplexity", 2),
                    ("expert_usage_cv", "expert-usage CV", 3))
_STATS = ["n_pairs", "mean_diff", "ci_low", "ci_high", "t", "p_value"]


def condition_columns(df):
    cols = list(df.columns)
    return ["noise_std", "load_balancing_weight"] + cols[cols.index("expert_usage_cv") + 1:cols.index("status")]


def _ok_mask(df):
    return df["status"].astype(str).str.strip().eq("ok")


def _num(df, col):
    import pandas as pd
    return pd.to_numeric(df[col], errors="coerce")


def _fmt_value(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # CSV values round-trip exactly, so this reads "0.0", "0.01", "1e-05"
    return str(v.item() if isinstance(v, np.generic) else v)


def _cond_label(cond: dict) -> str:
    return ", ".join(f"{_SHORT.get(k, k)}={_fmt_value(v)}" for k, v in cond.items())


def _labels(t, cc) -> list:
    return [_cond_label(d) for d in t[cc].to_dict("records")]  # per-column dtypes: top_k=2, not 2.0


# ------------------------------------------------------------------------------------------------------------
# Reading

def _configs(df) -> list:
    """Each row's config_json as a dict; {} where it is missing or unreadable."""
    configs = []
    for s in df["config_json"]:
        try:
            configs.append(json.loads(s))
        except (TypeError, ValueError):
            configs.append({})
    return configs


def _read_results(csv_path, hashes=None):
    """The CSV's complete rows (only those in `hashes` if given), checked, with setup columns added."""
    import pandas as pd
    p = Path(csv_path)
    if not p.is_file():
        raise ValueError(f"results CSV not found: {p}")
    try:
        df = pd.read_csv(p, dtype={c: str for c in _TEXT_COLUMNS})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"cannot read {p} as a results CSV: {e}".splitlines()[0]) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{p} is not a results CSV of this tool: missing column(s) {', '.join(missing)}")
    df = df[df["status"].notna()]  # a torn last line from a killed writer
    if hashes is not None:
        df = df[df["config_hash"].isin(hashes)]
    if df.empty:
        raise ValueError(f"{p} has no runs yet")
    if not _ok_mask(df).any():
        raise ValueError(f"{p} has no successful runs ({len(df)} run(s), none with status 'ok')")
    # Rows of different setups in one CSV (say, two --max-steps appended to one file) must not be pooled:
    # every config field that differs between rows becomes a condition column, as if swept with --grid.
    df, cfgs = df.reset_index(drop=True), [{**LATER_FIELDS, **c} if c else c for c in _configs(df)]
    skip = set(condition_columns(df)) | {"seed", "data_files"} | set(RESULT_NEUTRAL)
    for name in dict.fromkeys(k for c in cfgs for k in c):
        # a missing value is a level of its own, never NaN (NaN keys would drop those runs from every contrast)
        values = [json.dumps(v) if isinstance(v, (list, dict)) else NOT_RECORDED if v is None else v
                  for v in (c.get(name) for c in cfgs)]
        if name not in skip and len(set(map(str, values))) > 1:
            df.insert(df.columns.get_loc("status"), name, values)
    return df


def _read_curves(csv_path, df):
    """Long-form curves of every run with a metrics.jsonl, plus the run_ids that have none."""
    import pandas as pd
    cols, recs, missing = condition_columns(df) + ["seed", "run_id", "status"], [], []
    runs = Path(csv_path).with_name(Path(csv_path).stem + "_runs")
    for _, row in df.iterrows():
        f = runs / str(row["run_id"]) / "metrics.jsonl"
        if not f.is_file():
            missing.append(str(row["run_id"]))
            continue
        base = {c: row[c] for c in cols}
        for line in f.read_text().splitlines():
            try:  # a run killed mid-write leaves a torn last line
                m = json.loads(line)
                recs.append({**base, "split": m["split"], "step": int(m["step"]), "loss": float(m["loss"])})
            except (ValueError, KeyError, TypeError):
                pass
    return pd.DataFrame(recs, columns=cols + ["split", "step", "loss"]), missing


def load_curves(csv_path):
    return _read_curves(csv_path, _read_results(csv_path))[0]


def report_paths(csv_path):
    p = Path(csv_path)
    prefix = "experiment" if p.name == DEFAULT_CSV else p.stem
    return p.parent / f"{prefix}_analysis.md", prefix


def _recorded(df, col) -> bool:
    """Whether any ok run has a value in `col`: older CSVs lack the routing columns, and a run may leave them blank."""
    return col in df.columns and bool(df.loc[_ok_mask(df), col].notna().any())


def _floats(v) -> list:
    """A ";"-joined list cell as floats; pandas reads a one-element list as a number and an empty one as NaN."""
    import pandas as pd
    return [] if pd.isna(v) else [float(x) for x in str(v).split(";") if x.strip()]


def _load_matrix(v):
    """An expert_load_per_layer cell as a (layers, experts) array of shares; None if blank or unreadable."""
    import pandas as pd
    if pd.isna(v):
        return None
    try:
        m = np.array([_floats(layer) for layer in str(v).split("|")], dtype=float)  # (L, E)
    except ValueError:  # a non-number, or layers of different lengths
        return None
    return m if m.ndim == 2 and m.size and np.isfinite(m).all() else None


def expert_loads(df) -> list:
    """(condition label, seed, (layers, experts) shares) per condition that recorded its expert load, from its
    smallest ok seed with one: by seed rather than file order, since parallel ranks append in any order."""
    if "expert_load_per_layer" not in df.columns:
        return []
    cc, out = condition_columns(df), []
    for key, g in df[_ok_mask(df)].groupby(cc, sort=False, dropna=False):
        for seed, v in g.sort_values("seed")[["seed", "expert_load_per_layer"]].itertuples(index=False):
            if (m := _load_matrix(v)) is not None:
                out.append((_cond_label(dict(zip(cc, key))), seed, m))
                break
    return out


# ------------------------------------------------------------------------------------------------------------
# Statistics

def condition_table(df, metric="best_val_perplexity", confidence=0.95):
    """One row per condition, in order of first appearance: mean/sample std/t-CI of `metric` over ok runs;
    n_diverged counts the rest."""
    import pandas as pd
    from scipy import stats
    cc, rows = condition_columns(df), []
    for key, g in df.groupby(cc, sort=False, dropna=False):
        ok = g[_ok_mask(g)]
        x = _num(ok, metric).dropna().to_numpy(float)
        n = len(x)
        mean = x.mean() if n else math.nan
        std = x.std(ddof=1) if n > 1 else math.nan
        lo, hi = ((math.nan, math.nan) if n < 2 else (mean, mean) if std == 0  # scipy: NaN and a warning at 0
                  else stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n)))
        rows.append({**dict(zip(cc, key)), "n": n, "mean": mean, "std": std, "ci_low": lo, "ci_high": hi,
                     "mean_val_loss": _num(ok, "val_loss").mean(), "mean_cv": _num(ok, "expert_usage_cv").mean(),
                     "mean_minutes": _num(ok, "training_time_minutes").mean(), "n_diverged": len(g) - len(ok)})
    return pd.DataFrame(rows)


def baseline_condition(df) -> dict:
    """The default routing (noise 0, lb weight 0.01) if an ok run has it, else the first ok run's condition."""
    noise, lbw = _num(df, "noise_std"), _num(df, "load_balancing_weight")
    hits = df[np.isclose(noise, 0.0) & np.isclose(lbw, 0.01) & _ok_mask(df)]  # a condition with an ok run
    row = hits.iloc[0] if len(hits) else df[_ok_mask(df)].iloc[0]
    return {c: (row[c].item() if isinstance(row[c], np.generic) else row[c]) for c in condition_columns(df)}


def factor_levels(df) -> dict:
    """Each condition column with 2+ levels -> its levels: the reference (the baseline's level) first, then the
    others in order of first appearance."""
    base, out = baseline_condition(df), {}
    for c in condition_columns(df):
        levels = df[c].drop_duplicates().tolist()
        if len(levels) > 1:
            out[c] = [base[c]] + [v for v in levels if v != base[c]]
    return out


def _holm(p):
    # Holm's step-down adjustment by hand: scipy only ships BH/BY (false_discovery_control).
    p = np.asarray(p, float)
    m, order = len(p), np.argsort(p)
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def _with_holm(out, alpha, by=None):
    """Add p_holm (Holm over the tested rows, one family per `by` group, or one for all) and significant."""
    out["p_holm"] = math.nan  # stays NaN where not tested
    for _, g in ([(None, out)] if by is None else out.groupby(by, sort=False)):
        tested = g["p_value"].dropna()
        out.loc[tested.index, "p_holm"] = _holm(tested)
    out["significant"] = out["p_holm"].lt(alpha)
    return out


def _seed_cells(df, metric) -> dict:
    """Condition key (a tuple over condition_columns) -> `metric` of its ok runs, indexed by seed."""
    return {key: _num(g[_ok_mask(g)], metric).groupby(g["seed"]).mean().dropna()
            for key, g in df.groupby(condition_columns(df), sort=False, dropna=False)}


def _paired_test(x, y, alpha) -> dict:
    """Paired t-test of x - y over the seeds both have (x, y: values indexed by seed): n_pairs, mean_diff with
    its (1 - alpha) t-interval, t, p_value; NaN below 2 pairs, t and p NaN when every difference is 0."""
    from scipy import stats
    seeds = sorted(set(x.dropna().index) & set(y.dropna().index))
    r = {"n_pairs": len(seeds), **dict.fromkeys(_STATS[1:], math.nan)}
    if len(seeds) >= 2:
        a, b = x[seeds].to_numpy(float), y[seeds].to_numpy(float)
        with warnings.catch_warnings():  # identical differences give t = nan/inf; reported as such
            warnings.simplefilter("ignore")
            res = stats.ttest_rel(a, b)
            ci = res.confidence_interval(1 - alpha)
        r.update(mean_diff=float((a - b).mean()), ci_low=float(ci.low), ci_high=float(ci.high),
                 t=float(res.statistic), p_value=float(res.pvalue))
    return r


def paired_comparisons(df, metric="best_val_perplexity", alpha=0.05):
    """Every condition minus the baseline, paired on seed (seeds ok in both); Holm over all tested ones."""
    import pandas as pd
    cc, cells = condition_columns(df), _seed_cells(df, metric)
    bkey = tuple(baseline_condition(df)[c] for c in cc)
    rows = [{**dict(zip(cc, key)), **_paired_test(s, cells[bkey], alpha)} for key, s in cells.items() if key != bkey]
    return _with_holm(pd.DataFrame(rows, columns=cc + _STATS), alpha)


def contrasts(df, alpha=0.05):
    """The factorial contrasts of every metric in CONTRAST_METRICS, each a paired test by seed.

    effect: for each factor (a condition column with 2+ levels), at each combination of the other factors' levels
    (held_at), each level minus the factor's reference level (the baseline's). interaction: for each pair of factors
    and each pair of their non-reference levels, at each combination of the remaining factors' levels, the
    difference of differences: the first factor's effect at the second's level minus its effect at the second's
    reference, per seed (seeds ok in all four cells). Contrasts whose cells the design lacks are left out.
    Holm's family is one metric: all its tested effects and interactions together."""
    import itertools
    import pandas as pd
    cc, base, levels = condition_columns(df), baseline_condition(df), factor_levels(df)

    def settings(cols):  # the combinations of these factors' levels that the data has
        return df[cols].drop_duplicates().to_dict("records") if cols else [{}]

    rows = []
    for metric, _, _ in CONTRAST_METRICS:
        cells = _seed_cells(df, metric)
        cell = lambda fixed: cells.get(tuple({**base, **fixed}[c] for c in cc))  # None: not in the design
        head = {"metric": metric, "kind": "effect"}
        for f, (ref, *others) in levels.items():
            for at in settings([c for c in levels if c != f]):
                for level in others:
                    x, y = cell({**at, f: level}), cell({**at, f: ref})
                    if x is not None and y is not None:
                        rows.append({**head, "factor": f, "level": level, "reference": ref,
                                     "held_at": _cond_label(at), **_paired_test(x, y, alpha)})
        head["kind"] = "interaction"
        for f, g in itertools.combinations(levels, 2):
            (fr, *fls), (gr, *gls) = levels[f], levels[g]
            for at in settings([c for c in levels if c not in (f, g)]):
                for fl, gl in itertools.product(fls, gls):
                    four = [cell({**at, f: a, g: b}) for a, b in ((fl, gl), (fr, gl), (fl, gr), (fr, gr))]
                    if any(s is None for s in four):
                        continue
                    # Series arithmetic aligns on seed: a seed missing from any cell becomes NaN and is dropped
                    rows.append({**head, "factor": f, "level": fl, "reference": fr, "factor2": g, "level2": gl,
                                 "reference2": gr, "held_at": _cond_label(at),
                                 **_paired_test(four[0] - four[1], four[2] - four[3], alpha)})
    cols = ["metric", "kind", "factor", "level", "reference", "factor2", "level2", "reference2", "held_at"] + _STATS
    return _with_holm(pd.DataFrame(rows, columns=cols), alpha, by="metric")


def layer_usage_table(df, column="expert_usage_cv_per_layer"):
    """Per condition (in order of first appearance), the per-layer values of `column` averaged over ok runs:
    columns layer_0, layer_1, ...; NaN for a condition without values."""
    import pandas as pd
    cc = condition_columns(df)
    values = [_floats(v) if ok else [] for v, ok in zip(df[column], _ok_mask(df))]
    n = max(map(len, values), default=0)
    layers = pd.DataFrame([v + [math.nan] * (n - len(v)) for v in values], index=df.index,
                          columns=[f"layer_{i}" for i in range(n)], dtype=float)
    return pd.concat([df[cc], layers], axis=1).groupby(cc, sort=False, dropna=False).mean().reset_index()


def routing_table(df):
    """Per condition (in order of first appearance), the mean over ok runs of each overall routing metric the
    CSV has a column for (see ROUTING_METRICS)."""
    import pandas as pd
    cc, ok = condition_columns(df), _ok_mask(df)
    values = pd.DataFrame({m: _num(df, m).where(ok) for m, _, _ in ROUTING_METRICS if m in df.columns})
    return pd.concat([df[cc], values], axis=1).groupby(cc, sort=False, dropna=False).mean().reset_index()


# ------------------------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def expert_load_figure(df):
    """Heat maps of expert load, one per condition (expert_loads: its smallest ok seed), layers x experts, as
    load / fair share (1 = balanced) on one colour scale; None when no ok run recorded its load."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    plt, loads = _pyplot(), expert_loads(df)
    if not loads:
        return None
    rel = [share * share.shape[1] for _, _, share in loads]  # share x E: 1 = the fair share, whatever E is
    ncols = min(3, len(loads))
    nrows = math.ceil(len(loads) / ncols)
    height = 1.4 + 0.3 * max(r.shape[0] for r in rel)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols + 1, height * nrows), squeeze=False,
                             layout="constrained")
    axes = list(axes.flat)
    # white = the fair share, red = overloaded, blue = starved: one scale so the panels compare
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, max(r.max() for r in rel)))
    for ax, (label, seed, _), r in zip(axes, loads, rel):
        im = ax.imshow(r, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{label}, seed {_fmt_value(seed)}", fontsize=9)
        ax.set(xlabel="expert", ylabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(loads):]:
        fig.delaxes(ax)
    fig.colorbar(im, ax=axes[:len(loads)], label="load / fair share (1 = balanced)")
    return fig


def write_plots(csv_path, df=None, curves=None) -> list:
    """Perplexity and expert-CV per condition, (if any run logged them) seed-averaged loss curves and (if the CSV
    has it) the expert-load heat map. `curves` lets write_report pass the curves it already read."""
    plt = _pyplot()
    df = _read_results(csv_path) if df is None else df
    curves = _read_curves(csv_path, df)[0] if curves is None else curves
    out_dir, prefix = Path(csv_path).parent, report_paths(csv_path)[1]
    cc, ok = condition_columns(df), df[_ok_mask(df)]
    labels = _labels(condition_table(df), cc)
    ys, paths = np.arange(len(labels))[::-1], []  # first condition on top

    def save(fig, name):
        paths.append(out_dir / f"{prefix}_{name}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)

    for metric, title, xlabel, name, ci in [
            ("best_val_perplexity", "Best validation perplexity per condition", "perplexity (lower is better)",
             "perplexity", True),
            ("expert_usage_cv", "Expert-usage imbalance per condition",
             "coefficient of variation of tokens per expert (0 = balanced)", "expert_cv", False)]:
        t = condition_table(df, metric)
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(t)))
        for y, cond in zip(ys, t[cc].to_dict("records")):
            sel = np.logical_and.reduce([ok[c].eq(v) for c, v in cond.items()])
            ax.scatter(_num(ok[sel], metric), np.full(sel.sum(), y), s=14, color="0.55", zorder=3,
                       label="single seed" if y == ys[0] else None)
        err = np.abs(np.vstack([t["mean"] - t["ci_low"], t["ci_high"] - t["mean"]])) if ci else None
        ax.errorbar(t["mean"], ys, xerr=err, fmt="o", color="C0", capsize=4, zorder=4,
                    label="mean ± 95% CI" if ci else "mean")
        ax.set_yticks(ys, labels)
        ax.set(title=title, xlabel=xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        save(fig, name)
    curves = curves[_ok_mask(curves)]
    if len(curves):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        style, handles = {lab: (f"C{i % 10}", "-" if i < 10 else "--") for i, lab in enumerate(labels)}, {}
        for ax, split in zip(axes, ("train", "val")):
            c = curves[curves["split"] == split]
            # mean over the seeds that logged each step, so a short or missing seed does not shift the curve
            mean = c.groupby(cc + ["step"], sort=False, dropna=False)["loss"].mean().reset_index()
            for key, g in mean.groupby(cc, sort=False, dropna=False):
                lab = _cond_label(dict(zip(cc, key)))
                color, ls = style.get(lab, ("k", ":"))
                g = g.sort_values("step")
                handles[lab], = ax.plot(g["step"], g["loss"], ls, color=color, ms=3,
                                        marker="o" if split == "val" else None, label=lab)
            ax.set(title=f"{split} loss (mean over seeds)", xlabel="optimizer step", ylabel="loss")
            ax.grid(alpha=0.3)
        shown = [k for k in labels if k in handles]
        axes[1].legend([handles[k] for k in shown], shown, fontsize=8)
        save(fig, "loss_curves")
    if (fig := expert_load_figure(df)) is not None:
        save(fig, "expert_load")
    return paths


# ------------------------------------------------------------------------------------------------------------
# The markdown report

def _md_table(headers, rows, left=1) -> str:
    """A GitHub markdown table (tabulate, which DataFrame.to_markdown needs, is not a dependency)."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    align = "|" + "|".join([":---"] * left + ["---:"] * (len(headers) - left)) + "|"
    return "\n".join([line(headers), align] + [line(r) for r in rows])


def _fx(x, d=2, sign=False) -> str:
    x = float(x)
    return "n/a" if math.isnan(x) else f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def _fp(p, eq=False) -> str:
    p = float(p)
    if math.isnan(p):
        return "n/a"
    return ("< 0.001" if eq else "<0.001") if p < 0.001 else ("= " if eq else "") + f"{p:.3f}"


_TEST_HEADERS = ["Pairs", "Δ", "{level} CI", "t", "p", "p (Holm)", "Significant"]


def _test_cells(r, d=2) -> list:
    """A paired test's row cells, in _TEST_HEADERS order, with d decimals for the difference."""
    t = f"{r.t:.3g}" if abs(r.t) >= 1e4 else _fx(r.t)  # near-identical differences give enormous t
    return [int(r.n_pairs), _fx(r.mean_diff, d, sign=True),
            "n/a" if math.isnan(r.ci_low) else f"{r.ci_low:.{d}f} to {r.ci_high:.{d}f}", t, _fp(r.p_value),
            _fp(r.p_holm), "yes" if r.significant else "no"]


def _setup_paragraph(df, cc) -> list:
    ok = _ok_mask(df)
    n_ok, n_div = int(ok.sum()), int(df["status"].str.strip().eq("diverged").sum())
    other, n_cond = len(df) - n_ok - n_div, len(df[cc].drop_duplicates())
    seeds = ", ".join(_fmt_value(s) for s in sorted(df["seed"].dropna().unique()))
    factors = "; ".join(f"`{c}` ∈ {{{', '.join(_fmt_value(v) for v in df[c].drop_duplicates())}}}"
                        for c in cc if df[c].nunique(dropna=False) > 1) or "none (a single condition)"
    distinct = lambda col: ", ".join(str(v) for v in df.loc[ok, col].dropna().unique()) or "n/a"
    counts = lambda col: ", ".join(f"{int(v):,}" for v in _num(df[ok], col).dropna().unique()) or "n/a"
    text = (f"The sweep has {len(df)} runs ({n_ok} ok, {n_div} diverged" + (f", {other} other" if other else "")
            + f") in {n_cond} condition{'s' if n_cond > 1 else ''}, each with seeds {seeds}. "
            f"Swept factors: {factors}. Each run trained for {counts('steps')} optimizer steps on "
            f"{counts('train_tokens')} tokens, on {distinct('device')} in {distinct('dtype')}.")
    configs = [c for c in _configs(df) if c]
    if not configs:
        return [text, "", "The runs' configuration was not recorded (no readable `config_json`)."]
    same = lambda k: all(k in c for c in configs) and len({json.dumps(c[k], sort_keys=True) for c in configs}) == 1
    shared = [k for k in configs[0] if same(k)]
    varying = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in shared and k not in cc + ["seed"]]
    show = lambda v: v if isinstance(v, str) else json.dumps(v)
    lines = [text, "", "Shared configuration (identical in every run): "
             + ", ".join(f"`{k}={show(configs[0][k])}`" for k in shared) + "."]
    if varying:  # a CSV that mixes setups: say so rather than hide it
        lines += ["", "Also differing between runs although not a swept factor: " + ", ".join(varying) + "."]
    return lines


def _power_note(n_pairs, per: str, conclusion: str) -> list:
    """The low-power warning, when the tests have 5 or fewer paired seeds."""
    n = sorted({int(k) for k in n_pairs})
    if not n or n[-1] > 5:
        return []
    n_txt = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
    return [f"With only {n_txt} paired seeds per {per} these tests have little power, so {conclusion}."]


def _findings(pc, labels, base_label, alpha) -> list:
    """The paired comparisons in words; `labels` are pc's rows' condition labels."""
    if pc.empty:
        return ["There is only one condition, so there is nothing to compare."]
    if not pc["n_pairs"].any():
        return [f"The baseline ({base_label}) has no ok run, so nothing could be compared with it."]
    tested, level, out = pc[pc["p_value"].notna()], f"{100 * (1 - alpha):g}%", []
    m, sig = len(tested), tested[tested["significant"]]
    pre = f"At alpha = {alpha:g} (Holm-corrected over {m} comparison{'s' if m > 1 else ''}), "
    for k, r in sig.iterrows():
        lo, hi = (r.ci_low, r.ci_high) if r.mean_diff > 0 else (-r.ci_high, -r.ci_low)  # CI of the gap "by"
        out.append(("" if out else pre) + f"{labels[k]} has {'higher' if r.mean_diff > 0 else 'lower'} best "
                   f"validation perplexity than the baseline ({base_label}) by {abs(r.mean_diff):.2f} ({level} CI "
                   f"{lo:.2f} to {hi:.2f}, p_holm {_fp(r.p_holm, eq=True)}).")
    if len(sig) and len(sig) < m:
        out.append("No other condition differs significantly from the baseline.")
    elif m and not len(sig):
        big = tested.loc[tested["mean_diff"].abs().idxmax()]
        out.append(pre + f"no condition differs significantly from the baseline ({base_label}). The largest "
                   f"observed difference is {labels[big.name]}: {big.mean_diff:+.2f} ({level} CI {big.ci_low:.2f} "
                   f"to {big.ci_high:.2f}, unadjusted p {_fp(big.p_value, eq=True)}).")
        out += _power_note(tested["n_pairs"], "comparison", "this is not evidence that the conditions perform the same")
    few = pc[pc["n_pairs"] < 2]
    if len(few):
        pairs = [f"{labels[k]} ({int(n)} pair{'s' if n != 1 else ''})" for k, n in few["n_pairs"].items()]
        out.append("Not tested (fewer than 2 seeds ok in both the condition and the baseline): "
                   + ", ".join(pairs) + ".")
    flat = pc[(pc["n_pairs"] >= 2) & pc["p_value"].isna()]
    if len(flat):  # scipy gives t = nan when every paired difference is exactly 0
        out.append("Not tested (identical results to the baseline on every seed): "
                   + ", ".join(labels[k] for k in flat.index) + ".")
    return out


def _contrast_label(r) -> str:
    """'noise=0.5 vs 0.0' for an effect, '(noise=0.5 vs 0.0) × (lb=0.0 vs 0.01)' for an interaction."""
    one = lambda f, level, ref: f"{_cond_label({f: level})} vs {_fmt_value(ref)}"
    if r.kind == "effect":
        return one(r.factor, r.level, r.reference)
    return f"({one(r.factor, r.level, r.reference)}) × ({one(r.factor2, r.level2, r.reference2)})"


def _contrast_findings(ct, alpha) -> list:
    """Per metric, the significant effects (grouped by contrast) and interactions, or the largest effect when none
    is; then what could not be tested and the low-power warning."""
    level, out = f"{100 * (1 - alpha):g}%", []
    for metric, name, d in CONTRAST_METRICS:
        t = ct[(ct["metric"] == metric) & ct["p_value"].notna()]
        if t.empty:
            continue
        ci = lambda r: f"{level} CI {r.ci_low:.{d}f} to {r.ci_high:.{d}f}"
        held = lambda r, word: f" {word} {r.held_at}" if r.held_at else ""
        pre = f"On {name} (Holm over its {len(t)} tested contrast{'s' if len(t) > 1 else ''}, alpha = {alpha:g}), "
        sig = t[t["significant"]]
        if sig.empty:
            pool = t[t["kind"] == "effect"] if (t["kind"] == "effect").any() else t
            big = pool.loc[pool["mean_diff"].abs().idxmax()]
            out.append(pre + f"no effect or interaction is significant; the largest is {_contrast_label(big)}"
                       f"{held(big, 'at')}: {big.mean_diff:+.{d}f} ({ci(big)}, unadjusted p {_fp(big.p_value, True)}).")
            continue
        stat = lambda r: f"({ci(r)}, p_holm {_fp(r.p_holm, eq=True)})"
        parts = []
        for label, g in sig.groupby([_contrast_label(r) for r in sig.itertuples()], sort=False):
            if g["kind"].iloc[0] == "effect":  # one contrast at several levels of the others: one clause
                items = [f"{r.mean_diff:+.{d}f}{held(r, 'at')} {stat(r)}" for r in g.itertuples()]
                parts.append(f"{label}: " + (", ".join(items[:-1]) + " and " if len(items) > 1 else "") + items[-1])
                continue
            parts += [f"interaction {label}: {r.mean_diff:+.{d}f}{held(r, 'with')} {stat(r)}, i.e. the "
                      f"{_cond_label({r.factor: r.level})} vs {_fmt_value(r.reference)} effect is "
                      f"{abs(r.mean_diff):.{d}f} {'larger' if r.mean_diff > 0 else 'smaller'} at "
                      f"{_cond_label({r.factor2: r.level2})} than at {_cond_label({r.factor2: r.reference2})}"
                      for r in g.itertuples()]
        rest = len(t) - len(sig)
        out.append(pre + "significant: " + "; ".join(parts) + (f"; the other {rest} are not." if rest else "."))
    if len(ct) and ct["p_value"].isna().any():
        out.append(f"{int(ct['p_value'].isna().sum())} contrast(s) could not be tested (fewer than 2 seeds ok in "
                   "all the cells involved, or a difference of exactly 0 on every seed): n/a in the tables.")
    tested = ct[ct["p_value"].notna()]
    if (~tested["significant"]).any():
        out += _power_note(tested["n_pairs"], "contrast", "a contrast that is not significant is not evidence of "
                           "no effect")
    return out


def _contrast_section(df, alpha) -> list:
    levels, ct = factor_levels(df), contrasts(df, alpha)
    md = ["", "## Effects within levels and interactions", ""]
    if not levels:
        return md + ["There is a single condition, so there is no factor to contrast."]
    if ct.empty:
        return md + ["No two conditions differ in one factor only, so no within-level effect can be formed."]
    level = f"{100 * (1 - alpha):g}%"
    refs = ", ".join(_cond_label({f: lv[0]}) for f, lv in levels.items())
    md += [f"Reference levels (the baseline's): {refs}. An effect is one factor's level minus its reference with "
           "the other factors held at the levels under \"At\"; an interaction is a difference of differences: the "
           "first factor's effect at the second factor's level minus its effect at the second factor's reference, "
           "for each combination of any remaining factors. Every contrast is paired by seed (the seeds ok in "
           f"every cell involved): paired t-test with a {level} t-interval; p-values are Holm-corrected within "
           "each metric, over all of that metric's tested effects and interactions (one family per metric). "
           "Validation loss is the last evaluation's (log perplexity); perplexity is the best over all "
           "evaluations, as in the baseline comparison; expert-usage CV is from the last evaluation.", ""]
    for metric, name, d in CONTRAST_METRICS:
        t = ct[ct["metric"] == metric]
        rows = [[_contrast_label(r), r.held_at or "—"] + _test_cells(r, d) for r in t.itertuples()]
        md += [f"### {name[0].upper() + name[1:]}", "",
               _md_table(["Contrast", "At"] + [h.format(level=level) for h in _TEST_HEADERS], rows, left=2), ""]
    return md + [" ".join(_contrast_findings(ct, alpha))]


def _routing_section(df, labels) -> list:
    cc, have = condition_columns(df), [m for m in ROUTING_METRICS if _recorded(df, m[0])]
    rt = routing_table(df)
    md = ["", "## Routing", "",
          "Routing over the validation batches of the last evaluation, averaged over each condition's ok seeds. "
          "CV = population std / mean of the tokens routed to each expert (0 = balanced); max/mean load = the "
          "busiest expert's load over the mean load (1 = balanced); entropy = entropy of the experts' load shares "
          "divided by log(number of experts) (1 = perfectly even); dead fraction = share of experts receiving "
          "under 10% of their fair share. Overall values: CV of the counts summed over layers, the others the mean "
          "of the per-layer values.", "",
          _md_table(["Condition"] + [h for _, _, h in have],
                    [[lab] + [_fx(v, 3) for v in r] for lab, r in
                     zip(labels, rt[[m for m, _, _ in have]].itertuples(index=False))])]
    absent = [h.lower() for m, _, h in ROUTING_METRICS if not _recorded(df, m)]
    absent += [] if _recorded(df, "expert_load_per_layer") else ["per-expert load"]
    if absent:
        md += ["", f"Not available in this CSV (written before these were recorded, or no ok run has them): "
                   f"{', '.join(absent)}."]
    per_layer = [(h, layer_usage_table(df, pl)) for _, pl, h in ROUTING_METRICS if _recorded(df, pl)]
    n_layers = max(t.shape[1] - len(cc) for _, t in per_layer)
    rows = []
    for i, lab in enumerate(labels):  # the tables' rows are the conditions in the order of `labels`
        for h, t in per_layer:
            values = t.iloc[i, len(cc):].tolist()
            rows.append([lab, h] + [_fx(v, 3) for v in values] + ["n/a"] * (n_layers - len(values)))
    md += ["", "Per layer (mean over ok seeds):", "",
           _md_table(["Condition", "Metric"] + [f"layer {i}" for i in range(n_layers)], rows, left=2)]
    ok = df[_ok_mask(df)]
    lbw, cv = _num(ok, "load_balancing_weight"), _num(ok, "expert_usage_cv")
    if cv[lbw == 0].notna().any() and cv[lbw > 0].notna().any():
        weights = ", ".join(_fmt_value(w) for w in lbw[lbw > 0].unique())
        md += ["", f"Without the balancing loss (weight 0), mean expert-usage CV is {cv[lbw == 0].mean():.3f} vs "
                   f"{cv[lbw > 0].mean():.3f} with it (weight {weights}), averaged over the other factors and seeds; "
                   "the tests of this difference within each level are in the section above."]
    return md


def write_report(csv_path, alpha=0.05):
    """Markdown report (setup, per-condition table, paired tests against the baseline, factorial contrasts,
    routing, divergences, plots) beside the CSV."""
    csv_path = Path(csv_path)
    df = _read_results(csv_path)
    report, prefix = report_paths(csv_path)
    cc, bad = condition_columns(df), df[~_ok_mask(df)]
    level = f"{100 * (1 - alpha):g}%"
    curves, no_curves = _read_curves(csv_path, df)
    plots = write_plots(csv_path, df, curves)
    md = [f"# MoE routing experiment: analysis of `{csv_path.name}`", ""] + _setup_paragraph(df, cc)

    table = condition_table(df, confidence=1 - alpha)
    labels = _labels(table, cc)
    md += ["", "## Results per condition", "",
           f"Best validation perplexity over ok runs (mean ± sample std over seeds, {level} t-interval); "
           "lower is better. CV is the expert-usage coefficient of variation.", "",
           _md_table(["Condition", "n", "Best val PPL", f"{level} CI", "Val loss", "Mean CV", "Minutes", "Diverged"],
                     [[lab, int(r.n), _fx(r.mean) + ("" if math.isnan(r.std) else f" ± {r.std:.2f}"),
                       f"{_fx(r.ci_low)} to {_fx(r.ci_high)}" if r.n > 1 else "n/a", _fx(r.mean_val_loss, 3),
                       _fx(r.mean_cv, 3), _fx(r.mean_minutes), int(r.n_diverged)]
                      for lab, r in zip(labels, table.itertuples())])]

    base_label = _cond_label(baseline_condition(df))
    pc = paired_comparisons(df, alpha=alpha)
    pc_labels = _labels(pc, cc)
    md += ["", "## Paired comparisons against the baseline", "",
           f"Baseline: {base_label}. Each condition is paired with the baseline by seed (seeds ok in both); "
           f"Δ = condition − baseline in best validation perplexity, so a negative Δ is better. Paired t-test, "
           f"p-values Holm-corrected over all tested comparisons.", ""]
    if len(pc):
        md += [_md_table(["Condition"] + [h.format(level=level) for h in _TEST_HEADERS],
                         [[lab] + _test_cells(r) for lab, r in zip(pc_labels, pc.itertuples())]), ""]
    md += [" ".join(_findings(pc, pc_labels, base_label, alpha))]
    md += _contrast_section(df, alpha)
    md += _routing_section(df, labels)

    diverged = [[r.run_id, lab, _fmt_value(r.seed), _fx(step, 0)]
                for lab, r, step in zip(_labels(bad, cc), bad.itertuples(), _num(bad, "diverged_step"))]
    md += ["", "## Diverged runs", "",
           _md_table(["Run", "Condition", "Seed", "Step"], diverged, left=2) if diverged else "None."]

    names = {"perplexity": "Best validation perplexity", "expert_cv": "Expert-usage CV", "loss_curves": "Loss curves",
             "expert_load": "Expert load per layer (smallest ok seed of each condition)"}
    md += ["", "## Plots", ""]
    for p in plots:
        md += [f"![{names[p.stem.removeprefix(prefix + '_')]}]({p.name})", ""]
    if not any(p.stem.endswith("_expert_load") for p in plots):
        md += ["Expert-load heat map not drawn: no ok run has an `expert_load_per_layer` value in this CSV.", ""]
    if no_curves and len(no_curves) == len(df):
        md += [f"Loss curves not drawn: no run has a `metrics.jsonl` under `{csv_path.stem}_runs/`."]
    elif no_curves:
        md += [f"Loss curves leave out {len(no_curves)} run(s) without a `metrics.jsonl`: "
               + ", ".join(no_curves) + "."]
    if len(bad) and len(no_curves) < len(df):
        md += ["", "Diverged runs are left out of the averaged curves."]
    report.write_text("\n".join(md).rstrip() + "\n")
    return report


def print_summary(path: Path, hashes=None):
    """Per condition (of the runs in `hashes`, or all): best val perplexity mean ± sample std (ddof=1; the original
    printed the population std), mean CV, mean minutes."""
    try:
        df = _read_results(path, hashes)
    except ValueError as e:
        print(f"no summary: {e}")
        return
    table = condition_table(df)
    labels = _labels(table, condition_columns(df))
    width = max(map(len, labels + ["condition"])) + 2
    print(f"\n{'condition':<{width}}{'n':>3}{'best val ppl ± sample std':>28}{'mean cv':>10}{'mean min':>10}")
    for label, (_, r) in zip(labels, table.iterrows()):
        ppl = f"{r['mean']:.2f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.2f}")
        print(f"{label:<{width}}{int(r['n']):>3}{ppl:>28}{r['mean_cv']:>10.3f}{r['mean_minutes']:>10.2f}"
              + (f"  ({int(r['n_diverged'])} diverged)" if r["n_diverged"] else ""))


# ------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the markdown report and plots for a results CSV of llm.py.")
    p.add_argument("csv", help=f"results CSV (llm.py's default: {DEFAULT_CSV})")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level for the tests (default 0.05)")
    p.add_argument("--summary", action="store_true", help="also print the per-condition summary table")
    args = p.parse_args(argv)
    if not 0 < args.alpha < 1:
        p.error("--alpha must be between 0 and 1")
    try:
        if args.summary:
            print_summary(Path(args.csv))
        print(f"report: {write_report(args.csv, alpha=args.alpha)}")
    except (OSError, ValueError) as e:
        print(f"error: cannot write a report for {args.csv}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
