"""Code edits (issue 19): a plan's SEARCH/REPLACE edits to llm.py, applied to a copy, checked,
sandboxed.

Draft of simple_llm.py's "Code edits" section (stdlib only, no module-level state, nothing from
simple_llm).

    python -m pytest -q tests/test_code_edits.py   # parse, apply, the lock, the sandbox, smoke runs

Flow (simple_llm.py drives it): parse_edits(answer) -> apply_edits(code, edits) ->
check_protected(...) -> unified_diff(...) shown and saved -> check_default_behaviour(...) ->
smoke_check_entries(...); every patched llm.py runs through sandboxed(). Every refusal is an
EditError with a one-line message."""
from __future__ import annotations

import ast
import collections
import contextlib
import csv
import difflib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Code edits

PROTECTED_TITLE = "# Evaluation (protected)"
EDIT_FILE = "llm.py"
TAIL_LINES = 40  # lines of a failed run's output quoted in its refusal
RULE = re.compile(r"^# -{20,}\s*$")  # the rule line that opens every llm.py section
# aider's markers, 5 to 9 characters as aider tolerates; anything else like one is refused.
HEAD = re.compile(r"^\s*<{5,9}\s*SEARCH\s*>?\s*$", re.IGNORECASE)
DIVIDER = re.compile(r"^\s*={5,9}\s*$")
UPDATED = re.compile(r"^\s*>{5,9}\s*REPLACE\s*<?\s*$", re.IGNORECASE)
# A line of < or > with an edit word, or 5+ of them alone: meant as a marker ("<<<< SEARCH").
NEAR_MISS = re.compile(r"^\s*(?:[<>]{2,}\s*(?:SEARCH|REPLACE|ORIGINAL|UPDATED)\b|[<>]{5,}\s*$)"
                       r"|^\s*(?:SEARCH|REPLACE)\s*[<>]{2,}", re.IGNORECASE)
FENCE = re.compile(r"^\s*(?:`{3,}|~{3,})([^`]*)$")  # an opener's info: ```python, ```python llm.py
UNIFIED_DIFF = re.compile(r"^(?:\+\+\+|---) (?:[ab]/)?\S*llm\.py\b")
SECRET_NAME = re.compile(r"API_KEY|_TOKEN$|_SECRET$", re.IGNORECASE)


class EditError(Exception):
    """A code edit refused: one line saying which edit and what to do (simple_llm: a repairable
    refusal)."""


class Edit(typing.NamedTuple):
    search: str  # exact text of llm.py to replace (whole lines, each ending in a newline)
    replace: str  # what replaces it (may be empty: a deletion)
    index: int  # 1-based number of the block in the answer, for messages


def _file_name(line: str) -> str | None:
    """The file a line names: alone (`llm.py`, **llm.py**, ### llm.py, llm.py:, File: llm.py), else
    the one .py file a short line mentions ("Changes to `llm.py`:")."""
    text = line.strip().strip("*`'\"").strip()
    text = re.sub(r"^#+\s*", "", text)
    text = re.sub(r"^(?:file(?:name)?|path)\s*:\s*", "", text, flags=re.IGNORECASE)
    text = text.strip("*`'\":").strip()
    if re.fullmatch(r"[\w./\\-]+\.[A-Za-z0-9]+", text):
        return text[2:] if text.startswith("./") else text
    named = set(re.findall(r"[\w./-]*\w\.py\b", line)) if len(line) <= 120 else set()
    return named.pop().removeprefix("./") if len(named) == 1 else None


def _name_before(lines: list[str], head: int) -> str | None:
    """The file named just before the SEARCH marker at lines[head]: inside the fence (its first
    line, or the opener's ```python llm.py) or on the line before the fence."""
    i = head - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    if i < 0:
        return None
    fence = FENCE.match(lines[i])
    if not fence:
        return _file_name(lines[i]) if not UPDATED.match(lines[i]) else None
    named = [t for t in fence.group(1).replace(":", " ").split() if "." in t]
    if named:
        return _file_name(named[0])
    i -= 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    return _file_name(lines[i]) if i >= 0 else None


def _marker_error(line: str, n: int) -> EditError:
    return EditError(f"line {n} of the answer looks like an edit marker but is not one "
                     f"({line.strip()[:40]!r}): write <<<<<<< SEARCH, ======= and >>>>>>> REPLACE, "
                     f"7 characters each, on lines of their own")


def _read_block(lines: list[str], i: int, index: int, indent: str) -> tuple[Edit, int]:
    """The SEARCH/REPLACE section whose marker is lines[i]: its Edit and the line after its REPLACE
    marker."""
    parts, j = ([], []), i + 1
    side = 0
    while True:
        if j == len(lines):
            raise EditError(f"the answer was cut inside an edit block (edit {index}): ask for the "
                            f"plan again, or shorten it so the answer ends")
        line = lines[j]
        if HEAD.match(line):
            raise EditError(f"edit {index} has no {'=======' if side == 0 else '>>>>>>> REPLACE'} "
                            f"before the next <<<<<<< SEARCH: close each block with >>>>>>> "
                            f"REPLACE")
        if DIVIDER.match(line):
            if side == 1:
                raise EditError(f"edit {index} has two ======= lines: one SEARCH part, one "
                                f"=======, one REPLACE part per block")
            side = 1
        elif UPDATED.match(line):
            if side == 0:
                raise EditError(f"edit {index} has a SEARCH with no =======: write <<<<<<< SEARCH, "
                                f"the old lines, =======, the new lines, >>>>>>> REPLACE")
            break
        else:
            if indent and line.startswith(indent):  # a block indented in a list item: as the marker
                line = line[len(indent):]
            parts[side].append(line + "\n")
        j += 1
    search, replace = "".join(parts[0]), "".join(parts[1])
    if not search.strip():
        raise EditError(f"edit {index} has an empty SEARCH: quote the lines of llm.py the change "
                        f"goes next to (new files and appends are not supported)")
    return Edit(search, replace, index), j + 1


def parse_edits(answer: str) -> list[Edit]:
    """aider's SEARCH/REPLACE edits to llm.py in a model's answer, in order ([] when there are
    none).

    The file name stands on its own line before the fence (`llm.py`, **llm.py**, ### llm.py) or as
    the fence's first line; a block with no name of its own belongs to the file of the block before
    it, as in aider. Markers of 5-9 characters are accepted, as aider does. Refused (EditError
    naming the edit): another file, no name at all, a SEARCH with no =======, an empty SEARCH, a
    block the answer ends inside, a marker-like line that is not a marker, a unified diff of llm.py
    instead of blocks."""
    lines = answer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    edits, i, current = [], 0, None
    while i < len(lines):
        line = lines[i]
        if HEAD.match(line):
            index = len(edits) + 1
            name = _name_before(lines, i) or current
            if name is None:
                raise EditError(f"edit {index} names no file: put {EDIT_FILE} on its own line just "
                                f"before the fence that holds the block")
            if name != EDIT_FILE:
                raise EditError(f"edit {index} changes {name}: only {EDIT_FILE} may be edited (the "
                                f"copy in the round folder); express the rest with {EDIT_FILE} "
                                f"flags")
            indent = line[:len(line) - len(line.lstrip())]
            edit, i = _read_block(lines, i, index, indent)
            edits.append(edit)
            current = name
            continue
        if UPDATED.match(line) or NEAR_MISS.match(line):
            raise _marker_error(line, i + 1)
        if UNIFIED_DIFF.match(line):
            raise EditError(f"line {i + 1} of the answer starts a unified diff: write each change "
                            f"to {EDIT_FILE} as a <<<<<<< SEARCH / ======= / >>>>>>> REPLACE block "
                            f"instead")
        i += 1
    return edits


def _first_line(edit: Edit) -> str:
    first = next((ln for ln in edit.search.splitlines() if ln.strip()), "")
    return first.strip()[:60]


def apply_edits(code: str, edits: list[Edit]) -> str:
    """code with each edit applied in order; each SEARCH must match the text (as edited so far)
    exactly once, else EditError naming the edit and its first line."""
    for edit in edits:
        n = code.count(edit.search)
        if n != 1:
            what = "matches nothing in" if n == 0 else f"matches {n} places in"
            hint = ("copy the lines exactly as llm.py has them, indentation included" if n == 0 else
                    "quote more surrounding lines so it matches once")
            raise EditError(f"edit {edit.index}'s SEARCH (starting {_first_line(edit)!r}) {what} "
                            f"llm.py: {hint}")
        code = code.replace(edit.search, edit.replace, 1)
    return code


def unified_diff(original: str, patched: str) -> str:
    """The change as a unified diff, a/llm.py -> b/llm.py ('' when the texts are equal)."""
    def lines(text):
        return (text if text.endswith("\n") or not text else text + "\n").splitlines(keepends=True)
    return "".join(difflib.unified_diff(lines(original), lines(patched), "a/llm.py", "b/llm.py"))


def protected_section(code: str, what: str = "the patched llm.py") -> tuple[int, int]:
    """(first line, line after the last), 0-based, of the one `# Evaluation (protected)` section:
    from the rule line above its title to the next rule line (or the end). EditError when there is
    none or more."""
    lines = code.splitlines()
    titles = [i for i, ln in enumerate(lines) if ln.strip() == PROTECTED_TITLE]
    if len(titles) != 1:
        raise EditError(f"{what} has {len(titles) or 'no'} {PROTECTED_TITLE!r} section"
                        f"{'s' if titles else ''}: it must keep exactly one, unchanged")
    t = titles[0]
    if lines[t] != PROTECTED_TITLE or t == 0 or not RULE.match(lines[t - 1]):
        raise EditError(f"{what}'s {PROTECTED_TITLE!r} title is not a section title (a rule line "
                        f"above it, at the start of the line): it must stay as it was")
    end = next((i for i in range(t + 1, len(lines)) if RULE.match(lines[i])), len(lines))
    return t - 1, end


def _section_text(code: str, span: tuple[int, int]) -> str:
    return "".join(code.splitlines(keepends=True)[span[0]:span[1]])


def _bound_at_module_level(stmts) -> typing.Iterator[tuple[str, ast.AST]]:
    """(name, node) for every module-level binding in stmts (def/class bodies are other scopes)."""
    for stmt in stmts:
        nodes = [stmt]
        while nodes:
            node = nodes.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield node.name, node
                nodes.extend(node.decorator_list)  # decorators run in module scope; bodies do not
                continue
            if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                                 ast.GeneratorExp)):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    yield (alias.asname or alias.name.split(".")[0]), node
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                yield node.id, node
            elif isinstance(node, ast.ExceptHandler) and node.name:
                yield node.name, node
            nodes.extend(ast.iter_child_nodes(node))


def _root_name(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


RISKY_CALLS = {"exec", "eval", "compile", "__import__", "globals", "vars", "setattr", "delattr"}
RISKY_MODULES = {"builtins", "ctypes", "gc", "importlib", "inspect"}
RISKY_ATTRS = {"__dict__", "__globals__", "__code__", "__builtins__", "f_globals", "f_locals"}


def _flat_targets(targets) -> typing.Iterator[ast.AST]:
    for t in targets:
        if isinstance(t, (ast.Tuple, ast.List)):
            yield from _flat_targets(t.elts)
        else:
            yield t.value if isinstance(t, ast.Starred) else t


def _lock_findings(tree: ast.Module, span: tuple[int, int], protected: set[str]):
    """(key, line, what) for each thing outside the protected section (lines span, 0-based) that
    could change what the section computes: a module-level binding of one of its names, a global
    statement for one, an assignment into one of its names or into an imported module
    (monkeypatching torch, np, math...), reflection (setattr, globals, __dict__, sys.modules, exec)
    and risky imports."""
    stmts = [s for s in tree.body if not span[0] < s.lineno <= span[1]]
    modules = {n for n, node in _bound_at_module_level(tree.body)
               if isinstance(node, (ast.Import, ast.ImportFrom))}
    for name, node in _bound_at_module_level(stmts):
        if name in protected:
            yield ("bind", name), node.lineno, f"rebinds {name}"
    for node in (n for s in stmts for n in ast.walk(s)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in set(node.names) & protected:
                yield ("global", name), line, f"declares global {name}"
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in _flat_targets(targets):
            root = _root_name(t) if isinstance(t, (ast.Attribute, ast.Subscript)) else None
            if root in protected or root in modules:
                yield ("patch", ast.unparse(t)), line, f"assigns {ast.unparse(t)}"
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Name) and func.id in RISKY_CALLS:
            yield ("call", ast.unparse(node)), line, f"calls {func.id}()"
        if isinstance(node, ast.Attribute) and (
                node.attr in RISKY_ATTRS or node.attr == "modules" and _root_name(node) == "sys"):
            yield ("attr", ast.unparse(node)), line, f"uses {ast.unparse(node)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names])
            for name in names:
                if name.split(".")[0] in RISKY_MODULES or any(a.name == "*" for a in node.names):
                    yield ("import", ast.unparse(node)), line, f"has {ast.unparse(node)}"


def _parse(code: str, what: str) -> ast.Module:
    try:
        return ast.parse(code)
    except SyntaxError as e:
        raise EditError(f"{what} does not parse: line {e.lineno}: {e.msg}") from None


def check_protected(original: str, patched: str, edits: list[Edit]) -> None:
    """Refuse (EditError) a change that could alter how the evaluation measures: an edit whose
    SEARCH overlaps the protected section of the original, a copy whose section text differs or that
    has no such section or two, or a copy that rebinds, outside the section, a name the section
    defines, or patches an imported module or uses reflection the original does not (checked on the
    AST; see _lock_findings). A determined obfuscation can still get past an AST check: the diff is
    shown."""
    span = protected_section(original, "the base llm.py")
    lines = original.splitlines(keepends=True)
    lo, hi = sum(map(len, lines[:span[0]])), sum(map(len, lines[:span[1]]))
    for edit in edits:
        start = original.find(edit.search)
        while start >= 0:
            if start < hi and start + len(edit.search) > lo:
                raise EditError(f"edit {edit.index} (SEARCH starting {_first_line(edit)!r}) "
                                f"touches the {PROTECTED_TITLE!r} section: the validation split "
                                f"and the metrics may not change; edit the model, data or training "
                                f"code instead")
            start = original.find(edit.search, start + 1)
    new_span = protected_section(patched)
    if _section_text(patched, new_span) != _section_text(original, span):
        raise EditError(f"the patched llm.py's {PROTECTED_TITLE!r} section differs from the "
                        f"original's (an edit next to it changed it): leave that section's text "
                        f"exactly as it is")
    section = _parse(_section_text(original, span), "the base llm.py's protected section")
    protected = {name for name, _ in _bound_at_module_level(section.body)}
    old_tree, new_tree = _parse(original, "the base llm.py"), _parse(patched, "the patched llm.py")
    before = collections.Counter(k for k, _, _ in _lock_findings(old_tree, span, protected))
    for key, line, what in _lock_findings(new_tree, new_span, protected):
        if before[key] > 0:
            before[key] -= 1
            continue
        raise EditError(f"the patched llm.py {what} at line {line}: code outside "
                        f"{PROTECTED_TITLE!r} may not rebind its names, patch modules or use "
                        f"reflection; give new code new names")


def _project() -> Path:
    """The folder of the user's llm.py and report.py (this file sits beside them)."""
    return Path(__file__).resolve().parent


def _sandbox_prefix(kind: str, writable: Path) -> list[str]:
    if kind == "bwrap":
        w = str(writable)
        hide = [a for env in (_project() / ".env", Path.cwd() / ".env") if env.is_file()
                for a in ("--ro-bind", "/dev/null", str(env))]
        # A fresh /dev plus the NVIDIA nodes only (not --dev-bind /dev /dev: every host device).
        gpus = [a for p in sorted(glob.glob("/dev/nvidia*")) for a in ("--dev-bind", p, p)]
        return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/",
                "/", "--dev", "/dev", *gpus, "--proc", "/proc", *hide, "--bind", w, w, "--chdir", w,
                "--"]
    # new user, network and PID namespaces; the PID namespace dies with unshare (--kill-child)
    return ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
            "--"]


def sandbox_kind() -> str | None:
    """"bwrap" (no network, writes confined), "unshare" (no network only), or None: each is probed
    by running `true` inside it, so a disabled user namespace (AppArmor, containers) reads as
    absent."""
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
        for kind in ("bwrap", "unshare"):
            if shutil.which(kind) is None:
                continue
            try:
                probe = subprocess.run(_sandbox_prefix(kind, Path(tmp)) + ["true"], cwd=tmp,
                                       timeout=20, stdin=subprocess.DEVNULL, capture_output=True)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return kind
    return None


def sandboxed(cmd: list[str], *, writable: Path, timeout: float, env: dict,
              no_sandbox: bool = False, capture: bool = True) -> subprocess.CompletedProcess:
    """Run cmd (an argument list, never a shell) in the best sandbox here, cwd = writable.

    Always: stdin closed, exactly `env` (the caller strips it; a name like *_API_KEY is refused here
    too), a new session killed as a whole after `timeout` seconds (EditError). bwrap: no network
    (its own loopback), PID/IPC namespaces, the whole file system read-only except `writable`, .env
    files hidden. unshare: no network (loopback down), own PID namespace, but writes are NOT
    confined: the process can write wherever the user can. Neither limits CPU or memory (only the
    timeout does) nor hides files from reading. With no sandbox: EditError, unless no_sandbox (then
    only the points under "Always"). capture=False lets the output through to this process's
    stdout/stderr (long runs)."""
    secret = sorted(k for k in env if SECRET_NAME.search(k))
    if secret:
        raise EditError(f"refusing to start patched code with secrets in its environment "
                        f"({', '.join(secret)})")
    kind = sandbox_kind()
    if kind is None and not no_sandbox:
        raise EditError("no sandbox can be made here (neither bubblewrap nor `unshare -rn` runs: "
                        "user namespaces may be disabled); code edits need one, or pass "
                        "--no-sandbox")
    writable = Path(writable).resolve()
    full = (_sandbox_prefix(kind, writable) if kind else []) + [str(c) for c in cmd]
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(full, cwd=writable, env=env, stdin=subprocess.DEVNULL, stdout=pipe,
                            stderr=pipe, start_new_session=True, text=True, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C: the whole group goes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        script = next((Path(str(c)).name for c in cmd if str(c).endswith(".py")),
                      Path(str(cmd[0])).name)
        raise EditError(f"{script} ran past its {timeout:g} s limit and was "
                        f"stopped.{_tail(out, err)}") from None
    return subprocess.CompletedProcess(full, proc.returncode, out, err)


def _tail(out: str | None, err: str | None) -> str:
    """The last TAIL_LINES lines of a run's output (progress bars' carriage returns kept to their
    last state), as a block to append to a refusal."""
    lines = []
    for text in (out or "", err or ""):
        lines += [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip()]
    lines = lines[-TAIL_LINES:]
    return f"\nLast {len(lines)} lines of its output:\n" + "\n".join(lines)


SMOKE_STEPS = ["--max-steps", "3", "--eval-every", "3"]
DEFAULT_RUN = ["--preset", "smoke", *SMOKE_STEPS, "--seeds", "42", "--noise-std", "0.1",
               "--lb-weight", "0.01", "--device", "cpu"]


def sandbox_env(env: dict, workdir: Path, project: Path | None = None, report: bool = True) -> dict:
    """env plus what a patched llm.py in a round folder needs: the shipped smoke corpus, `import
    report` from the project (report=False: no report.py on the path, so llm.py skips its report),
    the hub offline, temporary and cache files (datasets' too: a read-only HF_HOME would stop
    load_dataset) inside workdir, no bytecode written."""
    project = Path(project or _project()).resolve()
    tmp = Path(workdir).resolve() / "tmp"
    (tmp / "mpl").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return {**env, "LLM_SAMPLE_CORPUS": str(project / "data_cache" / "sample_corpus.txt"),
            **({"PYTHONPATH": str(project)} if report else {}), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmp), "MPLCONFIGDIR": str(tmp / "mpl"),
            "XDG_CACHE_HOME": str(tmp / "cache"), "HF_DATASETS_CACHE": str(tmp / "hf_datasets"),
            "PYTHONDONTWRITEBYTECODE": "1"}


def _run_llm(code: Path, args: list[str], folder: Path, env: dict, timeout: float, what: str,
             fresh: bool = True, report: bool = True) -> subprocess.CompletedProcess:
    """code (an llm.py) with args in the sandbox, cwd and writable = folder; EditError when it
    fails. report=False: report.py is not importable, so the run writes no report (2-3 s saved)."""
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proc = sandboxed([sys.executable, str(Path(code).resolve()), *args], writable=folder,
                     timeout=timeout, env=sandbox_env(env, folder, report=report))
    if proc.returncode != 0:
        raise EditError(f"{what} failed (exit {proc.returncode}): python llm.py {' '.join(args)}"
                        f"{_tail(proc.stdout, proc.stderr)}")
    return proc


def _csv_rows(path: Path, what: str, proc) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        raise EditError(f"{what} wrote no readable CSV "
                        f"({e}){_tail(proc.stdout, proc.stderr)}") from None
    if not rows:
        raise EditError(f"{what} wrote no result row{_tail(proc.stdout, proc.stderr)}")
    return rows


def _val_loss(rows: list[dict], what: str, proc) -> float:
    try:
        loss = float(rows[-1]["val_loss"])
    except (KeyError, ValueError):
        loss = math.nan
    if len(rows) != 1 or not math.isfinite(loss):
        raise EditError(f"{what} gave {len(rows)} rows, val_loss {rows[-1].get('val_loss')!r} "
                        f"(expected one finite value){_tail(proc.stdout, proc.stderr)}")
    return loss


def _default_plan(code: Path, folder: Path, env: dict, timeout: float, what: str,
                  keep: bool = False) -> dict:
    """What `llm.py --dry-run --json` (no flags) would run: the defaults of every field and axis.
    keep: save it as folder/plan.json and reuse that file when it is there (the original's, by
    content hash)."""
    saved = folder / "plan.json"
    if keep and saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    proc = _run_llm(code, ["--dry-run", "--json"], folder, env, timeout, what, report=False)
    try:
        plan = json.loads(proc.stdout)
        plan = {"n_runs": plan["n_runs"], "axes": plan["axes"],
                "configs": [r["config"] for r in plan["runs"]]}
    except (ValueError, KeyError, TypeError) as e:
        raise EditError(f"{what}: --dry-run --json printed no plan "
                        f"({e}){_tail(proc.stdout, proc.stderr)}")
    if keep:
        saved.write_text(json.dumps(plan), encoding="utf-8")
    return plan


def _compare_defaults(want: dict, got: dict) -> None:
    if (got["n_runs"], got["axes"]) != (want["n_runs"], want["axes"]):
        raise EditError(f"the patched llm.py's default sweep differs: {got['n_runs']} runs over "
                        f"{got['axes']} instead of {want['n_runs']} over {want['axes']}; keep the "
                        f"defaults")
    for w, g in zip(want["configs"], got["configs"]):
        for key, value in w.items():
            if key not in g or g[key] != value:
                raise EditError(f"the patched llm.py changes the default of config field {key} "
                                f"from {value!r} to {g.get(key, '(removed)')!r}: keep every "
                                f"default and pass the new value in the runs' args, or add a new "
                                f"flag whose default keeps the old behaviour")


def check_default_behaviour(copy: Path, original: Path, workdir: Path, env: dict,
                            timeout: float) -> None:
    """Refuse (EditError) a copy whose defaults differ from the original's: its `--dry-run --json`
    plan with no flags must resolve every original config field to the same value, and both must
    train `--preset smoke` for 3 steps with seed 42 to the same val_loss (to 1e-6), on CPU in the
    sandbox.

    Outputs go under workdir/default-check/; the original's, keyed by its content hash, are kept and
    reused by later checks of the same original. timeout: seconds per run."""
    base = Path(workdir) / "default-check"
    sha = hashlib.sha256(Path(original).read_bytes()).hexdigest()[:12]
    orig_dir, copy_dir = base / f"original-{sha}", base / "copy"
    orig_dir.mkdir(parents=True, exist_ok=True)
    if not (orig_dir / "llm.py").is_file():  # run from here: no report.py beside it to import
        shutil.copyfile(original, orig_dir / "llm.py")
    original = orig_dir / "llm.py"
    want = _default_plan(original, orig_dir / "dry", env, timeout, "the original llm.py's dry run",
                         keep=True)
    got = _default_plan(copy, copy_dir / "dry", env, timeout, "the patched llm.py's dry run")
    _compare_defaults(want, got)
    losses, cache = [], orig_dir / "train" / "data_cache"
    for code, folder, what in ((original, orig_dir / "train", "the original llm.py's smoke run"),
                               (copy, copy_dir / "train", "the patched llm.py's smoke run")):
        done = folder / "default.csv"
        if code == original and done.is_file():  # this original's run, made by an earlier check
            proc = subprocess.CompletedProcess([], 0, "", "")
        else:  # the copy reads the tokens the original cached, as its real runs will
            args = [*DEFAULT_RUN, "--out", done.name]
            args += ["--cache-dir", str(cache)] if code == copy else []
            proc = _run_llm(code, args, folder, env, timeout, what, report=False)
        losses.append(_val_loss(_csv_rows(done, what, proc), what, proc))
    if abs(losses[0] - losses[1]) > 1e-6:
        raise EditError(f"the patched llm.py changes the default behaviour: val_loss "
                        f"{losses[1]:.7f} vs the original's {losses[0]:.7f} (python llm.py "
                        f"{' '.join(DEFAULT_RUN)}); put the new behaviour behind a new flag whose "
                        f"default keeps the old one{_tail(proc.stdout, proc.stderr)}")


# Flags whose values the smoke check sets itself: output, length, device, data (the shipped corpus).
SMOKE_OWNED = {"--out", "--fresh", "--preset", "--max-steps", "--eval-every", "--eval-steps",
               "--log-every", "--device", "--compile", "--no-compile", "--dataset",
               "--dataset-config", "--data-files", "--tokenizer", "--num-documents", "--max-tokens",
               "--cache-dir", "--vocab-size", "--batch-size", "--max-seq-len",
               "--gradient-accumulation-steps"}


ROUTING_FLAGS = {"--noise-std": "noise_std", "--lb-weight": "load_balancing_weight",
                 "--seeds": "seed"}


def smoke_args(args: list[str]) -> list[str]:
    """An entry's llm.py args at smoke scale: its model flags and their sweeps kept (the values a
    code change branches on), the routing axes (--noise-std, --lb-weight, --seeds, and --grid on
    them) cut to their first value (0.1, 0.01, 42 when absent), the flags in SMOKE_OWNED (and --grid
    items naming their fields) dropped, then the smoke preset for 3 steps on CPU."""
    def field(name: str) -> str:
        return name.replace("-", "_")
    grid_routing = {field(v): k for k, v in ROUTING_FLAGS.items()} | {"lb_weight": "--lb-weight",
                                                                      "seeds": "--seeds"}
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        j = i + 1
        while j < len(args) and not (eq or re.match(r"--?[A-Za-z]", args[j])):
            j += 1  # the flag's values
        values = [value] if eq else args[i + 1:j]
        grid_field = field(values[0].split("=")[0]) if flag == "--grid" and values else None
        if flag in SMOKE_OWNED or grid_field and "--" + grid_field.replace("_", "-") in SMOKE_OWNED:
            pass
        elif flag in ROUTING_FLAGS and values:
            out += [flag, values[0].split(",")[0]]
        elif grid_field in grid_routing:
            out += [grid_routing[grid_field], values[0].split("=", 1)[-1].split(",")[0]]
        else:
            out += args[i:j]
        i = j
    for flag, value in (("--noise-std", "0.1"), ("--lb-weight", "0.01"), ("--seeds", "42")):
        if flag not in out:  # one run, not the default 18-run product
            out += [flag, value]
    return out + ["--preset", "smoke", *SMOKE_STEPS, "--device", "cpu"]


def smoke_check_entries(copy: Path, entry_args: list[list[str]], workdir: Path, env: dict,
                        timeout: float) -> None:
    """Each entry's args (through smoke_args) train a few steps of the copy in the sandbox, under
    workdir/smoke-check/entry{i}/; a failure is an EditError with the reason and the output's tail.
    timeout: seconds per entry."""
    for i, args in enumerate(entry_args, 1):
        folder = Path(workdir) / "smoke-check" / f"entry{i}"
        what = f"entry {i}'s smoke run on the patched llm.py"
        proc = _run_llm(copy, [*smoke_args(args), "--out", "smoke.csv"], folder, env, timeout, what)
        rows = _csv_rows(folder / "smoke.csv", what, proc)
        bad = [r for r in rows if r.get("status") != "ok"]
        if bad:
            raise EditError(f"{what} diverged ({len(bad)} of {len(rows)} runs, e.g. val_loss "
                            f"{bad[0].get('val_loss')}){_tail(proc.stdout, proc.stderr)}")
