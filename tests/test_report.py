"""report.py: reading a results CSV (conditions from config_json and the data hash, duplicates
refused, non-finite losses as divergences), the statistics (main effects and interactions paired by
seed, one Holm family per metric, detectable differences) checked against scipy.stats computed
directly, the verdict wording of summary()/summary_text() and the markdown report, and the command
line.

Every CSV is made from one real row of a smoke run of llm.py (run once per session), copied and
edited: the config values and metrics of each copy are set by the test, so the expected statistics
are known."""
import csv
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import report as R

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(150)  # the first test also runs the session's smoke run
# CONTRACT.md's column order
COLUMNS = list(R.FIRST_COLUMNS) + [
    "status", "diverged_step", "steps", "train_tokens", "tokens_per_s",
    "expert_usage_cv_worst_layer", "dead_expert_fraction", "expert_load_max_mean",
    "routing_entropy", "expert_usage_cv_per_layer",
    "dead_expert_fraction_per_layer", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
    "expert_load_per_layer", "train_expert_usage_cv_worst_layer", "train_dead_expert_fraction",
    "device", "dtype", "run_id", "config_hash", "data", "data_sha256", "config_json"]
SEEDS = (42, 43, 44)
SEED_EFFECT = {42: 0.0, 43: 0.03, 44: -0.02, 45: 0.01}
NOISE, LB = (0.0, 0.1, 0.5), (0.01, 0.0)


def to_contract(row: dict) -> dict:
    """A row of llm.py in CONTRACT.md's layout: columns the llm.py of this checkout does not write
    yet are added (the worst layer's CV from the per-layer list), others dropped, config_json
    without cache_dir, log_every and data_files. A row already in that layout keeps its values."""
    cfg = {k: v for k, v in json.loads(row["config_json"]).items()
           if k not in ("cache_dir", "log_every", "data_files")}
    worst = max(float(x) for x in row["expert_usage_cv_per_layer"].split(";"))
    corpus = hashlib.sha256((ROOT / "data_cache" / "sample_corpus.txt").read_bytes()).hexdigest()
    added = {"expert_usage_cv_worst_layer": worst, "train_expert_usage_cv_worst_layer": 0.8 * worst,
             "train_dead_expert_fraction": 0.0, "data": "files: sample_corpus.txt",
             "data_sha256": corpus}
    return {**{c: row.get(c, added.get(c, "")) for c in COLUMNS}, "config_json": json.dumps(cfg)}


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """One real row of a 5-step smoke run of llm.py, in CONTRACT.md's layout."""
    d = tmp_path_factory.mktemp("smoke")
    here = ROOT
    if "from report import" in (ROOT / "llm.py").read_text():
        # the llm.py from before its rewrite imports the old report.py's constants: run it beside
        # that report.py (delete this branch once the rewritten llm.py is merged)
        here = d / "old"
        (here / "data_cache").mkdir(parents=True)
        shutil.copy(ROOT / "llm.py", here)
        shutil.copy(ROOT / "data_cache" / "sample_corpus.txt", here / "data_cache")
        old = subprocess.run(["git", "-C", str(ROOT), "show", "724aaf3:report.py"],
                             capture_output=True, text=True, check=True).stdout
        (here / "report.py").write_text(old)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(d / "hf"),
           "HOME": str(d), "PYTHONUNBUFFERED": "1"}
    out = d / "smoke.csv"
    args = ["--preset", "smoke", "--max-steps", "5", "--eval-every", "5", "--log-every", "5",
            "--noise-std", "0", "--lb-weight", "0.01", "--seeds", "42", "--out", str(out)]
    done = subprocess.run([sys.executable, str(here / "llm.py"), *args],
                          cwd=d, env=env, capture_output=True, text=True, timeout=140)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    with open(out, newline="") as f:
        return to_contract(next(csv.DictReader(f)))


def run(seed, val_loss, noise=0.0, lb=0.01, best=None, **extra):
    """One run: its config values (noise, lb and `config`) and metrics; the rest from a template."""
    return {"seed": seed, "noise_std": noise, "load_balancing_weight": lb, "val_loss": val_loss,
            "best": val_loss - 0.01 if best is None else best, **extra}


def make_csv(path, template, runs, columns=COLUMNS):
    """Write `runs` (see run()) as rows of the template, in `columns`."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(runs):
            cfg = {**json.loads(template["config_json"]), "noise_std": r["noise_std"],
                   "load_balancing_weight": r["load_balancing_weight"], "seed": r["seed"],
                   **r.get("config", {})}
            ppl = lambda x: math.exp(x) if math.isfinite(x) else x
            row = {**template, "seed": r["seed"], "noise_std": r["noise_std"],
                   "load_balancing_weight": r["load_balancing_weight"], "val_loss": r["val_loss"],
                   "val_perplexity": ppl(r["val_loss"]), "best_val_perplexity": ppl(r["best"]),
                   "run_id": f"run{i:03d}", "config_hash": f"{i:016x}",
                   "config_json": json.dumps(cfg), **r.get("columns", {})}
            w.writerow(row)
    return path


def factorial(effect, seeds=SEEDS, jitter=0.002, rng_seed=0, **extra):
    """noise x lb x seeds; val_loss = 4 + seed effect + effect(noise, lb) + jitter."""
    rng = np.random.default_rng(rng_seed)
    return [run(s, 4.0 + SEED_EFFECT[s] + effect(n, lb) + rng.normal(0, jitter), n, lb, **extra)
            for lb in LB for n in NOISE for s in seeds]


def holm_loop(p):
    """Holm's adjusted p-values by an independent loop over the sorted p-values."""
    p = np.asarray(p, float)
    adj, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(np.argsort(p)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def cells(rows, key="val_loss"):
    """(noise, lb) -> {seed: value} from run() dicts."""
    out = {}
    for r in rows:
        v = math.log(math.exp(r["best"])) if key == "best" else r[key]
        out.setdefault((r["noise_std"], r["load_balancing_weight"]), {})[r["seed"]] = v
    return out


def expected_contrasts(c, seeds):
    """label -> per-seed values of each main effect and interaction, by hand from the cells."""
    a = lambda n, lb: np.array([c[n, lb][s] for s in seeds])
    out = {}
    for n in (0.1, 0.5):
        out[f"noise_std {n} vs 0.0"] = (a(n, 0.01) - a(0.0, 0.01) + a(n, 0.0) - a(0.0, 0.0)) / 2
    out["load_balancing_weight 0.0 vs 0.01"] = sum(a(n, 0.0) - a(n, 0.01) for n in NOISE) / 3
    for n in (0.1, 0.5):
        out[f"noise_std {n} vs 0.0 x load_balancing_weight 0.0 vs 0.01"] = \
            (a(n, 0.0) - a(0.0, 0.0)) - (a(n, 0.01) - a(0.0, 0.01))
    return out


# ------------------------------------------------------------------------------------------------
# Statistics against scipy

def test_contrasts_match_ttest_rel_and_holm(tmp_path, template):
    effect = lambda n, lb: 0.05 * (n == 0.5) + 0.02 * (lb == 0.0) + 0.03 * (n == 0.5) * (lb == 0.0)
    rows = factorial(effect, seeds=(42, 43, 44, 45))
    path = make_csv(tmp_path / "f.csv", template, rows)
    s = R.summary(path)
    expected = expected_contrasts(cells(rows), (42, 43, 44, 45))
    assert [v.contrast for v in s.verdicts] == list(expected)
    raw = []
    for v in s.verdicts:
        d = expected[v.contrast]
        ref = stats.ttest_rel(d, np.zeros_like(d))
        ci = ref.confidence_interval(0.95)
        assert (v.n, v.effect, v.ci_low, v.ci_high) == pytest.approx((4, d.mean(), ci.low, ci.high))
        assert v.metric == "val_loss" and v.ci_adjusted is False
        raw.append(ref.pvalue)
    assert [v.p_adjusted for v in s.verdicts] == pytest.approx(holm_loop(raw))
    words = {v.contrast: v.word for v in s.verdicts}
    assert words["noise_std 0.5 vs 0.0"] == words["load_balancing_weight 0.0 vs 0.01"] == "worse"
    assert words["noise_std 0.1 vs 0.0"] == "no detectable difference"
    assert words["noise_std 0.5 vs 0.0 x load_balancing_weight 0.0 vs 0.01"] == "worse"
    # the secondary metric is the log of the best perplexity, with its own family of the same size
    best = R.contrast_table(R.read_design(path), R.BEST)
    e = expected_contrasts(cells(rows, "best"), (42, 43, 44, 45))
    assert best["effect"].tolist() == pytest.approx([e[k].mean() for k in e])


def test_a_missing_or_diverged_seed_leaves_only_the_contrasts_that_need_it(tmp_path, template):
    rows = factorial(lambda n, lb: 0.0)
    rows = [r for r in rows
            if (r["noise_std"], r["load_balancing_weight"], r["seed"]) != (0.1, 0.0, 43)]
    path = make_csv(tmp_path / "m.csv", template, rows)
    n = {v.contrast: v.n for v in R.summary(path).verdicts}
    assert n["noise_std 0.5 vs 0.0"] == 3 and n["noise_std 0.1 vs 0.0"] == 2
    assert n["load_balancing_weight 0.0 vs 0.01"] == 2
    assert n["noise_std 0.5 vs 0.0 x load_balancing_weight 0.0 vs 0.01"] == 3
    text = R.write_report(path).read_text()
    assert "noise_std=0.1, load_balancing_weight=0.0: 42, 44 ok" in text  # seeds stated truthfully


def test_holm_counts_untested_contrasts_in_the_family():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.1, 7)
    assert R.holm(p) == pytest.approx(holm_loop(p))
    with_nan = np.append(p, np.nan)
    got = R.holm(with_nan)
    assert math.isnan(got[-1]) and got[:-1] == pytest.approx(holm_loop(np.append(p, 1.0))[:-1])


@pytest.mark.parametrize("n, alpha", [(3, 0.01), (6, 0.05)])
def test_detectable_difference_has_80_percent_power(n, alpha):
    delta = R.detectable_difference(n, 2.0, alpha)
    rng = np.random.default_rng(n)
    x = rng.normal(delta, 2.0, (60_000, n))  # a true difference of delta, sd 2
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    power = (2 * stats.t.sf(np.abs(t), n - 1) < alpha).mean()
    assert power == pytest.approx(0.8, abs=0.01)
    assert R.detectable_difference(n + 3, 2.0, alpha) < delta
    assert math.isnan(R.detectable_difference(1, 2.0, alpha))
    assert math.isnan(R.detectable_difference(n, 0.0, alpha))


# ------------------------------------------------------------------------------------------------
# One item of the statistics review each

def test_one_significant_contrast_is_worded_not_a_tuple(tmp_path, template):
    path = make_csv(tmp_path / "one.csv", template, factorial(lambda n, lb: 0.2 * (lb == 0.0)))
    s = R.summary(path)
    assert [v.word for v in s.verdicts].count("worse") == 1
    (v,) = [v for v in s.verdicts if v.word == "worse"]
    assert v.contrast == "load_balancing_weight 0.0 vs 0.01" and v.factor == "load_balancing_weight"
    text = R.summary_text(s) + R.write_report(path).read_text()
    assert "('" not in text and "',)" not in text
    line = R.verdict_line(v, 0.05)
    assert v.effect == pytest.approx(0.2, abs=0.01) and v.n == 3
    assert line.startswith(f"load_balancing_weight 0.0 vs 0.01: {v.effect:+.3g} (higher loss), ")
    assert f"- {line}" in text and line in R.summary_text(s)


def test_duplicate_condition_and_seed_is_refused(tmp_path, template):
    rows = factorial(lambda n, lb: 0.0)
    path = make_csv(tmp_path / "dup.csv", template, rows + [rows[4]])
    with pytest.raises(R.ReportError) as e:
        R.summary(path)
    msg = str(e.value)
    assert "\n" not in msg and "noise_std=0.1, load_balancing_weight=0.01, seed 43" in msg
    assert "lines 6, 20" in msg
    assert R.main([str(path)]) == 2


def test_two_corpora_are_two_conditions(tmp_path, template):
    rows = factorial(lambda n, lb: 0.0)
    other = {"data": "files: other.txt", "data_sha256": "b" * 64}
    rows += [{**r, "val_loss": r["val_loss"] + 0.5, "columns": other} for r in rows]
    path = make_csv(tmp_path / "two.csv", template, rows)
    d = R.read_design(path)
    assert list(d.factors) == ["noise_std", "load_balancing_weight", "data_sha256"]
    assert d.factors["data_sha256"] == [template["data_sha256"], "b" * 64]
    assert len(d.conditions) == 12 and d.runs.groupby("cond").size().eq(3).all()
    s = R.summary(path)
    data = [v for v in s.verdicts if v.factor == "data_sha256"]
    assert len(data) == 1 and data[0].effect == pytest.approx(0.5) and data[0].n == 3
    assert all(v.n == 3 for v in s.verdicts)
    text = R.write_report(path).read_text()
    assert "Data: files: sample_corpus.txt (sha256 " in text
    assert "; files: other.txt (sha256 bbbb" in text


def test_a_non_finite_loss_is_a_diverged_run(tmp_path, template):
    rows = factorial(lambda n, lb: 0.0)
    rows[3] = {**rows[3], "val_loss": math.inf}  # status "ok", but its loss is not finite
    rows[4] = {**rows[4], "columns": {"val_perplexity": "nan"}}
    rows[5] = {**rows[5], "columns": {"status": "diverged", "diverged_step": 3}}
    path = make_csv(tmp_path / "inf.csv", template, rows)
    s = R.summary(path)
    assert (s.n_rows, s.n_ok, s.n_diverged) == (18, 15, 3)
    assert {v.contrast: v.n for v in s.verdicts}["noise_std 0.1 vs 0.0"] == 0
    assert "too few to test" in R.summary_text(s)
    text = R.write_report(path).read_text()
    div = text.split("## Diverged runs")[1]
    assert ("| run003 | noise_std=0.1, load_balancing_weight=0.01 | 42 | val_loss is not finite "
            "(inf) |") in div
    assert "val_perplexity is not finite (nan)" in div and "status diverged at step 3" in div
    assert "identical" not in text


def test_one_family_per_metric_gives_one_verdict_everywhere(tmp_path, template):
    effect = lambda n, lb: 0.04 * (n == 0.5) + 0.01 * (lb == 0.0)
    rows = []
    for k, extra in ((2, 0.0), (1, 0.03)):  # a third factor: expert_top_k
        rows += [{**r, "val_loss": r["val_loss"] + extra, "best": r["best"] + extra,
                  "config": {"expert_top_k": k}} for r in factorial(effect, rng_seed=k)]
    path = make_csv(tmp_path / "three.csv", template, rows)
    s = R.summary(path)
    # main effects 2 + 1 + 1, interactions 2 (noise x lb) + 2 (noise x top_k) + 1 (lb x top_k)
    assert len(s.verdicts) == 9 and s.reference == {"noise_std": 0.0, "load_balancing_weight": 0.01,
                                                    "expert_top_k": 2}
    text = R.write_report(path).read_text()
    assert text.count("Holm over all 9 contrasts") == 1 and text.count("family of 9") == 2
    primary = text.split("## Primary analysis")[1].split("## Secondary")[0]
    for v in s.verdicts:
        row = next(x for x in primary.splitlines() if x.startswith(f"| {v.contrast} |"))
        assert f"| {R._p(v.p_adjusted)} |" in row and row.endswith(f"| {v.word} |")
        assert f"- {R.verdict_line(v, 0.05)}" in primary
    for metric in (R.PRIMARY, R.BEST):
        t = R.contrast_table(R.read_design(path), metric)
        assert len(t) == 9 and t["p_adjusted"].tolist() == pytest.approx(holm_loop(t["p"]))
        if metric is R.PRIMARY:
            assert t["p_adjusted"].tolist() == [v.p_adjusted for v in s.verdicts]


def test_signed_wording_never_says_larger_or_smaller(tmp_path, template):
    effect = lambda n, lb: -0.039 * (n == 0.5) + 0.039 * (lb == 0.0)
    path = make_csv(tmp_path / "signed.csv", template, factorial(effect, jitter=0.001))
    v = {v.contrast: v for v in R.summary(path).verdicts}
    noise, lb = v["noise_std 0.5 vs 0.0"], v["load_balancing_weight 0.0 vs 0.01"]
    assert noise.effect == pytest.approx(-0.039, abs=2e-3) and noise.word == "better"
    assert lb.effect == pytest.approx(0.039, abs=2e-3) and lb.word == "worse"
    assert R.verdict_line(noise, 0.05).startswith(
        f"noise_std 0.5 vs 0.0: -{abs(noise.effect):.3g} (lower loss), ")
    assert R.verdict_line(lb, 0.05).startswith(
        f"load_balancing_weight 0.0 vs 0.01: +{lb.effect:.3g} (higher loss), ")
    text = R.write_report(path).read_text()
    for word in ("larger", "smaller", "bigger"):
        assert word not in text


def test_every_claim_has_n_and_non_significant_ones_a_detectable_difference(tmp_path, template):
    rows = factorial(lambda n, lb: 0.1 * (n == 0.5), jitter=0.01)
    path = make_csv(tmp_path / "n.csv", template, rows)
    s = R.summary(path)
    expected = expected_contrasts(cells(rows), SEEDS)
    lines = R.summary_text(s).splitlines()[2:]
    assert len(lines) == 5
    for v, line in zip(s.verdicts, lines):
        assert f", n={v.n}, " in line and "unadjusted 95% CI" in line
        d = expected[v.contrast]
        if v.word == "no detectable difference":
            want = R.detectable_difference(3, d.std(ddof=1), 0.05 / 5)
            assert v.detectable == pytest.approx(want)
            assert f"smallest detectable difference {want:.3g}: no detectable difference" in line
        else:
            assert "detectable" not in line and v.contrast == "noise_std 0.5 vs 0.0"


def test_a_constant_difference_is_not_reported_as_evidence(tmp_path, template):
    # noise 0.5 adds exactly 0.25 on every seed (exact in binary): no spread to estimate
    rows = [run(s, 4.0 + 0.125 * i + 0.25 * (n == 0.5), n, lb)
            for lb in LB for n in NOISE for i, s in enumerate(SEEDS)]
    rows = [{**r, "val_loss": r["val_loss"] + 0.001 * (r["seed"] % 7) * (r["noise_std"] == 0.1)}
            for r in rows]  # noise 0.1 varies by seed
    path = make_csv(tmp_path / "const.csv", template, rows)
    v = {v.contrast: v for v in R.summary(path).verdicts}["noise_std 0.5 vs 0.0"]
    assert v.effect == 0.25 and v.n == 3 and math.isnan(v.p_adjusted) and math.isnan(v.ci_low)
    assert v.word == "no detectable difference"
    line = R.verdict_line(v, 0.05)
    assert "+0.25 (higher loss) on every one of the n=3 seeds: the seeds agree exactly" in line
    text = R.write_report(path).read_text()
    row = next(x for x in text.splitlines() if x.startswith("| noise_std 0.5 vs 0.0 |"))
    assert "the seeds agree exactly | not tested | not tested |" in row
    assert "0.25 to " not in text and "< 0.001" not in row


def test_balance_is_judged_per_layer_with_training_routing_beside(tmp_path, template):
    # the layer-summed CV is the same everywhere; the worst layer collapses without balancing loss
    rng = np.random.default_rng(3)
    worst = lambda lb: 0.4 + 0.6 * (lb == 0) + rng.normal(0, 0.01)
    rows = [{**r, "columns": {
        "expert_usage_cv": 0.3, "expert_usage_cv_worst_layer": worst(r["load_balancing_weight"]),
        "train_expert_usage_cv_worst_layer": 0.2, "dead_expert_fraction": 0.1}}
        for r in factorial(lambda n, lb: 0.0)]
    path = make_csv(tmp_path / "bal.csv", template, rows)
    d = R.read_design(path)
    assert d.balance.column == "expert_usage_cv_worst_layer"
    t = R.contrast_table(d, d.balance).set_index("contrast")
    lb = t.loc["load_balancing_weight 0.0 vs 0.01"]
    assert lb.effect == pytest.approx(0.6, abs=0.02) and lb.p_adjusted < 0.05
    text = R.write_report(path).read_text()
    sec = text.split("## Secondary: worst layer's expert-usage CV")[1].split("## Routing")[0]
    assert "| load_balancing_weight 0.0 vs 0.01 | 3 | +0.6" in sec and "(less even routing)" in sec
    routing = text.split("## Routing")[1].split("## Diverged")[0]
    assert "| worst-layer CV, evaluation | worst-layer CV, training |" in routing
    assert "layer-summed CV (original's)" in routing and "Not in this CSV" not in routing
    # without the worst-layer column: the maximum of the per-layer list; without both: dead fraction
    drop = [c for c in COLUMNS if c not in ("expert_usage_cv_worst_layer",
                                            "train_expert_usage_cv_worst_layer")]
    make_csv(tmp_path / "pl.csv", template, rows, drop)
    d = R.read_design(tmp_path / "pl.csv")
    worst = max(float(x) for x in template["expert_usage_cv_per_layer"].split(";"))
    assert d.balance.column == "worst_layer_cv" and d.runs["worst_layer_cv"].eq(worst).all()
    make_csv(tmp_path / "dead.csv", template, rows,
             [c for c in drop if c != "expert_usage_cv_per_layer"])
    assert R.read_design(tmp_path / "dead.csv").balance.column == "dead_expert_fraction"
    bare = [c for c in drop if c not in ("expert_usage_cv_per_layer", "dead_expert_fraction")]
    make_csv(tmp_path / "bare.csv", template, rows, bare)
    text = R.write_report(tmp_path / "bare.csv").read_text()
    assert "## Secondary: expert balance\n\nNot tested" in text
    assert "noise conditions show noise-free routing only" in text


# ------------------------------------------------------------------------------------------------
# The report, reading, the command line

def test_report_setup_pngs_and_reference(tmp_path, template):
    rows = factorial(lambda n, lb: 0.01 * n)
    rows = rows[3:] + rows[:3]  # the first condition in the file is noise 0.1: the reference
    path = make_csv(tmp_path / "rep.csv", template, rows)
    s = R.summary(path)
    assert s.reference == {"noise_std": 0.1, "load_balancing_weight": 0.01}
    assert s.verdicts[0].contrast == "noise_std 0.5 vs 0.1"
    report = R.write_report(path)
    assert report == tmp_path / "rep_analysis.md"
    text = report.read_text()
    assert "18 runs (18 ok, 0 diverged) in 6 condition(s)." in text
    assert "`noise_std` ∈ {0.1, 0.5, 0.0}" in text
    assert "Every condition has the seeds 42, 43, 44" in text
    assert "Data: files: sample_corpus.txt" in text and "`dataset=" not in text
    assert "Reference: noise_std=0.1, load_balancing_weight=0.01." in text
    import matplotlib.pyplot as plt
    for stem in ("loss", "balance", "expert_load"):
        png = tmp_path / f"rep_{stem}.png"
        assert f"]({png.name})" in text
        img = plt.imread(png)
        assert img.ndim == 3 and img[..., :3].std() > 0.05  # a drawing, not a blank figure


def test_single_condition_and_header_read_as_found(tmp_path, template):
    path = make_csv(tmp_path / "single.csv", template, [run(s, 4.0 + s / 100) for s in SEEDS],
                    COLUMNS[:10] + ["status", "config_json"])  # only what report.py requires
    s = R.summary(path)
    assert s.verdicts == [] and (s.n_rows, s.n_ok) == (3, 3)
    assert R.summary_text(s).endswith("A single condition: nothing to compare.")
    text = R.write_report(path).read_text()
    assert "Data: not recorded in this CSV" in text and "Not in this CSV, so not shown:" in text
    pd.read_csv(path).drop(columns="config_json").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(R.ReportError, match="missing column.*config_json"):
        R.summary(tmp_path / "bad.csv")


def test_a_torn_last_line_is_ignored_a_broken_one_refused(tmp_path, template):
    path = make_csv(tmp_path / "torn.csv", template, [run(s, 4.0 + s / 100) for s in SEEDS])
    lines = path.read_text().splitlines(keepends=True)
    inside = lines[-1][:lines[-1].index('"{') + 10]  # cut inside the quoted config_json
    before = lines[-1][:lines[-1].index('"{')]  # cut before it
    for torn in (inside, before):
        path.write_text("".join(lines) + torn)
        assert R.summary(path).n_rows == 3
    path.write_text("".join(lines[:2]) + inside + "\n" + lines[2])
    with pytest.raises(R.ReportError, match="cannot read .* as a results CSV") as e:
        R.summary(path)  # a line torn inside the quoted config_json swallows the next ones
    assert "\n" not in str(e.value)
    make_csv(path, template, [run(s, 4.0, columns={"config_json": "{not json"} if s == 43 else {})
                              for s in SEEDS])
    with pytest.raises(R.ReportError, match="line 3 has no readable config_json"):
        R.summary(path)


def test_cli(tmp_path, template, capsys):
    path = make_csv(tmp_path / "cli.csv", template, factorial(lambda n, lb: 0.0))
    assert R.main([str(path), "--summary", "--alpha", "0.01"]) == 0
    assert capsys.readouterr().out.strip() == R.summary_text(R.summary(path, 0.01))
    assert "alpha 0.01" in R.summary_text(R.summary(path, 0.01))
    assert R.main([str(path), "--alpha", "0.01"]) == 0
    assert "Unadjusted 99% CI" in (tmp_path / "cli_analysis.md").read_text()
    capsys.readouterr()
    for args in ([str(path), "--alpha", "2"], [str(tmp_path / "missing.csv")]):
        assert R.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
    bad = subprocess.run([sys.executable, str(ROOT / "report.py"), str(tmp_path / "missing.csv")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: results CSV not found: {tmp_path}/missing.csv"
