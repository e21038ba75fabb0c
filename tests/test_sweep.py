"""Sweeps beyond the default grid: --grid over other config fields (with resume), run in process, and torchrun
spreading the runs over processes on CPU (gloo): every run exactly once, the same numbers as one process, and a
killed rank finished by a rerun."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import llm
from conftest import merge_smoke


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(180)  # several short runs
def test_grid_of_two_fields_writes_a_column_each_and_resumes(llm_main, tmp_path, smoke_fast):
    args = (*smoke_fast, "--max-steps", "4", "--eval-every", "4", "--seeds", "42", "--noise-std", "0.1",
            "--lb-weight", "0.01", "--grid", "expert_top_k=1,2", "--grid", "num_experts=4,8", "--out", "g.csv")
    first = llm_main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(tmp_path / "g.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == list(llm.CSV_COLUMNS)  # no per-sweep columns: config_json says what each run was
    rows = read_rows(tmp_path / "g.csv")
    cfgs = [json.loads(r["config_json"]) for r in rows]
    assert sorted((c["expert_top_k"], c["num_experts"]) for c in cfgs) == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for r, c in zip(rows, cfgs):
        assert f"expert-top-k{c['expert_top_k']}_num-experts{c['num_experts']}" in r["run_id"]
        assert len(r["expert_usage_cv_per_layer"].split(";")) == 2
    # Extending one axis reruns only the new cells.
    second = llm_main(*args[:-6], "--grid", "expert_top_k=1,2,3", "--grid", "num_experts=4,8", "--out", "g.csv")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "4 of 6 runs already done" in second.stdout
    rows = read_rows(tmp_path / "g.csv")
    assert len(rows) == 6 and len({r["config_hash"] for r in rows}) == 6


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(llm.HERE / "llm.py"), *merge_smoke(args)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_processes_run_every_run_exactly_once(tmp_path, smoke_fast):
    args = (*smoke_fast, "--max-steps", "4", "--eval-every", "4", "--seeds", "42", "43", "--noise-std", "0.0",
            "0.5", "--lb-weight", "0.01", "--out", "d.csv")
    proc = subprocess.run(torchrun(2, *args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "d.csv")
    assert len(rows) == 4 and len({r["config_hash"] for r in rows}) == 4
    assert all(r["status"] == "ok" for r in rows)
    assert proc.stdout.count("report:") == 1  # written once, by rank 0
    assert "[rank 1]" in proc.stdout  # rank 1 really trained some of the runs
    # The same runs in a single process give the same numbers: where a run executes does not matter.
    single = subprocess.run([sys.executable, str(llm.HERE / "llm.py"), *merge_smoke(args[:-1]), "s.csv"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    by_hash = {r["config_hash"]: r["val_loss"] for r in read_rows(tmp_path / "s.csv")}
    assert {r["config_hash"]: r["val_loss"] for r in rows} == by_hash


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_rank_leaves_rows_intact_and_a_rerun_finishes_the_set(tmp_path, smoke_fast):
    # 8 short runs, so that a kill after the first row always leaves some undone (with 4, a loaded
    # machine sometimes finished them all before the poll saw the first row)
    args = (*smoke_fast, "--max-steps", "20", "--seeds", "42", "43", "44", "45", "--noise-std", "0.0",
            "0.5", "--lb-weight", "0.01", "--out", "k.csv")
    out = tmp_path / "k.csv"
    proc = subprocess.Popen(torchrun(2, *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out.exists() and len(read_rows(out)) >= 1):
        time.sleep(0.2)
    # Kill one worker (a child of the torchrun agent); the agent then stops the other and exits non-zero.
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    before = read_rows(out)
    assert 1 <= len(before) < 8
    again = subprocess.run(torchrun(2, *args), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 8 and len({r["config_hash"] for r in rows}) == 8
    assert rows[:len(before)] == before  # earlier rows untouched


@pytest.mark.timeout(180)  # several short runs
def test_grid_over_data_and_shape_fields_trains_each_run_as_its_row_says(llm_main, tmp_path, smoke_fast):
    proc = llm_main(*smoke_fast, "--max-steps", "3", "--eval-every", "3", "--seeds", "42", "--noise-std", "0",
                   "--lb-weight", "0.01", "--grid", "max_seq_len=32,64", "--grid", "max_tokens=60000,30000",
                   "--out", "d.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(tmp_path / "d.csv")
    assert len(rows) == 4 and len({r["config_hash"] for r in rows}) == 4 and len({r["val_loss"] for r in rows}) == 4
    for r in rows:
        assert int(r["train_tokens"]) == 3 * 8 * json.loads(r["config_json"])["max_seq_len"]
    assert proc.stdout.count("data: ") == 2  # two corpora: 60,000 and 30,000 tokens
    lines = [line for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert "60,000 tokens" in lines[0] and "30,000 tokens" in lines[1]
