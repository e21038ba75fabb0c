"""llm.py from the command line: the smoke sweep end to end (one shared run, its CSV checked column by column
and read back by report.py), resume (after SIGKILL, after Ctrl-C, across data edits and copies), diverged runs,
the token cache, offline behaviour (a refusing port, a silent server, a blackholed address), one-line errors
for bad input, dry run and the benchmark's JSON. Cases that cannot leave state behind run in process
(llm.main), the rest as real subprocesses."""
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import llm
from conftest import merge_smoke, sigint_default
import report

CSV_NAME = "moe_routing_noise_experiment_results.csv"
# Written out, not imported from report.py: a writer and a reader that agree with each other but not with
# this list (a column dropped, renamed or moved) must fail here.
EXPECTED_COLUMNS = [
    "seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
    "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv",
    "status", "diverged_step", "steps", "train_tokens", "tokens_per_s", "expert_usage_cv_worst_layer",
    "dead_expert_fraction", "expert_load_max_mean", "routing_entropy", "expert_usage_cv_per_layer",
    "dead_expert_fraction_per_layer", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
    "expert_load_per_layer", "train_expert_usage_cv_worst_layer", "train_dead_expert_fraction",
    "device", "dtype", "run_id", "config_hash", "data", "data_sha256", "config_json"]
RUN_ID = __import__("re").compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FIRST_TEN = EXPECTED_COLUMNS[:10]


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


def machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def cv(x):
    x = np.asarray(x, float)
    return x.std() / x.mean()


# ------------------------------------------------------------------------------------------------------------
# The smoke preset, run once for every test that only reads its outputs

@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """`llm.py --preset smoke` in a fresh folder, as a user runs it: (folder, CompletedProcess)."""
    where = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "HF_HOME": str(where / "hf_home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(llm.HERE / "llm.py"), "--preset", "smoke"], cwd=where, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return where, proc


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test to ask for the shared sweep pays for it (18 runs)
def test_smoke_preset_runs_the_full_sweep_and_writes_csv_and_report(smoke_sweep):
    where, proc = smoke_sweep
    assert "= 18 runs" in proc.stdout
    rows = read_rows(where / CSV_NAME)
    assert len(rows) == 18 and len({r["config_hash"] for r in rows}) == 18
    assert {(float(r["noise_std"]), float(r["load_balancing_weight"]), int(r["seed"])) for r in rows} == {
        (n, w, s) for n in (0.0, 0.1, 0.5) for w in (0.01, 0.0) for s in (42, 43, 44)}
    for r in rows:
        assert r["status"] == "ok" and r["diverged_step"] == ""
        for col in FIRST_TEN[3:]:
            assert math.isfinite(float(r[col])), (col, r[col])
        assert 0 < float(r["val_accuracy"]) < 1
        assert float(r["val_perplexity"]) == pytest.approx(math.exp(float(r["val_loss"])), rel=1e-9)
        # CPU: the process's peak resident memory, so torch alone puts it above 50 MB, and never above the machine.
        assert 0.05 < float(r["peak_memory_gb"]) < machine_memory_gb()
        assert float(r["best_val_perplexity"]) <= float(r["val_perplexity"]) + 1e-9
        assert int(r["steps"]) == 30 and int(r["train_tokens"]) == 30 * 8 * 64
        assert float(r["tokens_per_s"]) > 0 and float(r["training_time_minutes"]) > 0
    # Paired seeds: the same seed starts from the same weights, so runs of a seed differ only by routing.
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r["val_loss"])
    assert all(len(v) > 1 for v in by_seed.values())
    # A balancing loss on keeps expert usage more even than off, averaged over the sweep.
    cv_on = np.mean([float(r["expert_usage_cv"]) for r in rows if float(r["load_balancing_weight"]) > 0])
    cv_off = np.mean([float(r["expert_usage_cv"]) for r in rows if float(r["load_balancing_weight"]) == 0])
    assert cv_on < cv_off
    assert (where / "experiment_analysis.md").exists() and "report: " in proc.stdout
    assert "best val ppl" in proc.stdout  # the per-run lines
    runs_dir = where / "moe_routing_noise_experiment_results_runs"
    assert len(list(runs_dir.glob("*/metrics.jsonl"))) == 18


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_csv_has_exactly_the_documented_columns_each_well_formed(smoke_sweep, monkeypatch):
    where, _ = smoke_sweep
    with open(where / CSV_NAME, newline="") as f:
        header = next(csv.reader(f))
    assert header == EXPECTED_COLUMNS
    rows = read_rows(where / CSV_NAME)
    monkeypatch.chdir(where)  # config_json's cache_dir is relative to where the sweep ran
    tokens_sha = {}
    for r in rows:
        # Routing columns, recomputed from the per-layer load shares written in the same row (2 layers x 8
        # experts; every layer routes every token to top-k experts, so layers carry equal totals).
        share = np.array([[float(x) for x in layer.split(";")] for layer in r["expert_load_per_layer"].split("|")])
        assert share.shape == (2, 8) and (share >= 0).all()
        assert share.sum(axis=1) == pytest.approx([1, 1], abs=1e-4)
        per_layer = {c: [float(x) for x in r[c].split(";")] for c in (
            "expert_usage_cv_per_layer", "expert_load_max_mean_per_layer", "routing_entropy_per_layer",
            "dead_expert_fraction_per_layer")}
        entropy = -(share * np.log(np.where(share > 0, share, 1))).sum(axis=1) / math.log(8)
        expected = {"expert_usage_cv_per_layer": [cv(s) for s in share],
                    "expert_load_max_mean_per_layer": share.max(axis=1) * 8,
                    "routing_entropy_per_layer": entropy,
                    "dead_expert_fraction_per_layer": (share < 0.1 / 8).mean(axis=1)}
        for c, want in expected.items():
            assert per_layer[c] == pytest.approx(list(want), rel=1e-3, abs=1e-4), c
        assert float(r["expert_usage_cv"]) == pytest.approx(cv(share.sum(axis=0)), rel=1e-3, abs=1e-4)
        assert float(r["expert_usage_cv_worst_layer"]) == pytest.approx(max(per_layer["expert_usage_cv_per_layer"]),
                                                                       rel=1e-4)
        assert 0 <= float(r["train_dead_expert_fraction"]) <= 1 and float(r["train_expert_usage_cv_worst_layer"]) >= 0
        for c in ("expert_load_max_mean", "routing_entropy", "dead_expert_fraction"):
            assert float(r[c]) == pytest.approx(np.mean(per_layer[c + "_per_layer"]), rel=1e-4, abs=1e-6), c
        assert 1 <= float(r["expert_load_max_mean"]) <= 8 / 2 + 1e-6 and 0 < float(r["routing_entropy"]) <= 1
        # Where and how it ran, and which run it is.
        assert r["device"].startswith("cpu (") and r["device"].endswith(" threads)")
        assert r["dtype"] == "float32"  # the smoke preset turns autocast off
        assert len(r["config_hash"]) == 16 and int(r["config_hash"], 16) >= 0
        noise, lb = float(r["noise_std"]), float(r["load_balancing_weight"])
        assert r["run_id"].startswith(f"n{noise:g}_lb{lb:g}_s{r['seed']}_") and RUN_ID.match(r["run_id"])
        assert r["data"] == "files: sample_corpus.txt" and len(r["data_sha256"]) == 64
        cfg_dict = json.loads(r["config_json"])
        assert set(cfg_dict) == {f.name for f in dataclasses.fields(llm.MoEModelConfig)} - {
            "cache_dir", "log_every", "data_files"}  # every field that is a run's identity
        assert (cfg_dict["seed"], cfg_dict["noise_std"], cfg_dict["load_balancing_weight"]) == (int(r["seed"]), noise,
                                                                                                 lb)
        # config_json is the whole run: rebuilt into a config over the same tokens it hashes to the row's identity.
        cfg = llm.MoEModelConfig(**cfg_dict, data_files=(str(llm.sample_corpus()),))
        if "sha" not in tokens_sha:
            tokens_sha["sha"] = llm.load_and_cache_data(cfg, quiet=True)[1]["sha256"]
            assert tokens_sha["sha"] == r["data_sha256"]
        assert llm.config_hash(cfg, tokens_sha["sha"]) == r["config_hash"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_report_writes_a_report_from_the_real_smoke_csv(smoke_sweep, tmp_path):
    where, _ = smoke_sweep
    csv_path = tmp_path / "copy.csv"
    shutil.copy(where / CSV_NAME, csv_path)
    assert report.write_report(csv_path).exists()  # report.py reads the header it finds


# ------------------------------------------------------------------------------------------------------------
# Resume: after a kill, after Ctrl-C, across data edits; diverged runs

def _popen_sweep(tmp_path, args, **kw):
    return subprocess.Popen([sys.executable, str(llm.HERE / "llm.py"), *merge_smoke(args)], cwd=tmp_path, **kw)


def _wait_for_rows(path, n, proc, limit_s=120):
    deadline = time.time() + limit_s
    while time.time() < deadline and proc.poll() is None and not (path.exists() and len(read_rows(path)) >= n):
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_sweep_resumes_without_duplicates(tmp_path, smoke_fast):
    args = [*smoke_fast, "--max-steps", "10", "--noise-std", "0.0", "0.5", "--seeds", "42", "43", "--lb-weight",
            "0.01", "--out", "r.csv"]
    out = tmp_path / "r.csv"
    proc = _popen_sweep(tmp_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_rows(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_rows(out))
    assert 1 <= done < 4, "the sweep finished before it could be killed; make it longer"
    # A torn last line, as from a writer killed mid-write, must not break the resume.
    with open(out, "a") as f:
        f.write("42,0.5,0.01,3.1")
    cmd = [sys.executable, str(llm.HERE / "llm.py"), *merge_smoke(args)]
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{done} of 4 runs already done" in again.stdout
    rows = [r for r in read_rows(out) if r.get("status")]
    keys = [(r["noise_std"], r["seed"]) for r in rows]
    assert len(rows) == 4 and len(set(keys)) == 4
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert third.returncode == 0 and "4 of 4 runs already done" in third.stdout
    assert len([r for r in read_rows(out) if r.get("status")]) == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_mid_sweep_exits_130_keeping_finished_runs(tmp_path, smoke_fast):
    # 8 runs, so the sweep is still going when the signal lands even if this process is slow to send it.
    args = [*smoke_fast, "--max-steps", "10", "--noise-std", "0.0", "--seeds", *map(str, range(42, 50)),
            "--lb-weight", "0.01", "--out", "r.csv"]
    out = tmp_path / "r.csv"
    proc = _popen_sweep(tmp_path, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        preexec_fn=sigint_default)
    _wait_for_rows(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    rows = read_rows(out)
    assert 1 <= len(rows) < 8, "the sweep finished before Ctrl-C; make it longer"
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "finished runs are saved in r.csv" in err and "rerun the same command to resume" in err
    assert all(r["status"] == "ok" and math.isfinite(float(r["val_loss"])) for r in rows)  # complete rows only


@pytest.mark.timeout(180)  # several short runs
def test_resume_identity_follows_the_data_content_not_its_path(llm_main, tmp_path, smoke_fast):
    # Paragraphs without their trailing newline, so the documents read back are exactly these.
    docs = [d.strip() for d in llm.sample_corpus().read_text().split("\n\n") if d.strip()]
    data = tmp_path / "a.txt"
    data.write_text("\n\n".join(docs))
    args = (*smoke_fast, "--max-steps", "3", "--eval-every", "3", "--seeds", "42", "--noise-std", "0",
            "--lb-weight", "0", "--out", "r.csv")
    first = llm_main(*args, "--data-files", "a.txt")
    assert first.returncode == 0, first.stderr[-2000:]
    # Edit the file in place, keeping its size: the same documents in reverse order. Same flags, new data.
    edited = "\n\n".join(docs[::-1])
    assert len(edited) == len(data.read_text())
    time.sleep(0.01)  # a real edit comes later than the first write
    data.write_text(edited)
    second = llm_main(*args, "--data-files", "a.txt")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "already done" not in second.stdout  # not skipped as done: the data differ
    rows = read_rows(tmp_path / "r.csv")
    assert len(rows) == 2 and rows[0]["config_hash"] != rows[1]["config_hash"]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]
    # ...and its tokens are the edited file's, not the first file's cached ones.
    cfg = llm.MoEModelConfig(**{**llm.PRESETS["smoke"], "data_files": (str(data),),
                                "cache_dir": str(tmp_path / "data_cache")})
    tokens, _ = llm.load_and_cache_data(cfg, quiet=True)
    expected = b"".join(d[:llm.DOC_CHARS].encode() for d in docs[::-1])[:cfg.max_tokens]
    assert bytes(tokens.astype(np.uint8)) == expected
    # The same content at another path is the same run: skipped as done.
    (tmp_path / "copy").mkdir()
    shutil.copy(data, tmp_path / "copy" / "b.txt")
    third = llm_main(*args, "--data-files", "copy/b.txt")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "1 of 1 runs already done, 0 to go" in third.stdout
    assert len(read_rows(tmp_path / "r.csv")) == 2


def test_token_cache_follows_an_edit_of_the_data_file(tmp_path):
    docs = [d.strip() for d in llm.sample_corpus().read_text().split("\n\n") if d.strip()][:20]
    data = tmp_path / "a.txt"
    cfg = llm.MoEModelConfig(tokenizer="bytes", data_files=(str(data),), num_documents=20,
                             cache_dir=str(tmp_path / "cache"))
    for order in (docs, docs[::-1], docs):  # back to the first content: the cache must still not go stale
        data.write_text("\n\n".join(order))
        tokens, _ = llm.load_and_cache_data(cfg, quiet=True)
        assert bytes(tokens.astype(np.uint8)) == b"".join(d[:llm.DOC_CHARS].encode() for d in order)
        time.sleep(0.01)


@pytest.mark.timeout(180)  # several short runs
def test_diverged_run_is_recorded_counted_done_and_reported(llm_main, tmp_path, smoke_fast):
    # A Muon learning rate of 1e6 blows the weights up within a few updates (non-finite loss); 0.01 trains.
    args = (*smoke_fast, "--max-steps", "8", "--eval-every", "4", "--log-every", "1", "--seeds", "42",
            "--noise-std", "0", "--lb-weight", "0.01", "--grid", "muon_lr=0.01,1e6", "--out", "d.csv")
    first = llm_main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = {json.loads(r["config_json"])["muon_lr"]: r for r in read_rows(tmp_path / "d.csv")}
    ok, bad = rows[0.01], rows[1e6]
    assert ok["status"] == "ok" and math.isfinite(float(ok["val_loss"]))
    assert bad["status"] == "diverged"
    step = int(bad["diverged_step"])
    assert 1 <= step <= 8 and int(bad["steps"]) == step and int(bad["train_tokens"]) == step * 8 * 64
    for col in ("val_loss", "val_accuracy", "val_perplexity", "best_val_perplexity", "expert_usage_cv"):
        assert bad[col] == "nan", (col, bad[col])  # written, as nan, never as a number or a blank
    assert bad["run_id"] and bad["config_hash"] and json.loads(bad["config_json"])["muon_lr"] == 1e6
    # A rerun counts the diverged run as done and trains nothing.
    runs = tmp_path / "d_runs"
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")}
    again = llm_main(*args)
    assert again.returncode == 0 and "2 of 2 runs already done, 0 to go" in again.stdout
    assert len(read_rows(tmp_path / "d.csv")) == 2
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")} == before


# ------------------------------------------------------------------------------------------------------------
# Dry run and bad input: one line, exit 2, nothing lost

def test_dry_run_prints_every_run_and_trains_nothing(llm_main, tmp_path):
    proc = llm_main("--dry-run", "--max-steps", "123")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert len(lines) == 18 and "18 runs" in proc.stdout
    cfg = json.loads(lines[-1].split(": ", 1)[1])
    assert cfg["max_steps"] == 123 and cfg["noise_std"] == 0.5 and cfg["seed"] == 44
    assert not (tmp_path / CSV_NAME).exists() and not (tmp_path / "data_cache").exists()


def test_preset_values_yield_to_explicit_flags(llm_main):
    proc = llm_main("--preset", "smoke", "--d-model", "96", "--seeds", "1", "--noise-std", "0", "--lb-weight", "0",
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
    (["--grid", "expert_top_k=1,2,1"], ["expert_top_k", "twice"]),
    (["--noise-std", "0.1", "0.1"], ["noise_std", "twice"]),
    (["--seeds", "42", "42"], ["seed", "twice"]),
    (["--noise-std", "inf"], ["--noise-std", "finite"]),
    (["--seeds", "-3"], ["--seeds"]),
    (["--out", "."], ["--out", "folder"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--bench", "--bench-out", "no/such/dir/b.json"], ["--bench-out"]),
    (["--vocab-size", "100"], ["--vocab-size 100", "tokenizer"]),  # the byte tokenizer's ids reach 255
    (["--balancing", "bias", "--grid", "balancing=loss,bias"], ["--balancing", "--grid balancing", "keep one"]),
    (["--noise-std", "0", "--grid", "noise_std=0.01,0.05"], ["--noise-std", "--grid noise_std", "keep one"]),
    (["--seeds", "1", "--seeds", "2"], ["--seeds", "twice"]),
    (["--grid", "seed=1,2", "--grid", "seed=3"], ["--grid seed", "twice"]),
    (["--lb-weight", "0", "--grid", "lb_weight=1"], ["unknown field"]),
    (["--grid", "load-balancing-weight=0.1", "--lb-weight", "0"], ["--lb-weight", "keep one"]),
    (["--expert-top-k", "1", "2", "1"], ["expert_top_k", "twice"]),
])
def test_bad_config_is_one_line_exit_2(llm_main, smoke_fast, args, words):
    if args == ["--device", "cuda"] and llm.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(llm_main(*smoke_fast, *args), *words)


def test_bad_config_from_a_real_command_line_is_one_line_exit_2(run_llm, smoke_fast):
    # The cases above run llm.main in process; this one checks the exit status and stderr a shell sees.
    assert_one_line_error(run_llm(*smoke_fast, "--d-model", "100"), "--d-model 100", "--n-heads")


def test_bench_steps_must_be_positive(llm_main):
    proc = llm_main("--bench", "--bench-steps", "0")
    assert proc.returncode == 2 and "--bench-steps" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_out_is_one_line_exit_2(llm_main, tmp_path, smoke_fast):
    (tmp_path / "afile").write_text("a regular file, not a folder\n")
    proc = llm_main(*smoke_fast, "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "afile/r.csv")
    assert_one_line_error(proc, "afile")
    assert (tmp_path / "afile").read_text() == "a regular file, not a folder\n"
    assert not list(tmp_path.rglob("*.csv"))


def test_bad_data_is_one_line_exit_2_and_keeps_the_csv(llm_main, tmp_path, smoke_fast):
    existing = tmp_path / "keep.csv"
    existing.write_text("precious results\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A few words only.\n\nAnd another short line.\n")
    (tmp_path / "table.jsonl").write_text('{"body": "no text column here"}\n')
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    cases = [(["--data-files", "missing.txt"], ["not found", "missing.txt"]),
             (["--data-files", "empty.txt"], ["empty", "empty.txt"]),
             (["--data-files", "short.txt"], ["too few", "--batch-size"]),
             (["--data-files", "table.jsonl"], ["'text'"]),
             (["--data-files", "short.txt", "docs.jsonl"], ["--data-files", "one kind", ".jsonl", ".txt"])]
    for args, words in cases:
        assert_one_line_error(llm_main(*smoke_fast, "--out", "keep.csv", *args), *words)
    assert existing.read_text() == "precious results\n"


@pytest.mark.timeout(180)  # several short runs
def test_csv_with_other_columns_is_not_appended_to(llm_main, tmp_path, smoke_fast):
    (tmp_path / "r.csv").write_text("a,b,c\n1,2,3\n")
    proc = llm_main(*smoke_fast, "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "r.csv")
    assert_one_line_error(proc, "--fresh")
    assert (tmp_path / "r.csv").read_text() == "a,b,c\n1,2,3\n"
    proc = llm_main(*smoke_fast, "--seeds", "42", "--noise-std", "0", "--lb-weight", "0", "--out", "r.csv",
                    "--fresh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    backups = list(tmp_path.glob("r.*.bak.csv"))
    assert len(backups) == 1 and backups[0].read_text() == "a,b,c\n1,2,3\n"
    assert len(read_rows(tmp_path / "r.csv")) == 1



# ------------------------------------------------------------------------------------------------------------
# Offline: a port that refuses, a server that accepts and never answers, an address that drops every packet

@pytest.fixture
def silent_server():
    """A TCP server on loopback that accepts every connection and never sends a byte: its port."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    srv.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def blackholed_port():
    """A loopback port whose connection attempts go unanswered, as a blackholed address's do: a listener that
    never accepts, its queue already full (Linux then drops new SYNs)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=0)
    held = []
    for _ in range(8):
        c = socket.socket()
        c.settimeout(0.5)
        try:
            c.connect(srv.getsockname())
        except OSError:
            c.close()
            break
        held.append(c)
    else:
        pytest.skip("this system's accept queue never filled, so it cannot stand in for a blackholed address")
    yield srv.getsockname()[1]
    for c in held:
        c.close()
    srv.close()


@pytest.mark.timeout(30)
def test_offline_without_cache_fails_fast_naming_the_offline_options(run_llm):
    proc = run_llm("--max-steps", "1", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "--data-files", "--tokenizer", "--preset smoke")


@pytest.mark.timeout(20)
def test_hub_probe_gives_up_on_a_blackholed_address(monkeypatch, blackholed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{blackholed_port}")
    assert llm.hub_reachable(timeout=1.0) is False


def test_hub_probe_calls_a_silent_server_unreachable(monkeypatch, silent_server):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_server}")
    assert llm.hub_reachable(timeout=1.0) is False


@pytest.mark.timeout(30)
def test_offline_behind_a_silent_server_fails_fast_naming_the_offline_options(run_llm, silent_server):
    proc = run_llm("--max-steps", "1", "--seeds", "42", "--noise-std", "0", "--lb-weight", "0",
                   env={"HF_ENDPOINT": f"http://127.0.0.1:{silent_server}"})
    assert_one_line_error(proc, "--data-files", "--tokenizer", "--preset smoke")


# ------------------------------------------------------------------------------------------------------------
# Data and the token cache

def test_token_cache_is_npy_with_sidecar_and_is_reused_offline(tmp_path, monkeypatch, run_llm, smoke_fast):
    # Build the cache for the hub dataset in process, with the documents coming from the sample corpus instead
    # of the network: load_and_cache_data writes it exactly as a real download would.
    cfg = llm.MoEModelConfig(tokenizer="bytes", num_documents=1000, max_tokens=100_000,
                             cache_dir=str(tmp_path / "data_cache"))
    docs = [d for d in llm.sample_corpus().read_text().split("\n\n") if d.strip()]
    monkeypatch.setattr(llm, "iter_documents", lambda c, files: iter(docs))
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


@pytest.mark.timeout(180)  # several short runs
def test_corrupt_or_mismatched_cache_is_rebuilt_with_a_warning(llm_main, tmp_path, smoke_fast):
    args = (*smoke_fast, "--max-steps", "5", "--seeds", "42", "--noise-std", "0", "--lb-weight", "0")
    first = llm_main(*args, "--out", "a.csv")
    assert first.returncode == 0, first.stderr[-2000:]
    npy = next((tmp_path / "data_cache").glob("*.npy"))
    good = npy.read_bytes()
    npy.write_bytes(b"not a numpy file")
    second = llm_main(*args, "--out", "b.csv")
    assert second.returncode == 0 and "rebuilding" in second.stderr
    assert npy.read_bytes() == good
    sidecar = npy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["n_tokens"] += 1
    sidecar.write_text(json.dumps(meta))
    third = llm_main(*args, "--out", "c.csv")
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
    cfg = llm.MoEModelConfig(vocab_size=512, d_model=32, n_heads=4, n_layers=1, d_ff=64, batch_size=2, max_seq_len=32)
    assert res["gradient_accumulation_steps"] == 2 and res["tokens_per_step"] == 2 * 64  # whole updates
    assert res["flops_per_token"] == pytest.approx(llm.estimate(cfg).flops_per_token)
    assert res["peak_tflops"] > 0 and res["dtype"] and res["torch"] == llm.torch.__version__
    assert [r["impl"] for r in res["impls"]] == ["this project", "original", "dense"]
    ours, orig, dense = res["impls"]
    assert res["speedup"] == pytest.approx(ours["tokens_per_s"] / orig["tokens_per_s"])
    assert res["dense_ratio"] == pytest.approx(ours["tokens_per_s"] / dense["tokens_per_s"])
    assert orig["dtype"] == "float32"  # on CPU the original's CUDA-only autocast did nothing
    for r in res["impls"]:
        assert set(r) >= {"impl", "device", "dtype", "step_ms", "tokens_per_s", "tflops", "mfu", "peak_mem_gb",
                          "warmup_s"}
        step_s = r["step_ms"] / 1e3
        assert step_s > 0 and r["tokens_per_s"] == pytest.approx(128 / step_s)
        assert r["tflops"] == pytest.approx(res["flops_per_token"] * 128 / step_s / 1e12)
        assert 0 < r["mfu"] and r["mfu"] == pytest.approx(r["tflops"] / res["peak_tflops"])
        assert 0.05 < r["peak_mem_gb"] < machine_memory_gb() and r["warmup_s"] > 0  # CPU: the process's peak RSS
        assert r["device"].startswith("cpu (") and "threads)" in r["device"]  # which CPU took the timing
    assert f"{res['speedup']:.2f}x" in proc.stdout and "speed-up over the original" in proc.stdout
    assert "dense" in proc.stdout
    assert "warning:" not in proc.stderr  # every side ran its intended path, none fell back


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_local_data_files_of_each_kind_are_read_as_documents(tmp_path, kind):
    import pandas as pd
    docs = [d for d in llm.sample_corpus().read_text().split("\n\n") if d.strip()][:10]
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


@pytest.mark.timeout(180)  # several short runs
def test_a_csv_holding_two_setups_is_not_pooled(llm_main, tmp_path, smoke_fast):
    args = (*smoke_fast, "--eval-every", "4", "--seeds", "42", "43", "--noise-std", "0", "0.5",
            "--lb-weight", "0.01", "--out", "mix.csv")
    assert llm_main(*args, "--max-steps", "4").returncode == 0
    second = llm_main(*args, "--max-steps", "6")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "also holds 4 run(s) of other setups" in second.stdout
    rows = read_rows(tmp_path / "mix.csv")
    assert sorted(json.loads(r["config_json"])["max_steps"] for r in rows) == [4, 4, 4, 4, 6, 6, 6, 6]
    assert len({r["config_hash"] for r in rows}) == 8


def test_random_tokens_train_offline_for_timing(llm_main, tmp_path):
    proc = llm_main("--dataset", "random", "--max-tokens", "40000", "--vocab-size", "300", "--d-model", "32",
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
    docs = [d for d in llm.sample_corpus().read_text().split("\n\n") if d.strip()]
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


# ------------------------------------------------------------------------------------------------------------
# The sweep planner, dry runs as JSON, and what a plan cannot reach (issue 16)

def test_plan_sweep_resolves_axes_in_order_with_seed_last_and_prints_nothing(capsys):
    plan = llm.plan_sweep(["--preset", "smoke", "--expert-top-k", "1", "2", "--grid", "d-ff=64,128",
                           "--seeds", "1", "2", "--lb-weight", "0"])
    assert list(plan.axes) == ["expert_top_k", "d_ff", "noise_std", "load_balancing_weight", "seed"]
    assert plan.axes["d_ff"] == (64, 128) and plan.axes["seed"] == (1, 2) and plan.n_runs == 2 * 2 * 3 * 1 * 2
    configs = list(plan.configs())
    assert len(configs) == plan.n_runs and configs[0].d_model == 64 and configs[1].seed == 2
    assert plan.out == llm.Path(llm.DEFAULT_CSV)
    for bad in (["--expert-top-k", "0"], ["--nope"], ["--seeds", "1", "--grid", "seed=2"], ["--help"]):
        with pytest.raises(llm.UserError):
            llm.plan_sweep(bad)
    assert capsys.readouterr() == ("", "")  # errors are exceptions: nothing printed


def test_ten_million_runs_are_refused_from_the_axes_without_expanding_them():
    import tracemalloc
    argv = []
    for flag in ("--seeds", "--noise-std", "--lb-weight", "--max-steps", "--n-layers", "--d-ff", "--eval-steps"):
        argv += [flag, *[str(i + 1) for i in range(10)]]
    tracemalloc.start()
    with pytest.raises(llm.UserError, match="10,000,000 runs"):
        llm.plan_sweep(argv)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # bytes: nothing was enumerated


def test_dry_run_json_is_one_object_with_the_estimates_and_writes_nothing(llm_main, tmp_path):
    proc = llm_main("--preset", "smoke", "--expert-top-k", "1", "2", "--seeds", "7", "--lb-weight", "0",
                    "--dry-run", "--json", "--time-steps", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert out["n_runs"] == 6 == len(out["runs"]) and out["out"] == CSV_NAME
    assert out["axes"] == {"expert_top_k": [1, 2], "noise_std": [0.0, 0.1, 0.5], "load_balancing_weight": [0.0],
                           "seed": [7]}
    for run in out["runs"]:
        cfg = llm.MoEModelConfig(**run["config"])
        est = llm.estimate(cfg)
        assert (run["params"], run["flops_per_token"], run["train_tokens"], run["memory_gb"]) == (
            est.params, est.flops_per_token, est.train_tokens, est.memory_gb)
        assert run["tokens_per_s"] > 0 and RUN_ID.match(run["run_id"])
    assert len({r["run_id"] for r in out["runs"]}) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no CSV


def test_a_tokenizer_folder_with_remote_code_never_runs_it(run_llm, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    marker = tmp_path / "marker"
    (tok / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.Evil", None]}, "tokenizer_class": "Evil"}))
    (tok / "config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "evil.Evil"}}))
    proc = run_llm("--preset", "smoke", "--tokenizer", "tok", "--seeds", "42", "--noise-std", "0",
                   "--lb-weight", "0", "--max-steps", "1", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "tokenizer", "tok")
    assert not marker.exists()


def test_string_values_in_a_sweep_never_become_paths(llm_main, tmp_path, smoke_fast):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = llm_main(*smoke_fast, "--max-steps", "2", "--eval-every", "2", "--seeds", "42", "--noise-std", "0",
                    "--lb-weight", "0", "--grid", "dataset=../../escape,a/b", "--out", "out/r.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(out_dir / "r.csv")
    assert len(rows) == 2 and all(RUN_ID.match(r["run_id"]) and len(r["run_id"]) <= 100 for r in rows)
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert made <= {"out", "data_cache", "hf_home"}, made
    assert {p.name for p in (out_dir / "r_runs").iterdir()} == {r["run_id"] for r in rows}


def test_planted_symlinks_are_not_written_through(llm_main, tmp_path, smoke_fast):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "r.csv").symlink_to(victim)
    proc = llm_main(*smoke_fast, "--max-steps", "2", "--eval-every", "2", "--seeds", "42", "--noise-std", "0",
                    "--lb-weight", "0", "--out", "r.csv")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert victim.read_text() == "keep me\n"
    target = tmp_path / "cache_target"
    target.write_text("keep me too\n")
    link = tmp_path / "linked.npy"
    link.symlink_to(target)
    llm.write_file_safely(link, b"new")  # the link is replaced, its target untouched
    assert target.read_text() == "keep me too\n" and link.read_bytes() == b"new" and not link.is_symlink()


def test_the_sample_corpus_can_be_moved_by_environment(run_llm, tmp_path):
    corpus = tmp_path / "elsewhere.txt"
    corpus.write_text("text\n")
    proc = run_llm("--preset", "smoke", "--seeds", "1", "--noise-std", "0", "--lb-weight", "0", "--dry-run",
                   env={"LLM_SAMPLE_CORPUS": str(corpus)})
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1].split(": ", 1)[1])[
        "data_files"] == [str(corpus)]


def test_the_evaluation_section_is_protected_and_self_contained():
    import ast
    source = (llm.HERE / "llm.py").read_text()
    lines = source.splitlines()
    start = lines.index("# Evaluation (protected)")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ----"))
    section = "\n".join(lines[start:end])
    defined = {n.name for n in ast.parse(section).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.parse(section).body if isinstance(n, ast.Assign) for t in n.targets}
    assert {"TokenData", "evaluate", "routing_metrics", "expert_usage_cv", "DEAD_SHARE"} <= defined
    rest = ast.parse("\n".join(lines[:start] + lines[end:]))
    rebound = {t.id for n in ast.walk(rest) if isinstance(n, (ast.Assign, ast.AugAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    rebound |= {n.name for n in rest.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & rebound


def test_flag_specs_lists_every_option_as_the_parser_reads_it():
    specs = {o: s for s in llm.flag_specs() for o in s.options}
    assert specs["--lb-weight"].dest == "load_balancing_weight" and specs["--lb-weight"].nargs == "+"
    assert specs["--seeds"].dest == "seed" and specs["--grid"].options == ("--grid",)
    parsed = vars(llm.build_parser().parse_args(["--lb-weight", "0", "0.01", "--d-model", "64"]))
    assert parsed[specs["--lb-weight"].dest] == [0.0, 0.01] and specs["--d-model"].dest in parsed
    assert all(s.options and all(o.startswith("-") for o in s.options) for s in specs.values())
