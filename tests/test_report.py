"""The sweep report (report.py, which llm.py runs after a sweep and for --report): per-condition statistics,
paired tests with Holm correction, plots and the markdown text, all from hand-made CSVs checked against
scipy.stats computed directly; and report.py's own command line."""
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
SEEDS = (42, 43, 44)
# Default sweep order: noise varies slowest within lb weight 0.01, then 0.0 (so lb is *not* sorted numerically).
CONDS = [(0.0, 0.01), (0.1, 0.01), (0.5, 0.01), (0.0, 0.0), (0.1, 0.0), (0.5, 0.0)]


def write_csv(path, rows, grid=()):
    """Write rows in the tool's CSV schema; unspecified fields get plausible defaults."""
    header = list(R.FIRST_COLUMNS) + list(grid) + list(R.TAIL_COLUMNS)
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
    # Holm by an independent loop
    p = np.array(expected_p)
    order = np.argsort(p)
    adj, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
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
        assert p.read_bytes()[:8] == PNG_SIG and p.stat().st_size > 5000
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
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIG


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
