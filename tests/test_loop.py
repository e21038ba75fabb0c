"""Closing the loop: {results}, plans as models write them, plan safety and budget, `runs` and `loop`.

Covers: {results} from a report, a CSV, auto-found, off or absent; the run format lists llm.py's own flags;
plans written the way real models answer (prose, tables, other fences, any fence label, comments, trailing
commas, single quotes, a bare list, args as one string, "--flag value" items, nested lists, a copy of the
prompt's example) are read as the runs they mean, and every wrong case (unknown key, two blocks, a cut
block, an unknown flag with the nearest real one, a bare extra value, a field set twice, tool-owned flags)
is refused in one line naming the entry; each reproduced attack of issue 16 fails safely (exit 2, one line,
nothing read, written, run or sent); the budget line comes from measured throughput and refuses runs over
the limits; --run needs --yes or a typed yes, and the commands are shown even when stdout is redirected;
llm.py children get no stdin and no keys; the shipped example plan runs offline; the ledger shows
report.py's verdicts; `loop` repairs a refused plan with exactly one extra request carrying the refusal,
reports a failed run to the model with its output, holds its out-dir lock before the chain, and over two
rounds (killed and resumed) carries round 1's ledger row into round 2's first prompt.
"""
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import report
import simple_llm
from fake_providers import answer
from test_simple_llm import (GEMINI_KEY, KIMI_KEY, SCRIPT, _no_dotenv, assert_no_keys,  # noqa: F401
                             fake, httpserver_listen_address, work)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "example_plan.md"
SMOKE = ["--preset", "smoke", "--lb-weight", "0", "--noise-std", "0", "--max-steps", "2", "--eval-every", "2",
         "--eval-steps", "1"]


def plan_md(runs, prose="The plan in words.") -> str:
    return f"{prose}\n\n```json\n{json.dumps({'runs': runs}, indent=1)}\n```\n"


def chain_dry(*extra) -> list[str]:
    return ["chain", "idea.md", "--code", "code.py", "--system", "system.md", "--dry-run", *extra]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="session")
def smoke_csv(tmp_path_factory) -> Path:
    """One real smoke run's CSV: its tokens/s is this machine's measured speed for the smoke shape."""
    out = tmp_path_factory.mktemp("speed") / "speed.csv"
    r = subprocess.run([sys.executable, str(ROOT / "llm.py"), *SMOKE, "--seeds", "42", "--out", str(out)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, cwd=out.parent)
    assert r.returncode == 0, r.stderr
    return out


def write_csv(path: Path, template: Path, effects, seeds=(42, 43, 44)) -> Path:
    """A results CSV in llm.py's own columns (the template is a real smoke run's row): noise {0, 0.1, 0.5}
    x lb {0.01, 0} x seeds, val_loss = 4 + effects[condition] / 100 + a seed effect."""
    with open(template, newline="") as f:
        reader = csv.DictReader(f)
        columns, row = reader.fieldnames, next(reader)
    conds = [(n, lb) for lb in (0.01, 0.0) for n in (0.0, 0.1, 0.5)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for i, ((n, lb), effect) in enumerate(zip(conds, effects)):
            for j, s in enumerate(seeds):
                loss = 4 + effect / 100 + (0.0, 0.03, -0.02)[j] + 0.001 * ((i * 7 + j * 3) % 5)
                cfg = {**json.loads(row["config_json"]), "noise_std": n, "load_balancing_weight": lb, "seed": s}
                w.writerow({**row, "seed": s, "noise_std": n, "load_balancing_weight": lb, "val_loss": loss,
                            "val_perplexity": math.exp(loss), "best_val_perplexity": math.exp(loss - 0.01),
                            "run_id": f"run{i}_{j}", "config_hash": f"{i * 10 + j:016x}",
                            "config_json": json.dumps(cfg)})
    return path


EFFECTS = [0, 0.2, 14, 0.1, 0.3, 0.2]


@pytest.fixture(scope="session")
def smoke_report(smoke_csv) -> Path:
    """Its report: as a loop's --results, it stands for the CSV beside it (built once, not per loop)."""
    return report.write_report(smoke_csv)


# ---------------------------------------------------------------------------------------------- {results}

def test_results_from_an_explicit_report_and_from_a_csv(work, capsys, smoke_csv):
    (work / "found.md").write_text("# Findings\nnoise 0.5 hurt: MARKER-REPORT\n\n## Plots\n\n![p](p.png)\n")
    assert simple_llm.main(chain_dry("--results", "found.md")) == 0
    out, err = capsys.readouterr()
    assert out.count("MARKER-REPORT") == 3  # steps 1, 2 and 4
    assert "p.png" not in out  # plots mean nothing to a model
    assert "results: found.md" in err and "{results}" not in out

    sweep = write_csv(work / "sweep.csv", smoke_csv, EFFECTS)
    assert simple_llm.main(chain_dry("--results", str(sweep))) == 0
    out, err = capsys.readouterr()
    assert not (work / "sweep_analysis.md").exists() and "built for this dry run only" in err  # writes nothing
    assert "analysis of `sweep.csv`" in out and "## Primary analysis" in out


def test_results_auto_found_turned_off_or_absent(work, capsys, smoke_csv):
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

    write_csv(work / report.DEFAULT_CSV, smoke_csv, EFFECTS)  # newer than its report
    before = sorted(p.name for p in work.iterdir())
    assert simple_llm.main(chain_dry()) == 0
    out, err = capsys.readouterr()
    assert "MARKER-AUTO" not in out and f"analysis of `{report.DEFAULT_CSV}`" in out
    assert sorted(p.name for p in work.iterdir()) == before  # a dry run builds it in a temporary folder


def test_missing_results_file_is_a_user_error(work, capsys):
    assert simple_llm.main(chain_dry("--results", "nope.csv")) == 2
    assert "nope.csv" in one_error_line(capsys.readouterr().err)


def test_plan_format_lists_llm_flags_from_its_parser(monkeypatch):
    import llm
    text = simple_llm.plan_format(max_runs=12)
    assert "At most 12 runs" in text and "```json" in text and "10 minutes of training per run" in text
    listed = {line.split(":")[0].split()[0] for line in text.splitlines() if line.startswith("--")}
    assert {"--noise-std", "--lb-weight", "--seeds", "--grid", "--d-model", "--max-steps"} <= listed
    assert not listed & {"--out", "--fresh", "--device", "--dry-run", "--report", "--bench", "--cache-dir",
                         "--json", "--time-steps"}
    example = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert llm.plan_sweep(example["runs"][0]["args"]).n_runs == 9  # the prompt's example is itself valid
    real = llm.build_parser

    def grown():  # llm.py gains a flag: the prompt follows without a change in simple_llm.py
        p = real()
        p.add_argument("--made-up-flag", type=float, metavar="FLOAT", help="a flag added later (default: 0)")
        return p
    monkeypatch.setattr(llm, "build_parser", grown)
    assert "--made-up-flag FLOAT: a flag added later (default: 0)" in simple_llm.plan_format()


# ---------------------------------------------------------------------------------------------- plans as written

PROSE = """# Final plan: router noise without the balancing loss

**Total experiments: 6 runs** (2 conditions x 3 seeds), about 2 minutes each.

## Goals
We ask whether a little router noise changes the final validation loss when the load-balancing loss is off.
The review was right that a single seed cannot separate the effect from seed variance, so we pair by seed.

| condition | --noise-std | --lb-weight | seeds |
|-----------|-------------|-------------|-------|
| baseline  | 0           | 0           | 42-44 |
| noisy     | 0.05        | 0           | 42-44 |

The settings map to llm.py like this (for the reader, not a run):

```python
cfg = MoEModelConfig(noise_std=0.05, load_balancing_weight=0.0)
```

```bash
python llm.py --preset smoke --lb-weight 0 --noise-std 0 0.05 --seeds 42 43 44
```
"""
WANT = ["--preset", "smoke", "--lb-weight", "0", "--noise-std", "0", "0.05", "--seeds", "42", "43", "44"]
ACCEPTED = {
    "JSON_label": PROSE + '```JSON\n{"runs": [{"name": "noise", "question": "q", "args": ' + json.dumps(WANT)
    + "}]}\n```\nThat is all.",
    "no_label_comments_commas": PROSE + '```\n{\n  // phase 1 only\n  "runs": [\n    {"name": "noise", '
    '"question": "q", "args": ["--preset", "smoke", "--lb-weight", "0", "--noise-std", "0", "0.05", '
    '"--seeds", "42", "43", "44",],},\n  ],\n}\n```\n',
    "tilde_single_quotes": PROSE + "~~~json5\n{'runs': [{'name': 'noise', 'question': 'q', 'args': "
    "['--preset', 'smoke', '--lb-weight', '0', '--noise-std', '0', '0.05', '--seeds', '42', '43', '44']}]}\n~~~\n",
    "args_one_string": PROSE + '```json\n{"runs": [{"name": "noise", "question": "q", "args": "--preset smoke '
    '--lb-weight 0 --noise-std 0 0.05 --seeds 42 43 44"}]}\n```\n',
    "flag_value_items": PROSE + '```json\n{"runs": [{"name": "noise", "question": "q", "args": ["--preset smoke",'
    ' "--lb-weight 0", "--noise-std 0 0.05", "--seeds 42 43 44"]}]}\n```\n',
    "bare_list_numbers_nested": PROSE + '```json\n[{"name": "noise", "question": "q", "args": ["--preset", '
    '"smoke", "--lb-weight", 0, "--noise-std", [0, 0.05], "--seeds", [42, [43, 44]]]}]\n```\n',
    "example_copied_first": PROSE + "As the format asks:\n\n```json\n" + json.dumps(simple_llm.plan_example())
    + '\n```\n\nOur runs:\n\n```json\n{"runs": [{"name": "noise", "question": "q", "args": '
    + json.dumps(WANT) + "}]}\n```\n",
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_plans_are_read_the_way_models_write_them(tmp_path, case):
    import llm
    (tmp_path / "plan.md").write_text(ACCEPTED[case])
    plan = simple_llm.read_plan(tmp_path / "plan.md")
    (entry,) = plan.entries
    assert (entry.name, entry.question, entry.args) == ("noise", "q", WANT)
    assert plan.edits == [] and plan.code == simple_llm.DEFAULT_CODE
    simple_llm.check_flags("e", entry.args, simple_llm.llm_flags())
    assert llm.plan_sweep(entry.args).n_runs == 6


def entry(args, **extra) -> str:
    return json.dumps({"name": "a", "question": "q", "args": args, **extra})


REFUSED = {
    "no_block": (PROSE, "has no block of runs"),
    "bad_json": ("```json\n{\"runs\": [oops]}\n```\n", "is not valid JSON"),
    "unknown_key_seeds": (f'```json\n{{"runs": [{entry(SMOKE, seeds=[1, 2])}]}}\n```', "unknown key 'seeds'"),
    "unknown_key_command": (f'```json\n{{"runs": [{entry(SMOKE, command="python llm.py")}]}}\n```',
                            "unknown key 'command'"),
    "unknown_top_key": (f'```json\n{{"runs": [{entry(SMOKE)}], "total_runs": 3}}\n```', "unknown key 'total_runs'"),
    "two_blocks": (PROSE + f'Phase 1:\n```json\n{{"runs": [{entry(SMOKE)}]}}\n```\nPhase 2 if it works:\n'
                   f'```json\n{{"runs": [{entry(SMOKE + ["--seeds", "1"])}]}}\n```\n', "2 blocks of runs (lines"),
    "cut_open_fence": (PROSE + '```json\n{"runs": [{"name": "a", "args": ["--noise-std", "0',
                       "the answer was cut inside the block"),
    "cut_inside_closed": ('```json\n{"runs": [{"name": "a", "args": ["--noise-std"\n```\n', "(cut?)"),
    "near_miss_field_name": (plan_md([{"name": "a", "args": SMOKE + ["--load-balancing-weight", "0"]}]),
                             "llm.py has no flag --load-balancing-weight; did you mean --lb-weight?"),
    "near_miss_typo": (plan_md([{"name": "a", "args": SMOKE + ["--noise-sd", "0.1"]}]),
                       "did you mean --noise-std?"),
    "bare_extra_value": (plan_md([{"name": "a", "args": ["--preset", "smoke", "2", "--seeds", "1"]}]),
                         "the value '2' after --preset belongs to no flag (--preset takes one value)"),
    "value_before_flag": (plan_md([{"name": "a", "args": ["0.1", "--preset", "smoke"]}]), "comes before any flag"),
    "field_twice": (plan_md([{"name": "a", "args": SMOKE + ["--noise-std", "0.1"]}]), "noise"),
    "flag_and_grid": (plan_md([{"name": "a", "args": SMOKE + ["--d-model", "64", "--grid", "d_model=32,64"]}]),
                      "both set d_model"),
    "args_not_list": (plan_md([{"name": "a", "args": {"noise": 1}}]), "must be a list"),
    "no_name": (plan_md([{"args": []}]), '"name"'),
    "duplicate": (plan_md([{"name": "A b", "args": SMOKE}, {"name": "a_b", "args": SMOKE}]), "already used"),
    "same_report": (plan_md([{"name": "experiment", "args": SMOKE},
                             {"name": "moe_routing_noise_experiment_results", "args": SMOKE}]), "already used"),
    "double_dash": (plan_md([{"name": "a", "args": ["--", "--lb-weight", "0"]}]), "'--'"),
    "forbidden": (plan_md([{"name": "a", "args": SMOKE + ["--ou", "elsewhere.csv"]}]), "chosen by the tool"),
    "malformed": (plan_md([{"name": "a", "args": SMOKE + ["--max-steps", "ten"]}]), "invalid int value: 'ten'"),
    "shell": (plan_md([{"name": "a", "args": SMOKE + ["--max-steps", "2; touch pwned", "$(touch pwned2)"]}]),
              "invalid int value: '2; touch pwned'"),
    "too_many": (plan_md([{"name": "a", "args": SMOKE + ["--seeds", "1", "2", "3"]},
                          {"name": "b", "args": SMOKE + ["--seeds", "1", "2"]}]), "entry 2 (b) brings the plan to 5"),
    "code_edits": (plan_md([{"name": "a", "args": SMOKE}]) + "llm.py\n```\n<<<<<<< SEARCH\nx\n=======\ny\n"
                   ">>>>>>> REPLACE\n```\n", "does not allow code edits"),
}
TOOL_OWNED = ["--out", "--ou", "--out=x.csv", "--fresh", "--fr", "--device=cpu", "--dry", "--cache-dir",
              "--bench", "--bench-o", "--bench-out=x.json", "-h", "--he", "-hh", "--json", "--time-steps"]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_wrong_plans_are_refused_in_one_line_and_run_nothing(tmp_path, monkeypatch, capsys, case):
    text, message = REFUSED[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.md").write_text(text)
    rc = simple_llm.main(["runs", "plan.md", "--run", "--yes", "--max-runs", "4", "--out-dir", "out"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert message in one_error_line(err)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.md"]  # nothing ran, no file


@pytest.mark.parametrize("token", TOOL_OWNED)
def test_tool_owned_flags_are_refused_however_spelled(token):
    with pytest.raises(simple_llm.PlanError, match="chosen by the tool"):
        simple_llm.check_flags("entry 1 (x)", ["--noise-std", "0", token, "v"], simple_llm.llm_flags())


def test_ordinary_flags_and_negative_numbers_pass_the_flag_check():
    simple_llm.check_flags("e", ["--noise-std", "-0.5", "1e-3", "--lb", "0", "--grid=expert_top_k=1,2",
                                 "--d-model", "64", "--no-compile"], simple_llm.llm_flags())


# ---------------------------------------------------------------------------------------------- plan safety

def refused(tmp_path, capsys, runs, *extra) -> str:
    (tmp_path / "plan.md").write_text(plan_md(runs))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = simple_llm.main(["runs", "plan.md", "--run", "--yes", "--out-dir", "out", *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    return one_error_line(err)


@pytest.mark.parametrize("args", [["--data-files=/etc/hostname"], ["--data-fi=/etc/hostname"],
                                  ["--data-files", "../outside.txt"], ["--data-files", "link.txt"]])
def test_data_files_outside_the_folder_are_refused_however_spelled(tmp_path, monkeypatch, capsys, args):
    # issue 16 item 1: --flag=value, an abbreviation, a parent path, a symlink inside pointing outside
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    (tmp_path / "project" / "link.txt").symlink_to(tmp_path / "outside.txt")
    line = refused(tmp_path / "project", capsys, [{"name": "a", "args": SMOKE + ["--seeds", "1"] + args}])
    assert "outside the folder the tool runs in" in line and "entry 1 (a)" in line


@pytest.mark.parametrize("args,what", [
    (["--tokenizer=/etc"], "tokenizer '/etc'"), (["--grid=tokenizer=/tmp"], "tokenizer '/tmp'"),
    (["--grid", "tokenizer=bytes,../x"], "tokenizer '../x'"), (["--tokenizer", "someone/custom-code"], "tokenizer"),
    (["--dataset=/etc"], "dataset '/etc'"), (["--grid=dataset=/../../x"], "dataset '/../../x'")])
def test_tokenizers_and_datasets_come_from_the_allowlist_only(tmp_path, monkeypatch, capsys, args, what):
    # issue 16 items 1, 2 and 8: paths and hub ids a plan names are never loaded (a hub id can carry code)
    monkeypatch.chdir(tmp_path)
    # a dataset counts only without data files: no preset (its corpus) for those
    base = ["--tokenizer", "bytes", "--max-steps", "2"] if what.startswith("dataset") else SMOKE
    runs = [{"name": "a", "args": base + ["--seeds", "1"] + args}]
    line = refused(tmp_path, capsys, runs)
    assert what in line and "is not allowed" in line and "--allow-data" in line


def test_a_tokenizer_folder_with_code_never_runs_and_children_get_no_keys(tmp_path, monkeypatch, capsys):
    # issue 16 item 2: a folder inside the project (the path check passes it) whose config asks for custom code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOVITA_API_KEY", KIMI_KEY)
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    (tok / "evil.py").write_text("import os, pathlib\npathlib.Path('RAN').write_text(repr(dict(os.environ)))\n")
    line = refused(tmp_path, capsys, [{"name": "a", "args": SMOKE + ["--seeds", "1", "--tokenizer", "tok"]}])
    assert "tokenizer 'tok' is not allowed" in line and not (tmp_path / "RAN").exists()
    # every child this tool starts: an llm.py stand-in that records its environment and stdin
    stub = tmp_path / "stub.py"
    stub.write_text("import json, os, sys\nopen('child.json', 'w').write(json.dumps({'env': dict(os.environ), "
                    "'stdin': sys.stdin.read()}))\n")
    simple_llm.load_env()
    plan = simple_llm.Plan([simple_llm.PlanEntry("a", "", ["--seeds", "1"], 1, [], [0.1])], tmp_path / "p.md",
                           code=stub)
    (tmp_path / "out").mkdir()
    with simple_llm.out_dir_lock(tmp_path / "out") as fd:
        assert simple_llm.run_plan(plan, tmp_path / "out", fd).rc == 0
    child = json.loads((tmp_path / "child.json").read_text())
    assert child["stdin"] == "" and not {"NOVITA_API_KEY", "GEMINI_API_KEY"} & set(child["env"])
    assert_no_keys(json.dumps(child["env"]))


def test_a_plan_of_ten_million_runs_is_refused_before_anything_is_expanded(tmp_path, monkeypatch, capsys):
    # issue 16 item 5: counted from the axes (llm.plan_sweep), never enumerated
    monkeypatch.chdir(tmp_path)
    values = [str(v) for v in range(1, 11)]
    args = SMOKE[:6] + [a for f in ("--seeds", "--max-steps", "--eval-every", "--num-documents", "--max-tokens",
                                "--dropout", "--muon-lr") for a in [f, *(values if f != "--dropout" else
                                                                         [f"0.{v}" for v in range(10)])]]
    line = refused(tmp_path, capsys, [{"name": "huge", "args": args}])
    assert "entry 1 (huge)" in line and "10,000,000 runs" in line


def test_a_model_too_big_for_memory_is_refused_before_timing(tmp_path, monkeypatch, capsys):
    # issue 16 item 6: --d-model 4096 or a huge token array fail here, not by running out of memory
    monkeypatch.chdir(tmp_path)
    line = refused(tmp_path, capsys, [{"name": "big", "args": ["--d-model", "4096", "--n-heads", "64"]}])
    assert "entry 1 (big): run 1 needs about" in line and "GB of memory, more than this machine's" in line
    line = refused(tmp_path, capsys, [{"name": "data", "args": ["--dataset", "random", "--tokenizer", "bytes",
                                                                "--max-tokens", str(10 ** 12)]}])
    assert "entry 1 (data)" in line and "GB of memory" in line


def test_budget_refuses_runs_over_the_limits_naming_entry_and_numbers(tmp_path, monkeypatch, capsys, smoke_csv):
    # issue 16 item 6: the throughput measured on this machine (an earlier smoke run's tokens/s) prices the plan
    monkeypatch.chdir(tmp_path)
    long = [{"name": "long", "args": SMOKE[:6] + ["--seeds", "1", "--max-steps", "10000000"]}]
    line = refused(tmp_path, capsys, long,
                   "--results", str(smoke_csv))
    assert "entry 1 (long): run 1 needs about" in line and "more than --max-run-minutes 10" in line
    runs = [{"name": n, "args": SMOKE[:6] + ["--seeds", "1", "2", "--max-steps", "30"]} for n in ("a", "b")]
    line = refused(tmp_path, capsys, runs, "--results", str(smoke_csv), "--max-total-minutes", "0.01",
                   "--max-run-minutes", "1000")
    assert "the plan needs about" in line and "more than --max-total-minutes 0.01 (the largest: a," in line


def test_budget_line_comes_before_the_confirmation_with_every_command(tmp_path, monkeypatch, capsys, smoke_csv):
    # issue 16 item 10: stdout redirected (not a terminal): the commands still show where the question is asked
    monkeypatch.chdir(tmp_path)

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))  # anything but "yes" declines
    assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--out-dir", "out", "--results", str(smoke_csv)]) == 1
    out, err = capsys.readouterr()
    command = "--seeds 42 43 --max-steps 10 --eval-every 5 --out out/noise_without_lb.csv"
    assert command in out and command in err
    budget = [ln for ln in err.splitlines() if ln.startswith("budget: ")]
    assert budget[0].startswith("budget: 1. noise_without_lb: 4 runs x ~") and "peak memory ~" in budget[0]
    assert "from the speed measured on cpu" in budget[1] and "timed just now" not in budget[1]
    assert err.index(command) < err.index("budget: total") < err.index("Run these 4 runs? Type yes")
    assert "nothing was run" in err and not (tmp_path / "out").exists()


def test_plan_text_limits_and_invisible_characters(tmp_path, monkeypatch, capsys):
    # issue 16 item 10: an 11,000-character question; U+200B / U+2028 / U+FEFF / tag characters in a plan
    monkeypatch.chdir(tmp_path)
    line = refused(tmp_path, capsys, [{"name": "a", "question": "why? " * 2200, "args": SMOKE}])
    assert "its question is 11000 characters, more than 300" in line
    for bad in ("\u200b", "\u2028", "\ufeff", "\U000e0041", "\r\x1b[2K"):
        line = refused(tmp_path, capsys, [{"name": "a", "args": SMOKE[:6] + ["--max-steps", "2" + bad]}])
        assert "control characters" in line


def test_a_planted_lock_symlink_is_not_followed(tmp_path, monkeypatch, capsys):
    # issue 16 item 9: .runs.lock -> a file of the user's, which must not be truncated
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "notes.txt"
    victim.write_text("mine\n")
    (tmp_path / "idea.md").write_text("an idea")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".runs.lock").symlink_to(victim)
    assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "out"]) == 2
    assert "a symlink there is never followed" in one_error_line(capsys.readouterr().err)
    assert victim.read_text() == "mine\n"


def test_a_second_loop_on_one_out_dir_exits_at_once_sending_nothing(fake, work, capsys):
    # issue 16 item 11: the loop takes its lock before the chain
    (work / "L").mkdir()
    with simple_llm.out_dir_lock(work / "L"):
        assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L"]) == 2
    assert "still writing in L" in one_error_line(capsys.readouterr().err)
    assert fake.calls == [] and sorted(p.name for p in (work / "L").iterdir()) == [".runs.lock"]


def test_a_second_runs_on_a_busy_out_dir_is_refused(tmp_path, monkeypatch, capsys, smoke_csv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with simple_llm.out_dir_lock(tmp_path / "out"):  # as a running runs/loop, or its llm.py, holds it
        assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--yes", "--out-dir", "out",
                                "--results", str(smoke_csv)]) == 2
        assert "still writing in out" in one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("*.csv"))  # nothing ran


# ---------------------------------------------------------------------------------------------- runs

def test_run_without_terminal_or_yes_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--out-dir", "out"]) == 2
    assert "--yes" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_runs_out_dir_that_cannot_be_made_fails_before_asking(tmp_path, monkeypatch, capsys, smoke_csv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/sub"):
        assert simple_llm.main(["runs", str(EXAMPLE), "--run", "--yes", "--out-dir", out,
                                "--results", str(smoke_csv)]) == 2
        assert f"cannot create --out-dir {out}" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_example_plan_runs_offline(tmp_path):
    """The README's worked example: python simple_llm.py runs tests/example_plan.md --run --yes."""
    def runs(*extra):
        return subprocess.run([sys.executable, str(SCRIPT), "runs", str(EXAMPLE), "--out-dir", "out", *extra],
                              cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=280)
    r = runs("--run", "--yes")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "out" / "noise_without_lb.csv")
    assert len(df) == 4 and set(df["status"]) == {"ok"} and sorted(df["seed"]) == [42, 42, 43, 43]
    assert "(3 steps timed just now)" in r.stdout  # no earlier results here: the shape was timed
    assert "reports:\n  out/noise_without_lb_analysis.md" in r.stderr
    r = runs()  # again, without --run: now its own finished runs give the speed
    assert r.returncode == 0, r.stderr
    assert "budget: total" in r.stdout and "timed just now" not in r.stdout
    assert "nothing was run" in r.stderr and len(df) == 4


# ---------------------------------------------------------------------------------------------- ledger

def test_ledger_rows_carry_report_verdicts(tmp_path, smoke_csv):
    results = write_csv(tmp_path / "e.csv", smoke_csv, [-3, 0.2, 14, 0.1, 0.3, 0.2])
    found = simple_llm.verdicts(results)
    s = report.summary(results)
    assert found["text"] == report.summary_text(s) and found["n_ok"] == s.n_ok
    state = {"round": {"1": {"status": "done", "refusals": ["entry 1 (x): llm.py has no flag --foo"],
                             "entries": [{"name": "e", "question": "Does noise hurt?", "args": ["--noise-std", "0"],
                                          "runs": 18}], "verdicts": {"e": found}}}}
    table = simple_llm.ledger_table(state).splitlines()
    assert table[0] == "| round | question | change | runs | verdict | effect [95% CI] | minutes | tokens |"
    assert "refused: entry 1 (x): llm.py has no flag --foo" in table[2]
    rows = table[3:]
    assert len(rows) == len(s.verdicts) > 0
    for v, row in zip(s.verdicts, rows):
        assert f"{v.contrast}: {v.word} (n={v.n}" in row and f"{v.effect:+.4f} [{v.ci_low:+.4f}" in row
        assert row.startswith("| 1 | Does noise hurt? | --noise-std 0 | 18/18 ok |")


# ---------------------------------------------------------------------------------------------- loop

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
    assert "```json" in out and "--noise-std F [F ...]" in out  # the run format with llm.py's flags
    assert "repaired by the model up to 2 times" in out and "round 2 reads them" in out
    assert "results: experiment_analysis.md" in err and "round 1/2" in err
    assert not (work / simple_llm.DEFAULT_LOOP_DIR).exists()


def test_loop_repairs_a_refused_plan_with_one_request(fake, work, capfd, smoke_report):
    wrong = [{"name": "first_look", "question": "Does lb 0 train?",
              "args": SMOKE[:2] + ["--load-balancing-weight", "0"] + SMOKE[4:] + ["--seeds", "42"]}]
    right = [{**wrong[0], "args": SMOKE + ["--seeds", "42"]}]
    fake.then("gemini", lambda: answer("gemini", "review one"), lambda: answer("gemini", plan_md(wrong)),
              lambda: answer("gemini", plan_md(right, "Fixed: the flag is --lb-weight.")))
    # --results: an earlier smoke run gives the speed (and round 1's {results})
    assert simple_llm.main(["loop", "idea.md", "--yes", "--out-dir", "L", "--results", str(smoke_report)]) == 0
    captured = capfd.readouterr()
    assert len(fake.calls) == 5  # the chain's four and exactly one repair
    repair = fake.calls[-1]
    assert repair.provider == "gemini" and "llm.py has no flag --load-balancing-weight; did you mean --lb-weight?" \
        in repair.prompt and "--load-balancing-weight" in repair.prompt.split("<answer>")[1]
    rdir = work / "L" / "round1"
    assert (rdir / "step4_final_plan.repair1.md").read_text().startswith("Fixed: the flag is --lb-weight.")
    manifest = json.loads((rdir / "chain_run.json").read_text())
    (entry,) = manifest["repairs"]
    assert entry["repair"] == 1 and "--load-balancing-weight" in entry["refusal"]
    assert entry["output"] == "step4_final_plan.repair1.md" and entry["usage"]
    state = json.loads((work / "L" / "loop_state.json").read_text())["round"]["1"]
    assert state["status"] == "done" and state["repairs"] == 1 and state["plan"].endswith("repair1.md")
    ledger = (work / "L" / "ledger.md").read_text()
    assert "| 1 |  | (plan refused) | 0 | refused: entry 1 (first_look): llm.py has no flag" in ledger
    assert "(1 repair)" in ledger and "| 1 | Does lb 0 train? |" in ledger
    assert "round 1: refused (entry 1 (first_look)" in captured.err
    assert_no_keys(captured.out, captured.err, folder=work / "L")


def test_loop_reports_a_failed_run_to_the_model_then_stops(fake, work, capfd, smoke_report):
    failing = [{"name": "x", "args": SMOKE + ["--seeds", "1", "--data-files", "missing.txt"]}]
    fake.then("gemini", lambda: answer("gemini", "review"), lambda: answer("gemini", plan_md(failing)),
              lambda: answer("gemini", "I cannot fix it."))
    loop = ["loop", "idea.md", "--yes", "--out-dir", "L", "--repairs", "1", "--results", str(smoke_report)]
    assert simple_llm.main(loop) == 2
    err = capfd.readouterr().err
    assert "error: round 1: L/round1/step4_final_plan.repair1.md has no block of runs" in err
    assert "(1 repair tried)" in err and "Traceback" not in err
    repair = fake.calls[-1].prompt
    assert "entry 1 (x): a run failed (llm.py exit code 2); the last lines of its output:" in repair
    assert "data file not found" in repair  # llm.py's own words, so the model can avoid them
    state = json.loads((work / "L" / "loop_state.json").read_text())["round"]["1"]
    assert state["refusals"][0] == "entry 1 (x): a run failed (llm.py exit code 2); the last lines of its output:"
    assert state["status"].startswith("plan refused") and len(fake.calls) == 5
    # a rerun: the chain is reused, no repair is left, the record of the one made stays
    assert simple_llm.main(loop) == 2
    assert len(fake.calls) == 5
    (entry,) = json.loads((work / "L" / "round1" / "chain_run.json").read_text())["repairs"]
    assert entry["output"] == "step4_final_plan.repair1.md" and "a run failed" in entry["refusal"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_loop_two_rounds_resumes_after_kill_and_carries_the_ledger(fake, work):
    round1 = [{"name": "first_look", "question": "Does noise 0.1 change the loss?",
               "args": SMOKE[:4] + ["--noise-std", "0", "0.1", "--seeds", "42", "43"] + SMOKE[6:]}]
    round2 = [{"name": "more_seeds", "question": "Is it the same on seed 44?",
               "args": SMOKE[:6] + ["--seeds", "44", "45", "--max-steps", "4", "--eval-every", "4",
                                    "--eval-steps", "1"]}]
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
    except ProcessLookupError:
        pass  # it ended by itself: the asserts below say why
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
    assert len(fake.calls) == 8 and step1.stat().st_mtime_ns == stamp  # no model asked again
    assert "round 1: done" in r.stderr and len(pd.read_csv(work / "L" / "round1" / "first_look.csv")) == 4
    df = pd.read_csv(csv2)
    assert sorted(df["seed"]) == [44, 45] and set(df["status"]) == {"ok"}  # one row per run, none twice

    kimi = fake.calls_to("kimi")
    assert simple_llm.NO_RESULTS in kimi[0].prompt and "MARKER-IDEA" in kimi[0].prompt
    v = report.summary(work / "L" / "round1" / "first_look.csv").verdicts[0]
    row = f"| 1 | Does noise 0.1 change the loss? | {' '.join(round1[0]['args'])} | 4/4 ok | {v.contrast}: {v.word}"
    assert row in kimi[2].prompt  # round 2's first prompt carries round 1's ledger row with its verdict
    assert "Round 1, entry first_look: Does noise 0.1 change the loss?" in kimi[2].prompt  # and its report
    assert row in fake.calls_to("gemini")[3].prompt
    ledger = (work / "L" / "ledger.md").read_text()
    assert row in ledger and "## Round 1: done" in ledger and "## Round 2: done" in ledger
    assert "--out L/round2/more_seeds.csv" in ledger and "| 2 | Is it the same on seed 44? |" in ledger
    assert "loop complete: 2 round(s)" in r.stderr
    assert_no_keys(r.stdout, r.stderr, log, folder=work / "L")
