"""Ask Gemini or Kimi from the command line; turn a research idea into checked, budgeted runs.

    python simple_llm.py kimi "Summarise mixture-of-experts routing in five bullets"
    python simple_llm.py models                                  # the model ids your keys can call
    python simple_llm.py chain research_prompt.md --dry-run     # no key, no network: every prompt
    python simple_llm.py runs tests/example_plan.md --run --yes  # a plan's runs, offline on CPU
    python simple_llm.py loop research_prompt.md --rounds 2 --out-dir loop/  # chain, runs, verdicts
    python simple_llm.py runs tests/example_code_plan.md --allow-code-edits  # a code plan's diff

Keys come from GEMINI_API_KEY and NOVITA_API_KEY, in the environment or in .env (see .env.example).
The chain runs Research_Plan (kimi) -> Critical_Review (gemini) -> Critique_Analysis (kimi) ->
Final_Plan (gemini), saves each answer as step{N}_{title}.md and writes chain_run.json beside them.
The final plan ends in a block of llm.py runs, which `runs` checks with llm.py's own sweep planner,
budgets and runs; `loop` repeats chain -> runs -> verdicts, keeping a ledger every round's prompts
carry.
"""
from __future__ import annotations

import argparse
import ast
import base64
import collections
import contextlib
import csv
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import typing
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
# --------------------------------------------------------------------------------------------------
# Constants, errors, text safety, environment and files

HERE = Path(__file__).resolve().parent
DEFAULT_CODE = HERE / "llm.py"
DEFAULT_SYSTEM = HERE / "research_system_prompt.md"
MANIFEST = "chain_run.json"
DEFAULT_MAX_TOKENS = 16384  # plans of up to 1000 words, and Gemini counts its thinking here too
DEFAULT_TIMEOUT = 300.0  # seconds to connect and between chunks: a thinking model is silent a while
DEFAULT_RETRIES = 4
DEFAULT_DEADLINE = 1800.0  # seconds for one answer, retries included: a drip-fed stream ends here
DEFAULT_MAX_ANSWER = 200_000  # characters: 16384 tokens of English are about 65,000
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MAX_SERVER_WAIT = 120.0  # a server asking for a longer pause than this is a hard failure
MAX_PROMPT_CHARS = 8_000_000  # over 1M tokens at any rate of characters per token: refused here
MAX_CODE_CHARS = 400_000  # llm.py goes to the planner whole up to this size (about 100k tokens)


@dataclasses.dataclass(frozen=True)
class Provider:
    key_env: str  # environment variable holding the API key
    model: str  # default model id (checked against the provider's documentation: see the README)
    model_env: str  # environment variable overriding the model id
    base_env: str  # environment variable overriding the endpoint (proxy, gateway, local server)
    base_url: str | None  # None = the SDK's own default


PROVIDERS = {
    "gemini": Provider("GEMINI_API_KEY", "gemini-3.1-pro-preview", "GEMINI_MODEL",
                       "GEMINI_BASE_URL", None),
    "kimi": Provider("NOVITA_API_KEY", "moonshotai/kimi-k2.5", "KIMI_MODEL", "NOVITA_BASE_URL",
                     "https://api.novita.ai/openai"),
}
# The only variables a .env file may set: everything else there is ignored (and named).
TOOL_VARS = tuple(v for p in PROVIDERS.values() for v in (p.key_env, p.model_env, p.base_env))
SECRET_NAME = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


class UserError(Exception):
    """Something the user can fix (bad input, missing key): shown as one line, exit 2."""
    exit_code = 2
    hint = ""  # a second line telling how to go on (the chain's resume command)


class PlanError(UserError):
    """A plan is refused (format, flags, budget, safety, a failed run): the loop asks for a
    repair."""


class ProviderError(UserError):
    """The provider refused or failed to answer: exit 1."""
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(clean(redact(message)))


class ChainError(ProviderError):
    """A chain step failed; carries the step so the CLI can say how to resume."""

    def __init__(self, message: str, step: int, out_dir: Path):
        super().__init__(message)
        self.step, self.out_dir = step, out_dir


_SECRETS: dict[str, re.Pattern] = {}  # key -> one pattern for the key and its obvious encodings


def add_secret(key: str) -> None:
    """Redact `key` from now on: as is, split by whitespace, base64 (any alignment), URL-encoded."""
    if len(key) < 4 or key in _SECRETS:
        return
    raw = key.encode()
    forms = {key, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key)}
    for shift in range(3):  # a key inside a longer base64 text starts at one of three bit offsets
        enc = base64.b64encode(b"\0" * shift + raw).decode()
        core = enc[-(-4 * shift // 3):(shift + len(raw)) * 8 // 6]
        forms |= {core, core.replace("+", "-").replace("/", "_")} if len(core) >= 6 else set()
    spaced = r"\s*".join(map(re.escape, key))  # a key cut by a line break or spaces still matches
    forms = sorted(forms, key=len, reverse=True)
    _SECRETS[key] = re.compile("|".join([spaced] + [re.escape(f) for f in forms]))


def redact(text: str) -> str:
    for pattern in _SECRETS.values():
        text = pattern.sub("***", text)
    return text


# Terminal control: escape sequences (CSI, OSC, DCS...), C0 and C1 controls but newline and tab,
# bidi and zero-width controls, line separators, the BOM and tag characters. Removing every ESC and
# C1 byte makes it safe; the sequences go first so that their remainders do not litter the text.
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?")
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                     "\u2060-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]")


def clean(text: str) -> str:
    """Text from a provider made safe for a terminal, a file that is shown, or the next prompt."""
    return _UNSAFE.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))


class Redactor:
    """Cleans and redacts text that arrives in pieces: the tail of each piece waits for the next
    (or flush()), so a key split across two chunks is caught."""
    HOLD = 256  # characters held back: more than any key in any of its encodings

    def __init__(self):
        self.held = ""

    def feed(self, text: str) -> str:
        text = redact(self.held + clean(text))
        cut = max(len(text) - (self.HOLD if _SECRETS else 0), 0)
        self.held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        text, self.held = redact(self.held), ""
        return text


def _write_to(stream, text: str) -> bool:
    """Write and flush; a reader that went away (`| head`) silences the stream: False."""
    try:
        stream.write(text)
        stream.flush()
        return True
    except BrokenPipeError:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no flush error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return False


def _note(text: str) -> None:
    """Progress, warnings and errors, on stderr."""
    _write_to(sys.stderr, text + "\n")


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(clean(redact(str(text))).split())  # redacted before the cut: a cut key escapes
    return text if len(text) <= limit else text[:limit] + "..."


_DOTENV_NAMES: set[str] = set()  # names a .env file held: never passed to a child


def load_env() -> None:
    """The tool's own variables from .env here, else beside this script; set variables win, other
    names are ignored (and named). SIMPLE_LLM_NO_DOTENV=1 skips .env files (the tests use it)."""
    candidates = [] if os.environ.get("SIMPLE_LLM_NO_DOTENV") else [Path.cwd() / ".env",
                                                                    HERE / ".env"]
    for candidate in (c for c in candidates if c.is_file()):
        from dotenv import dotenv_values
        values = dotenv_values(candidate)
        _DOTENV_NAMES.update(values)
        for name, value in values.items():
            if name in TOOL_VARS and value is not None and name not in os.environ:
                os.environ[name] = value
        ignored = sorted(set(values) - set(TOOL_VARS))
        if ignored:
            _note(f"note: {candidate} sets {', '.join(ignored)}: ignored (a .env gives this tool "
                  f"only {', '.join(TOOL_VARS)})")
        break
    for p in PROVIDERS.values():
        add_secret(os.environ.get(p.key_env, "").strip())


def api_key(name: str) -> str:
    var = PROVIDERS[name].key_env
    key = os.environ.get(var, "").strip()
    if not key:
        raise UserError(f"{var} is not set: add it to .env (copy .env.example) or export it, then "
                        "rerun")
    add_secret(key)
    return key


def child_env(extra: dict | None = None) -> dict:
    """The environment of every llm.py this tool starts: without API keys, anything a .env named,
    any variable that looks like a secret or holds a key's value; `extra` on top."""
    keys = {os.environ.get(p.key_env, "").strip() for p in PROVIDERS.values()} | set(_SECRETS)
    env = {k: v for k, v in os.environ.items()
           if k not in TOOL_VARS and k not in _DOTENV_NAMES and not SECRET_NAME.search(k)
           and not any(key and key in v for key in keys)}
    return {**env, **(extra or {})}


def _read_text(path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {e}") from None


def _write(path: Path, text: str) -> None:
    """Write a fresh temporary file (O_EXCL|O_NOFOLLOW: never through a planted file or symlink),
    then rename it over `path` (which replaces a symlink there, never following it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder in the way, no permission
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {path} ({e.strerror or e})") from e


def make_dir(path: Path, flag: str = "--out-dir") -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocked = isinstance(e, (FileExistsError, NotADirectoryError))
        why = "a file is in the way" if blocked else e.strerror
        raise UserError(f"cannot create {flag} {path} ({why}); choose another folder") from None


@contextlib.contextmanager
def out_dir_lock(out_dir: Path):
    """An exclusive lock on out_dir, yielding its file descriptor (passed to each llm.py, so a
    killed tool's llm.py still holds it); opened without following a symlink, never truncated."""
    import fcntl
    path = Path(out_dir) / ".runs.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UserError(f"cannot open the lock {path} ({e.strerror}; a symlink there is never "
                        "followed); remove it and rerun") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another runs/loop (or an llm.py it started) is still writing in "
                        f"{out_dir}; wait for it to finish, or use another --out-dir") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


# --------------------------------------------------------------------------------------------------
# Providers: one streaming function each, one retry helper, one list call each


@dataclasses.dataclass
class Settings:
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    deadline: float = DEFAULT_DEADLINE
    max_answer: int = DEFAULT_MAX_ANSWER


@dataclasses.dataclass
class Reply:
    text: str
    model_id: str  # the model asked for
    finish_reason: str | None
    usage: dict
    answered_by: str | None = None  # the model the provider says answered
    reasoning_chars: int = 0  # reasoning streamed, never kept (reasoning_content, thoughts)
    seconds: float = 0.0

    @property
    def cut(self) -> bool:
        return self.finish_reason in ("length", "MAX_TOKENS")

    @property
    def reasoning_tokens(self) -> int | None:
        details = self.usage.get("completion_tokens_details") or {}
        return self.usage.get("thoughts_token_count", details.get("reasoning_tokens"))


class Stream:
    """One answer in progress: its text (cleaned, redacted, shown as it comes), the reasoning it
    skips, the model that says it answers, the size cap and the deadline."""

    def __init__(self, name: str, s: Settings, show):
        self.name, self.s, self.show = name, s, show
        self.parts, self.redactor, self.reasoning, self.answered_by = [], Redactor(), 0, None
        self.size, self.ends = 0, time.monotonic() + s.deadline

    @property
    def received(self) -> str:
        return "".join(self.parts)

    def text(self, piece: str) -> None:
        self.check()
        self.size += len(piece)
        if self.size > self.s.max_answer:
            raise ProviderError(f"{self.name}: the answer passed the cap of {self.s.max_answer:,} "
                                "characters (--max-answer-chars); stopped there, and the part "
                                "received is kept")
        self.parts.append(self.redactor.feed(piece))
        self.show(self.parts[-1])

    def thought(self, piece: str | None) -> None:
        self.check()
        self.reasoning += len(piece or "")

    def model(self, model_id) -> None:
        if model_id:
            self.answered_by = clean(str(model_id)).removeprefix("models/")[:200]

    def check(self) -> None:
        if time.monotonic() > self.ends:
            raise ProviderError(f"{self.name}: no complete answer within the --deadline of "
                                f"{self.s.deadline:g} s; the part received is kept")

    def finish(self, model_id: str = "", finish=None, usage=None) -> Reply:
        self.parts.append(self.redactor.flush())
        self.show(self.parts[-1])
        if model_id and finish is None:  # a complete answer ends with a reason: an EOF cut it off
            raise ProviderError(f"{self.name}: the stream ended before the answer was finished "
                                "(no finish reason); try again")
        if model_id and not self.received.strip():
            raise ProviderError(f"{self.name}: the answer was empty (finish reason {finish})")
        return Reply(self.received, model_id, finish, usage or {}, self.answered_by, self.reasoning)


class _Retry(Exception):
    """An attempt failed in a way another may fix (429, 5xx, timeout, a dropped connection before
    any text): `problem` for the retrying line, `failure` and `tail` for the final error."""

    def __init__(self, problem: str, failure: str, tail: str, wait: float | None = None):
        super().__init__(problem)
        self.problem, self.failure, self.tail, self.wait = problem, failure, tail, wait


def _with_retries(name: str, s: Settings, attempt, stream: Stream | None = None):
    """The one retry loop: the server's wait is honoured up to MAX_SERVER_WAIT, else the waits
    double from 1 s (at most 30 s); each retry prints a line, none passes --deadline."""
    for made in range(1, s.retries + 2):
        try:
            return attempt()
        except _Retry as r:
            tried = "(retries are off)" if s.retries == 0 else f"after {_count(made, 'attempt')}"
            failure = f"{name}: {r.failure} {tried}{r.tail}"
            asked = r.wait if r.wait is not None and r.wait >= 0 else None  # NaN: not asked
            if asked is not None and asked > MAX_SERVER_WAIT:
                raise ProviderError(f"{failure}; the server asks to wait {asked:.0f} s, longer "
                                    f"than the {MAX_SERVER_WAIT:.0f} s this script waits, so try "
                                    "again later") from None
            wait = asked if asked is not None else min(2.0 ** (made - 1), 30.0) * random.uniform(
                0.75, 1.0)
            if made > s.retries or (stream and time.monotonic() + wait > stream.ends):
                raise ProviderError(failure) from None
            _note(f"{name}: {r.problem}, retrying in {wait:.1f} s (attempt {made + 1} of "
                  f"{s.retries + 1})")
            time.sleep(wait)


def _server_wait(headers, body) -> float | None:
    """Seconds the server asked to wait: Retry-After(-ms), or Google's RetryInfo in the body."""
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            return float(headers.get(header)) / scale
    error = body.get("error", body) if isinstance(body, dict) else {}
    for item in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            with contextlib.suppress(ValueError):
                return float(str(item.get("retryDelay", "")).rstrip("s"))
    return None


def _rejected(name: str, status: int, detail: str) -> ProviderError:
    return ProviderError(f"{name} rejected the key in {PROVIDERS[name].key_env} (HTTP {status}: "
                         f"{_one_line(detail, 160)}); check the key in .env or the environment")


_GONE = re.compile(r"model.{0,80}(not.found|does not exist|not exist|deprecat|retired|"
                   r"decommission|no longer|not supported|unknown)|(deprecat|retired|decommission)",
                   re.I | re.S)


def _status_error(name: str, status: int, label: str, detail: str, where: str, model_id: str,
                  stream, wait) -> Exception:
    """An HTTP error status as this tool's error, or a _Retry."""
    if status in (401, 403):
        return _rejected(name, status, detail)
    if status == 404 or (status in (400, 410) and _GONE.search(detail)):  # a retired model
        return ProviderError(f"{name}: model {model_id!r} is not available (HTTP {status}: "
                             f"{_one_line(detail, 160)}); it may be retired: list the ones your "
                             f"key can call with `python simple_llm.py models {name}`, then pick "
                             f"one with --model {name}=ID or {PROVIDERS[name].model_env}")
    if status not in RETRY_STATUS:
        return ProviderError(f"{name}: {label} from {where}: {detail}")
    return _transient(name, stream, label, f"{label} from {where}", f": {detail}", wait)


def _transient(name, stream, problem, failure, tail, wait=None) -> Exception:
    if stream is not None and stream.size:  # the answer had started: no retry picks it up
        return ProviderError(f"{name}: the answer broke off after {stream.size:,} "
                             f"characters: {failure}; try again")
    return _Retry(problem, failure, tail, wait)


def _error(name: str, e: Exception, where: str, model_id: str, s: Settings, stream) -> Exception:
    """An exception of either SDK (or of httpx2 under google-genai) as this tool's error."""
    import httpx2
    import openai
    from google.genai import errors
    fix = f"check the network or {PROVIDERS[name].base_env}"
    if isinstance(e, openai.APIStatusError):
        body = e.body.get("error", e.body) if isinstance(e.body, dict) else None
        detail = _one_line(body["message"] if isinstance(body, dict) and body.get("message")
                           else e.message)
        return _status_error(name, e.status_code, f"HTTP {e.status_code}", detail, where,
                             model_id, stream, _server_wait(e.response.headers, e.body))
    if isinstance(e, errors.APIError):
        detail = _one_line(e.message or e.details)
        if e.code == 400 and "API_KEY_INVALID" in str(e.details):
            return _rejected(name, 400, detail)
        return _status_error(name, 404 if e.status == "NOT_FOUND" else e.code,
                             f"HTTP {e.code} {e.status or ''}".strip(), detail, where, model_id,
                             stream, _server_wait(getattr(e.response, "headers", None), e.details))
    if isinstance(e, (openai.APITimeoutError, httpx2.TimeoutException)):
        return _transient(name, stream, "timed out", f"no data for {s.timeout:g} s from {where}",
                          "; raise --timeout or try later")
    if isinstance(e, (openai.APIConnectionError, httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return _transient(name, stream, "connection failed", f"connection to {where} failed "
                          f"({_one_line(e.__cause__ or e, 120)})", f"; {fix}")
    if isinstance(e, httpx2.TransportError):  # e.g. a malformed URL: no retry helps
        return ProviderError(f"{name}: connection to {where} failed ({_one_line(e, 120)}); {fix}")
    if isinstance(e, openai.APIError):  # an error event inside the stream
        return ProviderError(f"{name}: the stream reported an error: {_one_line(e.message)}")
    return ProviderError(f"{name}: the stream sent a malformed chunk ({_one_line(e, 160)}); try "
                         "again, or rerun with --debug to see it")


def _sdk_errors(name: str) -> tuple:
    if name == "kimi":
        import openai
        return openai.APIError, json.JSONDecodeError
    import httpx2
    import pydantic
    from google.genai import errors
    return (errors.APIError, httpx2.TransportError, errors.UnknownApiResponseError,
            pydantic.ValidationError)


def _client(name: str, s: Settings):
    """The SDK client and where it sends. Both SDKs' own retries are off: they are silent, and
    google-genai ignores Retry-After, so the one loop above retries for both."""
    base = os.environ.get(PROVIDERS[name].base_env) or PROVIDERS[name].base_url
    if name == "kimi":
        import openai
        return openai.OpenAI(api_key=api_key(name), base_url=base, timeout=s.timeout,
                             max_retries=0), base
    from google import genai
    from google.genai import types
    http = types.HttpOptions(timeout=int(s.timeout * 1000),
                             retry_options=types.HttpRetryOptions(attempts=1))
    if base:
        http.base_url = base
    return genai.Client(api_key=api_key(name), http_options=http), base or "the Gemini API"


def _kimi_chunks(client, prompt: str, model_id: str, s: Settings, stream: Stream):
    """(finish reason, usage) after feeding the answer's chunks to `stream`."""
    finish, usage = None, {}
    for chunk in client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": prompt}],
            max_tokens=s.max_tokens, stream=True, stream_options={"include_usage": True}):
        stream.model(chunk.model)
        if chunk.usage:  # the last chunk: no choices, only the token counts
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices[:1]:
            stream.thought(getattr(choice.delta, "reasoning_content", None))
            if choice.delta and choice.delta.content:
                stream.text(choice.delta.content)
            finish = choice.finish_reason or finish
    return finish, usage


def _gemini_chunks(client, prompt: str, model_id: str, s: Settings, stream: Stream):
    from google.genai import types
    config = types.GenerateContentConfig(max_output_tokens=s.max_tokens,
                                         thinking_config=types.ThinkingConfig(thinking_budget=-1))
    finish, usage = None, {}
    for chunk in client.models.generate_content_stream(model=model_id, contents=prompt,
                                                       config=config):
        stream.model(chunk.model_version)
        if chunk.usage_metadata:
            usage = chunk.usage_metadata.model_dump(exclude_none=True, mode="json")
        feedback = chunk.prompt_feedback
        if feedback and feedback.block_reason:
            reason = getattr(feedback.block_reason, "value", feedback.block_reason)
            raise ProviderError(f"gemini refused the prompt ({reason}); rephrase it")
        for cand in (chunk.candidates or [])[:1]:
            for part in (cand.content.parts or []) if cand.content else []:
                if part.thought:  # thought summaries are not the answer
                    stream.thought(part.text)
                elif part.text:
                    stream.text(part.text)
            if cand.finish_reason:
                finish = getattr(cand.finish_reason, "value", str(cand.finish_reason))
    return finish, usage


def stream_reply(name: str, prompt: str, model_id: str, s: Settings, stream: Stream) -> Reply:
    client, where = _client(name, s)
    chunks = _kimi_chunks if name == "kimi" else _gemini_chunks

    def attempt() -> Reply:
        stream.parts, stream.size = [], 0  # a retry starts again (only before any text)
        try:
            return stream.finish(model_id, *chunks(client, prompt, model_id, s, stream))
        except _sdk_errors(name) as e:
            raise _error(name, e, where, model_id, s, stream) from e
    return _with_retries(name, s, attempt, stream)


def list_models(name: str, s: Settings) -> list[str]:
    """The model ids the key can call, through each SDK's own list call (Gemini: those that
    generate text)."""
    client, where = _client(name, s)

    def attempt():
        try:
            return [m.id if name == "kimi" else m.name.removeprefix("models/")
                    for m in client.models.list() if name == "kimi" or m.name and (
                        m.supported_actions is None or "generateContent" in m.supported_actions)]
        except _sdk_errors(name) as e:
            raise _error(name, e, where, "(list)", s, None) from None
    return sorted({clean(str(m)) for m in _with_retries(name, s, attempt)})


# --------------------------------------------------------------------------------------------------
# Chain: the steps, their variables, the calls, the saved files and chain_run.json

# The built-in chain. --steps FILE.json replaces it with a list of the same shape.
CONTEXT = """{system_prompt}

The researcher's idea:

{user_input}

What the last experiment found:

{results}

The code (llm.py):

{code_content}

"""
DEFAULT_STEPS = [
    {"title": "Research_Plan", "model": "kimi", "prompt": CONTEXT + """\
Write a concise research plan of at most 800 words for experiments on this mixture-of-experts
language model: the question and hypothesis, the conditions to compare (name the llm.py settings
or code changes for each), seeds, metrics, expected run time, and the total number of runs. Build
on what the last experiment found. Keep to the constraints above.
"""},
    {"title": "Critical_Review", "model": "gemini", "prompt": CONTEXT + """A proposed research plan:

{step1_result}

Review this plan critically in at most 600 words. Look for unfair comparisons, confounds, too few
seeds to separate the effects, metrics that cannot show the claimed effect, steps the code does not
support, results it ignores or misreads, and anything that breaks the constraints. For each problem,
suggest a concrete fix."""},
    {"title": "Critique_Analysis", "model": "kimi", "prompt": """{system_prompt}

The original plan:

{step1_result}

A critical review of it:

{step2_result}

Weigh the review in at most 500 words. For each point, say whether it holds, what fixing it would
cost in runs and minutes, and whether the fix fits the constraints. Keep the ideas worth keeping
from the original plan and push back on criticism that does not hold."""},
    {"title": "Final_Plan", "model": "gemini", "prompt": CONTEXT + """The original plan:

{step1_result}

The critical review:

{step2_result}

The analysis of that review:

{step3_result}

Write the final research plan in at most 1000 words: goals and questions, the exact conditions and
the llm.py settings or code changes for each, seeds, metrics and how results will be compared
fairly, the time per run and in total, and the total number of experiments, stated at the start.

{code_edit_rules}{plan_format}"""},
]

_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_]\w*)\}\}|\{([A-Za-z_]\w*)\}")


def safe_name(title: str) -> str:
    """Plan or step text as a file-name part: letters, digits, - and _ only (no '/', no '..')."""
    return re.sub(r"[^a-z0-9_-]+", "_", title.lower()).strip("_-")[:60] or "step"


def step_file(n: int, title: str) -> str:
    return f"step{n}_{safe_name(title)}.md"


def placeholders(text: str) -> list[str]:
    return [m.group(2) for m in _PLACEHOLDER.finditer(text) if m.group(2)]


def substitute(text: str, variables: dict, strict: bool = True) -> str:
    """Each {name} replaced by its variable in one pass (braces in the values stay); {{name}} gives
    {name}; an unknown {name} is a UserError (or stays, with strict=False)."""
    def fill(m: re.Match) -> str:
        if m.group(1):
            return "{" + m.group(1) + "}"
        if m.group(2) in variables:
            return variables[m.group(2)]
        if strict:
            raise UserError(f"unknown variable {{{m.group(2)}}}: pass --var {m.group(2)}=VALUE or "
                            "fix the prompt (write {{name}} for literal braces)")
        return m.group(0)
    return _PLACEHOLDER.sub(fill, text)


def fenced_code(path, limit: int = MAX_CODE_CHARS) -> str:
    """A code file, whole, in a fence longer than any backtick run inside it."""
    path = Path(path)
    code = _read_text(path, "code")
    if len(code) > limit:
        raise UserError(f"code file {path} is {len(code):,} characters, more than the {limit:,} "
                        "sent whole to the planner; pass a shorter one with --code")
    fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`{3,}", code)])
    return f"{fence}{'python' if path.suffix == '.py' else ''}\n{code.rstrip()}\n{fence}"


def check_prompt_size(prompt: str, what: str = "the prompt", fix: str = "shorten it") -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{what} is {len(prompt):,} characters (about {len(prompt) // 4:,} "
                        f"tokens), far more than any model's context (1M tokens at most); {fix}")


def check_steps(steps) -> None:
    if not isinstance(steps, list) or not steps:
        raise UserError("steps must be a non-empty list of {\"title\", \"model\", \"prompt\"} "
                        "objects")
    for n, step in enumerate(steps, 1):
        if not isinstance(step, dict) or not all(isinstance(step.get(k), str) and step[k].strip()
                                                 for k in ("title", "model", "prompt")):
            raise UserError(f"step {n} needs non-empty string fields \"title\", \"model\" and "
                            "\"prompt\"")
        if step["model"] not in PROVIDERS:
            raise UserError(f"step {n} ({step['title']}): unknown model {step['model']!r}; choose "
                            f"one of {', '.join(PROVIDERS)}")


class SimpleLLM:
    """Calls the models: the settings, the model id of each provider, and where answers show."""

    def __init__(self, *, max_tokens: int = DEFAULT_MAX_TOKENS, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, deadline: float = DEFAULT_DEADLINE,
                 max_answer: int = DEFAULT_MAX_ANSWER, models: dict[str, str] | None = None,
                 out=None):
        load_env()
        self.settings = Settings(max_tokens, timeout, retries, deadline, max_answer)
        self.models = {n: os.environ.get(p.model_env) or p.model for n, p in PROVIDERS.items()}
        self.models.update(models or {})
        self.out, self.out_open = out or sys.stdout, True  # `| head` may close it: work goes on
        self.stream: Stream | None = None  # the answer in progress, kept when a call fails

    def show(self, text: str) -> None:
        if text and self.out_open:
            self.out_open = _write_to(self.out, text)

    def reply(self, name: str, prompt: str) -> Reply:
        """Stream one answer to `out`; return it with its finish reason, usage and answering
        model."""
        if name not in PROVIDERS:
            raise UserError(f"unknown model {name!r}: choose one of {', '.join(PROVIDERS)}")
        check_prompt_size(prompt)
        start, r = time.perf_counter(), None
        self.stream = Stream(name, self.settings, self.show)
        try:
            r = stream_reply(name, prompt, self.models[name], self.settings, self.stream)
        finally:
            if r is None:
                self.stream.finish()
            if r is not None or self.stream.received:  # an error then starts on its own line
                self.show("\n")
        r.seconds = round(time.perf_counter() - start, 2)
        if r.cut:
            _note(f"warning: {name} stopped at the --max-tokens limit ({self.settings.max_tokens});"
                  " the answer is cut short. Raise --max-tokens to get all of it")
        if r.answered_by and r.answered_by != r.model_id:
            _note(f"warning: {name} answered with model {r.answered_by}, not {r.model_id} as asked "
                  "(the provider rerouted the request; --model or the env variable picks another)")
        return r

    def call_model(self, name: str, prompt: str) -> str:
        return self.reply(name, prompt).text


def _step_entry(n: int, step: dict, prompt: str, model_id: str) -> dict:
    return {"step": n, "title": step["title"], "model": step["model"], "model_id": model_id,
            "prompt_chars": len(prompt),
            "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
            "output": step_file(n, step["title"])}


class Chain:
    """The steps of one chain in one folder: fills the prompts, asks, saves step{N}_{title}.md and
    chain_run.json. Everything checkable is checked before the first request; with resume, saved
    answers of a leading run of steps are reused."""

    def __init__(self, llm: SimpleLLM, steps: list[dict], variables: dict, out_dir, results=None):
        check_steps(steps)
        self.llm, self.steps, self.variables, self.out = llm, steps, dict(variables), Path(out_dir)
        self.results = results  # (write) -> {results} text, loaded only if a step uses it
        self.manifest: dict = {}
        self.interrupted_step = 0  # the step a Ctrl-C stopped, for the resume hint

    def run(self, resume: bool = False, dry_run: bool = False) -> list[str]:
        self._fill_defaults(dry_run)
        saved = self._saved(resume)
        if dry_run:
            return self.dry_run(saved)
        for name in {step["model"] for step in self.steps[len(saved):]}:
            api_key(name)  # a missing key stops the chain before it spends anything
        for n, prompt in enumerate(self.render(saved, lambda n, s: ""), 1):
            if n > len(saved):  # answers still to come count as empty; reply() checks the rest
                check_prompt_size(prompt, f"step {n} ({self.steps[n - 1]['title']})'s prompt",
                                  "shorten the input, code or --var values it is made from")
        try:
            old = json.loads((self.out / MANIFEST).read_text(encoding="utf-8")) if resume else {}
        except (OSError, ValueError):
            old = {}
        self.manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "status": "running", "settings": dataclasses.asdict(self.llm.settings),
                         "steps": [], **({"repairs": old["repairs"]} if old.get("repairs") else {})}
        make_dir(self.out)  # found now, not when the first paid answer cannot be saved
        self.save()
        for n, step in enumerate(self.steps, 1):
            prompt = substitute(step["prompt"], self.variables)
            entry = _step_entry(n, step, prompt, self.llm.models[step["model"]])
            if n <= len(saved):
                self._reuse(n, entry, old)
            else:
                _note(f"\n== step {n}/{len(self.steps)}: {step['title']} ({step['model']}, "
                      f"{entry['model_id']}, {len(prompt):,} prompt characters)")
                self.manifest["steps"].append(entry)
                saved.append(self.ask_into(step["model"], prompt, entry,
                                           f"step {n} ({step['title']}, {step['model']})", n).text)
            self.variables[f"step{n}_result"] = saved[n - 1]
        self.manifest["status"] = "complete"
        self.save()
        return saved

    def save(self) -> None:
        _write(self.out / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def _fill_defaults(self, dry_run: bool) -> None:
        used = {name for step in self.steps for name in placeholders(step["prompt"])}
        for name, load in (("code_content", lambda: fenced_code(DEFAULT_CODE)),
                           ("system_prompt", lambda: _read_text(DEFAULT_SYSTEM, "prompt")),
                           ("results", lambda: self.results(not dry_run) if self.results
                            else NO_RESULTS),
                           ("plan_format", plan_format), ("code_edit_rules", lambda: "")):
            if name in used and name not in self.variables:
                self.variables[name] = load()
        for n, step in enumerate(self.steps, 1):
            earlier = {f"step{k}_result" for k in range(1, n)}
            unknown = sorted(set(placeholders(step["prompt"])) - set(self.variables) - earlier)
            if unknown:
                names = ", ".join("{" + v + "}" for v in unknown)
                raise UserError(f"step {n} ({step['title']}) uses {names}, which no variable or "
                                "earlier step defines: pass --var NAME=VALUE or fix the prompt")
        if "user_input" in self.variables and "user_input" not in used:
            _note("warning: no step uses {user_input}, so the input file is not sent")
        elif "user_input" in used and not self.variables["user_input"].strip():
            _note("warning: {user_input} is empty (an empty input file?), so the steps get no idea "
                  "to work on")

    def _saved(self, resume: bool) -> list[str]:
        """The saved answers of the leading steps (a redone step makes later ones stale)."""
        saved = []
        for n, step in enumerate(self.steps, 1):
            path = self.out / step_file(n, step["title"])
            text = _read_text(path, "saved step") if resume and path.is_file() else ""
            if not text.strip():
                break
            saved.append(clean(redact(text)))  # a file from elsewhere may hold a key or escapes
        return saved

    def _reuse(self, n: int, entry: dict, old: dict) -> None:
        before = next((e for e in old.get("steps", []) if e.get("output") == entry["output"]), {})
        if before.get("prompt_sha256", entry["prompt_sha256"]) != entry["prompt_sha256"]:
            _note(f"warning: step {n}'s prompt changed since {entry['output']} was saved; reusing "
                  "it anyway (delete the file to ask again)")
        # the saved answer's own prompt and usage stay on record, so the next --resume warns too
        self.manifest["steps"].append({**entry, **before, "reused": True})
        self.save()
        _note(f"== step {n}/{len(self.steps)}: {entry['title']} reused from {entry['output']} "
              "(--resume)")

    def ask_into(self, model: str, prompt: str, entry: dict, label: str, n: int) -> Reply:
        """Ask, save the answer as entry["output"] and record it; on failure keep what arrived as
        .partial.md."""
        path = self.out / entry["output"]
        partial = path.with_name(path.name.replace(".md", ".partial.md"))
        self.llm.stream = None
        try:
            try:
                path.unlink(missing_ok=True)  # an older answer must not pass for this one
            except OSError as e:
                raise UserError(f"cannot replace {path} ({e.strerror or e})") from e
            r = self.llm.reply(model, prompt)
            _write(path, r.text)
        except (Exception, KeyboardInterrupt) as e:
            stop = isinstance(e, KeyboardInterrupt)
            entry.update(output=None, error="interrupted" if stop else _one_line(e))
            self.manifest["status"] = "interrupted" if stop else "failed"
            with contextlib.suppress(UserError):  # best effort: the folder may be what failed
                got = self.llm.stream.received if self.llm.stream else ""
                if got.strip():  # paid for: keep it, but never as a finished step
                    _write(partial, got)
                    entry["partial"] = partial.name
                self.save()
            if stop:
                self.interrupted_step = n
                raise
            why = e if isinstance(e, UserError) else \
                f"unexpected {type(e).__name__}: {_one_line(e)}"
            raise ChainError(f"{label} failed: {why}", n, self.out) from e
        partial.unlink(missing_ok=True)
        entry.update(seconds=r.seconds, usage=r.usage, finish_reason=r.finish_reason, cut=r.cut,
                     answered_by=r.answered_by, reasoning_tokens=r.reasoning_tokens,
                     reasoning_chars=r.reasoning_chars)
        self.save()
        return r

    def render(self, saved: list[str], unknown) -> list[str]:
        """Every step's prompt: saved answers, and `unknown(n, step)` for those still to come."""
        values = dict(self.variables)
        for n, step in enumerate(self.steps, 1):
            values[f"step{n}_result"] = saved[n - 1] if n <= len(saved) else unknown(n, step)
        return [substitute(step["prompt"], values) for step in self.steps]

    def dry_run(self, saved: list[str]) -> list[str]:
        rendered = self.render(saved, lambda n, step: f"<output of step {n} ({step['title']})>")
        for n, (step, prompt) in enumerate(zip(self.steps, rendered), 1):
            note = "reused from disk (--resume)" if n <= len(saved) else "would be sent"
            self.llm.show(redact(f"==== step {n}/{len(self.steps)}: {step['title']} -> "
                                 f"{step['model']} ({self.llm.models[step['model']]}), "
                                 f"{len(prompt):,} characters (~{len(prompt) // 4:,} tokens), "
                                 f"{note}, saved as {self.out / step_file(n, step['title'])}\n"
                                 f"{prompt}\n\n"))
        _note(f"dry run: {_count(len(self.steps), 'step')}, {sum(map(len, rendered)):,} prompt "
              "characters; nothing was sent")
        return rendered

# --------------------------------------------------------------------------------------------------
# Plans: read the way models write them, checked against what llm.py will do, budgeted, confirmed,
# run

DEFAULT_MAX_RUNS = 36  # runs per round (the research constraints)
DEFAULT_MAX_RUN_MINUTES = 10.0  # training minutes per run (the research constraints: 2-10)
DEFAULT_MAX_TOTAL_MINUTES = 180.0  # training minutes per plan
DEFAULT_REPAIRS = 2
DRY_RUN_TIMEOUT = 300.0  # seconds for llm.py's --dry-run --json (with a few timed steps)
TIME_STEPS = 3  # training steps timed per new model shape when no earlier run measured it
DEFAULT_CSV_NAME = "moe_routing_noise_experiment_results.csv"  # report.DEFAULT_CSV, not imported
DEFAULT_LOOP_DIR = "research_loop"
# llm.py flags the tool sets itself (where output goes) or that make llm.py another kind of command
TOOL_OWNED = ("out", "fresh", "report", "bench", "bench_out", "bench_steps", "cache_dir", "device",
              "dry_run", "json", "time_steps", "help")
ENTRY_KEYS = ("name", "question", "args")
MAX_ENTRIES, MAX_ARGS, MAX_ARG_CHARS, MAX_NAME, MAX_QUESTION = 12, 120, 200, 60, 300
NO_RESULTS = "No results exist yet: this is the first experiment on this question."
LOOP_STATE, LEDGER = "loop_state.json", "ledger.md"
TAIL_LINES = 40  # lines of a failed run's output quoted in its refusal
_FENCE = re.compile(r"(?m)^[ \t]*(`{3,}|~{3,})([^\n`]*)$\n?")
_NEGATIVE_NUMBER = re.compile(r"^-\d+(\.\d*)?(e-?\d+)?$|^-\.\d+$", re.I)  # argparse: values
SHAPE = ("d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "batch_size",
         "max_seq_len", "use_amp")


def _project_module(name: str):
    """llm.py or report.py, imported only by the commands that need them (llm imports torch)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import importlib
    return importlib.import_module(name)


@dataclasses.dataclass
class PlanEntry:
    name: str  # file-name safe
    question: str
    args: list[str]
    n_runs: int = 0
    runs: list[dict] = dataclasses.field(default_factory=list)  # config, flops_per_token, ...
    minutes: list = dataclasses.field(default_factory=list)  # estimated training minutes per run

    def csv(self, out_dir) -> Path:
        return Path(out_dir) / f"{self.name}.csv"


@dataclasses.dataclass
class Plan:
    entries: list[PlanEntry]
    source: Path
    edits: list = dataclasses.field(default_factory=list)  # code edits; empty when none
    code: Path = DEFAULT_CODE  # the llm.py the entries run: the user's, or a patched copy
    diff: str = ""  # shown with the confirmation when there are edits
    no_sandbox: bool = False  # patched code runs without a sandbox (--no-sandbox, none here)
    limit_s: float = 0.0  # wall-clock seconds per entry of patched code (0: from its budget)
    patched: bool = False  # code is a copy made by prepare_copy: runs only in the sandbox
    text: str = ""  # what the user confirms (plan_text)

    @property
    def total(self) -> int:
        return sum(e.n_runs for e in self.entries)

    def command(self, e: PlanEntry, out_dir) -> list[str]:
        return [sys.executable, str(self.code), *e.args, "--out", str(e.csv(out_dir))]


@dataclasses.dataclass(frozen=True)
class Limits:
    max_runs: int = DEFAULT_MAX_RUNS
    max_run_minutes: float = DEFAULT_MAX_RUN_MINUTES
    max_total_minutes: float = DEFAULT_MAX_TOTAL_MINUTES
    allow_data: tuple = ()  # tokenizers / datasets the user allows beyond the defaults
    allow_code_edits: bool = False
    no_sandbox: bool = False


def find_runs(text: str, where: str, example=None):
    """The one block of runs in an answer (any fence label or none), parsed with json5."""
    import json5
    found, bad, pos = [], [], 0
    while m := _FENCE.search(text, pos):
        line, fence = text.count("\n", 0, m.start()) + 1, m.group(1)
        close = re.compile(rf"(?m)^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$").search(
            text, m.end())
        body = text[m.end():close.start() if close else len(text)]
        pos = close.end() if close else len(text)
        if not body.strip().startswith(("{", "[")):
            continue
        if not close:
            raise PlanError(f"{where}: the answer was cut inside the block that starts on line "
                            f"{line}; ask again (a higher --max-tokens) or finish the block by "
                            "hand")
        try:
            data = json5.loads(body)
        except ValueError as e:
            bad.append((line, "cut?" if "end of input" in str(e).lower() else _one_line(e, 120)))
            continue
        if (isinstance(data, dict) and "runs" in data) or (
                isinstance(data, list) and data and all(isinstance(e, dict) for e in data)):
            found.append((line, data))
    if len(found) > 1:  # a copy of the prompt's example is no plan
        found = [f for f in found if f[1] != example] or found[:1]
    if len(found) > 1:
        raise PlanError(f"{where}: the answer has {len(found)} blocks of runs (lines "
                        f"{', '.join(str(f[0]) for f in found)}); keep exactly one, the runs to do "
                        "now")
    if found:
        return found[0][1]
    if bad:
        raise PlanError(f"{where}: the block on line {bad[0][0]} is not valid JSON ({bad[0][1]}); "
                        "fix it")
    raise PlanError(f"{where} has no block of runs: end the answer with one fenced block "
                    '{"runs": [{"name": ..., "question": ..., "args": [...]}]}')


def _args(value, label: str) -> list[str]:
    """args as models write them: a list (numbers, nested lists, "--flag value" items) or one
    shell-like string (split with shlex, never run by a shell)."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as e:
            raise PlanError(f"{label}: its args string cannot be split ({e}); write args as a "
                            "list") from None
    if not isinstance(value, list):
        raise PlanError(f'{label}: "args" must be a list of llm.py arguments (or one string)')
    out = []
    for item in value:
        if isinstance(item, list) or (isinstance(item, str) and item.startswith("--")
                                      and len(item.split()) > 1):  # "--seeds 42 43"
            out += _args(item, label)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(repr(item) if isinstance(item, float) else str(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise PlanError(f'{label}: "args" holds {json.dumps(item)[:40]}, which is no llm.py '
                            'argument')
    return out


def read_plan(path, example=None, limits: Limits = Limits()) -> Plan:
    """A plan's entries (and code edits) from a markdown file; PlanError for anything it does not
    mean."""
    text = _read_text(path, "plan")
    data = find_runs(text, str(path), example if example is not None else plan_example())
    if isinstance(data, dict) and set(data) - {"runs"}:
        raise PlanError(f"{path}: unknown key {sorted(set(data) - {'runs'})[0]!r} beside \"runs\"; "
                        "put everything llm.py should do in an entry's args and remove it")
    runs = data["runs"] if isinstance(data, dict) else data
    if not isinstance(runs, list) or not runs or len(runs) > MAX_ENTRIES:
        raise PlanError(f'{path}: "runs" must be a list of 1 to {MAX_ENTRIES} entries')
    seen: dict = {}
    entries = [_entry(e, f"{path}: entry {i}", seen, i) for i, e in enumerate(runs, 1)]
    if not limits.allow_code_edits:
        if any(HEAD.match(line) for line in text.splitlines()):
            raise PlanError("this run does not allow code edits; express the idea with flags or "
                            "rerun with --allow-code-edits")
        return Plan(entries, Path(path))
    try:
        return Plan(entries, Path(path), edits=parse_edits(text))
    except EditError as e:
        raise edit_refusal(e) from None


def _entry(e, label: str, seen: dict, i: int) -> PlanEntry:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].strip():
        raise PlanError(f'{label} needs a "name" (text)')
    label += f" ({e['name'][:MAX_NAME]})"
    unknown = sorted(set(e) - set(ENTRY_KEYS))
    if unknown:
        raise PlanError(f"{label}: unknown key {unknown[0]!r} (an entry has only name, question "
                        "and args); put what it says into args, e.g. \"--seeds 42 43\", and remove "
                        "it")
    question, args = e.get("question") or "", _args(e.get("args", []), label)
    if not isinstance(question, str):
        raise PlanError(f'{label}: "question" must be text')
    for what, text, limit in [("name", e["name"], MAX_NAME), ("question", question, MAX_QUESTION),
                              *[("args", a, MAX_ARG_CHARS) for a in args]]:
        if clean(text) != text:
            raise PlanError(f"{label}: its {what} contains control characters ({text[:60]!r}), "
                            "which could disguise the command shown before you confirm; remove "
                            "them")
        if len(text) > limit:
            raise PlanError(f"{label}: its {what} is {len(text)} characters, more than {limit}; "
                            "shorten it")
    if len(args) > MAX_ARGS:
        raise PlanError(f"{label}: {len(args)} args, more than {MAX_ARGS}; split the entry")
    name = safe_name(e["name"])
    # report.py names a report after its CSV, but the default CSV's "experiment_...": one key
    files = "experiment" if name == Path(DEFAULT_CSV_NAME).stem else name
    if files in seen:
        raise PlanError(f"{label}: its files ({files}_*) are already used by entry {seen[files]}; "
                        "rename one")
    seen[files] = i
    return PlanEntry(name, question.strip(), args)


def code_edit_rules(limits: Limits) -> str:
    """Step 4's {code_edit_rules}: the edit form and its rules, only with --allow-code-edits."""
    return CODE_EDIT_RULES if limits.allow_code_edits else ""


def _flags():
    """llm.py's options (llm.flag_specs): they word messages and the prompt; llm.plan_sweep decides
    what is valid."""
    return _project_module("llm").flag_specs()


def llm_flags() -> dict[str, tuple[str, object]]:
    """llm.py's options: flag -> (dest, nargs)."""
    return {s: (a.dest, a.nargs) for a in _flags() for s in a.options}


def check_flags(label: str, args: list[str], flags: dict) -> None:
    """Refuse what llm.py would misread or what the tool owns: unknown or ambiguous flags (with
    the nearest real one), tool-owned flags however spelled, '--', bare extra values."""
    current = None
    for tok in args:
        if tok == "--":
            raise PlanError(f"{label}: '--' is not allowed in args (it would hide the tool's own "
                            "flags)")
        if tok.startswith("-") and not _NEGATIVE_NUMBER.match(tok):
            key, eq, _ = tok.partition("=")
            key = key if key.startswith("--") else key[:2]  # short options bundle: -hh is -h -h
            hits = [key] if key in flags else [f for f in flags if f.startswith(key)
                                               and key.startswith("--")]
            if len(hits) > 1:
                raise PlanError(f"{label}: {key} could be {' or '.join(sorted(hits)[:3])}; write "
                                "the whole flag")
            if not hits:
                by_dest = {dest: f for f, (dest, _) in flags.items() if f.startswith("--")}
                name = key.lstrip("-").replace("-", "_")  # a field name maps to its flag
                near = [by_dest[name]] if name in by_dest else difflib.get_close_matches(
                    key, list(by_dest.values()), 1, 0.6)
                hint = f"; did you mean {near[0]}?" if near else "; see `python llm.py --help`"
                raise PlanError(f"{label}: llm.py has no flag {key}{hint}")
            dest, nargs = flags[hits[0]]
            if dest in TOOL_OWNED:
                raise PlanError(f"{label}: {tok} (--{dest.replace('_', '-')}) is chosen by the "
                                "tool, not the plan; remove it")
            current = [hits[0], nargs, 1 if eq else 0]
        elif current is None:
            raise PlanError(f"{label}: the value {tok!r} comes before any flag; name its flag")
        else:
            flag, nargs, n = current
            if nargs == 0 or (nargs in (None, "?") and n >= 1):
                raise PlanError(f"{label}: the value {tok!r} after {flag} belongs to no flag "
                                f"({flag} takes {'no value' if nargs == 0 else 'one value'}); "
                                "remove it or name its flag")
            current[2] += 1


def _check_config(label: str, cfg, llm, limits: Limits) -> None:
    """What llm.py will load for one config: files inside the folder the tool runs in (symlinks
    followed), tokenizer and dataset from the defaults, bytes, random, the presets' and what the
    user allows (a hub id or a folder could carry code); never what the plan says."""
    presets = list(llm.PRESETS.values())
    defaults = {f.name: f.default for f in dataclasses.fields(llm.MoEModelConfig)}
    files = {os.path.realpath(f) for p in presets for f in p.get("data_files", ())}
    root = os.path.realpath(Path.cwd())
    for f in cfg.data_files:
        real = os.path.realpath(f)
        if real not in files and os.path.commonpath([root, real]) != root:
            raise PlanError(f"{label}: data file {f} is {real}, outside the folder the tool runs "
                            f"in ({root}); a plan may only name files under it (copy the file "
                            "here)")
    for what, value, extra in (("tokenizer", cfg.tokenizer, "bytes"),
                               ("dataset", None if cfg.data_files else cfg.dataset, "random")):
        allowed = {defaults[what], extra, *(p[what] for p in presets if what in p),
                   *limits.allow_data}
        if value is not None and value not in allowed:
            raise PlanError(f"{label}: {what} {value!r} is not allowed (allowed: "
                            f"{', '.join(sorted(allowed))}); a plan cannot choose what gets "
                            "loaded: the user adds one with --allow-data NAME")


def check_plan(plan: Plan, limits: Limits, out_dir, csvs=()) -> str:
    """Every entry through llm.py's own sweep planner, its runs counted before any is expanded,
    each config checked, time and memory estimated; over a limit: PlanError. Returns the budget
    lines."""
    llm, flags, total = _project_module("llm"), llm_flags(), 0
    for i, e in enumerate(plan.entries, 1):
        label = f"entry {i} ({e.name})"
        check_flags(label, e.args, flags)
        try:
            sweep = llm.plan_sweep([*e.args, "--out", str(e.csv(out_dir))])
        except llm.UserError as err:
            raise PlanError(f"{label}: llm.py refuses its args: {_one_line(err)}") from None
        e.n_runs, total = sweep.n_runs, total + sweep.n_runs
        if total > limits.max_runs:
            raise PlanError(f"{label} brings the plan to {total} runs, more than --max-runs "
                            f"{limits.max_runs}; shrink the plan or raise --max-runs")
        e.runs = []
        for n, cfg in enumerate(sweep.configs(), 1):
            _check_config(label, cfg, llm, limits)
            est = llm.estimate(cfg)
            memory = est.memory_gb + cfg.max_tokens * 8 / 1e9  # + the token array (int64 at most)
            if memory > _ram_gb():
                raise PlanError(f"{label}: run {n} needs about {memory:.1f} GB of memory, more "
                                f"than this machine's {_ram_gb():.1f} GB; use a smaller model, "
                                "batch or --max-tokens")
            e.runs.append({"config": dataclasses.asdict(cfg), "memory_gb": memory,
                           "flops_per_token": est.flops_per_token,
                           "train_tokens": est.train_tokens})
    return budget(plan, limits, out_dir, csvs)


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return math.inf


def _shape(c: dict) -> tuple:
    """What throughput depends on, the vocabulary as llm.py resolves it (a CSV records it so)."""
    llm = _project_module("llm")
    cfg = llm.MoEModelConfig(**{f.name: c[f.name] for f in dataclasses.fields(llm.MoEModelConfig)
                                if f.init and f.name in c})
    return tuple(getattr(cfg, k) for k in SHAPE) + (llm.vocab_guess(cfg),)


def measured_speed(csvs) -> dict[tuple, tuple[float, str]]:
    """Model shape -> (median training FLOP/s of earlier ok runs, their device), from CSVs."""
    import pandas as pd
    llm, seen = _project_module("llm"), collections.defaultdict(list)
    names = {f.name for f in dataclasses.fields(llm.MoEModelConfig) if f.init}
    for path in dict.fromkeys(map(Path, csvs)):
        try:
            df = pd.read_csv(path)
            rows = df[df["status"].astype(str).str.strip().eq("ok")]
            triples = list(zip(rows["tokens_per_s"], rows["config_json"], rows["device"]))
        except (OSError, ValueError, KeyError):
            continue
        for tps, cfg_json, device in triples:
            with contextlib.suppress(TypeError, ValueError, llm.UserError):
                c = json.loads(cfg_json)
                cfg = llm.MoEModelConfig(**{k: v for k, v in c.items() if k in names})
                if float(tps) > 0:
                    seen[_shape(c)].append((float(tps) * llm.estimate(cfg).flops_per_token,
                                            str(device)))
    return {k: (statistics.median(v[0] for v in vs), vs[-1][1]) for k, vs in seen.items()}


def llm_dry_run(code: Path, args: list[str], label: str, time_steps: int = 0) -> dict:
    """`llm.py ARGS --dry-run --json [--time-steps K]` in a child: no shell, no stdin, no keys,
    offline, a timeout; its JSON."""
    cmd = [sys.executable, str(code), *args, "--dry-run", "--json"] + \
        (["--time-steps", str(time_steps)] if time_steps else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=DRY_RUN_TIMEOUT, env=child_env({"HF_HUB_OFFLINE": "1"}))
    except subprocess.TimeoutExpired:
        raise PlanError(f"{label}: llm.py's dry run took more than {DRY_RUN_TIMEOUT:g} s and was "
                        "stopped; make the model smaller") from None
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()] or ["no message"]
    if r.returncode:
        raise PlanError(f"{label}: llm.py refuses its args: "
                        f"{_one_line(lines[-1].split('error:', 1)[-1])}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise PlanError(f"{label}: llm.py's dry run printed no JSON ({_one_line(r.stdout, 120)})"
                        ) from None


def _speeds(plan: Plan, out_dir, csvs) -> tuple[dict, bool]:
    """FLOP/s per model shape: earlier ok runs, else a few timed steps (once per entry in need)."""
    speed, timed = measured_speed(csvs), False
    for i, e in enumerate(plan.entries, 1):
        if all(_shape(r["config"]) in speed for r in e.runs):
            continue
        label, timed = f"entry {i} ({e.name})", True
        out = llm_dry_run(plan.code, [*e.args, "--out", str(e.csv(out_dir))], label, TIME_STEPS)
        for r in out.get("runs", []):
            if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", str(r.get("run_id", ""))):
                raise PlanError(f"{label}: llm.py would name a run {str(r.get('run_id'))[:40]!r}, "
                                "which is no safe file name")
            if r.get("tokens_per_s"):
                speed[_shape(r["config"])] = (r["tokens_per_s"] * r["flops_per_token"],
                                              "this device")
    return speed, timed


def _mins(minutes: float) -> str:
    return f"{minutes:.1f}" if minutes >= 1 else f"{minutes:.2f}"


def budget(plan: Plan, limits: Limits, out_dir, csvs=()) -> str:
    """Minutes per run, per entry and in total: FLOPs per token x tokens / the FLOP/s measured on
    this device; peak memory from llm.estimate. Refuses what is over a limit."""
    speed, timed = _speeds(plan, out_dir, csvs)
    lines, devices = [], set()
    for i, e in enumerate(plan.entries, 1):
        e.minutes = []
        for n, r in enumerate(e.runs, 1):
            flops, device = speed.get(_shape(r["config"]), (0.0, ""))
            if flops <= 0:
                raise PlanError(f"entry {i} ({e.name}): no speed could be measured for run {n}")
            devices.add(device)
            e.minutes.append(r["flops_per_token"] * r["train_tokens"] / flops / 60)
            if e.minutes[-1] > limits.max_run_minutes:
                raise PlanError(f"entry {i} ({e.name}): run {n} needs about {e.minutes[-1]:.1f} "
                                "min of training, more than --max-run-minutes "
                                f"{limits.max_run_minutes:g}; use fewer --max-steps or a smaller "
                                "model (or raise the limit)")
        memory = max((r["memory_gb"] for r in e.runs), default=0.0)
        lines.append(f"budget: {i}. {e.name}: {_count(e.n_runs, 'run')} x ~{_mins(max(e.minutes))} "
                     f"min at most = {_mins(sum(e.minutes))} min, peak memory ~{memory:.2f} GB")
    total = sum(sum(e.minutes) for e in plan.entries)
    if total > limits.max_total_minutes:
        worst = max(plan.entries, key=lambda e: sum(e.minutes))
        raise PlanError(f"the plan needs about {total:.0f} min of training, more than "
                        f"--max-total-minutes {limits.max_total_minutes:g} (the largest: "
                        f"{worst.name}, {sum(worst.minutes):.0f} min); shrink it or raise the "
                        "limit")
    how = f" ({TIME_STEPS} steps timed just now)" if timed else ""
    lines.append(f"budget: total ~{_mins(total)} min of training for {_count(plan.total, 'run')} "
                 f"(limits: {limits.max_run_minutes:g} min a run, {limits.max_total_minutes:g} min "
                 f"in all, {limits.max_runs} runs), from the speed measured on "
                 f"{', '.join(sorted(devices))}{how}; evaluation and start-up come on top")
    return "\n".join(lines)


def shown(cmd: list[str]) -> str:
    """A command as the user would type it: `python` for this interpreter, llm.py relative if
    near."""
    exe = "python" if shutil.which("python") == sys.executable else cmd[0]
    script = os.path.relpath(cmd[1])
    return shlex.join([exe, cmd[1] if script.startswith("..") else script, *cmd[2:]])


def plan_text(plan: Plan, out_dir, budget_lines: str) -> str:
    """What the user confirms: every entry, every command, the diff of any code edit, the
    budget."""
    lines = [f"plan {plan.source}: {_count(len(plan.entries), 'entry')}, "
             f"{_count(plan.total, 'run')}, results in {out_dir}"]
    for i, e in enumerate(plan.entries, 1):
        question = f": {e.question}" if e.question else ""
        lines += [f"  {i}. {e.name} ({_count(e.n_runs, 'run')}){question}",
                  f"     {shown(plan.command(e, out_dir))}"]
    return "\n".join(lines + ([plan.diff] if plan.diff else []) + [budget_lines])


def confirm(text: str, question: str, yes: bool) -> bool:
    """A typed yes; the commands are shown where the question is asked (stderr when stdout is
    redirected)."""
    if yes:
        return True
    if not sys.stdin.isatty():  # checked up front by the commands too; this is the last guard
        raise UserError("nothing was run: there is no terminal to ask; add --yes to run without "
                        "asking")
    if not sys.stdout.isatty():
        print(text, file=sys.stderr)
    print(f"{question} Type yes to start: ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() == "yes"


def _need_consent(args, what: str) -> None:
    if not args.yes and not sys.stdin.isatty():
        raise UserError(f"{what} trains without asking only with --yes, and there is no terminal "
                        "to ask: add --yes (nothing was sent or run)")


class RunOutcome(typing.NamedTuple):
    rc: int  # llm.py's exit code: 0 when every entry is done
    entry: PlanEntry | None  # the entry that stopped
    tail: str  # its last lines of output


def run_plan(plan: Plan, out_dir, lock_fd: int) -> RunOutcome:
    """The entries one after another, with llm.py's own progress and resume, until the first
    failure. Each llm.py gets no stdin, no keys, the out-dir lock and a time limit (its budget)."""
    make_dir(out_dir)
    for i, e in enumerate(plan.entries, 1):
        _note(f"\n== entry {i}/{len(plan.entries)}: {e.name} ({_count(e.n_runs, 'run')})")
        sys.stdout.flush()
        limit = plan.limit_s or 120 + 60 * (3 * sum(e.minutes) + 2 * e.n_runs)
        if plan.patched:
            folder = Path(out_dir).resolve()
            cmd = [sys.executable, str(Path(plan.code).resolve()), *e.args, "--out",
                   str(e.csv(folder))]
            rc, tail = _run_child(cmd, limit, sandbox_env(child_env(), folder), folder,
                                  plan.no_sandbox)
        else:
            rc, tail = _run_child(plan.command(e, out_dir), limit, child_env(), lock_fd=lock_fd)
        if rc:
            why = "interrupted" if rc == 130 else f"llm.py exited with code {rc}"
            _note(f"{'' if rc == 130 else 'error: '}entry {i} ({e.name}): {why}; finished runs are "
                  f"saved in {e.csv(out_dir)}; rerun the same command to resume")
            return RunOutcome(rc, e, tail)
    rp = _project_module("report")
    _note(f"\ndone: {_count(len(plan.entries), 'entry')}; reports:")
    for e in plan.entries:
        _note(f"  {rp.report_paths(e.csv(out_dir))[0]}")
    return RunOutcome(0, None, "")


def _run_child(cmd: list[str], limit: float, env: dict, writable: Path | None = None,
               no_sandbox: bool = False, lock_fd: int | None = None) -> tuple[int, str]:
    """One llm.py, its output passed through as it comes and its last lines kept, killed after
    `limit` s. With `writable`: patched code, in the sandbox, its output cleaned and redacted."""
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    proc = start(cmd, env, writable, no_sandbox, **pipe) if writable else subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, env=env, pass_fds=(lock_fd,), **pipe)  # gets our Ctrl-C
    import threading
    timer, seen, redactor = threading.Timer(limit, _kill, (proc,)), "", Redactor()
    timer.start()
    try:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            text = chunk.decode(errors="replace")
            text = redactor.feed(text) if writable else text
            seen = (seen + text)[-20_000:]
            _write_to(sys.stdout, text)
        _write_to(sys.stdout, redactor.flush())
        rc = proc.wait()
    except KeyboardInterrupt:  # an llm.py got the same Ctrl-C: let it save what it has
        try:
            proc.wait(timeout=0 if writable else 60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            _kill(proc)
        rc = 130
    finally:
        timer.cancel()
    tail = [ln.rstrip() for ln in seen.replace("\r", "\n").splitlines() if ln.strip()]
    tail = tail[-TAIL_LINES:]
    if rc == -9:
        tail.append(f"(stopped by the tool after {limit:.0f} s, far past its budget)")
    return rc, clean("\n".join(tail))


def plan_example() -> dict:
    return {"runs": [{"name": "noise_without_lb",
                      "question": "Does router noise help when the balancing loss is off?",
                      "args": ["--lb-weight", "0", "--noise-std", "0", "0.05", "0.1", "--seeds",
                               "42", "43", "44"]}]}


def plan_format(max_runs: int = DEFAULT_MAX_RUNS, limits: Limits = Limits()) -> str:
    """{plan_format}: how the final plan ends in runs, with the flags from llm.py's own parser."""
    flags, owned = [], []
    for a in _flags():
        if a.dest in TOOL_OWNED:
            owned += a.options
        elif a.help != argparse.SUPPRESS:
            meta = a.metavar or a.dest.upper()
            use = {0: "", "+": f" {meta} [{meta} ...]"}.get(a.nargs, f" {meta}")
            flags.append(f"{' / '.join(a.options)}{use}: {a.help}")
    return "\n".join([
        "After the plan, end your answer with exactly one fenced ```json block that turns it into "
        "runs:", "", "```json", json.dumps(plan_example()), "```", "",
        "Each entry is one call of llm.py with `args` as its arguments (a list of strings) and "
        "gets its own CSV and report; an entry has only name, question and args. Its runs are "
        "every combination of the values given (a flag with several values, or --grid), and the "
        "report compares each condition with the baseline (noise 0 / lb weight 0.01, else the "
        "entry's first condition) paired by seed, so put the conditions to compare in one entry. "
        "`name` (letters, digits, _ and -) names the entry's files; `question` says what it "
        f"answers. At most {max_runs} runs over all entries, at most {limits.max_run_minutes:g} "
        f"minutes of training per run and {limits.max_total_minutes:g} in all (the tool measures "
        "and refuses more). Data, tokenizer and dataset stay the defaults unless the user allowed "
        f"others. The tool chooses output and device: never use {', '.join(owned)}. llm.py's "
        "flags (a flag left out keeps its default):", *flags])


def _report_text(md: Path) -> str:
    """A report as prompt context: without its plots, which a model cannot see."""
    return re.sub(r"(?ms)^## Plots\n.*?(?=^## |\Z)", "", _read_text(md, "results")).strip()


def _csv_of(md: Path) -> Path:
    """The CSV a report was written for (report.report_paths, backwards)."""
    stem = md.name.removesuffix("_analysis.md")
    return md.with_name(DEFAULT_CSV_NAME if stem == "experiment" else stem + ".csv")


def load_results(path=None, enabled: bool = True, write: bool = True):
    """{results}, the CSVs behind it (for time estimates) and the report: `path` (a report, or a
    CSV whose report is built first), else the default CSV's report here, rebuilt if the CSV is
    newer; write=False (a dry run) builds it in a temporary folder. None found: NO_RESULTS."""
    if not enabled:
        _note("results: left out (--no-results)")
        return NO_RESULTS, [], None
    given = None if path is None else Path(path)
    if given is not None and not given.is_file():
        raise UserError(f"--results {given}: file not found")
    rp = _project_module("report")
    csv = _csv_of(given) if given and given.suffix != ".csv" else given or Path(DEFAULT_CSV_NAME)
    md = given if given and given.suffix != ".csv" else rp.report_paths(csv)[0]
    if md != given and csv.is_file() and (given or not md.is_file()
                                          or md.stat().st_mtime < csv.stat().st_mtime):
        try:
            if not write:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copy(csv, Path(tmp) / csv.name)
                    text = _report_text(rp.write_report(Path(tmp) / csv.name))
                _note(f"results: the report of {csv}, built for this dry run only (nothing "
                      "written)")
                return f"From {md.name}:\n\n{text}", [csv], md
            md = rp.write_report(csv)
            _note(f"results: wrote the report {md} from {csv}")
        except (OSError, ValueError) as e:
            if given:
                raise UserError(f"--results {csv}: cannot build its report: {_one_line(e)}"
                                ) from None
            _note(f"warning: no report built from {csv}: {_one_line(e)}")
    if not md.is_file():
        _note(f"results: none found ({md.name} or {csv.name} in {Path.cwd()}); the prompts say no "
              "results exist yet (--results FILE gives some)")
        return NO_RESULTS, [], None
    _note(f"results: {md} (--results FILE for another, --no-results for none)")
    return f"From {md.name}:\n\n{_report_text(md)}", [csv] if csv.is_file() else [], md


def limits_of(args) -> Limits:
    return Limits(args.max_runs, args.max_run_minutes, args.max_total_minutes,
                  tuple(args.allow_data), args.allow_code_edits, args.no_sandbox)


def _runs_command(args) -> int:
    if args.run:
        _need_consent(args, "runs --run")
    limits, out = limits_of(args), Path(args.out_dir)
    plan = read_plan(args.plan, limits=limits)
    earlier = Path(args.results or DEFAULT_CSV_NAME)
    if args.results and not earlier.is_file():
        raise UserError(f"--results {earlier}: file not found")
    # a rerun: the plan's own finished runs are the best guide; a report stands for its CSV
    csvs = sorted(out.glob("*.csv")) + [earlier if earlier.suffix == ".csv" else _csv_of(earlier)]
    if plan.edits:
        make_dir(out)  # the copy and its diff go there
        lines = prepare_copy(plan, DEFAULT_CODE, out, limits)
    else:
        lines = check_plan(plan, limits, out, csvs)
    text = plan_text(plan, out, lines)
    print(text)
    if not args.run:
        _note("nothing was run; add --run to run them")
        return 0
    created = not out.exists()
    make_dir(out)  # before asking: a folder that cannot be used fails now
    with out_dir_lock(out) as fd:
        if confirm(text, f"Run these {plan.total or ''} runs?".replace("  ", " "), args.yes):
            if plan.edits:
                check_copy(plan, out)
            return run_plan(plan, out, fd).rc
    _note("not confirmed: nothing was run")
    if created:  # leave nothing behind
        (out / ".runs.lock").unlink()
        out.rmdir()
    return 1


# --------------------------------------------------------------------------------------------------
# Code edits: aider's SEARCH/REPLACE blocks, the protected-section lock, the sandbox, the checks

PROTECTED_TITLE = "# Evaluation (protected)"
EDIT_FILE = "llm.py"
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
SANDBOX_SECRET = re.compile(r"API_KEY|_TOKEN$|_SECRET$", re.IGNORECASE)


class EditError(Exception):
    """A code edit refused: one line saying which edit and what to do (a repairable refusal)."""


class Edit(typing.NamedTuple):
    search: str  # exact text of llm.py to replace (whole lines, each ending in a newline)
    replace: str  # what replaces it (may be empty: a deletion)
    index: int  # 1-based number of the block in the answer, for messages


def _file_name(line: str) -> str | None:
    """The file a line names: alone (`llm.py`, **llm.py**, ### llm.py, llm.py:, File: llm.py), else
    the one .py file a short line mentions ("Changes to `llm.py`:")."""
    text = re.sub(r"^#+\s*|^(?:file(?:name)?|path)\s*:\s*", "", line.strip().strip("*`'\"").strip(),
                  flags=re.I).strip("*`'\":").strip()
    if re.fullmatch(r"[\w./\\-]+\.[A-Za-z0-9]+", text):
        return text.removeprefix("./")
    named = set(re.findall(r"[\w./-]*\w\.py\b", line)) if len(line) <= 120 else set()
    return named.pop().removeprefix("./") if len(named) == 1 else None


def _name_before(lines: list[str], i: int) -> str | None:
    """The file named just before lines[i]: the line above (not a REPLACE marker), or in or above
    the fence that opens there."""
    while i > 0 and not lines[i - 1].strip():
        i -= 1
    if i == 0 or UPDATED.match(lines[i - 1]):
        return None
    fence = FENCE.match(lines[i - 1])
    if not fence:
        return _file_name(lines[i - 1])
    named = [t for t in fence.group(1).replace(":", " ").split() if "." in t]
    return _file_name(named[0]) if named else _name_before(lines, i - 1)


def parse_edits(answer: str) -> list[Edit]:
    """aider's SEARCH/REPLACE edits to llm.py in an answer, in order ([] when there are none); a
    block with no name of its own belongs to the file of the block before it. Markers of 5-9
    characters are accepted, as aider does. EditError naming the edit for another file, no name,
    no =======, an empty SEARCH, a block cut off, a marker-like line, a unified diff."""
    lines = answer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    edits, name, block = [], None, None  # block: (indent, [search lines] [, replace lines])
    for n, line in enumerate(lines, 1):
        k = len(edits) + 1
        if block is None and HEAD.match(line):
            name = _name_before(lines, n - 1) or name
            if name != EDIT_FILE:
                raise EditError(f"edit {k} changes {name}: only {EDIT_FILE} may be edited (the "
                                f"copy in the round folder); express the rest with {EDIT_FILE} "
                                "flags" if name else f"edit {k} names no file: put {EDIT_FILE} on "
                                "its own line just before the fence that holds the block")
            block = (line[:len(line) - len(line.lstrip())], [[]])
        elif block is None and (UPDATED.match(line) or NEAR_MISS.match(line)):
            raise EditError(f"line {n} of the answer looks like an edit marker but is not one "
                            f"({line.strip()[:40]!r}): write <<<<<<< SEARCH, ======= and >>>>>>> "
                            "REPLACE, 7 characters each, on lines of their own")
        elif block is None and UNIFIED_DIFF.match(line):
            raise EditError(f"line {n} of the answer starts a unified diff: write each change to "
                            f"{EDIT_FILE} as a <<<<<<< SEARCH / ======= / >>>>>>> REPLACE block "
                            "instead")
        elif block is not None:
            parts = block[1]
            if HEAD.match(line):
                missing = "=======" if len(parts) == 1 else ">>>>>>> REPLACE"
                raise EditError(f"edit {k} has no {missing} before the next <<<<<<< SEARCH: close "
                                "each block with >>>>>>> REPLACE")
            if DIVIDER.match(line) and len(parts) == 2:
                raise EditError(f"edit {k} has two ======= lines: one SEARCH part, one =======, "
                                "one REPLACE part per block")
            if UPDATED.match(line) and len(parts) == 1:
                raise EditError(f"edit {k} has a SEARCH with no =======: write <<<<<<< SEARCH, the "
                                "old lines, =======, the new lines, >>>>>>> REPLACE")
            if DIVIDER.match(line):
                parts.append([])
            elif UPDATED.match(line):
                search, replace = ("".join(p) for p in parts)
                if not search.strip():
                    raise EditError(f"edit {k} has an empty SEARCH: quote the lines of llm.py the "
                                    "change goes next to (new files and appends are not supported)")
                edits.append(Edit(search, replace, k))
                block = None
            else:  # a block indented in a list item loses the marker's indent
                parts[-1].append(line.removeprefix(block[0]) + "\n")
    if block is not None:
        raise EditError(f"the answer was cut inside an edit block (edit {len(edits) + 1}): ask for "
                        "the plan again, or shorten it so the answer ends")
    return edits


def apply_edits(code: str, edits: list[Edit]) -> str:
    """code with each edit applied in order; each SEARCH must match (the text as edited so far)
    exactly once."""
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


def _first_line(edit: Edit) -> str:
    return next((ln for ln in edit.search.splitlines() if ln.strip()), "").strip()[:60]


def unified_diff(original: str, patched: str) -> str:
    """The change as a unified diff, a/llm.py -> b/llm.py ('' when the texts are equal)."""
    def lines(text):
        return (text if text.endswith("\n") or not text else text + "\n").splitlines(keepends=True)
    return "".join(difflib.unified_diff(lines(original), lines(patched), "a/llm.py", "b/llm.py"))


def protected_section(code: str, what: str = "the patched llm.py") -> tuple[int, int]:
    """(first line, line after the last), 0-based, of the one `# Evaluation (protected)` section:
    from the rule line above its title to the next rule line (or the end)."""
    lines = code.splitlines()
    titles = [i for i, ln in enumerate(lines) if ln.strip() == PROTECTED_TITLE]
    if len(titles) != 1:
        raise EditError(f"{what} has {len(titles) or 'no'} {PROTECTED_TITLE!r} section"
                        f"{'s' if titles else ''}: it must keep exactly one, unchanged")
    t = titles[0]
    if lines[t] != PROTECTED_TITLE or t == 0 or not RULE.match(lines[t - 1]):
        raise EditError(f"{what}'s {PROTECTED_TITLE!r} title is not a section title (a rule line "
                        "above it, at the start of the line): it must stay as it was")
    return t - 1, next((i for i in range(t + 1, len(lines)) if RULE.match(lines[i])), len(lines))


def _bound_at_module_level(stmts) -> typing.Iterator[tuple[str, ast.AST]]:
    """(name, node) for every module-level binding in stmts (def/class bodies are other scopes)."""
    nodes = list(stmts)
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


def _lock_findings(tree: ast.Module, span: tuple[int, int], protected: set[str]):
    """(key, line, what) for each thing outside the protected section (lines span) that could
    change what it computes: a module-level binding or a global statement of one of its names, an
    assignment into one of them or into an imported module (monkeypatching torch...), reflection
    (setattr, globals, __dict__, sys.modules, exec) and risky imports."""
    stmts = [s for s in tree.body if not span[0] < s.lineno <= span[1]]
    modules = {n for n, node in _bound_at_module_level(tree.body)
               if isinstance(node, (ast.Import, ast.ImportFrom))}
    for name, node in _bound_at_module_level(stmts):
        if name in protected:
            yield ("bind", name), node.lineno, f"rebinds {name}"
    for node in (n for s in stmts for n in ast.walk(s)):
        line, text = getattr(node, "lineno", 0), lambda: ast.unparse(node)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in set(node.names) & protected:
                yield ("global", name), line, f"declares global {name}"
        if (isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, (
                ast.Store, ast.Del)) and _root_name(node) in protected | modules):
            yield ("patch", text()), line, f"assigns {text()}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in RISKY_CALLS:
            yield ("call", text()), line, f"calls {node.func.id}()"
        if isinstance(node, ast.Attribute) and (
                node.attr in RISKY_ATTRS or node.attr == "modules" and _root_name(node) == "sys"):
            yield ("attr", text()), line, f"uses {text()}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names]
            if any(n.split(".")[0] in RISKY_MODULES for n in names) or any(
                    a.name == "*" for a in node.names):
                yield ("import", text()), line, f"has {text()}"


def _parse(code: str, what: str) -> ast.Module:
    try:
        return ast.parse(code)
    except SyntaxError as e:
        raise EditError(f"{what} does not parse: line {e.lineno}: {e.msg}") from None


def check_protected(original: str, patched: str, edits: list[Edit]) -> None:
    """EditError for a change that could alter how the evaluation measures: an edit overlapping
    the protected section, a copy whose section differs (or is missing or doubled), or one whose
    code outside it does what _lock_findings finds and the original does not. A determined
    obfuscation can still get past a syntax-tree check: the diff is shown."""
    span = protected_section(original, "the base llm.py")
    lines = original.splitlines(keepends=True)
    lo, hi = sum(map(len, lines[:span[0]])), sum(map(len, lines[:span[1]]))
    for edit in edits:
        start = original.find(edit.search)
        while start >= 0:
            if start < hi and start + len(edit.search) > lo:
                raise EditError(f"edit {edit.index} (SEARCH starting {_first_line(edit)!r}) "
                                f"touches the {PROTECTED_TITLE!r} section: the validation split "
                                "and the metrics may not change; edit the model, data or training "
                                "code instead")
            start = original.find(edit.search, start + 1)
    new_span = protected_section(patched)
    section = "".join(lines[span[0]:span[1]])
    if "".join(patched.splitlines(keepends=True)[new_span[0]:new_span[1]]) != section:
        raise EditError(f"the patched llm.py's {PROTECTED_TITLE!r} section differs from the "
                        "original's (an edit next to it changed it): leave that section's text "
                        "exactly as it is")
    protected = {name for name, _ in _bound_at_module_level(
        _parse(section, "the base llm.py's protected section").body)}
    old_tree, new_tree = _parse(original, "the base llm.py"), _parse(patched, "the patched llm.py")
    before = collections.Counter(k for k, _, _ in _lock_findings(old_tree, span, protected))
    for key, line, what in _lock_findings(new_tree, new_span, protected):
        if before[key] <= 0:
            raise EditError(f"the patched llm.py {what} at line {line}: code outside "
                            f"{PROTECTED_TITLE!r} may not rebind its names, patch modules or use "
                            "reflection; give new code new names")
        before[key] -= 1


def _sandbox_prefix(kind: str, writable: Path) -> list[str]:
    if kind == "bwrap":
        w = str(writable)
        hide = [a for env in (HERE / ".env", Path.cwd() / ".env") if env.is_file()
                for a in ("--ro-bind", "/dev/null", str(env))]
        # a fresh /dev plus the NVIDIA nodes only (not --dev-bind /dev /dev: every host device)
        gpus = [a for p in sorted(glob.glob("/dev/nvidia*")) for a in ("--dev-bind", p, p)]
        return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/",
                "/", "--dev", "/dev", *gpus, "--proc", "/proc", *hide, "--bind", w, w, "--chdir", w,
                "--"]
    # new user, network and PID namespaces; the PID namespace dies with unshare (--kill-child)
    return ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
            "--"]


def sandbox_kind() -> str | None:
    """"bwrap" (no network, writes confined), "unshare" (no network only), or None: each is probed
    by running `true` inside it, so a disabled user namespace reads as absent."""
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
        for kind in (k for k in ("bwrap", "unshare") if shutil.which(k)):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                if subprocess.run(_sandbox_prefix(kind, Path(tmp)) + ["true"], cwd=tmp, timeout=20,
                                  stdin=subprocess.DEVNULL, capture_output=True).returncode == 0:
                    return kind
    return None


def start(cmd: list[str], env: dict, writable: Path, no_sandbox: bool = False,
          **popen) -> subprocess.Popen:
    """cmd (an argument list, never a shell) in the best sandbox here, cwd = writable, in a session
    of its own (killed as a whole), stdin closed, exactly `env` (a *_API_KEY name is refused).
    bwrap: no network, the file system read-only but `writable`, .env files hidden; unshare: no
    network, writes NOT confined. No sandbox: EditError, unless no_sandbox."""
    secret = sorted(k for k in env if SANDBOX_SECRET.search(k))
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
    return subprocess.Popen(full, cwd=writable, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True, **popen)


def _kill(proc: subprocess.Popen) -> None:
    """The process, and its whole group when it leads one (the sandbox's)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


def sandboxed(cmd: list[str], *, writable: Path, timeout: float, env: dict,
              no_sandbox: bool = False) -> subprocess.CompletedProcess:
    """start() and wait, its output captured; past `timeout` s the group is killed: EditError."""
    proc = start(cmd, env, writable, no_sandbox, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C: the whole group goes
        _kill(proc)
        out, err = proc.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        script = next((Path(str(c)).name for c in cmd if str(c).endswith(".py")),
                      Path(str(cmd[0])).name)
        raise EditError(f"{script} ran past its {timeout:g} s limit and was "
                        f"stopped.{_tail(out, err)}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tail(out: str | None, err: str | None) -> str:
    """The last lines of a run's output (a progress bar at its last state), for a refusal."""
    lines = [ln.rsplit("\r", 1)[-1] for text in (out or "", err or "")
             for ln in text.splitlines() if ln.strip()][-TAIL_LINES:]
    return f"\nLast {len(lines)} lines of its output:\n" + "\n".join(lines)


SMOKE_STEPS = ["--max-steps", "3", "--eval-every", "3"]
DEFAULT_RUN = ["--preset", "smoke", *SMOKE_STEPS, "--seeds", "42", "--noise-std", "0.1",
               "--lb-weight", "0.01", "--device", "cpu"]


def sandbox_env(env: dict, workdir: Path, report: bool = True) -> dict:
    """env plus what a patched llm.py in a round folder needs: the shipped smoke corpus, `import
    report` from the project (report=False: none, so llm.py writes no report), the hub offline,
    temporary and cache files inside workdir, no bytecode."""
    tmp = Path(workdir).resolve() / "tmp"
    (tmp / "mpl").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return {**env, "LLM_SAMPLE_CORPUS": str(HERE / "data_cache" / "sample_corpus.txt"),
            **({"PYTHONPATH": str(HERE)} if report else {}), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmp),
            "MPLCONFIGDIR": str(tmp / "mpl"), "XDG_CACHE_HOME": str(tmp / "cache"),
            "HF_DATASETS_CACHE": str(tmp / "hf_datasets"), "PYTHONDONTWRITEBYTECODE": "1"}


def _run_llm(code: Path, args: list[str], folder: Path, env: dict, timeout: float, what: str,
             no_sandbox: bool, report: bool = False) -> subprocess.CompletedProcess:
    """code (an llm.py) with args in the sandbox, in a fresh `folder`; EditError when it fails.
    report=False: report.py is not importable, so the run writes no report (2-3 s saved)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    proc = sandboxed([sys.executable, str(Path(code).resolve()), *args], writable=folder,
                     timeout=timeout, env=sandbox_env(env, folder, report), no_sandbox=no_sandbox)
    if proc.returncode != 0:
        raise EditError(f"{what} failed (exit {proc.returncode}): python llm.py {' '.join(args)}"
                        f"{_tail(proc.stdout, proc.stderr)}")
    return proc


def _rows(path: Path, what: str, tail: str) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        raise EditError(f"{what} wrote no readable CSV ({e}){tail}") from None
    if not rows:
        raise EditError(f"{what} wrote no result row{tail}")
    return rows


def _default_plan(code: Path, folder: Path, env: dict, timeout: float, what: str,
                  no_sandbox: bool) -> dict:
    """What `llm.py --dry-run --json` (no flags) runs: every default field and axis."""
    proc = _run_llm(code, ["--dry-run", "--json"], folder, env, timeout, what, no_sandbox)
    try:
        plan = json.loads(proc.stdout)
        return {"n_runs": plan["n_runs"], "axes": plan["axes"],
                "configs": [r["config"] for r in plan["runs"]]}
    except (ValueError, KeyError, TypeError) as e:
        raise EditError(f"{what}: --dry-run --json printed no plan "
                        f"({e}){_tail(proc.stdout, proc.stderr)}") from None


def check_default_behaviour(copy: Path, original: Path, workdir: Path, env: dict,
                            timeout: float, no_sandbox: bool = False) -> None:
    """EditError for a copy whose defaults differ from the original's: its no-flag `--dry-run
    --json` must resolve every original field to the same value, and both must train the smoke
    preset 3 steps (seed 42) to the same val_loss (to 1e-6), in the sandbox, under
    workdir/default-check/ (the original's results, by content hash, are reused)."""
    sha = hashlib.sha256(Path(original).read_bytes()).hexdigest()[:12]
    base = Path(workdir) / "default-check"
    orig_dir, copy_dir = base / f"original-{sha}", base / "copy"
    orig_dir.mkdir(parents=True, exist_ok=True)
    if not (orig_dir / "llm.py").is_file():  # run from here: no report.py beside it to import
        shutil.copyfile(original, orig_dir / "llm.py")
    saved = orig_dir / "plan.json"
    if not saved.is_file():
        _write(saved, json.dumps(_default_plan(orig_dir / "llm.py", orig_dir / "dry", env, timeout,
                                               "the original llm.py's dry run", no_sandbox)))
    want = json.loads(saved.read_text(encoding="utf-8"))
    got = _default_plan(copy, copy_dir / "dry", env, timeout, "the patched llm.py's dry run",
                        no_sandbox)
    if (got["n_runs"], got["axes"]) != (want["n_runs"], want["axes"]):
        raise EditError(f"the patched llm.py's default sweep differs: {got['n_runs']} runs over "
                        f"{got['axes']} instead of {want['n_runs']} over {want['axes']}; keep the "
                        "defaults")
    for w, g in zip(want["configs"], got["configs"]):
        for key, value in w.items():
            if key not in g or g[key] != value:
                raise EditError(f"the patched llm.py changes the default of config field {key} "
                                f"from {value!r} to {g.get(key, '(removed)')!r}: keep every "
                                "default and pass the new value in the runs' args, or add a new "
                                "flag whose default keeps the old behaviour")
    losses, tail, cache = [], "", orig_dir / "train" / "data_cache"
    for code, folder, what in ((orig_dir / "llm.py", orig_dir / "train", "the original"),
                               (copy, copy_dir / "train", "the patched")):
        what, done = f"{what} llm.py's smoke run", folder / "default.csv"
        if code == copy or not done.is_file():  # else: this original's run, by an earlier check
            args = [*DEFAULT_RUN, "--out", done.name] + (
                ["--cache-dir", str(cache)] if code == copy else [])  # the original's tokens
            proc = _run_llm(code, args, folder, env, timeout, what, no_sandbox)
            tail = _tail(proc.stdout, proc.stderr)
        rows = _rows(done, what, tail)
        try:
            losses.append(float(rows[-1]["val_loss"]))
        except (KeyError, ValueError):
            losses.append(math.nan)
        if len(rows) != 1 or not math.isfinite(losses[-1]):
            raise EditError(f"{what} gave {len(rows)} rows, val_loss "
                            f"{rows[-1].get('val_loss')!r} (expected one finite value){tail}")
    if abs(losses[0] - losses[1]) > 1e-6:
        raise EditError(f"the patched llm.py changes the default behaviour: val_loss "
                        f"{losses[1]:.7f} vs the original's {losses[0]:.7f} (python llm.py "
                        f"{' '.join(DEFAULT_RUN)}); put the new behaviour behind a new flag whose "
                        f"default keeps the old one{tail}")


# Flags whose values the smoke check sets itself: output, length, device, data (the shipped corpus).
SMOKE_OWNED = {"--out", "--fresh", "--preset", "--max-steps", "--eval-every", "--eval-steps",
               "--log-every", "--device", "--compile", "--no-compile", "--dataset",
               "--dataset-config", "--data-files", "--tokenizer", "--num-documents", "--max-tokens",
               "--cache-dir", "--vocab-size", "--batch-size", "--max-seq-len",
               "--gradient-accumulation-steps"}
ROUTING_FLAGS = {"--noise-std": "--noise-std", "--lb-weight": "--lb-weight", "--seeds": "--seeds",
                 "noise_std": "--noise-std", "load_balancing_weight": "--lb-weight",
                 "lb_weight": "--lb-weight", "seed": "--seeds", "seeds": "--seeds"}


def smoke_args(args: list[str]) -> list[str]:
    """An entry's args at smoke scale: its model flags and their sweeps kept (what a code change
    branches on), the routing axes (--noise-std, --lb-weight, --seeds, and --grid on them) cut to
    their first value (0.1, 0.01, 42 when absent), SMOKE_OWNED flags (and --grid items of their
    fields) dropped, then the smoke preset for 3 steps on CPU."""
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        j = i + 1
        while j < len(args) and not (eq or re.match(r"--?[A-Za-z]", args[j])):
            j += 1  # the flag's values
        values = [value] if eq else args[i + 1:j]
        field = values[0].split("=")[0].replace("-", "_") if flag == "--grid" and values else ""
        if field:
            flag, values = ROUTING_FLAGS.get(field, flag), [values[0].split("=", 1)[-1]]
        if flag in SMOKE_OWNED or "--" + field.replace("_", "-") in SMOKE_OWNED:
            pass
        elif flag in ROUTING_FLAGS and values:
            out += [flag, values[0].split(",")[0]]
        else:
            out += args[i:j]
        i = j
    for flag, value in (("--noise-std", "0.1"), ("--lb-weight", "0.01"), ("--seeds", "42")):
        if flag not in out:  # one run, not the default 18-run product
            out += [flag, value]
    return out + ["--preset", "smoke", *SMOKE_STEPS, "--device", "cpu"]


def smoke_check_entries(copy: Path, entry_args: list[list[str]], workdir: Path, env: dict,
                        timeout: float, no_sandbox: bool = False) -> None:
    """Each entry's smoke_args train the copy in the sandbox, under workdir/smoke-check/entry{i}/;
    EditError with the reason and the output's tail when one fails or diverges."""
    for i, args in enumerate(entry_args, 1):
        folder = Path(workdir) / "smoke-check" / f"entry{i}"
        what = f"entry {i}'s smoke run on the patched llm.py"
        proc = _run_llm(copy, [*smoke_args(args), "--out", "smoke.csv"], folder, env, timeout,
                        what, no_sandbox, report=True)
        tail = _tail(proc.stdout, proc.stderr)
        bad = [r for r in _rows(folder / "smoke.csv", what, tail) if r.get("status") != "ok"]
        if bad:
            raise EditError(f"{what} diverged ({len(bad)} runs, e.g. val_loss "
                            f"{bad[0].get('val_loss')}){tail}")


CODE_EDIT_RULES = """
This run allows edits to llm.py. Put each change in aider's SEARCH/REPLACE form, after the plan
and before its block of runs: the file name llm.py on its own line, then a fence holding one or
more sections:

llm.py
```python
<<<<<<< SEARCH
(lines copied exactly from llm.py, indentation included, enough of them to match once)
=======
(the lines that replace them)
>>>>>>> REPLACE
```

Rules (a plan that breaks one is refused and sent back to you):
- Only llm.py may be edited; every SEARCH must match exactly once.
- The section "# Evaluation (protected)" (the validation split and every reported metric) may not
  be touched, and code outside it may not rebind its names, patch imported modules or use
  reflection (setattr, globals(), __dict__, sys.modules, exec).
- Defaults are kept: a new behaviour goes behind a new flag (a new config field) whose default
  keeps the old behaviour exactly; the patched copy and the original must train the smoke preset
  to the same loss.
- Each entry's args then train 3 steps at smoke scale on the patched copy; every entry of the plan
  runs on the copy, so compare the new flag's values inside one entry (its baseline included).
"""


def edit_refusal(e: EditError) -> PlanError:
    """A code-edit refusal as the repairable plan refusal; patched runs' output redacted."""
    return PlanError(redact(clean(str(e))))


def prepare_copy(plan: Plan, base: Path, folder: Path, limits: Limits) -> str:
    """Nothing runs here: the edits applied to base into folder/llm.py, the lock checked, the diff
    saved as folder/llm.py.diff, plan.code and plan.diff set. Returns the lines that stand for the
    budget (patched code is checked and counted in the sandbox only after consent)."""
    kind = sandbox_kind()
    if kind is None and not limits.no_sandbox:
        raise UserError("this plan edits llm.py and no sandbox can be made here (neither "
                        "bubblewrap nor `unshare -rn` runs); pass --no-sandbox to run it without "
                        "one")
    original = _read_text(base, "code")
    try:
        patched = apply_edits(original, plan.edits)
        check_protected(original, patched, plan.edits)
    except EditError as e:
        raise edit_refusal(e) from None
    n = count_code_plan(plan, limits, folder)  # before anything is written
    copy, diff_file = folder / "llm.py", folder / "llm.py.diff"
    diff = unified_diff(original, patched)
    _write(copy, patched)
    _write(diff_file, diff)
    plan.code, plan.no_sandbox, plan.patched = copy, kind is None, True
    plan.limit_s = 60 * limits.max_total_minutes
    plan.diff = (f"code: {_count(len(plan.edits), 'edit')} to {base}, applied to the copy {copy} "
                 f"(diff saved as {diff_file}):\n{clean(diff)}")
    where = (f"patched code runs in: {kind}" if kind else "patched code runs WITHOUT A SANDBOX "
             "(--no-sandbox; none can be made here): it can reach the network and write wherever "
             "you can; it still gets an environment without keys, no stdin and a time limit")
    counted = (f"{_count(n, 'run')} counted by the unpatched llm.py (new flags times their "
               "values)" if n else
               "runs not counted ahead (the unpatched llm.py refuses the args)")
    return (f"{where}; after you confirm, its default behaviour and each entry at smoke scale are "
            f"checked there first; {counted}; each entry may run at most "
            f"{limits.max_total_minutes:g} min (the copy's runs are not timed ahead)")


def count_code_plan(plan: Plan, limits: Limits, out_dir) -> int:
    """A code plan's runs, counted before anything patched runs: the unpatched llm.py's planner on
    the flags it knows, times the number of values of each flag (or --grid field) it does not know
    (the copy's new ones). The known flags and their configs are checked as a plain plan's are
    (tool-owned flags, data files, tokenizer, dataset). Over --max-runs: PlanError. 0 where the
    unpatched planner refuses the args (the copy may accept them): then only the time limit
    bounds the plan."""
    llm, flags, total, uncounted = _project_module("llm"), llm_flags(), 0, False
    fields = {f.name for f in dataclasses.fields(llm.MoEModelConfig)}
    for i, e in enumerate(plan.entries, 1):
        known, factor, groups = [], 1, []
        for tok in e.args:
            if tok.startswith("-") and not _NEGATIVE_NUMBER.match(tok):
                flag, eq, value = tok.partition("=")
                groups.append([flag, *([value] if eq else [])])
            elif groups:
                groups[-1].append(tok)
        for flag, *values in groups:
            if flag == "--grid":
                new = [v for v in values if v.partition("=")[0].replace("-", "_") not in fields]
                factor *= math.prod(len(v.partition("=")[2].split(",")) for v in new)
                values = [v for v in values if v not in new]
                known += [flag, *values] if values else []
            elif flag in flags or any(f.startswith(flag) for f in flags if f.startswith("--")):
                known += [flag, *values]  # a prefix too: the copy's argparse would take it so
            else:
                factor *= max(1, len(values))
        label = f"entry {i} ({e.name})"
        check_flags(label, known, flags)  # the tool's own flags stay the tool's
        try:
            sweep = llm.plan_sweep([*known, "--out", str(e.csv(out_dir))])
        except llm.UserError:
            uncounted = True  # the other entries are still checked and counted
            continue
        e.n_runs = factor * sweep.n_runs
        total += e.n_runs
        if total > limits.max_runs:
            raise PlanError(f"{label} brings the plan to {total} runs or more, more than "
                            f"--max-runs {limits.max_runs}; shrink the plan or raise --max-runs")
        for cfg in sweep.configs():  # what gets loaded: files, tokenizer, dataset
            _check_config(label, cfg, llm, limits)
    return 0 if uncounted else total


def check_copy(plan: Plan, folder: Path) -> None:
    """After consent: the copy's default behaviour against the user's llm.py, then each entry at
    smoke scale, in the sandbox (a repairable PlanError on failure)."""
    env, work, timeout = child_env(), Path(folder) / "checks", max(300.0, plan.limit_s)
    try:
        check_default_behaviour(plan.code, DEFAULT_CODE, work, env, timeout, plan.no_sandbox)
        smoke_check_entries(plan.code, [e.args for e in plan.entries], work, env, timeout,
                            plan.no_sandbox)
    except EditError as e:
        raise edit_refusal(e) from None


def better(verdicts_of_round: dict) -> bool:
    """Whether an entry of a round has a "better" verdict on the primary metric."""
    return any(v.get("word") == "better" for res in verdicts_of_round.values()
               for v in res.get("verdicts", []))


# --------------------------------------------------------------------------------------------------
# Loop: rounds of chain -> plan (repaired by the model when refused) -> runs -> verdicts, with a
# ledger

REPAIR_PROMPT = """

Your answer to the request above was:

<answer>
{answer}
</answer>

The tool could not use it: {refusal}

Write the corrected answer in full: the plan, and its one block of runs, fixed as the message
says."""
LEDGER_COLUMNS = ("round", "question", "change", "runs", "verdict", "effect [95% CI]", "minutes",
                  "tokens")


def _cell(text: object, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _rounds(state: dict, upto: int | None = None):
    return [(k, r) for k, r in sorted(state["round"].items(), key=lambda kv: int(kv[0]))
            if upto is None or int(k) <= upto]


def ledger_table(state: dict, upto: int | None = None) -> str:
    """One row per verdict of every finished entry (and per refused plan or failed run): what each
    round asked, changed, ran and found."""
    rows = []
    for k, rnd in _rounds(state, upto):
        rows += [[k, "", "(plan refused)", "0", f"refused: {r}", "", "", ""]
                 for r in rnd.get("refusals", [])]
        for e in rnd.get("entries", []):
            res = rnd.get("verdicts", {}).get(e["name"])
            if res is None:
                continue
            base = [k, e.get("question") or e["name"], " ".join(e["args"]),
                    f"{res.get('n_ok', 0)}/{e['runs']} ok"]
            cost = [f"{res.get('minutes', 0):.1f}", f"{res.get('tokens', 0):,}"]
            if "error" in res or not res.get("verdicts"):
                rows.append(base + [res.get("error") or "no contrast (one condition)", ""] + cost)
            rows += [base + [f"{v['contrast']}: {v['word']} (n={v['n']}, p_adj="
                             f"{v['p_adjusted']:.2g}, detectable {v['detectable']:.3g})",
                             f"{v['effect']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"]
                     + cost for v in res.get("verdicts", [])]
    if not rows:
        return ""
    head = ["| " + " | ".join(LEDGER_COLUMNS) + " |", "|" + "---|" * len(LEDGER_COLUMNS)]
    return "\n".join(head + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def verdicts(csv: Path) -> dict:
    """An entry's findings from report.py's primary analysis (its public summary), and its cost."""
    import pandas as pd
    rp = _project_module("report")
    try:
        s = rp.summary(csv)
        out = {"n_ok": s.n_ok, "verdicts": [v._asdict() for v in s.verdicts],
               "text": rp.summary_text(s)}
    except (OSError, ValueError) as e:  # report.ReportError is a ValueError
        out = {"error": f"no verdict: {_one_line(e, 160)}"}
    try:
        df = pd.read_csv(csv)
        return {**out, "minutes": float(df["training_time_minutes"].sum()),
                "tokens": int(df["train_tokens"].sum())}
    except (OSError, ValueError, KeyError):
        return {**out, "minutes": 0.0, "tokens": 0}


def _save_loop(out: Path, state: dict) -> None:
    _write(out / LOOP_STATE, json.dumps(state, indent=2) + "\n")
    code = ("Current code: your llm.py (no code edit has won a \"better\" verdict yet)."
            if not state.get("code") else
            f"Current code: {state['code']} (a code edit that won a \"better\" verdict; your "
            f"llm.py is unchanged); compare it with yours: `diff -u llm.py {out / state['code']}`")
    md = [f"# Research loop: {state['idea']}", "",
          f"{state['rounds']} round(s) asked. Each round: the chain plans from the ledger and the "
          "last reports, the plan's runs train, report.py gives the verdicts. Rerun the same "
          "command to continue.", "",
          "## Ledger", "", ledger_table(state) or "(no finished entry yet)", "", code, ""]
    for k, rnd in _rounds(state):
        md += [f"## Round {k}: {rnd['status']}", "",
               f"- Results read: {rnd.get('results_from') or 'none'}"]
        if rnd.get("plan"):
            md.append(f"- Plan: [{rnd['plan']}]({rnd['plan']}) "
                      f"({_count(rnd.get('repairs', 0), 'repair')})")
        if rnd.get("code"):
            md.append(f"- Code: the plan's edits to {rnd.get('base')} ran as [{rnd['code']}]"
                      f"({rnd['code']}), diff [{rnd['diff']}]({rnd['diff']})")
        if rnd.get("entries"):
            md += ["- Commands:", "", "  ```", *[f"  {e['command']}" for e in rnd["entries"]],
                   "  ```"]
        for name, res in rnd.get("verdicts", {}).items():
            md += [f"- **{name}** ([report](round{k}/{name}_analysis.md)):"]
            md += [f"  {line}" for line in (res.get("text") or res.get("error", "")).splitlines()]
        md.append("")
    _write(out / LEDGER, "\n".join(md))


def _load_state(out: Path, idea: str) -> dict:
    try:
        state = json.loads((out / LOOP_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {"round": {}}
    except (OSError, ValueError) as e:
        raise UserError(f"{out / LOOP_STATE} is unreadable ({_one_line(e)}); fix or delete it"
                        ) from None
    rounds = state.get("round") if isinstance(state, dict) else None
    if not isinstance(rounds, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("status"), str) for r in rounds.values()):
        raise UserError(f"{out / LOOP_STATE} is not a loop state of this tool; fix or delete it")
    if state.get("idea") not in (None, idea):
        raise UserError(f"{out} holds a loop over {state['idea']}, not {idea}; use another "
                        "--out-dir (or the same idea file)")
    return state


class Loop:
    """The rounds of one loop folder, under its lock: state and ledger saved after each stage."""

    def __init__(self, llm: SimpleLLM, args, steps: list[dict], given: dict, lock_fd: int | None):
        self.llm, self.args, self.steps, self.given, self.fd = llm, args, steps, given, lock_fd
        self.out, self.limits, self.earlier = Path(args.out_dir), limits_of(args), []
        self.state = _load_state(self.out, str(args.input))
        self.state.update(idea=str(args.input), rounds=args.rounds)

    def save(self, rnd: dict | None = None, status: str | None = None) -> None:
        if status:
            rnd["status"] = status
        _save_loop(self.out, self.state)

    def run(self) -> int:
        for k in range(1, self.args.rounds + 1):
            rc = self.round(k)
            if rc is not None:
                return rc
        _note(f"\nloop complete: {self.args.rounds} round(s); see {self.out / LEDGER}")
        return 0

    def variables(self, k: int, rnd: dict) -> dict:
        """The chain's variables: round k-1's reports (round 1: the last results) after the
        ledger, and the code that won so far."""
        values = dict(self.given)
        if "results" in self.given:
            rnd["results_from"] = "--var results"
            return values
        if k > 1:
            parts = []
            for e in self.state["round"][str(k - 1)].get("entries", []):
                md = _project_module("report").report_paths(
                    self.out / f"round{k - 1}" / f"{e['name']}.csv")[0]
                body = _report_text(md) if md.is_file() else "No report: no run of this entry " \
                    "finished."
                parts.append(f"## Round {k - 1}, entry {e['name']}: "
                             f"{e.get('question') or 'no question given'}\n\n{body}")
            text, rnd["results_from"] = "\n\n".join(parts), \
                f"the ledger and round {k - 1}'s reports"
        else:
            text, self.earlier, source = load_results(self.args.results, not self.args.no_results,
                                                      write=not self.args.dry_run)
            rnd["results_from"] = str(source) if source else None
        table = ledger_table(self.state, upto=k - 1)
        if table:
            text = ("The ledger of this loop, every round so far (do not ask again what it "
                    f"answers):\n\n{table}\n\n{text}")
        values["results"] = text
        if self.state.get("code") and "code_content" not in values:
            values["code_content"] = fenced_code(self.out / self.state["code"])
        return values

    def round(self, k: int) -> int | None:
        rnd = self.state["round"].setdefault(str(k), {"status": "not started"})
        if rnd["status"] == "done":
            _note(f"round {k}: done (see {self.out / LEDGER})")
            return None
        rdir = self.out / f"round{k}"
        chain = Chain(self.llm, self.steps, self.variables(k, rnd), rdir)
        _note(f"\n==== round {k}/{self.args.rounds} in {rdir}")
        if self.args.dry_run:
            return self.dry_run(chain, rdir, k)
        self.save(rnd, "chain")
        try:
            chain.run(resume=True)
        except ChainError as e:
            self.save(rnd, f"chain failed at step {e.step}")
            e.args = (f"round {k}: {e}",)
            e.hint = f"finished steps are saved in {rdir}; rerun the same command to continue"
            raise
        except KeyboardInterrupt:
            self.save(rnd, "chain interrupted")
            _note(f"\ninterrupted in round {k}'s chain; rerun the same command to continue")
            return 130
        rnd.setdefault("plan", f"round{k}/{step_file(len(self.steps), self.steps[-1]['title'])}")
        while True:
            try:
                plan = self.checked_plan(rnd, rdir)
                rc = self.run_round(k, rnd, plan, rdir)
                if rc is not None:
                    return rc
                break
            except PlanError as e:
                self.repair_or_stop(chain, k, rnd, e)
        rnd["verdicts"] = {e.name: verdicts(e.csv(rdir)) for e in plan.entries}
        if plan.edits and better(rnd["verdicts"]):  # code that wins accumulates
            self.state["code"] = f"round{k}/llm.py"
        self.save(rnd, "done")
        _note(f"round {k} done: verdicts in {self.out / LEDGER}")
        return None

    def checked_plan(self, rnd: dict, rdir: Path) -> Plan:
        plan = read_plan(self.out / rnd["plan"], limits=self.limits)
        csvs = sorted(self.out.glob("round*/*.csv")) + self.earlier
        if plan.edits or self.state.get("code"):  # a winning copy stays the base, edits or not
            base = self.out / self.state["code"] if self.state.get("code") else DEFAULT_CODE
            make_dir(rdir)
            lines = prepare_copy(plan, base, rdir, self.limits)
            rnd.update(code=f"{rdir.name}/llm.py", diff=f"{rdir.name}/llm.py.diff", base=str(base))
        else:
            lines = check_plan(plan, self.limits, rdir, csvs)
            rnd.pop("code", None)
        plan.text = plan_text(plan, rdir, lines)
        rnd["entries"] = [{"name": e.name, "question": e.question, "args": e.args, "runs": e.n_runs,
                           "command": shown(plan.command(e, rdir))} for e in plan.entries]
        self.save(rnd, "runs")
        return plan

    def run_round(self, k: int, rnd: dict, plan: Plan, rdir: Path) -> int | None:
        print(plan.text)
        if not confirm(plan.text, f"Round {k}: run these {plan.total} runs?", self.args.yes):
            self.save(rnd, "runs not confirmed")
            _note("not confirmed: nothing was run; rerun the same command to be asked again")
            return 1
        if plan.patched:
            check_copy(plan, rdir)
        outcome = run_plan(plan, rdir, self.fd)
        if outcome.rc == 130:
            self.save(rnd, "runs interrupted")
            return 130
        if outcome.rc:
            i = plan.entries.index(outcome.entry) + 1
            e = PlanError(f"entry {i} ({outcome.entry.name}): a run failed (llm.py exit code "
                          f"{outcome.rc}); the last lines of its output:\n{outcome.tail}")
            e.status = f"a run failed (llm.py exit code {outcome.rc})"
            raise e
        return None

    def repair_or_stop(self, chain: Chain, k: int, rnd: dict, e: PlanError) -> None:
        """The final step gets its answer and the refusal, at most --repairs times a round."""
        first = str(e).splitlines()[0]
        rnd.setdefault("refusals", []).append(first)
        self.save(rnd, getattr(e, "status", None) or f"plan refused: {first}")
        done = rnd.get("repairs", 0)
        if done >= self.args.repairs:
            raise UserError(f"round {k}: {first}; edit {self.out / rnd['plan']} and rerun the same "
                            "command" + (f" ({_count(done, 'repair')} tried)" if done else "")
                            ) from None
        n, step = len(self.steps), self.steps[-1]
        _note(f"round {k}: refused ({first}); asking {step['model']} for a corrected plan "
              f"({done + 1} of {self.args.repairs})")
        prompt = substitute(step["prompt"], chain.variables) + REPAIR_PROMPT.replace(
            "{answer}", _read_text(self.out / rnd["plan"], "plan")).replace("{refusal}", str(e))
        name = step_file(n, step["title"]).replace(".md", f".repair{done + 1}.md")
        entry = {**_step_entry(n, step, prompt, self.llm.models[step["model"]]), "repair": done + 1,
                 "refusal": first, "output": name}
        chain.manifest.setdefault("repairs", []).append(entry)
        chain.ask_into(step["model"], prompt, entry,
                       f"round {k}'s repair {done + 1} ({step['model']})", n)
        rnd.update(repairs=done + 1, plan=f"round{k}/{name}")
        self.save()

    def dry_run(self, chain: Chain, rdir: Path, k: int) -> int:
        chain.run(resume=True, dry_run=True)
        rnd = self.state["round"].get(str(k), {})
        plan_file = self.out / rnd["plan"] if rnd.get("plan") else \
            rdir / step_file(len(self.steps), self.steps[-1]["title"])
        if plan_file.is_file():  # the chain of this round is done already: its runs are known
            plan = read_plan(plan_file, limits=self.limits)
            print(plan_text(plan, rdir, check_plan(plan, self.limits, rdir, self.earlier))
                  if not plan.edits else f"then: the plan's {_count(len(plan.edits), 'code edit')} "
                  f"applied to {rdir}/llm.py, checked and run in the sandbox (not in a dry run)")
        else:
            print(f"then: the block of runs in {plan_file} (written by the last step), checked "
                  f"with llm.py's sweep planner and budgeted ({self.limits.max_runs} runs, "
                  f"{self.limits.max_run_minutes:g} min a run, {self.limits.max_total_minutes:g} "
                  f"min in all), repaired by the model up to {self.args.repairs} times if refused, "
                  f"confirmed (typed yes or --yes), run into {rdir}/NAME.csv; the verdicts go to "
                  f"{self.out / LEDGER}" + (f", and round {k + 1} reads them"
                                            if k < self.args.rounds else ""))
        _note("dry run: nothing was sent or run")
        return 0


def _loop_command(llm: SimpleLLM, args) -> int:
    if not args.dry_run:
        _need_consent(args, "loop")
    steps, given = _chain_inputs(args, limits_of(args))
    if args.dry_run:
        return Loop(llm, args, steps, given, None).run()
    make_dir(args.out_dir)
    with out_dir_lock(args.out_dir) as fd:  # before the chain: a second loop here sends nothing
        return Loop(llm, args, steps, given, fd).run()


# --------------------------------------------------------------------------------------------------
# Command line


def _bounded(convert, low: float, above: bool = False):
    """An argparse type with a lower bound: a bad value gets the subcommand's usage and exit 2."""
    def check(text: str):
        value = convert(text)
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} "
                                             f"{low:g}, not {text}")
        return value
    check.__name__ = convert.__name__  # argparse names the type in "invalid int value"
    return check


def _model_id(text: str) -> tuple[str, str]:
    name, sep, model_id = (part.strip() for part in text.partition("="))
    if not sep or name not in PROVIDERS:
        raise argparse.ArgumentTypeError("expected NAME=MODEL_ID with NAME one of "
                                         f"{', '.join(PROVIDERS)}, not {text!r}")
    if not model_id:  # an empty id would be sent as is, or crash the SDK
        raise argparse.ArgumentTypeError(f"{name}= needs a model id, e.g. "
                                         f"{name}={PROVIDERS[name].model}")
    return name, model_id


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    positive = _bounded(float, 0, above=True)
    for flag, kind, default, text in (
            ("--max-tokens", _bounded(int, 1), DEFAULT_MAX_TOKENS, "longest answer in tokens, per "
             "call (default %(default)s; gemini counts its thinking too)"),
            ("--timeout", positive, DEFAULT_TIMEOUT, "seconds to wait to connect and between "
             "streamed chunks, reasoning chunks included (default %(default)g)"),
            ("--deadline", positive, DEFAULT_DEADLINE, "seconds for one whole answer, retries "
             "included (default %(default)g)"),
            ("--max-answer-chars", _bounded(int, 1), DEFAULT_MAX_ANSWER, "an answer longer than "
             f"this fails its step, keeping the part received (default {DEFAULT_MAX_ANSWER:,})"),
            ("--retries", _bounded(int, 0), DEFAULT_RETRIES, "retries for 429, 5xx, timeouts and "
             "refused connections, with exponential backoff that honours Retry-After (default "
             "%(default)s; 0 = off)")):
        common.add_argument(flag, type=kind, default=default, help=text)
    common.add_argument("--model", action="append", default=[], type=_model_id,
                        metavar="NAME=MODEL_ID", help="use another model id, e.g. "
                        "gemini=gemini-pro-latest (repeatable; `models` lists them)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return common


def _plan_options(p: argparse.ArgumentParser) -> None:
    """The limits a plan must keep and what it may load: `runs` and `loop`."""
    p.add_argument("--max-runs", type=_bounded(int, 1), default=DEFAULT_MAX_RUNS,
                   help="refuse a plan with more runs than this (default %(default)s)")
    p.add_argument("--max-run-minutes", type=_bounded(float, 0, above=True),
                   default=DEFAULT_MAX_RUN_MINUTES, help="refuse a run estimated longer than "
                   "this, in training minutes (default %(default)g)")
    p.add_argument("--max-total-minutes", type=_bounded(float, 0, above=True),
                   default=DEFAULT_MAX_TOTAL_MINUTES,
                   help="refuse a plan estimated longer than this in all (default %(default)g)")
    p.add_argument("--allow-data", action="append", default=[], metavar="NAME",
                   help="also allow this tokenizer or dataset (hub id or folder) in plans "
                        "(repeatable); allowed always: the defaults, bytes, random")
    p.add_argument("--allow-code-edits", action="store_true",
                   help="let a plan edit a copy of llm.py (off)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run code-edited copies without a sandbox where none can be made (off)")
    p.add_argument("--yes", action="store_true", help="run without asking")


def _chain_options(p: argparse.ArgumentParser, out_dir: str, out_help: str, dry_help: str,
                   resume_help: str) -> None:
    """What `chain` and `loop` share: the input, the files and variables the prompts are made of,
    the folder, --dry-run and --resume."""
    p.add_argument("input", help="markdown file with the research idea: {user_input}")
    p.add_argument("--code", default=str(DEFAULT_CODE),
                   help="code file for {code_content} (default llm.py)")
    p.add_argument("--system", default=str(DEFAULT_SYSTEM), help="constraints file for "
                   "{system_prompt} (default research_system_prompt.md)")
    p.add_argument("--steps", metavar="FILE.json",
                   help="JSON list of {title, model, prompt} replacing the built-in four steps")
    p.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                   help="variable for {KEY} in prompts (repeatable; wins over all others)")
    p.add_argument("--out-dir", default=out_dir, help=out_help)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--dry-run", action="store_true", help=dry_help)
    results = p.add_mutually_exclusive_group()
    results.add_argument("--results", metavar="FILE", help="{results}: a report or a results CSV "
                         f"(its report is built); default: the report of {DEFAULT_CSV_NAME} in "
                         "the current folder, if any")
    results.add_argument("--no-results", action="store_true",
                         help="{results} says no results exist yet")


def parse_args(argv=None) -> argparse.Namespace:
    common = _common_parser()
    parser = argparse.ArgumentParser(prog="simple_llm.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{gemini,kimi,models,chain,runs,loop}")
    for name, p in PROVIDERS.items():
        cmd = sub.add_parser(name, parents=[common],
                             help=f"stream one answer from {name} ({p.model})")
        cmd.add_argument("prompt", nargs="*",
                         help="the prompt (words are joined); '-' or nothing reads stdin")
    models = sub.add_parser("models", parents=[common],
                            help="list the model ids your keys can call")
    models.add_argument("provider", nargs="?", choices=list(PROVIDERS),
                        help="one provider (default: both)")
    chain = sub.add_parser("chain", parents=[common],
                           help="run the research chain on a markdown file")
    _chain_options(chain, ".", "folder for step files and chain_run.json (default .)",
                   "print each rendered prompt and its size; needs no key and sends nothing",
                   "reuse saved step files from --out-dir and call only for the missing steps")
    runs = sub.add_parser("runs",
                          help="check, budget, show and (with --run) run the runs of a plan")
    runs.add_argument("plan", help="markdown file ending in a block of runs (a chain's final step)")
    runs.add_argument("--out-dir", default="runs",
                      help="folder for each entry's NAME.csv and report (default runs)")
    runs.add_argument("--run", action="store_true", help="run them, after a typed yes (or --yes)")
    runs.add_argument("--results", metavar="CSV", help="earlier results for the time estimate "
                      f"(default: {DEFAULT_CSV_NAME} here, if any)")
    runs.add_argument("--debug", action="store_true", help="show Python tracebacks")
    loop = sub.add_parser("loop", parents=[common], help="rounds of chain -> runs -> verdicts, "
                          "each round planned from the ledger")
    _chain_options(loop, DEFAULT_LOOP_DIR, f"folder for round{{k}}/, {LOOP_STATE} and {LEDGER} "
                   f"(default {DEFAULT_LOOP_DIR})", "print the first unfinished round's prompts "
                   "and what follows; no key, nothing sent", argparse.SUPPRESS)  # always resumes
    loop.add_argument("--rounds", type=_bounded(int, 1), default=1,
                      help="rounds to run (default 1)")
    loop.add_argument("--repairs", type=_bounded(int, 0), default=DEFAULT_REPAIRS,
                      help="times a round's refused plan (or failed run) goes back to the final "
                           "step with the message (default %(default)s)")
    for p in (runs, loop):
        _plan_options(p)
    return parser.parse_args(argv)


def _chain_inputs(args, limits: Limits | None = None) -> tuple[list[dict], dict]:
    """The steps, and the variables from the files and --var, as `chain` and `loop` read them."""
    steps = DEFAULT_STEPS
    if args.steps:
        try:
            steps = json.loads(_read_text(args.steps, "steps"))
        except ValueError as e:
            raise UserError(f"--steps {args.steps} is not valid JSON: {e}") from None
    check_steps(steps)
    values = {"user_input": _read_text(args.input, "prompt")}
    if args.code != str(DEFAULT_CODE):  # the defaults load only if a step uses them (Chain)
        values["code_content"] = fenced_code(args.code)
    if args.system != str(DEFAULT_SYSTEM):
        values["system_prompt"] = _read_text(args.system, "--system")
    if limits is not None:
        values["plan_format"] = plan_format(limits.max_runs, limits)
        values["code_edit_rules"] = code_edit_rules(limits)
    for item in args.var:  # last, so that --var wins over every other source
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise UserError(f"--var {item!r}: expected NAME=VALUE with NAME made of letters, "
                            "digits and _")
        values[key.strip()] = value
    return steps, values


def _models_command(args) -> int:
    load_env()
    names = [args.provider] if args.provider else list(PROVIDERS)
    for name in names:
        api_key(name)  # every missing key before any request
    s = Settings(args.max_tokens, args.timeout, args.retries, args.deadline, args.max_answer_chars)
    for name in names:
        chosen = dict(args.model).get(name) or os.environ.get(PROVIDERS[name].model_env) or \
            PROVIDERS[name].model
        for model_id in list_models(name, s):
            print(f"{name}\t{model_id}" + ("\tdefault" if model_id == chosen else ""), flush=True)
    return 0


def _chain_command(llm: SimpleLLM, args, argv: list[str]) -> int:
    steps, values = _chain_inputs(args)
    chain = Chain(llm, steps, values, args.out_dir,
                  results=lambda write: load_results(args.results, not args.no_results, write)[0])
    script = sys.argv[0] if sys.argv[0].endswith("simple_llm.py") else "simple_llm.py"
    resume = shlex.join(["python", script, *(a for a in argv if a != "--resume"), "--resume"])
    try:
        results = chain.run(resume=args.resume, dry_run=args.dry_run)
    except ChainError as e:
        done = e.step - 1
        kept = ("step 1 is" if done == 1 else f"steps 1-{done} are") + f" saved in {e.out_dir}"
        e.hint = f"{kept if done else 'no step had finished'}; continue with: {resume}"
        raise
    except KeyboardInterrupt:
        n = chain.interrupted_step
        kept = ("step 1 is" if n == 2 else f"steps 1-{n - 1} are") + f" kept in {args.out_dir}; "
        if n:
            _note(f"\ninterrupted at step {n}; {kept if n > 1 else ''}continue with: {resume}")
        return 130
    if not args.dry_run:
        _note(f"\nchain complete: {_count(len(results), 'step')} saved in {args.out_dir} (see "
              f"{MANIFEST})")
    return 0


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "runs":
        return _runs_command(args)
    if args.command == "models":
        return _models_command(args)
    llm = SimpleLLM(max_tokens=args.max_tokens, timeout=args.timeout, retries=args.retries,
                    deadline=args.deadline, max_answer=args.max_answer_chars,
                    models=dict(args.model))
    if args.command == "loop":
        return _loop_command(llm, args)
    if args.command == "chain":
        return _chain_command(llm, args, argv)
    prompt = " ".join(args.prompt)
    if prompt.strip() in ("", "-"):
        if sys.stdin.isatty():
            _note("reading the prompt from stdin; end it with Ctrl-D")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("empty prompt: pass it as arguments or pipe it on stdin")
    llm.call_model(args.command, prompt)
    return 0


def main(argv=None) -> int:
    """The one error boundary: a UserError is one line (exit 2, or 1 for a provider), anything else
    one line naming its type; --debug adds the (redacted) traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        _note("interrupted")
        return 130
    except Exception as e:  # printed, not re-raised: SDK exceptions can carry a key
        if args.debug:
            _note(clean(redact("".join(traceback.format_exception(e)))).rstrip())
        if isinstance(e, UserError):
            _note(clean(redact(f"error: {e}" + (f"\n  {e.hint}" if e.hint else ""))))
            return e.exit_code
        _note(f"error: unexpected {type(e).__name__}: {_one_line(e)}"
              + ("" if args.debug else " (rerun with --debug for the traceback)"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
