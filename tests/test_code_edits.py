"""Code edits (issue 19): parsing answers as models write them, applying, the evaluation lock, the
sandbox, and the default-behaviour and smoke checks on real llm.py runs.

    python -m pytest -q tests/test_code_edits.py

The llm.py runs (each several seconds on 2 cores) are shared through module-scoped fixtures: the
original's default-check runs are made once and reused by every check (keyed by its content hash).
"""
import ast
import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import simple_llm as ce
import simple_llm
from simple_llm import EditError, Edit

ROOT = Path(__file__).resolve().parents[1]
USER_LLM = ROOT / "llm.py"
EXAMPLE = ROOT / "tests" / "example_code_plan.md"
FAKE_KEY = "test-only-not-a-key-0123456789abcdefghijklmnop"  # no provider key shape


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_files() -> dict:
    """Every file of the project with its hash, less what pytest itself writes."""
    skip = {".pytest_cache", "__pycache__", ".git"}
    return {str(p.relative_to(ROOT)): sha(p) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)}


def clean_env() -> dict:
    """What simple_llm's child_env gives: this environment without anything like a secret."""
    return {k: v for k, v in os.environ.items() if not re.search(r"KEY|TOKEN|SECRET", k)
            and FAKE_KEY not in v}


def base_code() -> str:
    """The user's llm.py, with a protected section inserted if this llm.py has none yet."""
    code = USER_LLM.read_text()
    if ce.PROTECTED_TITLE not in code:  # an llm.py from before the evaluation lock
        title = f"\n# {'-' * 98}\n{ce.PROTECTED_TITLE}\n"
        code = code.replace("\ndef evaluate", title + "\ndef evaluate", 1)
    return code


@pytest.fixture(scope="module", autouse=True)
def untouched_project():
    """Snapshot of the project before this file's tests; test_zz_* compares it after them."""
    return project_files()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("round1")


def write_copy(folder: Path, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llm.py"
    path.write_text(code)
    return path


# --------------------------------------------------------------------------------------------------
# parse_edits: answers as models write them

REAL_ANSWER = '''# Final plan

We keep the sweep small. | arm | flag |
|---|---|
| base | none |

### llm.py
```python
<<<<<<< SEARCH
    a = 1
=======
    a = 2
>>>>>>> REPLACE

<<<<<<<< SEARCH
b = 3
========
b = 4
>>>>>>>> REPLACE
```

Then, in the training loop (the file name inside the fence this time):

```
llm.py
<<<<<<< SEARCH
    del x
=======
>>>>>>> REPLACE
```

1. A block inside a list item, indented as the item:

   `llm.py`
   ~~~python
   <<<<<<< SEARCH
   def f():
       return 1
   =======
   def f():
       return 2
   >>>>>>> REPLACE
   ~~~

```json
{"runs": [{"name": "a", "args": ["--noise-std", "0.1"]}]}
```
A doctest line like
>>> print("not a marker")
and a setext heading
=======
are prose.
'''


def test_parse_variants_models_write():
    edits = ce.parse_edits(REAL_ANSWER)
    assert edits == [Edit("    a = 1\n", "    a = 2\n", 1), Edit("b = 3\n", "b = 4\n", 2),
                     Edit("    del x\n", "", 3),
                     Edit("def f():\n    return 1\n", "def f():\n    return 2\n", 4)]


@pytest.mark.parametrize("name_line", ["llm.py", "`llm.py`", "**llm.py**", "### llm.py", "llm.py:",
                                       "**`llm.py`**", "Changes to `llm.py`:", "File: ./llm.py"])
def test_parse_file_name_spellings(name_line):
    block = "<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n"
    answer = f"Prose first.\n\n{name_line}\n```python\n{block}```\n"
    assert ce.parse_edits(answer) == [Edit("x\n", "y\n", 1)]


def test_parse_name_on_the_fence_and_crlf():
    answer = "```python llm.py\r\n<<<<<<< SEARCH\r\nx\r\n=======\r\ny\r\n>>>>>>> REPLACE\r\n```\r\n"
    assert ce.parse_edits(answer) == [Edit("x\n", "y\n", 1)]


def test_parse_no_edits_is_empty():
    assert ce.parse_edits("Only flags this round.\n```json\n{\"runs\": []}\n```\n") == []


@pytest.mark.parametrize("answer, words", [
    ("report.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n```",
     ["edit 1", "report.py"]),
    ("llm.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n```\n\ntests/test_llm.py\n```\n"
     "<<<<<<< SEARCH\nc\n=======\nd\n>>>>>>> REPLACE\n```", ["edit 2", "tests/test_llm.py"]),
    ("llm.py\n```\n<<<<<<< SEARCH\na\n>>>>>>> REPLACE\n```", ["edit 1", "no ======="]),
    ("llm.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n", ["cut inside an edit block", "edit 1"]),
    ("llm.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n<<<<<<< SEARCH\nc\n",
     ["cut inside an edit block", "edit 2"]),
    ("llm.py\n```\n<<<<<<< SEARCH\n\n=======\nb\n>>>>>>> REPLACE\n```", ["edit 1", "empty SEARCH"]),
    ("llm.py\n```\n<<<< SEARCH\na\n=======\nb\n>>>> REPLACE\n```", ["line 3", "not one"]),
    ("llm.py\n```\n<<<<<<<<<<< SEARCH\na\n", ["line 3", "not one"]),
    ("llm.py\n```\n<<<<<<< ORIGINAL\na\n=======\nb\n>>>>>>> UPDATED\n```", ["line 3", "not one"]),
    ("Oops:\n>>>>>>> REPLACE\n", ["line 2", "not one"]),
    ("```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n```", ["edit 1", "names no file"]),
    ("llm.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n=======\nc\n>>>>>>> REPLACE\n```",
     ["two ======="]),
    ("```diff\n--- a/llm.py\n+++ b/llm.py\n@@ -1 +1 @@\n-a\n+b\n```", ["unified diff"]),
])
def test_parse_refusals_name_the_block(answer, words):
    with pytest.raises(EditError) as e:
        ce.parse_edits(answer)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


# --------------------------------------------------------------------------------------------------
# apply_edits and unified_diff

def test_apply_in_order_and_exactly_once():
    code = "a = 1\nb = 2\nc = 3\n"
    out = ce.apply_edits(code, [Edit("b = 2\n", "b = 20\n", 1), Edit("b = 20\nc", "b = 21\nc", 2)])
    assert out == "a = 1\nb = 21\nc = 3\n"
    with pytest.raises(EditError, match=r"edit 2's SEARCH \(starting 'zzz = 9'\) matches nothing"):
        ce.apply_edits(code, [Edit("a = 1\n", "a = 0\n", 1), Edit("\nzzz = 9\n", "", 2)])


def test_apply_matching_twice_is_refused():
    with pytest.raises(EditError, match=r"edit 3's SEARCH \(starting 'x = 1'\) matches 2 places"):
        ce.apply_edits("x = 1\ny = 2\nx = 1\n", [Edit("x = 1\n", "x = 5\n", 3)])


def test_unified_diff_applies_with_patch(tmp_path):
    code = base_code()
    patched = ce.apply_edits(code, ce.parse_edits(EXAMPLE.read_text()))
    diff = ce.unified_diff(code, patched)
    assert diff.startswith("--- a/llm.py\n+++ b/llm.py\n") and "+    zero_experts: int" in diff
    assert ce.unified_diff(code, code) == ""
    if shutil.which("patch") is None:
        pytest.skip("no `patch` program to apply the diff with")
    (tmp_path / "llm.py").write_text(code)
    subprocess.run(["patch", "-p1", "-s"], input=diff, text=True, cwd=tmp_path, check=True)
    assert (tmp_path / "llm.py").read_text() == patched


# --------------------------------------------------------------------------------------------------
# check_protected, on a small llm.py-like text and on the real one

RULE = "# " + "-" * 100
TOY = f'''"""toy"""
import math
import torch
import torch.nn.functional as F

{RULE}
# Model

def model(x):
    return x * 2


{RULE}
{ce.PROTECTED_TITLE}
# The split and every metric.

VAL_FRACTION = 10


def evaluate(fn, xs):
    return sum(F.mse_loss(fn(x), x) for x in xs) / len(xs)


class Evaluation:
    pass


{RULE}
# Train

def train():
    ev = evaluate(model, [torch.ones(2)])
    setattr(train, "done", True)
    return ev
'''


def check(code: str, answer_edits: list[Edit]):
    patched = ce.apply_edits(code, answer_edits)
    ce.check_protected(code, patched, answer_edits)
    return patched


def test_toy_edit_outside_the_section_passes():
    patched = check(TOY, [Edit("    return x * 2\n", "    return x * 3\n", 1),
                          Edit('    setattr(train, "done", True)\n',
                               '    setattr(train, "done", True)\n', 2)])
    assert "x * 3" in patched


@pytest.mark.parametrize("edit, words", [
    (Edit("VAL_FRACTION = 10\n", "VAL_FRACTION = 5\n", 1), ["edit 1", "touches"]),
    (Edit("    pass\n\n\n" + RULE + "\n# Train", "    pass\n\n\n" + RULE + "\n# Train", 2),
     ["edit 2", "touches"]),
    (Edit("# Model\n", "# Model\n" + RULE + "\n" + ce.PROTECTED_TITLE + "\n", 1), ["has 2"]),
])
def test_toy_edits_touching_the_section_are_refused(edit, words):
    with pytest.raises(EditError) as e:
        check(TOY, [edit])
    for w in words:
        assert w in str(e.value)


def test_toy_text_appended_to_the_section_is_refused():
    # The SEARCH is the start of the next section (outside), but the REPLACE puts code before its
    # rule line: the section's text grows.
    edit = Edit(RULE + "\n# Train\n", "VAL_FRACTION = 1\n\n\n" + RULE + "\n# Train\n", 1)
    with pytest.raises(EditError, match="differs from the original"):
        check(TOY, [edit])


@pytest.mark.parametrize("new_code, what", [
    ("evaluate = lambda fn, xs: 0.0\n", "rebinds evaluate"),
    ("def evaluate(fn, xs):\n    return 0.0\n", "rebinds evaluate"),
    ("from math import floor as VAL_FRACTION\n", "rebinds VAL_FRACTION"),
    ("for Evaluation in range(2):\n    pass\n", "rebinds Evaluation"),
    ("if True:\n    VAL_FRACTION, other = 1, 2\n", "rebinds VAL_FRACTION"),
    ("def later():\n    global evaluate\n    evaluate = None\n", "declares global evaluate"),
    ("F.mse_loss = lambda a, b: 0\n", "assigns F.mse_loss"),
    ("torch.nn.functional.mse_loss = None\n", "assigns torch.nn.functional.mse_loss"),
    ("def later():\n    Evaluation.__init__ = None\n", "assigns Evaluation.__init__"),
    ("setattr(F, 'mse_loss', None)\n", "calls setattr()"),
    ("globals()['evaluate'] = None\n", "calls globals()"),
    ("def later():\n    exec('evaluate = None')\n", "calls exec()"),
    ("import sys\nsys.modules[__name__].evaluate = None\n", "sys.modules"),
    ("def later():\n    import sys\n    print(sys.modules)\n", "uses sys.modules"),
    ("evaluate.__code__ = model.__code__\n", "evaluate.__code__"),
    ("import ctypes\n", "has import ctypes"),
    ("from torch.nn.functional import *\n", "has from torch.nn.functional import *"),
])
def test_toy_rebinding_or_patching_outside_the_section_is_refused(new_code, what):
    edit = Edit("def train():\n", new_code + "\n\ndef train():\n", 1)
    with pytest.raises(EditError) as e:
        check(TOY, [edit])
    assert what in str(e.value) and "at line" in str(e.value)


def test_toy_local_names_and_the_originals_own_reflection_are_allowed():
    helper = "def helper(evaluate=1):\n    VAL_FRACTION = 3\n    return evaluate\n\n\n"
    edit = Edit("def train():\n", helper + "def train():\n", 1)
    check(TOY, [edit])  # locals shadow nothing at module level; train's setattr was already there


@pytest.mark.parametrize("mangle, words", [
    (lambda c: c.replace(ce.PROTECTED_TITLE, "# Evaluation"), ["no", "section"]),
    (lambda c: c.replace(RULE + "\n" + ce.PROTECTED_TITLE, ce.PROTECTED_TITLE),
     ["not a section title"]),
    (lambda c: c + "\n" + RULE + "\n" + ce.PROTECTED_TITLE + "\n", ["has 2"]),
    (lambda c: c.replace("def train", "def train(:"), ["does not parse"]),
])
def test_toy_copy_without_one_intact_section_is_refused(mangle, words):
    with pytest.raises(EditError) as e:
        ce.check_protected(TOY, mangle(TOY), [])
    for w in words:
        assert w in str(e.value)


def test_real_llm_protected_section_holds_the_metrics():
    code = base_code()
    start, end = ce.protected_section(code)
    section = "\n".join(code.splitlines()[start:end])
    names = {n for n, _ in ce._bound_at_module_level(ast.parse(section).body)}
    assert {"evaluate"} <= names  # whatever else the section holds, the evaluation itself is in it
    ce.check_protected(code, code, [])
    with pytest.raises(EditError, match="touches"):
        line = next(ln for ln in section.splitlines() if ln.startswith("def evaluate"))
        ce.check_protected(code, code, [Edit(line + "\n", line + "\n", 1)])


# --------------------------------------------------------------------------------------------------
# The sandbox: each kind that runs here

def kind_works(kind: str, tmp: Path) -> bool:
    if shutil.which(kind) is None:
        return False
    return subprocess.run(ce._sandbox_prefix(kind, tmp) + ["true"], cwd=tmp, capture_output=True,
                          stdin=subprocess.DEVNULL).returncode == 0


@pytest.fixture(params=["bwrap", "unshare"])
def kind(request, monkeypatch, tmp_path):
    if not kind_works(request.param, tmp_path):
        if request.param == "unshare":
            pytest.skip("`unshare -rn` cannot run here (user namespaces disabled?): the fallback "
                        "sandbox is untested on this machine")
        pytest.skip(f"{request.param} is not installed or cannot run here "
                    "(apt-get install bubblewrap)")
    monkeypatch.setattr(ce, "sandbox_kind", lambda: request.param)
    return request.param


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 outside the sandbox, counting the connections it accepts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    srv.close()


CONNECT = """import socket, sys
s = socket.socket(); s.settimeout(5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1]))); print("CONNECTED")
except OSError as e:
    print("NO CONNECTION", e.errno)
"""


def test_sandbox_has_no_network(kind, listener, tmp_path):
    port, accepted = listener
    outside = subprocess.run([sys.executable, "-c", CONNECT, str(port)], capture_output=True,
                             text=True)
    assert "CONNECTED" in outside.stdout and len(accepted) == 1  # the server works from outside
    inside = ce.sandboxed([sys.executable, "-c", CONNECT, str(port)], writable=tmp_path, timeout=30,
                          env=clean_env())
    assert "NO CONNECTION" in inside.stdout and len(accepted) == 1, inside


ENV_PROBE = """import os, sys
leaked = any(sys.argv[1] in v for v in os.environ.values())
print("key:", os.environ.get("GEMINI_API_KEY"), "leaked:", leaked)
print("stdin:", repr(sys.stdin.read()))
"""


def test_sandbox_child_finds_no_key_and_no_stdin(kind, monkeypatch, tmp_path):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("SOME_CONFIG", FAKE_KEY)  # a key's value under another name: stripped too
    out = ce.sandboxed([sys.executable, "-c", ENV_PROBE, FAKE_KEY], writable=tmp_path, timeout=30,
                       env=clean_env()).stdout
    assert "key: None leaked: False" in out and "stdin: ''" in out


def test_sandbox_refuses_an_environment_with_a_key(kind, tmp_path):
    with pytest.raises(EditError, match="GEMINI_API_KEY"):
        ce.sandboxed(["true"], writable=tmp_path, timeout=5,
                     env={"GEMINI_API_KEY": FAKE_KEY, "PATH": "/bin"})


def alive(marker: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                return True
        except OSError:
            pass
    return False


def test_sandbox_timeout_kills_the_whole_group(kind, tmp_path):
    marker = f"sleep-marker-{os.getpid()}-{kind}"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(300)', '{marker}']); print('started', flush=True); "
              f"time.sleep(300)")
    with pytest.raises(EditError, match=r"ran past its 2 s limit[\s\S]*started"):
        ce.sandboxed([sys.executable, "-c", script], writable=tmp_path, timeout=2, env=clean_env())
    for _ in range(50):  # the kill reaches the grandchild asynchronously
        if not alive(marker):
            break
        time.sleep(0.1)
    assert not alive(marker)


WRITE = """import sys
for path in sys.argv[1:]:
    try:
        open(path, "w").write("x"); print("WROTE", path)
    except OSError as e:
        print("REFUSED", path, e.errno)
"""


def test_sandbox_writes(kind, tmp_path):
    inside, outside = tmp_path / "box", tmp_path / "outside.txt"
    inside.mkdir()
    out = ce.sandboxed([sys.executable, "-c", WRITE, str(inside / "ok.txt"), str(outside)],
                       writable=inside, timeout=30, env=clean_env()).stdout
    assert f"WROTE {inside / 'ok.txt'}" in out
    if kind == "bwrap":
        assert f"REFUSED {outside}" in out and not outside.exists()
    else:  # documented: unshare gives no network but does not confine writes
        assert f"WROTE {outside}" in out


def test_no_sandbox_is_refused_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(ce, "sandbox_kind", lambda: None)
    with pytest.raises(EditError, match=r"no sandbox can be made here .*or pass --no-sandbox"):
        ce.sandboxed(["true"], writable=tmp_path, timeout=5, env=clean_env())
    done = ce.sandboxed([sys.executable, "-c", "print('ran')"], writable=tmp_path, timeout=30,
                        env=clean_env(), no_sandbox=True)
    assert done.stdout.strip() == "ran"


def test_sandbox_kind_finds_one_here():
    assert ce.sandbox_kind() in ("bwrap", "unshare")


def test_smoke_args_keep_the_idea_and_set_the_scale():
    tail = ["--preset", "smoke", "--max-steps", "3", "--eval-every", "3", "--device", "cpu"]
    args = ["--zero-experts", "2", "4", "--seeds", "42", "43", "--out", "x.csv", "--max-steps",
            "400",
            "--grid", "max_steps=1,2", "--dataset", "HuggingFaceTB/smollm-corpus",
            "--lb-weight=0.01", "--device", "cuda", "--grid", "expert_top_k=1,2"]
    assert ce.smoke_args(args) == ["--zero-experts", "2", "4", "--seeds", "42", "--lb-weight",
                                   "0.01", "--grid", "expert_top_k=1,2", "--noise-std", "0.1",
                                   *tail]
    sweep = ["--grid", "noise_std=0.5,0", "--grid", "seed=7,8", "--lb-weight", "0", "0.01"]
    assert ce.smoke_args(sweep) == ["--noise-std", "0.5", "--seeds", "7", "--lb-weight", "0", *tail]


# --------------------------------------------------------------------------------------------------
# Real llm.py runs in the sandbox (shared)

@pytest.fixture(scope="module")
def zero_copy(workdir):
    """The example plan applied to the user's llm.py as simple_llm.py does: a copy in the round."""
    code = base_code()
    edits = ce.parse_edits(EXAMPLE.read_text())
    patched = ce.apply_edits(code, edits)
    ce.check_protected(code, patched, edits)
    return write_copy(workdir / "zero", patched)


def edit_and_check(workdir: Path, name: str, search: str, replace: str) -> None:
    code = base_code()
    edits = [Edit(search, replace, 1)]
    patched = ce.apply_edits(code, edits)
    ce.check_protected(code, patched, edits)
    copy = write_copy(workdir / name, patched)
    ce.check_default_behaviour(copy, USER_LLM, workdir, clean_env(), 180)


@pytest.mark.timeout(180)
def test_example_plan_keeps_the_default_and_runs_zero_experts(zero_copy, workdir):
    ce.check_default_behaviour(zero_copy, USER_LLM, workdir, clean_env(), 180)
    plan = json.loads(re.findall(r"```json\n(.*?)```", EXAMPLE.read_text(), re.S)[-1])
    assert [r["name"] for r in plan["runs"]] == ["baseline", "zero2", "zero4"]
    entry = ["--zero-experts", "2", "--seeds", "42"]
    ce.smoke_check_entries(zero_copy, [entry], workdir, clean_env(), 180)
    rows = list(csv.DictReader(open(workdir / "smoke-check" / "entry1" / "smoke.csv")))
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert json.loads(rows[0]["config_json"])["zero_experts"] == 2


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_zero_experts_layer_against_a_plain_reference(zero_copy):
    """The patched MoE layer: both dispatch paths equal a per-token loop where an identity expert
    returns its input times the gate weight; with Z = 0 it equals the unpatched layer exactly."""
    import torch
    new, old = load_module(zero_copy, "llm_zero_experts"), load_module(USER_LLM, "llm_unpatched")
    cfg = new.MoEModelConfig(**{**new.PRESETS["smoke"], "zero_experts": 3, "dropout": 0.0,
                                "vocab_size": 256})
    torch.manual_seed(0)
    layers = {d: new.MixtureOfExperts(cfg, d) for d in ("grouped", "sorted")}
    for p in layers["grouped"].parameters():
        torch.nn.init.normal_(p, std=0.3)
    layers["sorted"].load_state_dict(layers["grouped"].state_dict())
    x = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    route = layers["grouped"].router(x.reshape(-1, cfg.d_model))
    assert (route.experts >= cfg.num_experts).any() and (route.experts < cfg.num_experts).any()
    ref = torch.zeros(32, cfg.d_model)
    for n, xn in enumerate(x.reshape(-1, cfg.d_model)):
        for w, e in zip(route.weights[n], route.experts[n].tolist()):
            m = layers["grouped"]
            y = xn if e >= cfg.num_experts else torch.nn.functional.silu(xn @ m.w1[e].T) @ m.w2[e].T
            ref[n] += w * y
    # Gradients too: grouped_mm leaves the identity copies' rows of its input gradient unset, so an
    # unmasked layer sends garbage (nan at times) into x's gradient (the example's first version did).
    g = torch.randn(32, cfg.d_model)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    for d, layer in layers.items():
        out = layer(x)
        got = out.out.reshape(-1, cfg.d_model)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=d)
        for _ in range(3):  # unset memory differs between calls: a lucky zero must not pass
            (grad,) = torch.autograd.grad(layer(x).out.reshape(-1, cfg.d_model), x, g)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5, msg=d)
        assert out.counts.shape == (cfg.num_experts,)
        assert out.counts.sum() == (route.experts < cfg.num_experts).sum()
    cfg0 = old.MoEModelConfig(**{**old.PRESETS["smoke"], "vocab_size": 256})
    torch.manual_seed(1)
    a = old.MixtureOfExperts(cfg0).eval()
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cfg_new = new.MoEModelConfig(**{**new.PRESETS["smoke"], "vocab_size": 256})  # zero_experts 0
    b = new.MixtureOfExperts(cfg_new).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x).out, b(x).out)


@pytest.mark.timeout(180)
def test_a_changed_default_init_is_refused(workdir, zero_copy):
    with pytest.raises(EditError) as e:
        edit_and_check(workdir, "init", "nn.init.normal_(p, mean=0.0, std=0.02)",
                       "nn.init.normal_(p, mean=0.0, std=0.03)")
    msg = str(e.value)
    assert "changes the default behaviour: val_loss" in msg and "new flag" in msg
    assert "Last" in msg and "lines of its output" in msg


@pytest.mark.timeout(120)
def test_a_changed_default_value_is_refused_by_the_dry_run(workdir, zero_copy):
    search = 'd_ff: int = param(1536,'
    with pytest.raises(EditError, match=r"changes the default of config field d_ff from 1536 to "
                                         r"2048"):
        edit_and_check(workdir, "dff", search, search.replace("1536", "2048"))


def probing_copy(workdir: Path, name: str, probe: str) -> Path:
    """The user's llm.py with a probe first thing in main() (then main returns 3: the run fails)."""
    code = base_code()
    search = "def main(argv=None) -> int:\n"
    body = "".join("    " + ln + "\n" for ln in probe.splitlines())
    edits = [Edit(search, search + body + "    return 3\n", 1)]
    patched = ce.apply_edits(code, edits)
    ce.check_protected(code, patched, edits)  # the lock lets this through: the sandbox must hold
    return write_copy(workdir / name, patched)


@pytest.mark.timeout(120)
def test_a_patched_copy_cannot_reach_a_local_server(workdir, listener):
    port, accepted = listener
    probe = (f"import socket\ns = socket.socket()\ns.settimeout(5)\ntry:\n"
             f"    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
             f"except OSError as e:\n    print('NO CONNECTION', e)")
    with pytest.raises(EditError) as e:
        ce.smoke_check_entries(probing_copy(workdir, "net", probe), [["--seeds", "42"]], workdir,
                               clean_env(), 60)
    assert "failed (exit 3)" in str(e.value) and "NO CONNECTION" in str(e.value)
    assert accepted == []


@pytest.mark.timeout(120)
def test_a_patched_copy_finds_no_api_key(workdir, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_KEY)
    probe = (f"print('KEY', os.environ.get('GEMINI_API_KEY'), "
             f"any('{FAKE_KEY}' in v for v in os.environ.values()))")
    with pytest.raises(EditError) as e:
        ce.smoke_check_entries(probing_copy(workdir, "key", probe), [["--seeds", "42"]], workdir,
                               clean_env(), 60)
    assert "KEY None False" in str(e.value)


def test_zz_nothing_written_outside_the_round_folder(untouched_project):
    """Last in the file: the user's llm.py and every project file are as they were."""
    assert project_files() == untouched_project


# --------------------------------------------------------------------------------------------------
# Wired into simple_llm's runs and loop (the loopback provider server, the real SDKs)

from fake_providers import answer  # noqa: E402
from test_simple_llm import (GEMINI_KEY, KIMI_KEY, _no_dotenv, assert_no_keys,  # noqa: E402,F401
                             fake, httpserver_listen_address, work)

TINY = ["--preset", "smoke", "--max-steps", "2", "--eval-every", "2", "--eval-steps", "1",
        "--noise-std", "0.1", "--lb-weight", "0.01", "--seeds", "42"]


def code_plan(runs) -> str:
    """The shipped example code plan (prose, SEARCH/REPLACE fences) with tiny runs of its own."""
    text = EXAMPLE.read_text()
    head = text[:text.index("```json")]
    return head + "```json\n" + json.dumps({"runs": runs}) + "\n```\n"


def test_a_code_plans_runs_are_counted_and_limited_before_consent(tmp_path):
    """Nothing patched runs to count them: the unpatched planner on the flags it knows, times the
    values of each new flag or new --grid field."""
    seeds = ["--seeds", "42", "43", "44"]
    plan_md = tmp_path / "plan.md"
    plan_md.write_text(code_plan([
        {"name": "flag", "args": ["--zero-experts", "0", "2", "--noise-std", "0", "0.1",
                                  "--lb-weight", "0.01", *seeds]},
        {"name": "grid", "args": ["--grid", "zero_experts=0,2,4", "noise_std=0,0.1", "--lb-weight",
                                  "0.01", *seeds]},
        {"name": "one", "args": ["--zero-experts=2", "--lb-weight", "0", "0.01", "--noise-std", "0",
                                 "--seeds", "7"]}]))
    limits = ce.Limits(allow_code_edits=True)
    plan = ce.read_plan(plan_md, limits=limits)
    for d in "opq":
        (tmp_path / d).mkdir()
    lines = ce.prepare_copy(plan, USER_LLM, tmp_path / "o", limits)
    assert [e.n_runs for e in plan.entries] == [12, 18, 2] and plan.total == 32
    assert "32 runs counted by the unpatched llm.py" in lines
    assert "plan.md: 3 entries, 32 runs" in ce.plan_text(plan, tmp_path / "o", lines)
    small = ce.Limits(max_runs=20, allow_code_edits=True)
    with pytest.raises(ce.PlanError, match=r"entry 2 \(grid\) brings the plan to 30 runs or more, "
                                           r"more than --max-runs 20"):
        ce.prepare_copy(ce.read_plan(plan_md, limits=small), USER_LLM, tmp_path / "p", small)
    assert not list((tmp_path / "p").iterdir())  # refused before the copy was written
    for args, refusal in ((["--fre"], r"--fre \(--fresh\) is chosen by the tool"),
                          (["--cache-dir", "/tmp/x"], r"--cache-dir \(--cache-dir\) is chosen by"),
                          (["--data-files", "/etc/hostname"], r"data file /etc/hostname is .*outside"),
                          (["--tokenizer", "evil/remote-code"], r"tokenizer 'evil/remote-code' is not")):
        plan_md.write_text(code_plan([{"name": "x", "args": ["--zero-experts", "2", *args, *seeds]}]))
        with pytest.raises(ce.PlanError, match=r"entry 1 \(x\): " + refusal):
            ce.prepare_copy(ce.read_plan(plan_md, limits=limits), USER_LLM, tmp_path / "p", limits)
    assert not list((tmp_path / "p").iterdir())
    plan_md.write_text(code_plan([{"name": "x", "args": ["--d-model", "-3", *seeds]}]))
    plan = ce.read_plan(plan_md, limits=limits)  # the unpatched planner refuses: not counted
    assert "runs not counted ahead" in ce.prepare_copy(plan, USER_LLM, tmp_path / "q", limits)
    plan_md.write_text(code_plan([{"name": "x", "args": ["--d-model", "-3", *seeds]},
                                  {"name": "y", "args": ["--data-files", "/etc/hostname", *seeds]}]))
    with pytest.raises(ce.PlanError, match=r"entry 2 \(y\): data file /etc/hostname"):
        ce.prepare_copy(ce.read_plan(plan_md, limits=limits), USER_LLM, tmp_path / "q", limits)


def test_code_plan_without_allow_code_edits_is_refused_and_yes_never_runs_code(tmp_path, capsys):
    plan = tmp_path / "plan.md"
    plan.write_text(code_plan([{"name": "z", "args": ["--zero-experts", "2", *TINY]}]))
    before = sha(ROOT / "llm.py")
    rc = simple_llm.main(["runs", str(plan), "--run", "--yes", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "this run does not allow code edits" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and sha(ROOT / "llm.py") == before
    assert simple_llm.code_edit_rules(simple_llm.Limits()) == ""
    assert "SEARCH" in simple_llm.code_edit_rules(simple_llm.Limits(allow_code_edits=True))


def test_the_accumulation_rule_reads_report_verdicts():
    word = lambda w: {"e": {"verdicts": [{"word": w}]}}  # noqa: E731
    assert simple_llm.better(word("better"))
    assert not simple_llm.better(word("worse")) and not simple_llm.better(word(
        "no detectable difference")) and not simple_llm.better({"e": {"error": "no verdict"}})


# round 2's edit matches only the round-1 copy and breaks its syntax: refused, which proves
# round 2 started from that copy without training anything more
ROUND2 = """Next: more zero experts.

llm.py
```python
<<<<<<< SEARCH
        self.zero_experts = cfg.zero_experts  # identity experts: ids E .. E + Z - 1
=======
        self.zero_experts = cfg.zero_experts  # identity experts: ids E .. E + Z - 1
evaluate = None
>>>>>>> REPLACE
```

```json
{"runs": [{"name": "again", "args": ["--zero-experts", "4"]}]}
```
"""


@pytest.mark.timeout(240)
def test_loop_runs_a_code_plan_end_to_end_and_the_next_round_starts_from_its_copy(
        fake, work, capfd):
    before = sha(ROOT / "llm.py")
    # A real verdict, not a constructed one: on the patched copy, a Muon learning rate 4x the default
    # lowers the loss at smoke scale on every seed (about -1.5 nats at 10 updates): "better".
    runs = ["--zero-experts", "2", "--preset", "smoke", "--max-steps", "6", "--eval-every", "6",
            "--eval-steps", "1", "--noise-std", "0.1", "--lb-weight", "0.01", "--muon-lr", "0.01",
            "0.04", "--seeds", "42", "43", "44"]
    plan1 = code_plan([{"name": "zero2", "question": "Do 2 zero experts train, and does a higher "
                        "Muon LR help them?", "args": runs}])
    fake.then("gemini", lambda: answer("gemini", "review one"), lambda: answer("gemini", plan1),
              lambda: answer("gemini", "review two"), lambda: answer("gemini", ROUND2))
    rc = simple_llm.main(["loop", "idea.md", "--rounds", "2", "--yes", "--allow-code-edits",
                          "--repairs", "0", "--out-dir", "L"])
    out, err = capfd.readouterr()
    r1, r2 = work / "L" / "round1", work / "L" / "round2"
    assert "allows edits to llm.py" in fake.calls[3].prompt  # step 4 got the form and the rules
    diff = (r1 / "llm.py.diff").read_text()
    assert diff.startswith("--- a/llm.py") and "+    zero_experts: int = param(0" in diff
    assert diff in out  # shown with the confirmation
    assert (r1 / "checks" / "default-check" / "copy" / "train" / "default.csv").is_file()
    assert (r1 / "checks" / "smoke-check" / "entry1" / "smoke.csv").is_file()
    rows = list(csv.DictReader(open(r1 / "zero2.csv")))
    assert rows and all(r["status"] == "ok" for r in rows)
    state = json.loads((work / "L" / "loop_state.json").read_text())
    assert state["round"]["1"]["status"] == "done" and state["code"] == "round1/llm.py"
    ledger = (work / "L" / "ledger.md").read_text()
    assert "[round1/llm.py.diff](round1/llm.py.diff)" in ledger
    assert re.search(r"muon_lr 0\.04 vs 0\.01: better \(n=3", ledger), ledger
    assert "diff -u llm.py L/round1/llm.py" in ledger
    # round 2: its prompt carries the copy's code; its edit applies to the copy only
    assert "zero_experts" in fake.calls[7].prompt and "zero_experts" not in fake.calls[3].prompt
    assert rc == 2 and "round 2" in err and "Traceback" not in err
    assert "does not parse" in err and "matches nothing" not in err  # applied to the copy
    assert not (r2 / "checks").exists() and not list(r2.glob("*.csv"))
    assert sha(ROOT / "llm.py") == before
    assert_no_keys(out, err, folder=work / "L")


# A code plan that attacks from inside the patched llm.py, behind a new flag (the defaults stay as
# they were, so the default-behaviour check passes): it connects to the loopback provider server,
# looks for any key in its environment and reads stdin, and writes what it found in its folder.
PROBE = '''argv = sys.argv[1:] if argv is None else list(argv)
if "--probe-port" in argv:
    import socket
    at = argv.index("--probe-port")
    port = int(argv.pop(at + 1))
    argv.pop(at)
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /openai/models HTTP/1.0\\r\\n\\r\\n")
        net = "CONNECTED"
    except OSError as e:
        net = f"NO CONNECTION {e.errno}"
    keys = sorted(k for k, v in os.environ.items()
                  if re.search("KEY|TOKEN|SECRET", k) or "SECRET-" in v)
    found = f"PROBE net={net} keys={keys} stdin={sys.stdin.read()!r}"
    print(found)
    open("probe.txt", "a").write(found + "\\n")
'''


def probe_plan(tmp_path: Path, port: int) -> Path:
    search = "def main(argv=None) -> int:\n"
    body = "".join(f"{'    ' + ln if ln else ''}\n" for ln in PROBE.splitlines())
    edit = f"llm.py\n```python\n<<<<<<< SEARCH\n{search}=======\n{search}{body}>>>>>>> REPLACE\n```\n"
    runs = {"runs": [{"name": "probe", "args": ["--probe-port", str(port), *TINY]}]}
    plan = tmp_path / "plan.md"
    plan.write_text(f"# Probe\n\n{edit}\n```json\n{json.dumps(runs)}\n```\n")
    return plan


def probe_findings(out: Path) -> list[str]:
    return [ln for p in sorted(out.rglob("probe.txt")) for ln in p.read_text().splitlines()]


@pytest.mark.timeout(240)
def test_cli_code_plan_in_the_sandbox_reaches_no_server_and_finds_no_key(fake, tmp_path,
                                                                         monkeypatch, capfd):
    monkeypatch.setenv("MOONSHOT_API_KEY", KIMI_KEY)
    monkeypatch.setenv("SOME_CONFIG", GEMINI_KEY)  # a key's value under another name
    monkeypatch.chdir(tmp_path)
    port = int(fake.kimi_url.split(":")[2].split("/")[0])
    before, listing = project_files(), {p.name for p in tmp_path.iterdir()}
    rc = simple_llm.main(["runs", str(probe_plan(tmp_path, port)), "--allow-code-edits", "--run",
                          "--yes", "--out-dir", "o"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    found = probe_findings(tmp_path / "o")
    assert len(found) == 2, found  # the smoke check and the run itself
    assert all(f.startswith("PROBE net=NO CONNECTION") and f.endswith(" keys=[] stdin=''")
               for f in found), found
    assert fake.server.log == [] and fake.calls == []
    assert project_files() == before
    assert {p.name for p in tmp_path.iterdir()} == listing | {"plan.md", "o"}
    assert_no_keys(out, err, folder=tmp_path / "o")


@pytest.mark.timeout(240)
def test_no_sandbox_refuses_code_unless_asked_then_says_so_and_still_strips_keys(
        fake, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(simple_llm, "sandbox_kind", lambda: None)  # neither bwrap nor unshare runs
    monkeypatch.chdir(tmp_path)
    port = int(fake.kimi_url.split(":")[2].split("/")[0])
    plan = probe_plan(tmp_path, port)
    args = ["runs", str(plan), "--allow-code-edits", "--run", "--yes", "--out-dir", "o"]
    assert simple_llm.main(args) == 2
    err = capfd.readouterr().err
    assert "no sandbox can be made here" in err and "--no-sandbox" in err
    assert not (tmp_path / "o" / "llm.py").exists() and not probe_findings(tmp_path / "o")
    assert simple_llm.main(args + ["--no-sandbox"]) == 0
    out, err = capfd.readouterr()
    assert "patched code runs WITHOUT A SANDBOX" in out
    assert "environment without keys, no stdin and a time limit" in out
    found = probe_findings(tmp_path / "o")
    assert found == ["PROBE net=CONNECTED keys=[] stdin=''"] * 2, found  # unconfined, yet key-free
    assert_no_keys(out, err, folder=tmp_path / "o")
