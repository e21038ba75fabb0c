"""Shared test setup: no real keys, no hub access, every cache and output under tmp_path.

Each test gets a clean environment: API keys and provider overrides are removed (tests that need them set
them explicitly), and the Hugging Face caches point into the test's temporary directory so nothing on this
machine is read or written.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

# One thread per test process, set before torch is imported here or in any child: the test models are tiny,
# and two OpenMP threads on two busy cores spin at every barrier (a one-run smoke sweep took 22 s with two
# threads and 7 s with one on the 2-core CI machine under load). Parallel test workers get a core each.
os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CLEARED = (
    "GEMINI_API_KEY", "GOOGLE_API_KEY", "NOVITA_API_KEY", "OPENAI_API_KEY",
    "GEMINI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "NOVITA_BASE_URL", "OPENAI_BASE_URL",
    "GEMINI_MODEL", "KIMI_MODEL",
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    # llm.py sets HF_HUB_OFFLINE in its own process when the hub is unreachable: undo that after in-process runs.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield


@pytest.fixture
def root() -> Path:
    """The project's root folder (where llm.py and simple_llm.py live)."""
    return ROOT


@pytest.fixture
def run_llm(tmp_path):
    """Run `python llm.py ARGS` in tmp_path (so CSVs and caches land there); returns the CompletedProcess."""
    import subprocess

    def run(*args, timeout=300, env=None, cwd=None):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, str(ROOT / "llm.py"), *merge_smoke(args)], cwd=cwd or tmp_path,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def llm_main(tmp_path, monkeypatch, capsys):
    """Run `llm.main(ARGS)` in this process, in tmp_path: the same result as run_llm without paying a
    subprocess and a torch import (1-2 s) each. Returns an object with returncode, stdout and stderr.

    For runs that cannot leave state behind in this process: not for offline or hub behaviour (the hub
    libraries read their settings once, at import), not for signals."""
    import types

    import llm

    def run(*args, env=None):
        monkeypatch.chdir(tmp_path)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            rc = llm.main(merge_smoke(args))
        except SystemExit as e:  # argparse's own errors exit 2 from inside parse_args
            rc = e.code
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return run


def sigint_default():
    """preexec_fn for a child that a test stops with Ctrl-C: pytest-xdist's workers ignore SIGINT, a child
    inherits an ignored signal, and Python then installs no KeyboardInterrupt handler (the child ran on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SMOKE_FAST = ("--preset", "smoke", "--max-steps", "10", "--eval-every", "5", "--log-every", "5")


def merge_smoke(args) -> list[str]:
    """args as strings, with SMOKE_FAST's values yielding to the same flags given after it (llm.py itself
    refuses a flag given twice)."""
    args = [str(a) for a in args]
    if tuple(args[:len(SMOKE_FAST)]) != SMOKE_FAST:
        return args
    later = set(args[len(SMOKE_FAST):])
    prefix = list(SMOKE_FAST[:2])
    for flag, value in zip(SMOKE_FAST[2::2], SMOKE_FAST[3::2]):
        if flag not in later:
            prefix += [flag, value]
    return prefix + args[len(SMOKE_FAST):]


@pytest.fixture
def smoke_fast():
    """A smoke sweep cut to 10 updates per run, for tests about the sweep's plumbing rather than learning."""
    return SMOKE_FAST
