"""llm.py from the command line, in subprocesses: the smoke sweep end to end, resume after a kill, the
token cache, offline behaviour, one-line errors for bad input, dry run and the benchmark's JSON."""
import csv
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llm

FIRST_TEN = ["seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
             "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv"]
CSV_NAME = "moe_routing_noise_experiment_results.csv"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.mark.slow
def test_smoke_preset_runs_the_full_sweep_and_writes_csv_and_report(run_llm, tmp_path):
    proc = run_llm("--preset", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "= 18 runs" in proc.stdout
    with open(tmp_path / CSV_NAME, newline="") as f:
        header = next(csv.reader(f))
    assert header[:10] == FIRST_TEN
    rows = read_rows(tmp_path / CSV_NAME)
    assert len(rows) == 18 and len({r["config_hash"] for r in rows}) == 18
    assert {(float(r["noise_std"]), float(r["load_balancing_weight"]), int(r["seed"])) for r in rows} == {
        (n, w, s) for n in (0.0, 0.1, 0.5) for w in (0.01, 0.0) for s in (42, 43, 44)}
    for r in rows:
        assert r["status"] == "ok"
        for col in FIRST_TEN[3:]:
            assert math.isfinite(float(r[col])), (col, r[col])
        assert 0 < float(r["val_accuracy"]) < 1 and float(r["peak_memory_gb"]) > 0
        assert float(r["best_val_perplexity"]) <= float(r["val_perplexity"]) + 1e-9
        assert len(r["expert_usage_cv_per_layer"].split(";")) == 2
    # Paired seeds: the same seed starts from the same weights, so runs of a seed differ only by routing.
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r["val_loss"])
    assert all(len(v) > 1 for v in by_seed.values())
    # A balancing loss on keeps expert usage more even than off, averaged over the sweep.
    cv_on = np.mean([float(r["expert_usage_cv"]) for r in rows if float(r["load_balancing_weight"]) > 0])
    cv_off = np.mean([float(r["expert_usage_cv"]) for r in rows if float(r["load_balancing_weight"]) == 0])
    assert cv_on < cv_off
    assert (tmp_path / "experiment_analysis.md").exists()
    assert "best val ppl" in proc.stdout  # the per-condition summary
    runs_dir = tmp_path / "moe_routing_noise_experiment_results_runs"
    assert len(list(runs_dir.glob("*/metrics.jsonl"))) == 18


@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicates(tmp_path, smoke_fast):
    args = [sys.executable, str(llm.HERE / "llm.py"), *smoke_fast, "--max-steps", "40", "--noise-std", "0.0",
            "0.5", "--lb-weight", "0.01", "--out", "r.csv"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    out = tmp_path / "r.csv"
    while time.time() < deadline and not (out.exists() and len(read_rows(out)) >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_rows(out))
    assert 1 <= done < 6, "the sweep finished before it could be killed; make it longer"
    # A torn last line, as from a writer killed mid-write, must not break the resume.
    with open(out, "a") as f:
        f.write("42,0.5,0.01,3.1")
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{done} of 6 runs already done" in again.stdout
    rows = [r for r in read_rows(out) if r.get("status")]
    keys = [(r["noise_std"], r["seed"]) for r in rows]
    assert len(rows) == 6 and len(set(keys)) == 6
    third = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "6 of 6 runs already done" in third.stdout
    assert len([r for r in read_rows(out) if r.get("status")]) == 6


def test_dry_run_prints_every_run_and_trains_nothing(run_llm, tmp_path):
    proc = run_llm("--dry-run", "--max-steps", "123")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert len(lines) == 18 and "18 runs" in proc.stdout
    cfg = json.loads(lines[-1].split(": ", 1)[1])
    assert cfg["max_steps"] == 123 and cfg["noise_std"] == 0.5 and cfg["seed"] == 44
    assert not (tmp_path / CSV_NAME).exists() and not (tmp_path / "data_cache").exists()


def test_preset_values_yield_to_explicit_flags(run_llm):
    proc = run_llm("--preset", "smoke", "--d-model", "96", "--seeds", "1", "--noise-std", "0", "--lb-weight", "0",
                   "--dry-run")
    cfg = json.loads(proc.stdout.splitlines()[-1].split(": ", 1)[1])
    assert cfg["d_model"] == 96 and cfg["n_layers"] == 2 and cfg["tokenizer"] == "bytes"


@pytest.mark.parametrize("args,words", [
    (["--d-model", "100"], ["--d-model 100", "--n-heads"]),
    (["--expert-top-k", "9"], ["--expert-top-k 9", "--num-experts 8"]),
    (["--noise-std", "0.1", "-0.5"], ["--noise-std"]),
    (["--lb-weight", "-1"], ["--lb-weight"]),
    (["--dropout", "1.5"], ["--dropout"]),
    (["--grid", "not_a_field=1,2"], ["not_a_field"]),
    (["--grid", "expert_top_k=one"], ["int"]),
    (["--grid", "log_every=1,2"], ["--log-every"]),
    (["--seeds", "42", "42"], ["seed", "twice"]),
    (["--noise-std", "inf"], ["--noise-std", "finite"]),
    (["--seeds", "-3"], ["--seeds"]),
    (["--out", "."], ["--out", "folder"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--bench", "--bench-out", "no/such/dir/b.json"], ["--bench-out"]),
])
def test_bad_config_is_one_line_exit_2(run_llm, smoke_fast, args, words):
    assert_one_line_error(run_llm(*smoke_fast, *args), *words)


def test_bench_steps_must_be_positive(run_llm):
    proc = run_llm("--bench", "--bench-steps", "0")
    assert proc.returncode == 2 and "--bench-steps" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_data_is_one_line_exit_2_and_keeps_the_csv(run_llm, tmp_path, smoke_fast):
    existing = tmp_path / "keep.csv"
    existing.write_text("precious results\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A few words only.\n\nAnd another short line.\n")
    (tmp_path / "table.jsonl").write_text('{"body": "no text column here"}\n')
    cases = [(["--data-files", "missing.txt"], ["not found", "missing.txt"]),
             (["--data-files", "empty.txt"], ["empty", "empty.txt"]),
             (["--data-files", "short.txt"], ["too few", "--batch-size"]),
             (["--data-files", "table.jsonl"], ["'text'"])]
    for args, words in cases:
        assert_one_line_error(run_llm(*smoke_fast, "--out", "keep.csv", *args), *words)
    assert existing.read_text() == "precious results\n"


def test_csv_with_other_columns_is_not_appended_to(run_llm, tmp_path, smoke_fast):
    (tmp_path / "r.csv").write_text("a,b,c\n1,2,3\n")
    proc = run_llm(*smoke_fast, "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "r.csv")
    assert_one_line_error(proc, "--fresh")
    assert (tmp_path / "r.csv").read_text() == "a,b,c\n1,2,3\n"
    proc = run_llm(*smoke_fast, "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "r.csv", "--fresh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    backups = list(tmp_path.glob("r.*.bak.csv"))
    assert len(backups) == 1 and backups[0].read_text() == "a,b,c\n1,2,3\n"
    assert len(read_rows(tmp_path / "r.csv")) == 1


def test_offline_without_cache_fails_fast_naming_the_offline_options(run_llm):
    start = time.time()
    proc = run_llm("--max-steps", "1", env={"HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)
    assert time.time() - start < 15
    assert_one_line_error(proc, "--data-files", "--tokenizer", "--preset smoke")


def test_token_cache_is_npy_with_sidecar_and_is_reused_offline(tmp_path, monkeypatch, run_llm, smoke_fast):
    # Build the cache for the hub dataset in process, with the documents coming from the sample corpus instead
    # of the network: load_and_cache_data writes it exactly as a real download would.
    cfg = llm.MoEModelConfig(tokenizer="bytes", num_documents=1000, max_tokens=100_000,
                             cache_dir=str(tmp_path / "data_cache"))
    docs = [d for d in llm.SAMPLE_CORPUS.read_text().split("\n\n") if d.strip()]
    monkeypatch.setattr(llm, "_iter_documents", lambda c, files: iter(docs))
    tokens, meta = llm.load_and_cache_data(cfg, quiet=True)
    cached = sorted(p.name for p in (tmp_path / "data_cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".npy")
    sidecar = json.loads((tmp_path / "data_cache" / cached[0]).read_text())
    assert sidecar["key"]["dataset"] == "HuggingFaceTB/smollm-corpus" and sidecar["n_tokens"] == len(tokens)
    # The CLI now trains on the hub dataset with no network at all (the hub address points nowhere).
    proc = run_llm("--tokenizer", "bytes", "--num-documents", "1000", "--max-tokens", "100000", "--d-model", "64",
                   "--n-heads", "4", "--n-layers", "2", "--d-ff", "128", "--batch-size", "8", "--max-seq-len", "64",
                   "--max-steps", "5", "--eval-every", "5", "--eval-steps", "4", "--seeds", "42", "--noise-std", "0",
                   "--lb-weight", "0", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cached[1] in proc.stdout


def test_corrupt_or_mismatched_cache_is_rebuilt_with_a_warning(run_llm, tmp_path, smoke_fast):
    args = (*smoke_fast, "--max-steps", "5", "--seeds", "42", "--noise-std", "0", "--lb-weight", "0")
    first = run_llm(*args, "--out", "a.csv")
    assert first.returncode == 0, first.stderr[-2000:]
    npy = next((tmp_path / "data_cache").glob("*.npy"))
    good = npy.read_bytes()
    npy.write_bytes(b"not a numpy file")
    second = run_llm(*args, "--out", "b.csv")
    assert second.returncode == 0 and "rebuilding" in second.stderr
    assert npy.read_bytes() == good
    sidecar = npy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["n_tokens"] += 1
    sidecar.write_text(json.dumps(meta))
    third = run_llm(*args, "--out", "c.csv")
    assert third.returncode == 0 and "rebuilding" in third.stderr
    assert json.loads(sidecar.read_text())["n_tokens"] == meta["n_tokens"] - 1
    assert not list((tmp_path / "data_cache").glob("*.pkl"))
    # Same data, same seed, same config: identical numbers each time.
    vals = [read_rows(tmp_path / n)[0]["val_loss"] for n in ("a.csv", "b.csv", "c.csv")]
    assert len(set(vals)) == 1


def test_bench_writes_json_with_the_original_and_the_dense_ceiling(run_llm, tmp_path):
    proc = run_llm("--bench", "--device", "cpu", "--vocab-size", "512", "--d-model", "32", "--n-heads", "4",
                   "--n-layers", "1", "--d-ff", "64", "--batch-size", "2", "--max-seq-len", "32", "--bench-steps", "2",
                   "--gradient-accumulation-steps", "2", "--bench-out", "b.json",
                   env={"LLM_COMPILE_BACKEND": "aot_eager"})  # the original's compiled Newton-Schulz, cheaply
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert [r["impl"] for r in res["impls"]] == ["this project", "original", "dense"]
    ours, orig, dense = res["impls"]
    assert res["speedup"] == pytest.approx(ours["tokens_per_s"] / orig["tokens_per_s"])
    assert res["dense_ratio"] == pytest.approx(ours["tokens_per_s"] / dense["tokens_per_s"])
    assert res["gradient_accumulation_steps"] == 2 and res["tokens_per_step"] == 2 * 64  # whole updates
    assert orig["dtype"] == "float32"  # on CPU the original's CUDA-only autocast did nothing
    for r in res["impls"]:
        assert set(r) >= {"impl", "device", "dtype", "step_ms", "tokens_per_s", "tflops", "mfu", "peak_mem_gb",
                          "warmup_s"}
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(128 / (r["step_ms"] / 1e3))
        assert r["device"].startswith("cpu (") and "threads)" in r["device"]  # which CPU took the timing
    assert "speed-up over the original" in proc.stdout and "dense" in proc.stdout
    assert "warning:" not in proc.stderr  # every side ran its intended path, none fell back


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_local_data_files_of_each_kind_are_read_as_documents(tmp_path, kind):
    import pandas as pd
    docs = [d for d in llm.SAMPLE_CORPUS.read_text().split("\n\n") if d.strip()][:10]
    path = tmp_path / f"docs.{kind}"
    if kind == "jsonl":
        pd.DataFrame({"text": docs, "id": range(10)}).to_json(path, orient="records", lines=True)
    elif kind == "parquet":
        pd.DataFrame({"text": docs}).to_parquet(path)
    else:
        path.write_text("\n\n".join(docs) + "\n")
    cfg = llm.MoEModelConfig(tokenizer="bytes", data_files=(str(path),), num_documents=4,
                             cache_dir=str(tmp_path / "cache"))
    tokens, meta = llm.load_and_cache_data(cfg, quiet=True)
    expected = b"".join(d[:llm.DOC_CHARS].encode() for d in docs[:4])
    assert meta["n_documents"] == 4 and bytes(tokens.astype(np.uint8)) == expected


def test_report_flag_rebuilds_the_report_from_a_csv(run_llm, tmp_path, smoke_fast):
    made = run_llm(*smoke_fast, "--max-steps", "5", "--seeds", "42", "43", "--noise-std", "0", "0.5",
                   "--lb-weight", "0.01", "--out", "mine.csv")
    assert made.returncode == 0, made.stderr[-2000:]
    report = tmp_path / "mine_analysis.md"
    report.unlink()
    proc = run_llm("--report", "mine.csv")
    assert proc.returncode == 0 and report.exists()
    assert "noise=0.5, lb=0.01" in report.read_text()
    assert_one_line_error(run_llm("--report", "nope.csv"), "nope.csv")


def test_a_csv_holding_two_setups_is_not_pooled(run_llm, tmp_path, smoke_fast):
    args = (*smoke_fast, "--max-steps", "4", "--eval-every", "4", "--seeds", "42", "43", "--noise-std", "0", "0.5",
            "--lb-weight", "0.01", "--out", "mix.csv")
    assert run_llm(*args).returncode == 0
    second = run_llm(*args[:-2], "--max-steps", "6", "--out", "mix.csv")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "also holds 4 run(s) of other setups" in second.stdout
    summary = second.stdout.split("results: mix.csv", 1)[1].splitlines()
    rows = [line.split() for line in summary if line.startswith("noise=")]
    assert [r[:3] for r in rows] == [["noise=0.0,", "lb=0.01", "2"], ["noise=0.5,", "lb=0.01", "2"]]
    report = (tmp_path / "mix_analysis.md").read_text()
    assert "| noise=0.0, lb=0.01, max_steps=4 | 2 |" in report and "| noise=0.0, lb=0.01, max_steps=6 | 2 |" in report


def test_random_tokens_train_offline_for_timing(run_llm, tmp_path):
    proc = run_llm("--dataset", "random", "--max-tokens", "40000", "--vocab-size", "300", "--d-model", "32",
                   "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--batch-size", "4", "--max-seq-len", "32",
                   "--max-steps", "3", "--eval-every", "3", "--seeds", "1", "--noise-std", "0", "--lb-weight", "0",
                   "--out", "r.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = read_rows(tmp_path / "r.csv")[0]
    assert row["status"] == "ok" and float(row["val_loss"]) > 5  # about ln(300): nothing to learn
    assert not (tmp_path / "data_cache").exists()


def test_local_tokenizer_folder_works_offline(run_llm, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    docs = [d for d in llm.SAMPLE_CORPUS.read_text().split("\n\n") if d.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "tok")
    proc = run_llm("--preset", "smoke", "--tokenizer", "tok", "--max-steps", "3", "--eval-every", "3",
                   "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "t.csv",
                   env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = read_rows(tmp_path / "t.csv")[0]
    assert json.loads(row["config_json"])["vocab_size"] == 400 and row["status"] == "ok"
