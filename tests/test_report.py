"""The sweep report (report.py, which llm.py runs after a sweep and for --report): per-condition statistics,
paired tests against the baseline and the factorial contrasts (effects within levels, interactions) with Holm
correction, routing tables, plots (checked as images) and the markdown text, all from hand-made CSVs checked
against scipy.stats computed directly; CSVs from before the routing columns; and report.py's own command line."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import report as R

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def assert_drawn_png(path, min_side=150):
    """A real PNG holding a drawing: the signature, a decodable RGB(A) image of a plausible size, not one colour."""
    import matplotlib.pyplot as plt
    assert path.read_bytes()[:8] == PNG_SIG
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= min_side
    assert img[..., :3].std() > 0.05  # a blank figure is (almost) all white
    return img
SEEDS = (42, 43, 44)
# Default sweep order: noise varies slowest within lb weight 0.01, then 0.0 (so lb is *not* sorted numerically).
CONDS = [(0.0, 0.01), (0.1, 0.01), (0.5, 0.01), (0.0, 0.0), (0.1, 0.0), (0.5, 0.0)]


def write_csv(path, rows, grid=(), old=False):
    """Write rows in the tool's CSV schema; unspecified fields get plausible defaults, routing columns blank.
    old: the schema before the routing columns existed."""
    header = list(R.FIRST_COLUMNS) + list(grid) + [c for c in R.TAIL_COLUMNS if not old or c not in R.LATER_ROUTING_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(rows):
            ok = r.get("status", "ok") == "ok"
            ppl = r.get("best_val_perplexity", 100.0) if ok else float("nan")
            tag = "_".join([f"n{r['noise_std']}", f"lb{r['load_balancing_weight']}"]
                           + [f"{g}{r[g]}" for g in grid] + [f"s{r['seed']}"])
            cfg = {"d_model": 64, "n_heads": 4, "n_layers": 3, "data_files": ["a.txt"],
                   "noise_std": r["noise_std"], "load_balancing_weight": r["load_balancing_weight"],
                   "seed": r["seed"], **{g: r[g] for g in grid}}
            full = {"val_loss": math.log(ppl) if ok else "nan", "val_accuracy": 0.2 if ok else "",
                    "val_perplexity": ppl, "training_time_minutes": r.get("minutes", 1.5), "peak_memory_gb": 2.0,
                    "best_val_perplexity": ppl if ok else "", "expert_usage_cv": r.get("cv", 0.1) if ok else "",
                    "status": r.get("status", "ok"), "diverged_step": r.get("diverged_step", ""), "steps": 400,
                    "train_tokens": 1_000_000, "tokens_per_s": 5e4,
                    "expert_usage_cv_per_layer": r.get("layers", "0.1;0.2;0.3") if ok else "",
                    "device": "cpu", "dtype": "float32", "run_id": r.get("run_id", f"{tag}_{i:08d}"),
                    "config_hash": f"{i:016d}", "config_json": json.dumps(cfg, separators=(",", ":")), **r}
            w.writerow(["" if full.get(k) is None else full.get(k) for k in header])
    return path


def sweep_rows(effects, seed_effect=(0.0, 3.0, -2.0), jitter=0.3):
    """6 conditions x 3 seeds; best ppl = 100 + condition effect + seed effect (+ jitter)."""
    rng = np.random.default_rng(0)
    rows = []
    for ci, (n, lb) in enumerate(CONDS):
        for si, s in enumerate(SEEDS):
            j = rng.normal(0, jitter)
            rows.append({"seed": s, "noise_std": n, "load_balancing_weight": lb,
                         "best_val_perplexity": 100 + effects[ci] + seed_effect[si] + j,
                         "cv": (0.07 if lb else 0.27) + 0.001 * si, "minutes": 1 + si})
    return rows


@pytest.fixture
def main_csv(tmp_path):
    """Large consistent effect for noise=0.5, lb=0.01 and one diverged run in noise=0.5, lb=0.0."""
    rows = sweep_rows([0, 0.2, 14, 0.1, 0.3, 0.2])
    rows[-1] = {"seed": 44, "noise_std": 0.5, "load_balancing_weight": 0.0, "status": "diverged",
                "diverged_step": 123}
    return write_csv(tmp_path / "results.csv", rows)


def test_constants_and_condition_columns(tmp_path):
    assert R.FIRST_COLUMNS[0] == "seed" and R.FIRST_COLUMNS[-1] == "expert_usage_cv" and len(R.FIRST_COLUMNS) == 10
    assert R.TAIL_COLUMNS[0] == "status" and R.TAIL_COLUMNS[-1] == "config_json"
    rows = [{"seed": s, "noise_std": 0.0, "load_balancing_weight": 0.01, "expert_top_k": k} for s in SEEDS
            for k in (1, 2)]
    df = pd.read_csv(write_csv(tmp_path / "g.csv", rows, grid=("expert_top_k",)))
    assert R.condition_columns(df) == ["noise_std", "load_balancing_weight", "expert_top_k"]
    assert R.condition_columns(pd.read_csv(write_csv(tmp_path / "p.csv", rows[:1]))) == [
        "noise_std", "load_balancing_weight"]


def test_condition_table_matches_independent_stats(main_csv):
    df = pd.read_csv(main_csv)
    t = R.condition_table(df)
    assert list(zip(t.noise_std, t.load_balancing_weight)) == CONDS  # first-appearance order, not sorted
    for _, r in t.iterrows():
        sel = df[(df.noise_std == r.noise_std) & (df.load_balancing_weight == r.load_balancing_weight)]
        x = sel.loc[sel.status == "ok", "best_val_perplexity"].to_numpy()
        m, s = x.mean(), x.std(ddof=1)
        h = stats.t.ppf(0.975, len(x) - 1) * s / np.sqrt(len(x))
        assert r.n == len(x)
        assert r["mean"] == pytest.approx(m) and r["std"] == pytest.approx(s)
        assert (r.ci_low, r.ci_high) == pytest.approx((m - h, m + h))
        assert r.mean_cv == pytest.approx(sel.loc[sel.status == "ok", "expert_usage_cv"].mean())
        assert r.mean_minutes == pytest.approx(sel.loc[sel.status == "ok", "training_time_minutes"].mean())
    last = t.iloc[-1]
    assert (last.n, last.n_diverged) == (2, 1) and t.n_diverged.iloc[:-1].eq(0).all()
    # 99% interval is wider; a single-run condition has NaN std/CI
    assert (R.condition_table(df, confidence=0.99).ci_high > t.ci_high).all()
    one = R.condition_table(df[(df.seed == 42) | (df.noise_std != 0.1)])
    r1 = one[one.noise_std == 0.1].iloc[0]
    assert r1.n == 1 and math.isnan(r1["std"]) and math.isnan(r1.ci_low)


def test_holm_hand_example():
    assert R._holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert R._holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert R._holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 * 0.8 capped at 1, then monotone
    assert R._holm([0.6, 0.7, 0.1]) == pytest.approx([1.0, 1.0, 0.3])


def holm_loop(p):
    """Holm's adjusted p-values by an independent loop over the sorted p-values."""
    p = np.asarray(p, float)
    adj, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(np.argsort(p)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def test_paired_comparisons_match_ttest_rel_and_pair_by_seed(main_csv, tmp_path):
    df = pd.read_csv(main_csv).sample(frac=1, random_state=3)  # shuffled rows: pairing must use seed
    df = df.sort_values("noise_std", kind="stable").reset_index(drop=True)  # baseline row still first
    df = df[~((df.noise_std == 0.1) & (df.load_balancing_weight == 0.0) & (df.seed == 43))]  # missing seed
    pc = R.paired_comparisons(df)
    assert len(pc) == 5
    ok = df[df.status == "ok"]

    def arr(n, lb, seeds):
        sel = ok[(ok.noise_std == n) & (ok.load_balancing_weight == lb)].set_index("seed")
        return sel.loc[list(seeds), "best_val_perplexity"].to_numpy()

    expected_p = []
    for _, r in pc.iterrows():
        seeds = {(0.1, 0.0): [42, 44], (0.5, 0.0): [42, 43]}.get((r.noise_std, r.load_balancing_weight), SEEDS)
        x, y = arr(r.noise_std, r.load_balancing_weight, seeds), arr(0.0, 0.01, seeds)
        res = stats.ttest_rel(x, y)
        assert r.n_pairs == len(seeds)
        assert r.mean_diff == pytest.approx((x - y).mean())
        assert r.t == pytest.approx(res.statistic) and r.p_value == pytest.approx(res.pvalue)
        d = x - y
        h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (r.ci_low, r.ci_high) == pytest.approx((d.mean() - h, d.mean() + h))
        expected_p.append(res.pvalue)
    adj = holm_loop(expected_p)
    assert pc.p_holm.to_numpy() == pytest.approx(adj)
    assert pc.significant.tolist() == list(adj < 0.05)
    big = pc[(pc.noise_std == 0.5) & (pc.load_balancing_weight == 0.01)].iloc[0]
    assert big.significant and big.mean_diff == pytest.approx(14, abs=1)


def test_too_few_pairs_gives_nan_and_is_noted(tmp_path):
    rows = sweep_rows([0, 5, 10, 0, 0, 0])[:9]  # three lb=0.01 conditions
    rows = [r for r in rows if not (r["noise_std"] == 0.1 and r["seed"] != 42)]  # noise=0.1 has one seed
    rows += [{**r, "noise_std": 0.3} for r in rows[:3]]  # a copy of the baseline: zero-variance differences
    path = write_csv(tmp_path / "few.csv", rows)
    pc = R.paired_comparisons(pd.read_csv(path))
    r = pc[pc.noise_std == 0.1].iloc[0]
    assert r.n_pairs == 1 and math.isnan(r.t) and math.isnan(r.p_holm) and not r.significant
    text = R.write_report(path).read_text()
    assert "Holm-corrected over 1 comparison)" in text
    assert "Not tested" in text and "noise=0.1, lb=0.01 (1 pair)" in text
    assert "identical results to the baseline on every seed): noise=0.3, lb=0.01." in text


def test_baseline_condition(tmp_path):
    rows = [{"seed": s, "noise_std": n, "load_balancing_weight": 0.01, "expert_top_k": k}
            for k in (2, 1) for n in (0.1, 0.0) for s in SEEDS]
    df = pd.read_csv(write_csv(tmp_path / "g.csv", rows, grid=("expert_top_k",)))
    assert R.baseline_condition(df) == {"noise_std": 0.0, "load_balancing_weight": 0.01, "expert_top_k": 2}
    rows = [{"seed": 42, "noise_std": 0.3, "load_balancing_weight": 0.1, "status": "diverged"},
            {"seed": 42, "noise_std": 0.2, "load_balancing_weight": 0.1}]
    df = pd.read_csv(write_csv(tmp_path / "nb.csv", rows))
    assert R.baseline_condition(df) == {"noise_std": 0.2, "load_balancing_weight": 0.1}


def test_layer_usage_table(tmp_path):
    rows = [{"seed": s, "noise_std": 0.0, "load_balancing_weight": lb, "layers": f"{0.1 * i};{0.2 * i}"}
            for lb in (0.01, 0.0) for i, s in enumerate(SEEDS, 1)]
    rows.append({"seed": 45, "noise_std": 0.0, "load_balancing_weight": 0.0, "status": "diverged"})
    t = R.layer_usage_table(pd.read_csv(write_csv(tmp_path / "l.csv", rows)))
    assert list(t.columns) == ["noise_std", "load_balancing_weight", "layer_0", "layer_1"]
    assert t.layer_0.tolist() == pytest.approx([0.2, 0.2]) and t.layer_1.tolist() == pytest.approx([0.4, 0.4])
    one = [{"seed": 42, "noise_std": 0.0, "load_balancing_weight": 0.01, "layers": "0.25"}]  # read as a float
    assert R.layer_usage_table(pd.read_csv(write_csv(tmp_path / "o.csv", one))).layer_0.tolist() == [0.25]


def add_curves(csv_path, run_ids, torn=False):
    runs = csv_path.with_name(csv_path.stem + "_runs")
    for k, rid in enumerate(run_ids):
        d = runs / rid
        d.mkdir(parents=True)
        lines = [json.dumps({"split": "train", "step": st, "loss": 6 - st / 100 + 0.01 * k, "aux_loss": 1.0,
                             "lr": 0.01, "tokens_per_s": 1e4}) for st in range(10, 210, 10)]
        lines += [json.dumps({"split": "val", "step": st, "loss": 5.5 - st / 200, "accuracy": 0.2,
                              "perplexity": 100.0}) for st in (100, 200)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"split\": \"tr" if torn else "\n"))


def test_report_significant_with_curves_and_pngs(main_csv):
    df = pd.read_csv(main_csv)
    add_curves(main_csv, df.run_id[:12], torn=True)
    curves = R.load_curves(main_csv)
    assert set(curves.columns) >= {"noise_std", "load_balancing_weight", "seed", "split", "step", "loss"}
    assert len(curves) == 12 * 22 and set(curves.split) == {"train", "val"}
    first = curves[curves.run_id == df.run_id[0]]
    assert first.seed.iloc[0] == 42 and first[first.split == "val"].step.tolist() == [100, 200]

    report = R.write_report(main_csv)
    assert report == main_csv.with_name("results_analysis.md")
    text = report.read_text()
    assert "| Condition | n | Best val PPL |" in text  # the aggregate table
    row = next(line for line in text.splitlines() if line.startswith("| noise=0.5, lb=0.01 |"))
    m = df[(df.noise_std == 0.5) & (df.load_balancing_weight == 0.01)].best_val_perplexity
    assert f"{m.mean():.2f} ± {m.std():.2f}" in row
    assert ("noise=0.5, lb=0.01 has higher best validation perplexity than the baseline "
            "(noise=0.0, lb=0.01) by 14.") in text
    assert "Holm-corrected over 5 comparisons" in text
    assert "Without the balancing loss (weight 0), mean expert-usage CV is 0.271 vs 0.071" in text
    assert "| results_n0.5_lb0.0_s44" not in text and "123" in text.split("## Diverged runs")[1]
    assert "Loss curves leave out 6 run(s)" in text
    assert "17 ok, 1 diverged" in text and "`d_model=64`" in text and "1,000,000 tokens" in text
    pngs = R.write_plots(main_csv)
    assert [p.name for p in pngs] == ["results_perplexity.png", "results_expert_cv.png", "results_loss_curves.png"]
    for p in pngs:
        assert_drawn_png(p)
        assert f"]({p.name})" in text


def test_report_noise_only_says_none_differ(tmp_path):
    path = write_csv(tmp_path / "moe_routing_noise_experiment_results.csv",
                     sweep_rows([0] * 6, seed_effect=(0, 0, 0), jitter=1.0))
    report = R.write_report(path)
    assert report.name == "experiment_analysis.md"
    text = report.read_text()
    assert "no condition differs significantly from the baseline (noise=0.0, lb=0.01)" in text
    assert "With only 3 paired seeds" in text and "has higher" not in text and "has lower" not in text
    assert "Loss curves not drawn" in text and "## Diverged runs\n\nNone." in text
    assert not (tmp_path / "experiment_loss_curves.png").exists()
    for name in ("experiment_perplexity.png", "experiment_expert_cv.png"):
        assert_drawn_png(tmp_path / name)


def test_grid_column_in_report(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"seed": s, "noise_std": n, "load_balancing_weight": 0.01, "expert_top_k": k,
             "best_val_perplexity": 100 - 8 * (k == 2) + 0.3 * i + rng.normal(0, 0.2)}
            for k in (1, 2) for n in (0.0, 0.5) for i, s in enumerate(SEEDS)]
    path = write_csv(tmp_path / "grid.csv", rows, grid=("expert_top_k",))
    text = R.write_report(path).read_text()
    assert "| noise=0.0, lb=0.01, expert_top_k=2 |" in text
    assert "`expert_top_k` ∈ {1, 2}" in text
    pc = R.paired_comparisons(pd.read_csv(path)).iloc[1]
    assert ("noise=0.0, lb=0.01, expert_top_k=2 has lower best validation perplexity than the baseline "
            f"(noise=0.0, lb=0.01, expert_top_k=1) by {-pc.mean_diff:.2f} (95% CI {-pc.ci_high:.2f} to "
            f"{-pc.ci_low:.2f}") in text
    assert (tmp_path / "grid_analysis.md").exists()


@pytest.mark.parametrize("case", ["no_ok", "missing_col", "no_rows", "absent"])
def test_bad_csv_raises_value_error(tmp_path, case):
    path = tmp_path / "bad.csv"
    rows = [{"seed": 42, "noise_std": 0.0, "load_balancing_weight": 0.01, "status": "diverged"}]
    if case == "no_ok":
        write_csv(path, rows)
    elif case == "missing_col":
        pd.read_csv(write_csv(path, rows[:0] + [{**rows[0], "status": "ok"}])).drop(
            columns="config_json").to_csv(path, index=False)
    elif case == "no_rows":
        write_csv(path, [])
    with pytest.raises(ValueError) as e:
        R.write_report(path)
    assert "\n" not in str(e.value)
    assert {"no_ok": "no successful runs", "missing_col": "config_json", "no_rows": "no runs",
            "absent": "not found"}[case] in str(e.value)


def test_report_cli_writes_report_and_fails_in_one_line(main_csv, tmp_path):
    import subprocess
    import sys
    script = Path(R.__file__)
    ok = subprocess.run([sys.executable, str(script), str(main_csv), "--summary"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    report = R.report_paths(main_csv)[0]
    assert f"report: {report}" in ok.stdout and report.is_file()
    assert "condition" in ok.stdout and "best val ppl" in ok.stdout  # the --summary table
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.csv")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr
    strict = subprocess.run([sys.executable, str(script), str(main_csv), "--alpha", "0.01"], capture_output=True,
                            text=True, timeout=120)
    assert strict.returncode == 0 and "99% CI" in report.read_text() and "alpha = 0.01" in report.read_text()
    wrong = subprocess.run([sys.executable, str(script), str(main_csv), "--alpha", "2"], capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "--alpha" in wrong.stderr and "Traceback" not in wrong.stderr


# ------------------------------------------------------------------------------------------------------------
# Factorial contrasts: effects within levels and interactions

SEEDS4 = (42, 43, 44, 45)
# per-cell effect on best val ppl: noise 0.5 costs 1 with the balancing loss and 12 without it (an interaction)
PPL_EFFECT = {(0.0, 0.01): 0.0, (0.1, 0.01): 0.2, (0.5, 0.01): 1.0, (0.0, 0.0): 0.1, (0.1, 0.0): 0.3, (0.5, 0.0): 12.0}


def factorial_rows(ppl_effect=PPL_EFFECT, cv_gap=0.2, loss_gap=0.05, jitter=0.3):
    """3 noise x 2 lb x 4 seeds; seed effects shared by all cells (what pairing removes); noise=0.1, lb=0.0 lacks
    seed 43 and noise=0.5, lb=0.0 has a diverged seed 45."""
    rng = np.random.default_rng(7)
    rows = []
    for n, lb in CONDS:
        for s, seed_eff in zip(SEEDS4, (0.0, 3.0, -2.0, 1.0)):
            if (n, lb, s) == (0.1, 0.0, 43):
                continue
            if (n, lb, s) == (0.5, 0.0, 45):
                rows.append({"seed": s, "noise_std": n, "load_balancing_weight": lb, "status": "diverged"})
                continue
            ppl = 100 + ppl_effect[(n, lb)] + seed_eff + rng.normal(0, jitter)
            rows.append({"seed": s, "noise_std": n, "load_balancing_weight": lb, "best_val_perplexity": ppl,
                         "val_loss": 4.6 + 0.01 * seed_eff + loss_gap * (n == 0.5) + rng.normal(0, 0.002),
                         "cv": 0.07 + cv_gap * (lb == 0) + rng.normal(0, 0.005)})
    return rows


def by_seed(rows, metric, n, lb):
    key = {"cv": "cv"}.get(metric, metric)
    return {r["seed"]: r[key] for r in rows if (r["noise_std"], r["load_balancing_weight"]) == (n, lb)
            and r.get("status", "ok") == "ok"}


def expected_test(d):
    """scipy's one-sample test of the paired differences d, and the t-interval by the textbook formula."""
    d = np.asarray(d, float)
    res = stats.ttest_1samp(d, 0.0)
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"n_pairs": len(d), "mean_diff": d.mean(), "ci_low": d.mean() - h, "ci_high": d.mean() + h,
            "t": res.statistic, "p_value": res.pvalue}


def test_contrasts_within_levels_and_interactions_match_scipy(tmp_path):
    rows = factorial_rows()
    df = pd.read_csv(write_csv(tmp_path / "f.csv", rows))
    ct = R.contrasts(df)
    assert R.factor_levels(df) == {"noise_std": [0.0, 0.1, 0.5], "load_balancing_weight": [0.01, 0.0]}
    # per metric: noise (2 levels vs 0.0) at 2 lb levels + lb (0.0 vs 0.01) at 3 noise levels + 2 interactions
    assert ct.groupby("metric").size().to_dict() == {"val_loss": 9, "best_val_perplexity": 9, "expert_usage_cv": 9}
    assert list(ct.metric.drop_duplicates()) == [m for m, _, _ in R.CONTRAST_METRICS]
    for metric in ("val_loss", "best_val_perplexity", "cv"):
        col = {"cv": "expert_usage_cv"}.get(metric, metric)
        t = ct[ct.metric == col]
        cell = lambda n, lb: by_seed(rows, metric, n, lb)
        expected = []
        for lb in (0.01, 0.0):  # noise effect within each lb level
            for n in (0.1, 0.5):
                x, y = cell(n, lb), cell(0.0, lb)
                seeds = sorted(set(x) & set(y))
                ref = stats.ttest_rel([x[s] for s in seeds], [y[s] for s in seeds])
                e = expected_test([x[s] - y[s] for s in seeds])
                assert (e["t"], e["p_value"]) == pytest.approx((ref.statistic, ref.pvalue))  # the two agree
                expected.append((("effect", "noise_std", n, f"lb={lb}"), e))
        for n in (0.0, 0.1, 0.5):  # lb effect within each noise level
            x, y = cell(n, 0.0), cell(n, 0.01)
            seeds = sorted(set(x) & set(y))
            expected.append((("effect", "load_balancing_weight", 0.0, f"noise={n}"), expected_test(
                [x[s] - y[s] for s in seeds])))
        for n in (0.1, 0.5):  # difference of differences per seed, over the seeds ok in all four cells
            c = [cell(n, 0.0), cell(0.0, 0.0), cell(n, 0.01), cell(0.0, 0.01)]
            seeds = sorted(set.intersection(*(set(v) for v in c)))
            d = [(c[0][s] - c[1][s]) - (c[2][s] - c[3][s]) for s in seeds]
            expected.append((("interaction", "noise_std", n, ""), expected_test(d)))
        got = {(r.kind, r.factor, r.level, r.held_at): r for r in t.itertuples()}
        assert set(got) == {k for k, _ in expected}
        for k, e in expected:
            r = got[k]
            assert {f: getattr(r, f) for f in e} == pytest.approx(e), k
            if r.kind == "interaction":
                assert (r.reference, r.factor2, r.level2, r.reference2) == (0.0, "load_balancing_weight", 0.0, 0.01)
        # one Holm family per metric
        assert [got[k].p_holm for k, _ in expected] == pytest.approx(holm_loop([e["p_value"] for _, e in expected]))
        assert t.significant.tolist() == t.p_holm.lt(0.05).tolist()
    sig = ct[ct.significant]
    ppl = sig[sig.metric == "best_val_perplexity"]
    assert ("effect", "noise_std", 0.5, "lb=0.0") in set(zip(ppl.kind, ppl.factor, ppl.level, ppl.held_at))
    assert ("interaction", "noise_std", 0.5) in set(zip(ppl.kind, ppl.factor, ppl.level))
    cv = ct[(ct.metric == "expert_usage_cv") & (ct.factor == "load_balancing_weight")]
    assert cv.significant.all() and (cv.mean_diff > 0.15).all()  # the balancing loss evens out routing: tested
    assert not ct[(ct.metric == "expert_usage_cv") & (ct.factor == "noise_std")].significant.any()


def test_contrasts_three_factors_with_string_levels_and_missing_cells(tmp_path):
    rng = np.random.default_rng(3)
    # file order: bias first, so the reference must come from the baseline row (noise 0, lb 0.01), not order
    rows = [{"seed": s, "noise_std": n, "load_balancing_weight": lb, "balancing": b,
             "best_val_perplexity": 100 + 5 * (b == "loss" and n == 0.5) + i + rng.normal(0, 0.3)}
            for b in ("bias", "loss") for lb in (0.01, 0.0) for n in (0.0, 0.5) for i, s in enumerate(SEEDS)]
    df = pd.read_csv(write_csv(tmp_path / "g.csv", rows, grid=("balancing",)))
    assert R.factor_levels(df)["balancing"] == ["bias", "loss"]
    ct = R.contrasts(df)
    t = ct[ct.metric == "best_val_perplexity"]
    # each factor's one non-reference level at the 4 combinations of the other two; 3 factor pairs x 2 levels of
    # the third for the interactions
    assert (t.kind == "effect").sum() == 12 and (t.kind == "interaction").sum() == 6
    r = t[(t.kind == "interaction") & (t.factor == "noise_std") & (t.factor2 == "balancing")
          & (t.held_at == "lb=0.0")].iloc[0]
    v = lambda n, b: np.array([x["best_val_perplexity"] for x in rows if (x["noise_std"], x["balancing"],
                                                                           x["load_balancing_weight"]) == (n, b, 0.0)])
    d = (v(0.5, "loss") - v(0.0, "loss")) - (v(0.5, "bias") - v(0.0, "bias"))
    e = expected_test(d)
    assert (r.level2, r.reference2, r.mean_diff, r.t, r.p_value) == pytest.approx(
        ("loss", "bias", e["mean_diff"], e["t"], e["p_value"]))
    eff = t[(t.kind == "effect") & (t.factor == "balancing")]
    assert set(eff.held_at) == {"noise=0.0, lb=0.01", "noise=0.5, lb=0.01", "noise=0.0, lb=0.0", "noise=0.5, lb=0.0"}
    # a design without the cell noise=0.5, lb=0.0, balancing=loss: contrasts that need it are left out
    part = df[~((df.noise_std == 0.5) & (df.load_balancing_weight == 0.0) & (df.balancing == "loss"))]
    tp = R.contrasts(part)
    tp = tp[tp.metric == "best_val_perplexity"]
    assert (tp.kind == "effect").sum() == 12 - 3 and (tp.kind == "interaction").sum() == 6 - 3
    assert tp.p_value.notna().all()


def test_report_findings_state_the_significant_contrasts(tmp_path):
    rows = factorial_rows()
    path = write_csv(tmp_path / "f.csv", rows)
    text = R.write_report(path).read_text()
    ct = R.contrasts(pd.read_csv(path))
    section = text.split("## Effects within levels and interactions")[1].split("## Routing")[0]
    assert "Reference levels (the baseline's): noise=0.0, lb=0.01." in section
    assert "one family per metric" in section and "last evaluation's (log perplexity)" in section
    for title in ("### Final validation loss", "### Best validation perplexity", "### Expert-usage CV"):
        assert title in section
    ppl = ct[(ct.metric == "best_val_perplexity") & (ct.kind == "effect") & (ct.level == 0.5)]
    big = ppl[ppl.held_at == "lb=0.0"].iloc[0]
    assert big.significant
    assert (f"| noise=0.5 vs 0.0 | lb=0.0 | 3 | {big.mean_diff:+.2f} | {big.ci_low:.2f} to {big.ci_high:.2f} |"
            in section)
    n_tested = ct[(ct.metric == "best_val_perplexity") & ct.p_value.notna()].shape[0]
    assert f"On best validation perplexity (Holm over its {n_tested} tested contrasts, alpha = 0.05), significant:" \
        in section
    small = ppl[ppl.held_at == "lb=0.01"].iloc[0]
    stat = lambda r, d: (f"{r.mean_diff:+.{d}f} at {r.held_at} (95% CI {r.ci_low:.{d}f} to {r.ci_high:.{d}f}, "
                         f"p_holm {R._fp(r.p_holm, eq=True)})")
    # one clause per contrast, listing the levels of the other factors where it is significant
    assert (f"noise=0.5 vs 0.0: {stat(small, 2)} and {stat(big, 2)}" if small.significant
            else f"noise=0.5 vs 0.0: {stat(big, 2)}") in section
    inter = ct[(ct.metric == "best_val_perplexity") & (ct.kind == "interaction") & (ct.level == 0.5)].iloc[0]
    assert (f"interaction (noise=0.5 vs 0.0) × (lb=0.0 vs 0.01): {inter.mean_diff:+.2f}" in section
            and f"effect is {inter.mean_diff:.2f} larger at lb=0.0 than at lb=0.01" in section)
    cv = ct[(ct.metric == "expert_usage_cv") & (ct.factor == "load_balancing_weight")]
    assert cv.significant.all()
    assert ("On expert-usage CV (Holm over its 9 tested contrasts, alpha = 0.05), significant: lb=0.0 vs 0.01: "
            f"{stat(cv.iloc[0], 3)}, {stat(cv.iloc[1], 3)} and {stat(cv.iloc[2], 3)}; the other 6 are not.") in section
    assert "With only 3-4 paired seeds per contrast" in section  # some contrasts are not significant


def test_report_contrasts_none_significant_warns_about_power(tmp_path):
    flat = dict.fromkeys(PPL_EFFECT, 0.0)
    path = write_csv(tmp_path / "n.csv", factorial_rows(flat, cv_gap=0.0, loss_gap=0.0, jitter=1.0))
    text = R.write_report(path).read_text()
    ct = R.contrasts(pd.read_csv(path))
    assert not ct.significant.any()
    t = ct[(ct.metric == "best_val_perplexity") & (ct.kind == "effect")]
    big = t.loc[t.mean_diff.abs().idxmax()]
    assert (f"no effect or interaction is significant; the largest is {R._contrast_label(big)} at {big.held_at}: "
            f"{big.mean_diff:+.2f} (95% CI {big.ci_low:.2f} to {big.ci_high:.2f}, unadjusted p") in text
    assert "With only 3-4 paired seeds per contrast these tests have little power" in text
    assert "significant:" not in text


def test_single_factor_and_single_condition_contrast_sections(tmp_path):
    rows = [{"seed": s, "noise_std": n, "load_balancing_weight": 0.01, "best_val_perplexity": 100 + 3 * n + i}
            for n in (0.0, 0.5) for i, s in enumerate(SEEDS)]
    ct = R.contrasts(pd.read_csv(write_csv(tmp_path / "one.csv", rows)))
    assert set(ct.kind) == {"effect"} and len(ct) == 3 and set(ct.held_at) == {""}
    one = write_csv(tmp_path / "single.csv", rows[:3])
    assert "there is no factor to contrast" in R.write_report(one).read_text()


# ------------------------------------------------------------------------------------------------------------
# Routing tables, the expert-load heat map, CSVs from before the routing columns

def routing_fields(load):
    """The routing columns llm.py writes for a (layers, experts) array of assignment shares, computed by hand."""
    load = np.asarray(load, float)
    E = load.shape[1]
    max_mean = load.max(axis=1) / load.mean(axis=1)
    entropy = np.array([-sum(p * math.log(p) for p in layer if p > 0) / math.log(E) for layer in load])
    dead = (load < 0.1 / E).mean(axis=1)
    j = lambda v: ";".join(f"{x:.6g}" for x in v)
    return {"expert_load_max_mean": max_mean.mean(), "routing_entropy": entropy.mean(),
            "dead_expert_fraction": dead.mean(), "expert_load_max_mean_per_layer": j(max_mean),
            "routing_entropy_per_layer": j(entropy), "dead_expert_fraction_per_layer": j(dead),
            "expert_load_per_layer": "|".join(j(layer) for layer in load)}


def random_load(rng, n_layers=2, n_experts=4, skew=1.0):
    w = 0.5 + rng.random((n_layers, n_experts))  # every expert above 10% of its fair share ...
    w[:, 0] *= skew
    w[0, -1] = 0.0  # ... but one dead expert in layer 0
    return w / w.sum(axis=1, keepdims=True)


@pytest.fixture
def routing_csv(tmp_path):
    """3 conditions x 3 seeds with routing columns (seed 43 written before 42; noise=0.5's seed 42 diverged)."""
    rng = np.random.default_rng(5)
    rows, loads = [], {}
    for n in (0.0, 0.1, 0.5):
        for s in (43, 42, 44):
            if (n, s) == (0.5, 42):
                rows.append({"seed": s, "noise_std": n, "load_balancing_weight": 0.01, "status": "diverged"})
                continue
            loads[n, s] = random_load(rng, skew=1 + 2 * n)
            rows.append({"seed": s, "noise_std": n, "load_balancing_weight": 0.01, **routing_fields(loads[n, s])})
    return write_csv(tmp_path / "r.csv", rows), rows, loads


def test_routing_tables_match_hand_computation(routing_csv):
    path, rows, loads = routing_csv
    df = R._read_results(path)
    rt = R.routing_table(df)
    assert rt.noise_std.tolist() == [0.0, 0.1, 0.5]
    for r in rt.itertuples():
        ok = [x for x in rows if x["noise_std"] == r.noise_std and x.get("status", "ok") == "ok"]
        for col in ("expert_load_max_mean", "routing_entropy", "dead_expert_fraction"):
            assert getattr(r, col) == pytest.approx(np.mean([x[col] for x in ok]), rel=1e-9), col
        # by hand from the loads themselves: the mean over seeds of the per-layer mean of max/mean and entropy
        ld = [loads[r.noise_std, x["seed"]] for x in ok]
        assert r.expert_load_max_mean == pytest.approx(np.mean([(m.max(1) / m.mean(1)).mean() for m in ld]))
        assert r.dead_expert_fraction == pytest.approx(0.125)  # 1 of 4 experts in 1 of 2 layers
        ent = np.mean([np.mean([stats.entropy(layer) / math.log(4) for layer in m]) for m in ld])
        assert r.routing_entropy == pytest.approx(ent, rel=1e-5)  # the CSV keeps 6 digits per layer
        lt = R.layer_usage_table(df, "routing_entropy_per_layer")
        row = lt[lt.noise_std == r.noise_std].iloc[0]
        per_layer = np.mean([[stats.entropy(layer) / math.log(4) for layer in m] for m in ld], axis=0)
        assert [row.layer_0, row.layer_1] == pytest.approx(per_layer, rel=1e-5)
    text = R.write_report(path).read_text()
    routing = text.split("## Routing")[1].split("## Diverged")[0]
    assert "| Condition | CV | Max/mean load | Entropy | Dead fraction |" in routing
    first = rt.iloc[0]
    assert (f"| noise=0.0, lb=0.01 | {first.expert_usage_cv:.3f} | {first.expert_load_max_mean:.3f} | "
            f"{first.routing_entropy:.3f} | {first.dead_expert_fraction:.3f} |") in routing
    assert "| noise=0.5, lb=0.01 | Dead fraction | 0.250 | 0.000 |" in routing
    assert "Not available" not in routing


def test_expert_load_heat_map(routing_csv):
    import matplotlib.pyplot as plt
    path, _, loads = routing_csv
    df = R._read_results(path)
    picked = R.expert_loads(df)
    assert [(lab, s) for lab, s, _ in picked] == [("noise=0.0, lb=0.01", 42), ("noise=0.1, lb=0.01", 42),
                                                 ("noise=0.5, lb=0.01", 43)]  # smallest ok seed, not file order
    fig = R.expert_load_figure(df)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(fig.axes) == 3 + 1 and len(images) == 3  # one panel per condition and the colour bar
    for img, (n, s) in zip(images, [(0.0, 42), (0.1, 42), (0.5, 43)]):
        assert img.get_array().shape == (2, 4)  # layers x experts
        assert np.asarray(img.get_array()) == pytest.approx(loads[n, s] * 4, abs=1e-5)  # share x E
    plt.close(fig)
    pngs = R.write_plots(path)
    assert pngs[-1].name == "r_expert_load.png"
    img = assert_drawn_png(pngs[-1])
    assert img.shape[1] > img.shape[0]  # three panels side by side
    assert "![Expert load per layer (smallest ok seed of each condition)](r_expert_load.png)" in \
        R.write_report(path).read_text()
    assert R.expert_loads(df.assign(expert_load_per_layer="0.5;0.5|0.2")) == []  # ragged: unreadable, skipped


def test_old_csv_without_routing_columns_still_reports(tmp_path):
    rows = factorial_rows()
    path = write_csv(tmp_path / "old.csv", rows, old=True)
    assert "routing_entropy" not in pd.read_csv(path).columns
    text = R.write_report(path).read_text()
    routing = text.split("## Routing")[1].split("## Diverged")[0]
    assert "| Condition | CV |\n" in routing and "Max/mean load" not in routing
    assert ("Not available in this CSV (written before these were recorded, or no ok run has them): max/mean load, "
            "entropy, dead fraction, per-expert load.") in routing
    assert "Expert-load heat map not drawn" in text and not (tmp_path / "old_expert_load.png").exists()
    assert "### Expert-usage CV" in text  # the contrasts do not need the new columns
    assert [p.name for p in R.write_plots(path)] == ["old_perplexity.png", "old_expert_cv.png"]
    # the original columns stay required
    pd.read_csv(path).drop(columns="expert_usage_cv_per_layer").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="expert_usage_cv_per_layer"):
        R.write_report(tmp_path / "bad.csv")


def test_summary_and_report_say_sample_std(main_csv, capsys):
    R.print_summary(main_csv)
    out = capsys.readouterr().out
    header, first = out.strip().splitlines()[:2]
    assert "best val ppl ± sample std" in header
    x = pd.read_csv(main_csv).query("noise_std == 0 and load_balancing_weight == 0.01").best_val_perplexity
    assert f"{x.mean():.2f} ± {x.std(ddof=1):.2f}" in first and f"± {x.std(ddof=0):.2f}" not in first
    assert "(mean ± sample std over seeds" in R.write_report(main_csv).read_text()


def test_rows_from_before_later_fields_pool_with_rows_at_their_defaults(tmp_path):
    # A CSV resumed across versions: seed 44's rows were written with the fields added later, at their defaults;
    # the others predate them. They are the same setup (llm.config_hash agrees) and must stay one condition each.
    rows = sweep_rows([0, 0.2, 14, 0.1, 0.3, 0.2])
    for r in rows:
        cfg = {"d_model": 64, "noise_std": r["noise_std"], "load_balancing_weight": r["load_balancing_weight"],
               "seed": r["seed"], **(R.LATER_FIELDS if r["seed"] == 44 else {})}
        r["config_json"] = json.dumps(cfg)
    df = R._read_results(write_csv(tmp_path / "mixed.csv", rows))
    assert R.condition_columns(df) == ["noise_std", "load_balancing_weight"]
    assert R.condition_table(df)["n"].tolist() == [3] * 6
    # A field that only some rows recorded (and that is not a later field) is a level of its own, never NaN:
    # no run drops out of the tables or the contrasts.
    for r in rows:
        r["config_json"] = json.dumps({**json.loads(r["config_json"]), **({"max_steps": 100} if r["seed"] == 42
                                                                           else {})})
    df = R._read_results(write_csv(tmp_path / "partial.csv", rows))
    assert set(df["max_steps"]) == {100, R.NOT_RECORDED}
    assert R.condition_table(df)["n"].sum() == len(rows)
