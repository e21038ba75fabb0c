"""Statistics, tables and plots from a results CSV written by llm.py: the markdown report of a sweep.

    python report.py moe_routing_noise_experiment_results.csv     # -> experiment_analysis.md + PNGs beside it
    python llm.py --preset smoke --out smoke.csv && python report.py smoke.csv --summary

llm.py calls this after every sweep (and for `llm.py --report CSV`); it needs pandas, scipy and matplotlib,
not torch. llm.py imports it at start-up for the CSV contract, so pandas, scipy and matplotlib are
imported inside the functions that use them. Sections: the CSV contract, reading, statistics, plots, the markdown report, CLI.
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

FIRST_COLUMNS = ("seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
                 "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv")
TAIL_COLUMNS = ("status", "diverged_step", "steps", "train_tokens", "tokens_per_s", "expert_usage_cv_per_layer",
                # routing on the validation batches (see llm.py's routing_metrics): overall, then per layer
                "expert_load_max_mean", "routing_entropy", "dead_expert_fraction",
                "expert_load_max_mean_per_layer", "routing_entropy_per_layer", "dead_expert_fraction_per_layer",
                "expert_load_per_layer",  # share of assignments per expert: experts ";"-joined, layers "|"-joined
                "device", "dtype", "run_id", "config_hash", "config_json")
_SHORT = {"noise_std": "noise", "load_balancing_weight": "lb"}
# Read as text: a hex hash can be all digits, and a one-layer CV list would otherwise become a float.
_TEXT_COLUMNS = ("status", "expert_usage_cv_per_layer", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
                 "dead_expert_fraction_per_layer", "expert_load_per_layer", "device", "dtype", "run_id",
                 "config_hash", "config_json")


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


def condition_table(df, metric="best_val_perplexity", confidence=0.95):
    """One row per condition, in order of first appearance: mean/std/t-CI of `metric` over ok runs; n_diverged
    counts the rest."""
    import pandas as pd
    from scipy import stats
    cc, rows = condition_columns(df), []
    for key, g in df.groupby(cc, sort=False, dropna=False):
        ok = g[_ok_mask(g)]
        x = _num(ok, metric).dropna().to_numpy(float)
        n = len(x)
        mean = x.mean() if n else math.nan
        std = x.std(ddof=1) if n > 1 else math.nan
        lo, hi = (stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n)) if n > 1
                  else (math.nan, math.nan))
        rows.append({**dict(zip(cc, key)), "n": n, "mean": mean, "std": std, "ci_low": lo, "ci_high": hi,
                     "mean_val_loss": _num(ok, "val_loss").mean(), "mean_cv": _num(ok, "expert_usage_cv").mean(),
                     "mean_minutes": _num(ok, "training_time_minutes").mean(), "n_diverged": len(g) - len(ok)})
    return pd.DataFrame(rows)


def baseline_condition(df) -> dict:
    """The default routing (noise 0, lb weight 0.01) if the CSV has it, else the first ok run's condition."""
    noise, lbw = _num(df, "noise_std"), _num(df, "load_balancing_weight")
    hits = df[np.isclose(noise, 0.0) & np.isclose(lbw, 0.01)]
    row = hits.iloc[0] if len(hits) else df[_ok_mask(df)].iloc[0]
    return {c: (row[c].item() if isinstance(row[c], np.generic) else row[c]) for c in condition_columns(df)}


def _holm(p):
    # Holm's step-down adjustment by hand: scipy only ships BH/BY (false_discovery_control).
    p = np.asarray(p, float)
    m, order = len(p), np.argsort(p)
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def paired_comparisons(df, metric="best_val_perplexity", alpha=0.05):
    """Every condition minus the baseline, paired on seed (seeds ok in both); Holm over all tested ones."""
    import pandas as pd
    from scipy import stats
    cc, base = condition_columns(df), baseline_condition(df)
    stat_cols = ["mean_diff", "ci_low", "ci_high", "t", "p_value"]
    by_seed = {key: _num(g[_ok_mask(g)], metric).groupby(g["seed"]).mean().dropna()
               for key, g in df.groupby(cc, sort=False, dropna=False)}
    bkey = tuple(base[c] for c in cc)
    b, rows = by_seed[bkey], []
    for key, s in by_seed.items():
        if key == bkey:
            continue
        seeds = sorted(set(s.index) & set(b.index))
        r = {**dict(zip(cc, key)), "n_pairs": len(seeds), **dict.fromkeys(stat_cols, math.nan)}
        if len(seeds) >= 2:
            x, y = s[seeds].to_numpy(float), b[seeds].to_numpy(float)
            with warnings.catch_warnings():  # identical differences give t = nan/inf; reported as such
                warnings.simplefilter("ignore")
                res = stats.ttest_rel(x, y)
                ci = res.confidence_interval(1 - alpha)
            r.update(mean_diff=float((x - y).mean()), ci_low=ci.low, ci_high=ci.high, t=res.statistic,
                     p_value=res.pvalue)
        rows.append(r)
    out = pd.DataFrame(rows, columns=cc + ["n_pairs"] + stat_cols)
    tested = out["p_value"].dropna()
    out["p_holm"] = pd.Series(_holm(tested), index=tested.index, dtype=float)  # NaN where not tested
    out["significant"] = out["p_holm"].lt(alpha)
    return out


def layer_usage_table(df):
    import pandas as pd
    cc, ok = condition_columns(df), df[_ok_mask(df)]
    # ";"-joined CVs; pandas reads a one-layer list as a number and an empty one as NaN
    per_layer = [[] if pd.isna(v) else [float(x) for x in str(v).split(";") if x.strip()]
                 for v in ok["expert_usage_cv_per_layer"]]
    layers = pd.DataFrame(per_layer, index=ok.index)
    layers.columns = [f"layer_{i}" for i in layers.columns]
    return pd.concat([ok[cc], layers], axis=1).groupby(cc, sort=False, dropna=False).mean().reset_index()


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
    missing = [c for c in FIRST_COLUMNS + TAIL_COLUMNS if c not in df.columns]
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
    df, cfgs = df.reset_index(drop=True), _configs(df)
    skip = set(condition_columns(df)) | {"seed", "data_files"} | set(RESULT_NEUTRAL)
    for name in dict.fromkeys(k for c in cfgs for k in c):
        values = [json.dumps(c.get(name)) if isinstance(c.get(name), (list, dict)) else c.get(name) for c in cfgs]
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


def write_plots(csv_path, df=None, curves=None) -> list:
    """Perplexity and expert-CV per condition, and (if any run logged them) seed-averaged loss curves.
    `curves` lets write_report pass the curves it already read."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    return paths


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
        n = sorted(set(tested["n_pairs"]))
        out.append(pre + f"no condition differs significantly from the baseline ({base_label}). The largest "
                   f"observed difference is {labels[big.name]}: {big.mean_diff:+.2f} ({level} CI {big.ci_low:.2f} "
                   f"to {big.ci_high:.2f}, unadjusted p {_fp(big.p_value, eq=True)}).")
        if n[-1] <= 5:
            n_txt = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
            out.append(f"With only {n_txt} paired seeds per comparison these tests have little power, so this "
                       "is not evidence that the conditions perform the same.")
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


def write_report(csv_path, alpha=0.05):
    """Markdown report (setup, per-condition table, paired tests, expert usage, divergences, plots) beside the CSV."""
    csv_path = Path(csv_path)
    df = _read_results(csv_path)
    report, prefix = report_paths(csv_path)
    cc, ok, bad = condition_columns(df), df[_ok_mask(df)], df[~_ok_mask(df)]
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
        md += [_md_table(["Condition", "Pairs", "Δ best val PPL", f"{level} CI", "t", "p", "p (Holm)", "Significant"],
                         [[lab, int(r.n_pairs), _fx(r.mean_diff, sign=True),
                           "n/a" if math.isnan(r.ci_low) else f"{r.ci_low:.2f} to {r.ci_high:.2f}", _fx(r.t),
                           _fp(r.p_value), _fp(r.p_holm), "yes" if r.significant else "no"]
                          for lab, r in zip(pc_labels, pc.itertuples())]), ""]
    md += [" ".join(_findings(pc, pc_labels, base_label, alpha))]

    # per-layer CVs by condition (a condition without an ok run has none)
    lt = layer_usage_table(df)
    lcols = [c for c in lt.columns if c not in cc]
    keys = lambda t: t[cc].itertuples(index=False, name=None)
    layers = dict(zip(keys(lt), lt[lcols].map(lambda v: _fx(v, 3)).values.tolist()))
    md += ["", "## Expert usage", "",
           "CV = std / mean of the tokens routed to each expert (0 = perfectly balanced); per-layer values are "
           "averaged over the condition's ok seeds.", "",
           _md_table(["Condition", "Mean CV"] + [c.replace("_", " ") for c in lcols],
                     [[lab, _fx(r.mean_cv, 3)] + layers.get(k, ["n/a"] * len(lcols))
                      for lab, k, r in zip(labels, keys(table), table.itertuples())])]
    lbw, cv = _num(ok, "load_balancing_weight"), _num(ok, "expert_usage_cv")
    if cv[lbw == 0].notna().any() and cv[lbw > 0].notna().any():
        weights = ", ".join(_fmt_value(w) for w in lbw[lbw > 0].unique())
        md += ["", f"Without the balancing loss (weight 0), mean expert-usage CV is {cv[lbw == 0].mean():.3f} vs "
                   f"{cv[lbw > 0].mean():.3f} with it (weight {weights}), averaged over the other factors and seeds."]

    diverged = [[r.run_id, lab, _fmt_value(r.seed), _fx(step, 0)]
                for lab, r, step in zip(_labels(bad, cc), bad.itertuples(), _num(bad, "diverged_step"))]
    md += ["", "## Diverged runs", "",
           _md_table(["Run", "Condition", "Seed", "Step"], diverged, left=2) if diverged else "None."]

    names = {"perplexity": "Best validation perplexity", "expert_cv": "Expert-usage CV", "loss_curves": "Loss curves"}
    md += ["", "## Plots", ""]
    for p in plots:
        md += [f"![{names[p.stem.removeprefix(prefix + '_')]}]({p.name})", ""]
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
    """Per condition (of the runs in `hashes`, or all): best val perplexity mean ± std, mean CV, mean minutes."""
    try:
        df = _read_results(path, hashes)
    except ValueError as e:
        print(f"no summary: {e}")
        return
    table = condition_table(df)
    labels = _labels(table, condition_columns(df))
    width = max(map(len, labels + ["condition"])) + 2
    print(f"\n{'condition':<{width}}{'n':>3}{'best val ppl':>20}{'mean cv':>10}{'mean min':>10}")
    for label, (_, r) in zip(labels, table.iterrows()):
        ppl = f"{r['mean']:.2f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.2f}")
        print(f"{label:<{width}}{int(r['n']):>3}{ppl:>20}{r['mean_cv']:>10.3f}{r['mean_minutes']:>10.2f}"
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
