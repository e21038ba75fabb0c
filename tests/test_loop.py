"""Closing the loop: {results} in the chain's prompts, `simple_llm.py runs PLAN.md` and `simple_llm.py loop`.

Covers: {results} from an explicit report, from a CSV (its report is built), auto-found beside the default CSV,
turned off, or absent (the prompts then say so; no dangling placeholder); the final step's run format lists
llm.py's own flags (a flag added to llm.py's parser appears without a change here) and never the tool-owned
ones; llm.py reaches the planner without its data and CSV sections; tool-owned flags are refused however
argparse would spell them; `runs` refuses a missing block, bad JSON, bad entries, unknown or malformed flags,
shell metacharacters and too many runs with one line and nothing run; --run needs --yes or a typed yes;
the shipped example plan runs offline and its runs then give the time estimate; the ledger's findings match scipy's paired test;
and `loop --rounds 2 --yes` against the fake providers runs chain, runs and report twice, feeds round 1's
report into round 2's first prompt, and after a kill -9 during round 2's runs a rerun finishes without
asking the models again or duplicating rows.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import report
import simple_llm
from fake_providers import answer
from test_report import sweep_rows, write_csv
from test_simple_llm import (SCRIPT, _no_dotenv, assert_no_keys, fake, httpserver_listen_address,  # noqa: F401
                             work)  # the fixtures: both providers faked, a work folder with an idea file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "example_plan.md"
SMOKE = ["--preset", "smoke", "--lb-weight", "0", "--noise-std", "0", "--max-steps", "2", "--eval-every", "2",
         "--eval-steps", "1"]


def plan_md(runs, prose="The plan in words.") -> str:
    return f"{prose}\n\n```json\n{json.dumps({'runs': runs}, indent=1)}\n```\n"


def chain_dry(*extra) -> list[str]:
    return ["chain", "idea.md", "--code", "code.py", "--system", "system.md", "--dry-run", *extra]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------- {results}

def test_results_from_an_explicit_report_and_from_a_csv(work, capsys):
    (work / "found.md").write_text("# Findings\nnoise 0.5 hurt: MARKER-REPORT\n\n## Plots\n\n![p](p.png)\n")
    assert simple_llm.main(chain_dry("--results", "found.md")) == 0
    out, err = capsys.readouterr()
    assert out.count("MARKER-REPORT") == 3  # steps 1, 2 and 4
    assert "p.png" not in out  # plots mean nothing to a model
    assert "results: found.md" in err and "{results}" not in out

    csv = write_csv(work / "sweep.csv", sweep_rows([0, 0.2, 14, 0.1, 0.3, 0.2]))
    assert simple_llm.main(chain_dry("--results", str(csv))) == 0
    out, err = capsys.readouterr()
    assert not (work / "sweep_analysis.md").exists() and "built for this dry run only" in err  # a dry run writes nothing
    assert "analysis of `sweep.csv`" in out and "## Paired comparisons against the baseline" in out


def test_results_auto_found_turned_off_or_absent(work, capsys):
    assert simple_llm.DEFAULT_CSV_NAME == report.DEFAULT_CSV
    assert simple_llm.main(chain_dry()) == 0
    out, err = capsys.readouterr()
    assert out.count(simple_llm.NO_RESULTS) == 3 and "{results}" not in out
    assert "results: none found" in err

    (work / "experiment_analysis.md").write_text("# The last sweep\nMARKER-AUTO\n")
    assert simple_llm.main(chain_dry()) == 0
    out, err = capsys.readouterr()
    assert out.count("MARKER-AUTO") == 3 and "results: experiment_analysis.md" in err

    assert simple_llm.main(chain_dry("--no-results")) == 0
    out, err = capsys.readouterr()
    assert "MARKER-AUTO" not in out and out.count(simple_llm.NO_RESULTS) == 3

    # a default CSV newer than its report: the report is rebuilt from it
    write_csv(work / report.DEFAULT_CSV, sweep_rows([0, 0.2, 14, 0.1, 0.3, 0.2]))
    assert simple_llm.main(chain_dry()) == 0
    out, err = capsys.readouterr()
    assert "MARKER-AUTO" not in out and f"analysis of `{report.DEFAULT_CSV}`" in out


def test_missing_results_file_is_a_user_error(work, capsys):
    assert simple_llm.main(chain_dry("--results", "nope.csv")) == 2
    assert "nope.csv" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- prompts

def test_plan_format_lists_llm_flags_from_its_parser(monkeypatch):
    import llm
    text = simple_llm.plan_format(max_runs=12)
    assert "At most 12 runs" in text and "```json" in text
    listed = {line.split(":")[0].split()[0] for line in text.splitlines() if line.startswith("--")}
    for action in llm.build_parser()._actions:
        if action.option_strings and action.dest not in simple_llm.TOOL_OWNED:
            assert action.option_strings[0] in listed
    assert not listed & {"--out", "--fresh", "--device", "--dry-run", "--report", "--bench", "--cache-dir"}
    # the example in the prompt is itself a valid plan
    example = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert simple_llm.check_plan([simple_llm.PlanEntry(r["name"], r["question"], r["args"])
                                  for r in example["runs"]], 36) > 0

    def grown():  # llm.py gains a flag on main: the prompt follows without a change in simple_llm.py
        p = llm.build_parser()
        p.add_argument("--made-up-flag", type=float, metavar="FLOAT", help="a flag added later (default: 0)")
        return p
    monkeypatch.setattr(simple_llm, "llm_parser", grown)
    assert "--made-up-flag FLOAT: a flag added later (default: 0)" in simple_llm.plan_format()


def test_planner_gets_llm_py_without_data_and_csv_sections():
    code = (ROOT / "llm.py").read_text()
    lean = simple_llm.lean_code(code)
    assert "class MoEModelConfig" in lean and "def train_moe_model" in lean and "def build_parser" in lean
    assert "def append_row" not in lean and "def load_and_cache_data" not in lean
    assert "left out of the planner's context: " in lean and "load_and_cache_data" in lean  # named, not shown
    assert len(lean) < 0.85 * len(code)
    untitled = "x = 1\n# " + "-" * 30 + "\n# Something else\ny = 2\n"
    assert simple_llm.lean_code(untitled) == untitled


@pytest.mark.parametrize("token", ["--out", "--ou", "--out=x.csv", "--fresh", "--fr", "--device=cpu", "--dry",
                                   "--cache-dir", "--bench", "--bench-o", "--report=x.csv", "-h", "--he"])
def test_tool_owned_flags_are_refused_however_spelled(token):
    import llm
    with pytest.raises(simple_llm.UserError, match="chosen by the tool"):
        simple_llm._check_flags("entry 1 (x)", ["--noise-std", "0", token, "v"], llm.build_parser())


def test_ordinary_flags_and_negative_numbers_pass_the_flag_check():
    import llm
    simple_llm._check_flags("e", ["--noise-std", "-0.5", "--lb", "0", "--grid=expert_top_k=1,2", "--d-model",
                                  "64", "--no-compile"], llm.build_parser())


# ---------------------------------------------------------------------------------------------- runs

BAD_PLANS = {
    "no_block": ("Just prose, no runs.\n", "no ```json block"),
    "bad_json": ("```json\n{\"runs\": [\n```\n", "not valid JSON"),
    "no_runs": ("```json\n{\"plan\": []}\n```\n", '"runs"'),
    "args_not_list": (plan_md([{"name": "a", "args": "--lb-weight 0"}]), "list of strings"),
    "no_name": (plan_md([{"args": []}]), '"name"'),
    "duplicate": (plan_md([{"name": "A b", "args": SMOKE}, {"name": "a_b", "args": SMOKE}]), "already used"),
    "double_dash": (plan_md([{"name": "a", "args": ["--", "--lb-weight", "0"]}]), "'--'"),
    "forbidden": (plan_md([{"name": "a", "args": SMOKE + ["--ou", "elsewhere.csv"]}]), "chosen by the tool"),
    "unknown_flag": (plan_md([{"name": "a", "args": SMOKE + ["--noise-sd", "0.1"]}]),
                     "unrecognized arguments: --noise-sd"),
    "malformed": (plan_md([{"name": "a", "args": SMOKE + ["--max-steps", "ten"]}]), "invalid int value: 'ten'"),
    "shell": (plan_md([{"name": "a", "args": SMOKE + ["--noise-std", "0; touch pwned", "$(touch pwned2)"]}]),
              "invalid float value: '0; touch pwned'"),
    "too_many": (plan_md([{"name": "a", "args": SMOKE + ["--seeds", "1", "2", "3"]},
                          {"name": "b", "args": SMOKE + ["--seeds", "1", "2"]}]), "entry 2 (b) brings the plan to 5"),
    # text that redraws the terminal line showing the command to confirm (carriage return, erase-line escape)
    "control_chars": (plan_md([{"name": "a", "args": SMOKE + ["--dataset", "\r\x1b[2K python llm.py --seeds 1"]}]),
                      "control characters"),
    "control_question": (plan_md([{"name": "a", "question": "ok?\x1b[8m hidden", "args": SMOKE}]),
                         "its question contains control characters"),
    "nul": (plan_md([{"name": "a", "args": SMOKE + ["--dataset", "x\u0000y"]}]), "control characters"),
    "outside_absolute": (plan_md([{"name": "a", "args": SMOKE + ["--data-files", "/etc/hostname"]}]),
                         "outside the current folder"),
    "outside_parent": (plan_md([{"name": "a", "args": SMOKE + ["--data-files", "../secret.txt"]}]),
                       "outside the current folder"),
    "outside_home": (plan_md([{"name": "a", "args": SMOKE + ["--tokenizer", "~/tok"]}]), "outside the current folder"),
    "bundled_help": (plan_md([{"name": "a", "args": SMOKE + ["-hh"]}]), "chosen by the tool"),
    # report.py names the default CSV's report "experiment_analysis.md": an entry named "experiment" would share it
    "same_report": (plan_md([{"name": "experiment", "args": SMOKE},
                             {"name": "moe_routing_noise_experiment_results", "args": SMOKE}]), "already used"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_runs_refuses_bad_plans_with_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys, case):
    text, message = BAD_PLANS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.md").write_text(text)
    rc = simple_llm.main(["runs", "plan.md", "--run", "--yes", "--max-runs", "4", "--out-dir", "out"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert message in one_error_line(err)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.md"]  # nothing ran, no file


def test_shell_metacharacters_arrive_as_plain_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weird = "bytes; touch pwned $(touch pwned2) `x` | cat"
    (tmp_path / "plan.md").write_text(plan_md([{"name": "w", "args": SMOKE + ["--tokenizer", weird]}]))
    (entry,) = simple_llm.read_plan(tmp_path / "plan.md")
    assert simple_llm.check_plan([entry], 36) == 3  # SMOKE leaves the default three seeds
    assert entry.runs[0]["tokenizer"] == weird  # llm.py's parser got it as one value
    shown = simple_llm.shown(entry.command("out"))
    assert "--tokenizer 'bytes; touch pwned $(touch pwned2) `x` | cat' --out out/w.csv" in shown  # quoted, one arg
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_run_without_terminal_or_yes_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--out-dir", "out"]) == 2
    assert "--yes" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_run_asks_for_a_typed_yes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))  # anything but "yes" declines
    assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--out-dir", "out"]) == 1
    out, err = capsys.readouterr()
    assert "--out out/noise_without_lb.csv" in out and "4 runs" in out  # shown before the question
    assert "Run these 4 runs? Type yes" in err and "nothing was run" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_example_plan_runs_offline(tmp_path):
    """The README's worked example: python simple_llm.py runs tests/example_plan.md --run --yes."""
    def runs(*extra):
        return subprocess.run([sys.executable, str(SCRIPT), "runs", str(EXAMPLE), "--out-dir", "out", *extra],
                              cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=280)
    r = runs("--run", "--yes")
    assert r.returncode == 0, r.stderr
    csv = tmp_path / "out" / "noise_without_lb.csv"
    df = pd.read_csv(csv)
    assert len(df) == 4 and set(df["status"]) == {"ok"} and sorted(df["seed"]) == [42, 42, 43, 43]
    assert "time: no estimate" in r.stdout  # no earlier results here
    assert "reports:\n  out/noise_without_lb_analysis.md" in r.stderr
    assert (tmp_path / "out" / "noise_without_lb_analysis.md").is_file()

    r = runs()  # the plan again, without --run: now its own finished runs give a time estimate
    assert r.returncode == 0, r.stderr
    assert "time: about" in r.stdout and "4 earlier run(s) in noise_without_lb.csv" in r.stdout
    assert "nothing was run" in r.stderr and len(pd.read_csv(csv)) == 4


def test_headline_findings_match_scipy(tmp_path):
    rows = sweep_rows([-3, 0.2, 14, 0.1, 0.3, 0.2])  # the baseline is clearly best, noise 0.5 clearly worse
    csv = write_csv(tmp_path / "r.csv", rows)
    lines = simple_llm.headline(csv)
    ppl = lambda n, lb: np.array([r["best_val_perplexity"] for r in rows
                                  if (r["noise_std"], r["load_balancing_weight"]) == (n, lb)])
    assert lines[0] == f"best: noise=0.0, lb=0.01, best val PPL {ppl(0.0, 0.01).mean():.2f} (n=3) of 6 condition(s)"
    res = stats.ttest_rel(ppl(0.5, 0.01), ppl(0.0, 0.01))
    ci = res.confidence_interval(0.95)
    (line,) = [ln for ln in lines if ln.startswith("noise=0.5, lb=0.01 vs noise=0.0, lb=0.01")]
    diff = (ppl(0.5, 0.01) - ppl(0.0, 0.01)).mean()
    assert f"Δ {diff:+.2f} PPL (95% CI {ci.low:.2f} to {ci.high:.2f}" in line and "significant" in line
    assert len(lines) == 6  # the best condition plus five comparisons


# ---------------------------------------------------------------------------------------------- loop

def test_runs_out_dir_that_cannot_be_made_fails_before_asking(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/sub"):
        assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--yes", "--out-dir", out]) == 2
        assert f"cannot create --out-dir {out}" in one_error_line(capsys.readouterr().err)


def test_a_second_runs_on_a_busy_out_dir_is_refused(tmp_path, monkeypatch, capsys):
    import fcntl
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".runs.lock", "w") as held:  # as a running runs/loop, or its llm.py, holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--yes", "--out-dir", "out"]) == 2
        assert "still writing in out" in one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("*.csv"))  # nothing ran


def test_llm_py_started_by_runs_holds_the_out_dir_lock(tmp_path, monkeypatch):
    # The lock travels to each llm.py (pass_fds): if the tool is killed, its llm.py still holds the folder.
    import fcntl
    seen = {}

    class Child:
        def __init__(self, cmd, pass_fds=()):
            with open(tmp_path / "out" / ".runs.lock", "w") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen["locked"] = False
                except OSError:
                    seen["locked"] = True
            seen["fds"] = pass_fds

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(simple_llm.subprocess, "Popen", Child)
    entry = simple_llm.PlanEntry("a", "", SMOKE, runs=[{}])
    assert simple_llm.run_plan([entry], tmp_path / "out") == 0
    assert seen["locked"] and len(seen["fds"]) == 1


def test_loop_refuses_a_foreign_or_broken_state_file(fake, work, capsys):
    (work / "L").mkdir()
    for bad in ("[]", "{}", '{"round": []}', '{"round": {"1": {}}}'):
        (work / "L" / "loop_state.json").write_text(bad)
        assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L"]) == 2
        assert "not a loop state of this tool" in one_error_line(capsys.readouterr().err)
    (work / "L" / "loop_state.json").write_text('{"idea": "other.md", "round": {}}')
    assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L"]) == 2
    assert "holds a loop over other.md" in one_error_line(capsys.readouterr().err)
    assert fake.calls == []


def test_dry_run_builds_a_stale_report_without_writing_it(work, monkeypatch, capsys):
    write_csv(work / simple_llm.DEFAULT_CSV_NAME, sweep_rows([0, 0.2, 14, 0.1, 0.3, 0.2]))
    before = sorted(p.name for p in work.iterdir())
    assert simple_llm.main(chain_dry()) == 0
    out, err = capsys.readouterr()
    assert "built for this dry run only" in err and "Paired comparisons against the baseline" in out
    assert sorted(p.name for p in work.iterdir()) == before  # no report, no plots


def test_loop_without_terminal_or_yes_refuses_before_any_request(fake, work, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert simple_llm.main(["loop", "idea.md", "--out-dir", "L"]) == 2
    assert "--yes" in one_error_line(capsys.readouterr().err)
    assert fake.calls == [] and not (work / "L").exists()


def test_loop_dry_run_shows_round_one_with_the_last_results(work, monkeypatch, capsys):
    monkeypatch.delenv("NOVITA_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    (work / "experiment_analysis.md").write_text("# Last sweep\nnoise 0.5 hurt by 14 PPL: MARKER-LAST\n")
    assert simple_llm.main(["loop", str(ROOT / "research_prompt.md"), "--dry-run", "--rounds", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("==== step") == 4 and out.count("MARKER-LAST") == 3
    assert "Is there a level of noise" in out  # research_prompt.md itself
    assert "```json" in out and "--noise-std F [F ...]" in out  # the run format with llm.py's flags
    assert "round 2 reads round 1's reports" in out
    assert "results: experiment_analysis.md" in err and "round 1/2" in err
    assert not (work / simple_llm.DEFAULT_LOOP_DIR).exists()


def test_loop_stops_on_a_plan_without_runs_and_on_a_failed_run(fake, work, capfd):
    # capfd: llm.py's own messages come from a child process
    # the default fake answers carry no ```json block: refused after the chain, before anything trains
    assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L"]) == 2
    err = capfd.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "error: round 1: L/round1/step4_final_plan.md has no ```json block" in err
    assert "rerun the same command" in err and "Traceback" not in err
    state = json.loads((work / "L" / "loop_state.json").read_text())
    assert state["round"]["1"]["status"].startswith("plan refused")
    assert "## Round 1: plan refused" in (work / "L" / "ledger.md").read_text()
    # the user fixes the plan by hand; the rerun reuses the chain and stops at llm.py's failure, with its code
    (work / "L" / "round1" / "step4_final_plan.md").write_text(
        plan_md([{"name": "x", "args": SMOKE + ["--seeds", "1", "--data-files", "missing.txt"]}]))
    assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L"]) == 2
    err = capfd.readouterr().err
    assert "data file not found" in err and "rerun the same command to resume" in err
    assert len(fake.calls) == 4  # the chain ran once
    state = json.loads((work / "L" / "loop_state.json").read_text())
    assert state["round"]["1"]["status"] == "a run failed (llm.py exit code 2)"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_loop_two_rounds_resumes_after_kill_without_repeating(fake, work):
    round1 = [{"name": "first_look", "question": "Does noise 0 train at all?", "args": SMOKE + ["--seeds", "42"]}]
    round2 = [{"name": "more_seeds", "question": "Is it the same on seed 43?",
               "args": SMOKE + ["--seeds", "42", "43", "--max-steps", "4", "--eval-every", "4"]}]
    fake.then("gemini", lambda: answer("gemini", "review one"), lambda: answer("gemini", plan_md(round1)),
              lambda: answer("gemini", "review two"), lambda: answer("gemini", plan_md(round2)))
    cmd = [sys.executable, str(SCRIPT), "loop", "idea.md", "--rounds", "2", "--yes", "--out-dir", "L"]
    with open(work / "first.log", "w") as log:  # a file, not a pipe: nothing can block on a full pipe
        proc = subprocess.Popen(cmd, cwd=work, env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    csv2 = work / "L" / "round2" / "more_seeds.csv"
    try:
        deadline = time.time() + 300
        while not csv2.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # the first of round 2's runs has finished: kill during the second
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        log = (work / "first.log").read_text()
    assert csv2.is_file(), log
    state = json.loads((work / "L" / "loop_state.json").read_text())
    assert state["round"]["1"]["status"] == "done" and state["round"]["2"]["status"] == "runs", log
    assert len(fake.calls) == 8
    step1 = work / "L" / "round1" / "step1_research_plan.md"
    stamp = step1.stat().st_mtime_ns

    r = subprocess.run(cmd, cwd=work, env=dict(os.environ), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(fake.calls) == 8 and step1.stat().st_mtime_ns == stamp  # no model asked again, round 1 untouched
    assert "round 1: done" in r.stderr
    assert len(pd.read_csv(work / "L" / "round1" / "first_look.csv")) == 1
    df = pd.read_csv(csv2)
    assert sorted(df["seed"]) == [42, 43] and set(df["status"]) == {"ok"}  # one row per run, none twice

    kimi = fake.calls_to("kimi")
    assert simple_llm.NO_RESULTS in kimi[0].prompt and "MARKER-IDEA" in kimi[0].prompt
    report1 = (work / "L" / "round1" / "first_look_analysis.md").read_text()
    assert report1.split("\n## Plots")[0].strip() in kimi[2].prompt  # round 2 plans from round 1's report
    assert "Round 1, entry first_look: Does noise 0 train at all?" in kimi[2].prompt
    assert "Round 1, entry first_look" in fake.calls_to("gemini")[3].prompt  # and so does its final step

    ledger = (work / "L" / "ledger.md").read_text()
    assert "## Round 1: done" in ledger and "## Round 2: done" in ledger
    assert "round1/step4_final_plan.md" in ledger and "--out L/round2/more_seeds.csv" in ledger
    assert "Runs done: 1 of 1" in ledger and "Runs done: 2 of 2" in ledger
    assert ledger.count("best: noise=0.0, lb=0.0") == 2
    assert "loop complete: 2 round(s)" in r.stderr
    assert_no_keys(r.stdout, r.stderr, log, folder=work / "L")
