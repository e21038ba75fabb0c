"""Ask Gemini or Kimi from the command line, and turn a research idea into a reviewed experiment plan and its runs.

    python simple_llm.py kimi "Summarise mixture-of-experts routing in five bullets"
    python simple_llm.py chain research_prompt.md --dry-run     # no key, no network: shows every prompt
    python simple_llm.py chain research_prompt.md --out-dir plans/ --resume
    python simple_llm.py runs tests/example_plan.md --run --yes  # a plan's runs, offline on CPU (smoke preset)
    python simple_llm.py loop research_prompt.md --rounds 2 --out-dir loop/   # chain -> runs -> report, twice

Keys come from GEMINI_API_KEY and NOVITA_API_KEY, in the environment or in a .env file (see .env.example).
The chain runs Research_Plan (kimi) -> Critical_Review (gemini) -> Critique_Analysis (kimi) -> Final_Plan
(gemini), saves each answer as step{N}_{title}.md and writes chain_run.json beside them. The prompts carry the
last sweep's report ({results}); the final plan ends in a ```json block of llm.py runs, which `runs` checks
with llm.py's own parser and runs, and `loop` repeats chain -> runs -> report for --rounds rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

# ------------------------------------------------------------------------------------------------------------
# Constants and defaults

HERE = Path(__file__).resolve().parent
DEFAULT_CODE = HERE / "llm.py"
DEFAULT_SYSTEM = HERE / "research_system_prompt.md"
MANIFEST = "chain_run.json"

# The chain asks for plans of up to 1000 words, and Gemini counts its thinking against this limit too.
DEFAULT_MAX_TOKENS = 16384
DEFAULT_TIMEOUT = 300.0  # seconds for the connection and between streamed chunks: Gemini thinks before it writes
DEFAULT_RETRIES = 4
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MAX_SERVER_WAIT = 120.0  # a server asking for a longer pause than this is treated as a hard failure
# English runs at about 4 characters per token and nothing at more than 8, so a prompt this long is over 1M
# tokens, the largest context of either model (Gemini's): it is refused here instead of uploaded and rejected.
MAX_PROMPT_CHARS = 8_000_000


@dataclasses.dataclass(frozen=True)
class Provider:
    key_env: str  # environment variable holding the API key
    model: str  # default model id
    model_env: str  # environment variable overriding the model id
    base_env: str  # environment variable overriding the endpoint (proxy, gateway, local server)
    base_url: str | None  # None = the SDK's own default


PROVIDERS = {
    "gemini": Provider("GEMINI_API_KEY", "gemini-2.5-pro", "GEMINI_MODEL", "GEMINI_BASE_URL", None),
    "kimi": Provider("NOVITA_API_KEY", "moonshotai/kimi-k2-0905", "KIMI_MODEL", "NOVITA_BASE_URL",
                     "https://api.novita.ai/openai"),
}

# The built-in chain. --steps FILE.json replaces it with a list of the same shape.
DEFAULT_STEPS = [
    {"title": "Research_Plan", "model": "kimi", "prompt": """{system_prompt}

You are planning experiments on the mixture-of-experts language model below. The researcher's idea:

{user_input}

What the last experiment found:

{results}

The current code (llm.py):

{code_content}

Write a concise research plan of at most 800 words: the question and hypothesis, the conditions to compare
(name the llm.py settings or code changes for each), seeds, metrics, expected run time, and the total number
of runs. Build on what the last experiment found. Keep to the constraints above."""},
    {"title": "Critical_Review", "model": "gemini", "prompt": """{system_prompt}

The researcher's idea:

{user_input}

What the last experiment found:

{results}

The code the plan builds on (llm.py):

{code_content}

A proposed research plan:

{step1_result}

Review this plan critically in at most 600 words. Look for unfair comparisons, confounds, too few seeds to
separate the effects, metrics that cannot show the claimed effect, steps the code does not support, results
it ignores or misreads, and anything that breaks the constraints. For each problem, suggest a concrete fix."""},
    {"title": "Critique_Analysis", "model": "kimi", "prompt": """{system_prompt}

The original plan:

{step1_result}

A critical review of it:

{step2_result}

Weigh the review in at most 500 words. For each point, say whether it holds, what fixing it would cost in
runs and minutes, and whether the fix fits the constraints. Keep the ideas worth keeping from the original
plan and push back on criticism that does not hold."""},
    {"title": "Final_Plan", "model": "gemini", "prompt": """{system_prompt}

The researcher's idea:

{user_input}

What the last experiment found:

{results}

The code (llm.py):

{code_content}

The original plan:

{step1_result}

The critical review:

{step2_result}

The analysis of that review:

{step3_result}

Write the final research plan in at most 1000 words: goals and questions, the exact conditions and the
llm.py settings or code changes for each, seeds, metrics and how results will be compared fairly, the time per
run and in total, and the total number of experiments, stated at the start.

{plan_format}"""},
]


class UserError(Exception):
    """Something the user can fix (bad input, missing key): shown as one line, exit 2."""
    exit_code = 2
    hint = ""  # a second line telling how to go on (the chain's resume command)


class ProviderError(UserError):
    """The provider refused or failed to answer: shown as one line, exit 1."""
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(redact(message))


class ChainError(ProviderError):
    """A chain step failed; carries the step so the CLI can say how to resume."""

    def __init__(self, message: str, step: int, out_dir: Path):
        super().__init__(message)
        self.step, self.out_dir = step, out_dir


_SECRETS: set[str] = set()


def redact(text: str) -> str:
    """SDK errors can echo request details: no key value ever leaves this process."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _note(text: str) -> None:
    """Progress, warnings and errors go to stderr; a reader that went away (`2>&1 | head`) must not stop the work."""
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence(sys.stderr)


def _silence(stream) -> None:
    """After a broken pipe, the stream writes to /dev/null, so Python's flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (AttributeError, OSError, ValueError):
        pass


class Redactor:
    """Redacts keys from text that arrives in pieces: a server may echo a key split across two chunks, so the
    last (longest key - 1) characters wait for the next piece, or for flush() at the end."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str) -> str:
        text = redact(self.held + text)
        cut = max(len(text) - max(map(len, _SECRETS), default=1) + 1, 0)
        self.held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        text, self.held = redact(self.held), ""
        return text


def load_env() -> None:
    """Read .env from the current directory, else from beside this script; set variables always win.

    SIMPLE_LLM_NO_DOTENV=1 skips .env files entirely (the tests use it so a real .env never leaks in).
    """
    if not os.environ.get("SIMPLE_LLM_NO_DOTENV"):
        from dotenv import load_dotenv
        for candidate in (Path.cwd() / ".env", HERE / ".env"):
            if candidate.is_file():
                load_dotenv(candidate, override=False)
                break
    for p in PROVIDERS.values():
        if len(os.environ.get(p.key_env, "")) >= 4:
            _SECRETS.add(os.environ[p.key_env])


def api_key(name: str) -> str:
    var = PROVIDERS[name].key_env
    key = os.environ.get(var, "").strip()
    if not key:
        raise UserError(f"{var} is not set: add it to .env (copy .env.example) or export it, then rerun")
    _SECRETS.add(key)
    return key


# ------------------------------------------------------------------------------------------------------------
# Provider calls: one streaming function per provider, both behind SimpleLLM.call_model


@dataclasses.dataclass
class Settings:
    max_tokens: int = DEFAULT_MAX_TOKENS
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES


@dataclasses.dataclass
class Reply:
    text: str
    model_id: str
    finish_reason: str | None
    usage: dict
    seconds: float = 0.0

    @property
    def cut(self) -> bool:
        return self.finish_reason in ("length", "MAX_TOKENS")


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(redact(str(text)).split())  # redacted before the cut: a cut key would no longer match
    return text if len(text) <= limit else text[:limit] + "..."


def _rejected(name: str, status: int, detail: str) -> ProviderError:
    return ProviderError(f"{name} rejected the key in {PROVIDERS[name].key_env} (HTTP {status}: "
                         f"{_one_line(detail, 160)}); check the key in .env or the environment")


class _Retry(Exception):
    """One attempt failed in a way another may fix (429, 5xx, timeout, dropped connection before any text)."""

    def __init__(self, problem: str, failure: str, tail: str, wait: float | None = None):
        self.problem = problem  # short, for the "retrying" line
        self.failure, self.tail = failure, tail  # the error if no retry is left: "{failure} {attempts}{tail}"
        self.wait = wait  # seconds the server asked for, if it did


def _transient(name: str, parts: list[str], problem: str, failure: str, fix: str) -> Exception:
    if parts:  # the answer had started: a stream cut off mid-answer, which no retry can pick up again
        return ProviderError(f"{name}: the answer broke off after {len(''.join(parts)):,} characters: {failure}; "
                             "try again")
    return _Retry(problem, failure, f"; {fix}")


def _malformed(name: str, e: Exception) -> ProviderError:
    return ProviderError(f"{name}: the stream sent a malformed chunk ({_one_line(e, 160)}); try again, or rerun "
                         "with --debug to see it")


def _attempts(made: int, retries: int) -> str:
    if retries == 0:
        return "(retries are off)"
    return f"after {made} attempt{'s' if made != 1 else ''}"


def _with_retries(name: str, s: Settings, attempt) -> Reply:
    """The one retry loop for both providers: the server's Retry-After is honoured up to MAX_SERVER_WAIT,
    otherwise the waits double from 1 s (at most 30 s), and each retry prints a line."""
    for made in range(1, s.retries + 2):
        try:
            return attempt()
        except _Retry as r:
            failure = f"{name}: {r.failure} {_attempts(made, s.retries)}{r.tail}"
            asked = r.wait if r.wait is not None and r.wait >= 0 else None  # NaN or negative: as if not asked
            if asked is not None and asked > MAX_SERVER_WAIT:
                raise ProviderError(f"{failure}; the server asks to wait {asked:.0f} s, longer than the "
                                    f"{MAX_SERVER_WAIT:.0f} s this script waits, so try again later") from None
            if made > s.retries:
                raise ProviderError(failure) from None
            wait = asked if asked is not None else min(2.0 ** (made - 1), 30.0) * random.uniform(0.75, 1.0)
            _note(f"{name}: {r.problem}, retrying in {wait:.1f} s (attempt {made + 1} of {s.retries + 1})")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _stream_kimi(prompt: str, model_id: str, s: Settings, emit) -> Reply:
    import openai
    base = os.environ.get("NOVITA_BASE_URL") or PROVIDERS["kimi"].base_url
    # The SDK's own retries are silent and give up on a long Retry-After without saying so: the shared loop
    # retries instead, as for Gemini.
    client = openai.OpenAI(api_key=api_key("kimi"), base_url=base, timeout=s.timeout, max_retries=0)

    def attempt() -> Reply:
        parts: list[str] = []
        finish, usage = None, {}
        try:
            stream = client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=s.max_tokens,
                stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage:  # the last chunk: no choices, only the token counts
                    usage = chunk.usage.model_dump(exclude_none=True)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                    emit(choice.delta.content)
                finish = choice.finish_reason or finish
            return _finished("kimi", parts, model_id, finish, usage)
        except openai.APIStatusError as e:  # always before the stream starts
            detail = _openai_detail(e)
            if e.status_code in (401, 403):
                raise _rejected("kimi", e.status_code, detail) from None
            failure = f"HTTP {e.status_code} from {base}"
            if e.status_code not in RETRY_STATUS:
                raise ProviderError(f"kimi: {failure}: {detail}") from None
            raise _Retry(f"HTTP {e.status_code}", failure, f": {detail}", _server_wait(e.response.headers, e.body))
        except openai.APITimeoutError:
            raise _transient("kimi", parts, "timed out", f"no data for {s.timeout:g} s from {base}",
                             "raise --timeout or try later") from None
        except openai.APIConnectionError as e:
            raise _transient("kimi", parts, "connection failed",
                             f"connection to {base} failed ({_one_line(e.__cause__ or e, 120)})",
                             "check the network or NOVITA_BASE_URL") from None
        except openai.APIError as e:  # an error event inside the stream
            raise ProviderError(f"kimi: the stream reported an error: {_openai_detail(e)}") from None
        except json.JSONDecodeError as e:  # a chunk that is not JSON
            raise _malformed("kimi", e) from e
    return _with_retries("kimi", s, attempt)


def _openai_detail(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return _one_line(body["message"])
    return _one_line(getattr(e, "message", e))


def _finished(name: str, parts: list[str], model_id: str, finish, usage: dict) -> Reply:
    text = "".join(parts)
    if finish is None:  # every complete answer ends with a finish reason; a clean EOF without one was cut off
        raise ProviderError(f"{name}: the stream ended before the answer was finished (no finish reason); "
                            "try again")
    if not text.strip():
        raise ProviderError(f"{name}: the answer was empty (finish reason {finish})")
    return Reply(text, model_id, finish, usage)


def _server_wait(headers, details) -> float | None:
    """Seconds the server asked us to wait: Retry-After(-ms) headers or Google's RetryInfo in the error body."""
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers.get(header)) / scale
        except (TypeError, ValueError, AttributeError):
            pass
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            try:
                return float(str(item.get("retryDelay", "")).rstrip("s"))
            except ValueError:
                pass
    return None


def _stream_gemini(prompt: str, model_id: str, s: Settings, emit) -> Reply:
    import httpx2
    import pydantic
    from google import genai
    from google.genai import errors, types
    base = os.environ.get("GEMINI_BASE_URL") or PROVIDERS["gemini"].base_url
    # The SDK's own retries ignore Retry-After, so it is told not to retry and the shared loop does it instead.
    http = types.HttpOptions(timeout=int(s.timeout * 1000), retry_options=types.HttpRetryOptions(attempts=1))
    if base:
        http.base_url = base
    client = genai.Client(api_key=api_key("gemini"), http_options=http)
    config = types.GenerateContentConfig(max_output_tokens=s.max_tokens,
                                         thinking_config=types.ThinkingConfig(thinking_budget=-1))
    where = base or "the Gemini API"

    def attempt() -> Reply:
        parts: list[str] = []
        finish, usage = None, {}
        try:
            for chunk in client.models.generate_content_stream(model=model_id, contents=prompt, config=config):
                if chunk.usage_metadata:
                    usage = chunk.usage_metadata.model_dump(exclude_none=True, mode="json")
                feedback = chunk.prompt_feedback
                if feedback and feedback.block_reason:
                    reason = getattr(feedback.block_reason, "value", feedback.block_reason)
                    raise ProviderError(f"gemini refused the prompt ({reason}); rephrase it")
                for cand in (chunk.candidates or [])[:1]:
                    for part in (cand.content.parts or []) if cand.content else []:
                        if part.text and not part.thought:  # thought summaries are not the answer
                            parts.append(part.text)
                            emit(part.text)
                    if cand.finish_reason:
                        finish = getattr(cand.finish_reason, "value", str(cand.finish_reason))
            return _finished("gemini", parts, model_id, finish, usage)
        except errors.APIError as e:
            detail = _one_line(e.message or e.details)
            if e.code in (401, 403) or (e.code == 400 and "API_KEY_INVALID" in str(e.details)):
                raise _rejected("gemini", e.code, detail) from None
            problem = f"HTTP {e.code} {e.status or ''}".strip()
            if parts or e.code not in RETRY_STATUS:
                raise ProviderError(f"gemini: {problem} from {where}: {detail}") from None
            raise _Retry(problem, f"{problem} from {where}", f": {detail}",
                         _server_wait(getattr(e.response, "headers", None), e.details)) from None
        except httpx2.TimeoutException:
            raise _transient("gemini", parts, "timed out", f"no data for {s.timeout:g} s from {where}",
                             "raise --timeout or try later") from None
        except httpx2.TransportError as e:
            failure = _transient("gemini", parts, "connection failed",
                                 f"connection to {where} failed ({_one_line(e, 120)})",
                                 "check the network or GEMINI_BASE_URL")
            if isinstance(failure, _Retry) and not isinstance(e, (httpx2.NetworkError, httpx2.RemoteProtocolError)):
                failure = ProviderError(f"gemini: {failure.failure}{failure.tail}")  # e.g. a malformed URL
            raise failure from None
        except (errors.UnknownApiResponseError, pydantic.ValidationError) as e:  # not JSON, or not a response
            raise _malformed("gemini", e) from e
    return _with_retries("gemini", s, attempt)


STREAMERS = {"gemini": _stream_gemini, "kimi": _stream_kimi}


# ------------------------------------------------------------------------------------------------------------
# Variables and chain

_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_]\w*)\}\}|\{([A-Za-z_]\w*)\}")


def safe_name(title: str) -> str:
    """A step title as a file-name part: letters, digits, - and _ only, so no path separators and no '..'."""
    return re.sub(r"[^a-z0-9_-]+", "_", title.lower()).strip("_-")[:60] or "step"


def step_file(n: int, title: str) -> str:
    return f"step{n}_{safe_name(title)}.md"


def placeholders(text: str) -> list[str]:
    return [m.group(2) for m in _PLACEHOLDER.finditer(text) if m.group(2)]


class SimpleLLM:
    """Calls the models and runs chains. `variables` fills {name} placeholders in step prompts."""

    def __init__(self, *, max_tokens: int = DEFAULT_MAX_TOKENS, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, models: dict[str, str] | None = None, out=None):
        load_env()
        self.variables: dict[str, str] = {}
        self.settings = Settings(max_tokens, timeout, retries)
        self.models = {n: os.environ.get(p.model_env) or p.model for n, p in PROVIDERS.items()}
        self.models.update(models or {})
        self.out = out or sys.stdout
        self.out_closed = False  # the reader of `out` went away (`| head`): answers are still returned and saved
        self.last_reply: Reply | None = None
        self._streamed: list[str] = []  # text of the answer in progress (keys redacted), kept if the call fails
        self._redactor = Redactor()
        self.interrupted_step = 0  # the chain step a Ctrl-C stopped, for the resume hint
        self.results_file, self.use_results = None, True  # where {results} comes from (see load_results)

    def _show(self, text: str) -> None:
        if not text or self.out_closed:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self.out_closed = True
            _silence(self.out)

    def _emit(self, text: str) -> None:
        text = self._redactor.feed(text)  # before it is shown, saved or passed to the next step
        self._streamed.append(text)
        self._show(text)

    def reply(self, name: str, prompt: str) -> Reply:
        """Stream one answer to `out` and return it with its finish reason and token usage."""
        if name not in PROVIDERS:
            raise UserError(f"unknown model {name!r}: choose one of {', '.join(PROVIDERS)}")
        check_prompt_size(prompt)
        start, self._streamed, self._redactor = time.perf_counter(), [], Redactor()
        r = None
        try:
            r = STREAMERS[name](prompt, self.models[name], self.settings, self._emit)
        finally:
            self._streamed.append(self._redactor.flush())
            self._show(self._streamed[-1])
            if r is not None or "".join(self._streamed):  # an error message then starts on a line of its own
                self._show("\n")
        r.text = redact(r.text)
        r.seconds = round(time.perf_counter() - start, 2)
        if r.cut:
            _note(f"warning: {name} stopped at the --max-tokens limit ({self.settings.max_tokens}); the answer "
                  "is cut short. Raise --max-tokens to get all of it")
        self.last_reply = r
        return r

    def call_model(self, name: str, prompt: str) -> str:
        return self.reply(name, prompt).text

    def substitute_vars(self, text: str, strict: bool = True) -> str:
        """Replace each {name} by its variable in one pass: braces inside the values are left as they are.

        {{name}} gives a literal {name}. An unknown {name} raises UserError (or stays, with strict=False).
        """
        def fill(m: re.Match) -> str:
            if m.group(1):
                return "{" + m.group(1) + "}"
            if m.group(2) in self.variables:
                return self.variables[m.group(2)]
            if strict:
                raise UserError(f"unknown variable {{{m.group(2)}}}: pass --var {m.group(2)}=VALUE or fix the "
                                "prompt (write {{name}} for literal braces)")
            return m.group(0)
        return _PLACEHOLDER.sub(fill, text)

    def read_markdown_file(self, path) -> str:
        return _read_text(path, "prompt")

    def read_code_file(self, path, lean: bool = False) -> str:
        """The file in a fenced block; the fence grows past any backtick run inside the code.
        lean: leave out the sections a planner does not need (see lean_code)."""
        path = Path(path)
        code = _read_text(path, "code")
        code = lean_code(code) if lean else code
        fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`{3,}", code)])
        return f"{fence}{'python' if path.suffix == '.py' else ''}\n{code.rstrip()}\n{fence}"

    def run_chain(self, steps: list[dict], user_input: str | None = None, *, out_dir=".", resume: bool = False,
                  dry_run: bool = False) -> list[str]:
        """Run the steps in order, saving each answer as step{N}_{title}.md; return the answers.

        Everything that can be checked is checked before the first request: step shapes, every {name}, the
        keys, the prompt sizes, and that --out-dir can be written. With resume, saved answers for a leading run
        of steps are reused instead of asked again.
        """
        check_steps(steps)
        if user_input is not None:
            self.variables["user_input"] = user_input
        used = {name for step in steps for name in placeholders(step["prompt"])}
        for name, load in (("code_content", lambda: self.read_code_file(DEFAULT_CODE, lean=True)),
                           ("system_prompt", lambda: self.read_markdown_file(DEFAULT_SYSTEM)),
                           ("results", lambda: load_results(self.results_file, self.use_results,
                                                            write=not dry_run)[0]),
                           ("plan_format", plan_format)):
            if name in used and name not in self.variables:
                self.variables[name] = load()
        for n, step in enumerate(steps, 1):
            earlier = {f"step{k}_result" for k in range(1, n)}
            unknown = sorted({v for v in placeholders(step["prompt"])} - set(self.variables) - earlier)
            if unknown:
                names = ", ".join("{" + v + "}" for v in unknown)
                raise UserError(f"step {n} ({step['title']}) uses {names}, which no variable or earlier step "
                                f"defines: pass --var NAME=VALUE or fix the prompt")
        if "user_input" in self.variables and "user_input" not in used:
            _note("warning: no step uses {user_input}, so the input file is not sent")
        elif "user_input" in used and not self.variables["user_input"].strip():
            _note("warning: {user_input} is empty (an empty input file?), so the steps get no idea to work on")

        out_dir = Path(out_dir)
        try:
            old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")) if resume else {}
        except (OSError, ValueError):
            old = {}
        saved: list[str] = []
        for n, step in enumerate(steps, 1):  # only a leading run: a redone step makes later ones stale
            path = out_dir / step_file(n, step["title"])
            text = _read_text(path, "saved step") if resume and path.is_file() else ""
            if not text.strip():
                break
            saved.append(redact(text))  # a file from an older version may hold an echoed key
        if dry_run:
            return self._dry_run(steps, saved, out_dir)
        for name in {step["model"] for step in steps[len(saved):]}:
            api_key(name)  # a missing key stops the chain before it spends anything
        for n, (step, prompt) in enumerate(zip(steps, self._render(steps, saved, lambda n, step: "")), 1):
            if n > len(saved):  # answers still to come count as empty here; reply() checks the real prompt
                check_prompt_size(prompt, f"step {n} ({step['title']})'s prompt",
                                  "shorten the input, code or --var values it is made from")
        manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "running",
                    "settings": dataclasses.asdict(self.settings), "steps": []}
        make_dir(out_dir)  # found now, not when the first paid answer cannot be saved
        _write(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # and that the folder can be written
        results: list[str] = []
        for n, step in enumerate(steps, 1):
            prompt = self.substitute_vars(step["prompt"])
            entry = {"step": n, "title": step["title"], "model": step["model"],
                     "model_id": self.models[step["model"]], "prompt_chars": len(prompt),
                     "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                     "output": step_file(n, step["title"])}
            if n <= len(saved):
                text = saved[n - 1]
                before = next((e for e in old.get("steps", []) if e.get("output") == entry["output"]), {})
                if before.get("prompt_sha256", entry["prompt_sha256"]) != entry["prompt_sha256"]:
                    _note(f"warning: step {n}'s prompt changed since {entry['output']} was saved; reusing it "
                          "anyway (delete the file to ask again)")
                # The saved answer's own prompt, model and usage stay on record, so the next --resume warns too.
                entry = {**entry, **before, "reused": True}
                _note(f"== step {n}/{len(steps)}: {step['title']} reused from {entry['output']} (--resume)")
            else:
                _note(f"\n== step {n}/{len(steps)}: {step['title']} ({step['model']}, {entry['model_id']}, "
                      f"{len(prompt):,} prompt characters)")
                partial = out_dir / entry["output"].replace(".md", ".partial.md")
                self._streamed = []
                try:
                    _remove(out_dir / entry["output"])  # an older answer must not pass for this one
                    r = self.reply(step["model"], prompt)
                    _write(out_dir / entry["output"], r.text)
                except (Exception, KeyboardInterrupt) as e:
                    interrupted = isinstance(e, KeyboardInterrupt)
                    entry.update(output=None, error="interrupted" if interrupted else redact(_one_line(e)))
                    manifest["status"] = "interrupted" if interrupted else "failed"
                    manifest["steps"].append(entry)
                    try:  # best effort: the folder itself may be what failed
                        if "".join(self._streamed).strip():  # paid for: keep it, but never as a finished step
                            _write(partial, "".join(self._streamed))
                            entry["partial"] = partial.name
                        _write(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
                    except UserError:
                        pass
                    if interrupted:
                        self.interrupted_step = n
                        raise
                    why = e if isinstance(e, UserError) else f"unexpected {type(e).__name__}: {_one_line(e)}"
                    raise ChainError(f"step {n} ({step['title']}, {step['model']}) failed: {why}", n, out_dir) \
                        from e
                text = r.text
                partial.unlink(missing_ok=True)
                entry.update(seconds=r.seconds, usage=r.usage, finish_reason=r.finish_reason, cut=r.cut)
            self.variables[f"step{n}_result"] = text
            results.append(text)
            manifest["steps"].append(entry)
            _write(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        manifest["status"] = "complete"
        _write(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return results

    def _render(self, steps: list[dict], saved: list[str], unknown) -> list[str]:
        """Every step's prompt, with the saved answers and `unknown(n, step)` for those still to come."""
        values = dict(self.variables)
        for n, step in enumerate(steps, 1):
            self.variables[f"step{n}_result"] = saved[n - 1] if n <= len(saved) else unknown(n, step)
        try:
            return [self.substitute_vars(step["prompt"]) for step in steps]
        finally:
            self.variables = values

    def _dry_run(self, steps: list[dict], saved: list[str], out_dir: Path) -> list[str]:
        rendered = self._render(steps, saved, lambda n, step: f"<output of step {n} ({step['title']})>")
        for n, (step, prompt) in enumerate(zip(steps, rendered), 1):
            note = "reused from disk (--resume)" if n <= len(saved) else "would be sent"
            self._show(redact(f"==== step {n}/{len(steps)}: {step['title']} -> {step['model']} "
                              f"({self.models[step['model']]}), {len(prompt):,} characters (~{len(prompt) // 4:,} "
                              f"tokens), {note}, saved as {out_dir / step_file(n, step['title'])}\n{prompt}\n\n"))
        _note(f"dry run: {_count(len(steps), 'step')}, {sum(map(len, rendered)):,} prompt characters; nothing was "
              "sent")
        return rendered


def check_steps(steps) -> None:
    if not isinstance(steps, list) or not steps:
        raise UserError("steps must be a non-empty list of {\"title\", \"model\", \"prompt\"} objects")
    for n, step in enumerate(steps, 1):
        if not isinstance(step, dict) or not all(isinstance(step.get(k), str) and step[k].strip()
                                                 for k in ("title", "model", "prompt")):
            raise UserError(f"step {n} needs non-empty string fields \"title\", \"model\" and \"prompt\"")
        if step["model"] not in PROVIDERS:
            raise UserError(f"step {n} ({step['title']}): unknown model {step['model']!r}; choose one of "
                            f"{', '.join(PROVIDERS)}")


def check_prompt_size(prompt: str, what: str = "the prompt", fix: str = "shorten it") -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{what} is {len(prompt):,} characters (about {len(prompt) // 4:,} tokens), far more than "
                        f"any model's context (1M tokens at most); {fix}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def _read_text(path, what: str) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {e}") from None


def _write(path: Path, text: str) -> None:
    """Write-then-rename, so an interrupted write never leaves a file that looks like a finished step."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder in the way, no permission
        raise UserError(f"cannot write {path} ({e.strerror or e})") from e


def make_dir(path: Path, flag: str = "--out-dir") -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise UserError(f"cannot create {flag} {path} ({why}); choose another folder") from None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot replace {path} ({e.strerror or e})") from e


# ------------------------------------------------------------------------------------------------------------
# Closing the loop: the last results in the prompts, a plan's runs checked and run, rounds of both

DEFAULT_MAX_RUNS = 36
DEFAULT_CSV_NAME = "moe_routing_noise_experiment_results.csv"  # report.DEFAULT_CSV, named without importing it
DEFAULT_LOOP_DIR = "research_loop"
# llm.py flags the runs command sets itself (where output goes) or that make llm.py another kind of command.
TOOL_OWNED = ("out", "fresh", "report", "bench", "bench_out", "bench_steps", "cache_dir", "device", "dry_run",
              "help")
# llm.py sections (by title prefix) a planner does not need: corpus loading and caching, device and compilation
# plumbing, the benchmark, CSV and resume plumbing. Config, model, optimiser, training and evaluation stay.
PLANNER_SKIPS = ("Data", "Runtime", "Benchmark", "Sweep")
NO_RESULTS = "No results exist yet: this is the first experiment on this question."
LOOP_STATE = "loop_state.json"
LEDGER = "ledger.md"
_SECTION = re.compile(r"(?m)^(# -{20,}\n# (.+)\n)")
_JSON_BLOCK = re.compile(r"(?ms)^[ \t]*(`{3,}|~{3,})[ \t]*json[ \t]*\n(.*?)^[ \t]*\1[ \t]*$")
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse reads these as values, not options
# Control and bidirectional-override characters: in a plan they could redraw the terminal line that shows the
# command the user is asked to confirm (carriage return, ANSI escapes), or hide a NUL that breaks the call.
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _project_module(name: str):
    """llm.py or report.py, imported only by the commands that need them (llm imports torch)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import importlib
    return importlib.import_module(name)


def lean_code(code: str) -> str:
    """The code with each PLANNER_SKIPS section cut to a one-line note naming what it defines, so a chain sends
    the model, training and config without the data and CSV plumbing. Unknown section titles are kept whole."""
    pieces = _SECTION.split(code)  # [head, rule+title, title, body, rule+title, title, body, ...]
    out = [pieces[0]]
    for header, title, body in zip(pieces[1::3], pieces[2::3], pieces[3::3]):
        if title.startswith(PLANNER_SKIPS):
            names = ", ".join(re.findall(r"(?m)^(?:def|class) (\w+)", body))
            body = f"# ({len(body.splitlines())} lines left out of the planner's context: {names})\n\n\n"
        out += [header, body]
    return "".join(out)


def _report_text(md: Path) -> str:
    """A report as prompt context: without its plots, which a model cannot see."""
    text = _read_text(md, "results")
    return re.sub(r"(?ms)^## Plots\n.*?(?=^## |\Z)", "", text).strip()


def _csv_of(md: Path) -> Path:
    """The CSV a report was written for (report.report_paths, backwards)."""
    stem = md.name.removesuffix("_analysis.md")
    return md.with_name(DEFAULT_CSV_NAME if stem == "experiment" else stem + ".csv")


def load_results(path=None, enabled: bool = True, write: bool = True) -> tuple[str, list[Path], Path | None]:
    """{results}: the markdown report of the last sweep, the CSVs behind it (for time estimates) and the report.

    path: a report, or a results CSV whose report is built first. None: the report of the default CSV in the
    current folder, rebuilt if the CSV is newer. A line on stderr says which file. Nothing found, or
    enabled=False: a sentence saying that no results exist yet. write=False (a dry run): a report that needs
    building is built in a temporary folder and not kept.
    """
    if not enabled:
        _note("results: left out (--no-results)")
        return NO_RESULTS, [], None
    given = None if path is None else Path(path)
    if given is not None and not given.is_file():
        raise UserError(f"--results {given}: file not found")
    if given is not None and given.suffix != ".csv":
        md, csv = given, _csv_of(given)
    else:
        rp = _project_module("report")
        csv = given or Path(DEFAULT_CSV_NAME)
        md = rp.report_paths(csv)[0]
        if csv.is_file() and (given or not md.is_file() or md.stat().st_mtime < csv.stat().st_mtime):
            try:
                if not write:
                    with tempfile.TemporaryDirectory() as tmp:
                        shutil.copy(csv, Path(tmp) / csv.name)
                        text = _report_text(rp.write_report(Path(tmp) / csv.name))
                    _note(f"results: the report of {csv}, built for this dry run only (nothing written)")
                    return f"From {md.name}:\n\n{text}", [csv], md
                md = rp.write_report(csv)
                _note(f"results: wrote the report {md} from {csv}")
            except (OSError, ValueError) as e:
                if given:
                    raise UserError(f"--results {csv}: cannot build its report: {_one_line(e)}") from None
                _note(f"warning: no report built from {csv}: {_one_line(e)}")
    if not md.is_file():
        _note(f"results: none found ({md.name} or {csv.name} in {Path.cwd()}); the prompts say no results exist "
              "yet (--results FILE gives some)")
        return NO_RESULTS, [], None
    _note(f"results: {md} (--results FILE for another, --no-results for none)")
    return f"From {md.name}:\n\n{_report_text(md)}", [csv] if csv.is_file() else [], md


def llm_parser():
    return _project_module("llm").build_parser()


def _invocation(action) -> str:
    """`--flag METAVAR [METAVAR ...]` as argparse's usage line writes it."""
    flags = " / ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    meta = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else
                              action.dest.upper())
    return f"{flags} {meta} [{meta} ...]" if action.nargs == "+" else f"{flags} {meta}"


def plan_format(max_runs: int = DEFAULT_MAX_RUNS) -> str:
    """{plan_format}: how the final plan ends in runs, with the flags generated from llm.py's own parser."""
    parser = llm_parser()
    flags = [f"{_invocation(a)}: {a.help}" for a in parser._actions
             if a.option_strings and a.dest not in TOOL_OWNED and a.help != argparse.SUPPRESS]
    owned = ", ".join(s for a in parser._actions if a.dest in TOOL_OWNED for s in a.option_strings)
    example = {"runs": [{"name": "noise_without_lb", "question": "Does router noise help when the balancing "
                         "loss is off?", "args": ["--lb-weight", "0", "--noise-std", "0", "0.05", "0.1",
                                                  "--seeds", "42", "43", "44"]}]}
    return "\n".join([
        "After the plan, end your answer with exactly one fenced ```json block that turns it into runs:", "",
        "```json", json.dumps(example), "```", "",
        "Each entry is one call of llm.py with `args` as its arguments (a list of strings, one per token) and gets "
        "its own CSV and report. Its runs are every combination of --noise-std, --lb-weight, --seeds and each "
        "--grid, and the report compares each condition with the baseline noise 0 / lb weight 0.01 (else the "
        "entry's first condition) paired by seed, so put the conditions to compare in one entry. `name` "
        "(letters, digits, _ and -) names the entry's files; `question` says what it answers. "
        f"At most {max_runs} runs over all entries. The tool chooses output and device: never use {owned}. "
        "llm.py's flags (a flag left out keeps its default):", *flags])


@dataclasses.dataclass
class PlanEntry:
    name: str  # file-name safe
    question: str
    args: list[str]
    runs: list[dict] = dataclasses.field(default_factory=list)  # each run's config, from llm.py's dry run

    def csv(self, out_dir) -> Path:
        return Path(out_dir) / f"{self.name}.csv"

    def command(self, out_dir) -> list[str]:
        return [sys.executable, str(DEFAULT_CODE), *self.args, "--out", str(self.csv(out_dir))]


def read_plan(path) -> list[PlanEntry]:
    """The entries of the last ```json block of a markdown file; one-line UserError for anything malformed."""
    blocks = _JSON_BLOCK.findall(_read_text(path, "plan"))
    if not blocks:
        raise UserError(f"{path} has no ```json block with the runs: the final plan ends with one "
                        '({"runs": [{"name": ..., "question": ..., "args": [...]}]})')
    try:
        data = json.loads(blocks[-1][1])
    except ValueError as e:
        raise UserError(f"{path}: the ```json block is not valid JSON ({e}); fix it by hand") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise UserError(f'{path}: the ```json block needs {{"runs": [...]}} with at least one entry')
    entries, seen = [], {}
    for i, e in enumerate(runs, 1):
        label = f"{path}: entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].strip():
            raise UserError(f'{label} needs a "name" (text)')
        label += f" ({e['name']})"
        args = e.get("args", [])
        # numbers are accepted as their text (models write 0 for "0"); anything else is not an argument
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                 for a in args):
            raise UserError(f'{label}: "args" must be a list of strings, one per llm.py argument')
        question, args = str(e.get("question") or "").strip(), [str(a) for a in args]
        for what, text in [("name", e["name"]), ("question", question)] + [("args", a) for a in args]:
            if _UNSAFE_TEXT.search(text):
                raise UserError(f"{label}: its {what} contains control characters ({text!r}), which could disguise "
                                "the command shown before you confirm; remove them")
        name = safe_name(e["name"])
        # report.py names a report after its CSV, except the default CSV's ("experiment_..."): one key for both
        files = "experiment" if name == Path(DEFAULT_CSV_NAME).stem else name
        if files in seen:
            raise UserError(f"{label}: its files ({files}_*) are already used by entry {seen[files]}; rename one")
        seen[files] = i
        entries.append(PlanEntry(name, question, args))
    return entries


def _check_flags(label: str, args: list[str], parser) -> None:
    """Refuse tool-owned flags however they are spelled: exact, a unique prefix (argparse's abbreviations) or
    --flag=value; unknown flags are left for llm.py's parser to name."""
    options = {s: a.dest for a in parser._actions for s in a.option_strings}
    for tok in args:
        if tok == "--":
            raise UserError(f"{label}: '--' is not allowed in args (it would hide the tool's own flags)")
        if not tok.startswith("-") or _NEGATIVE_NUMBER.match(tok):
            path = Path(tok)
            if tok.startswith("~") or path.is_absolute() or ".." in path.parts:
                raise UserError(f"{label}: {tok} points outside the current folder; a plan may only name files "
                                "under it (copy the file here)")
            continue
        key = tok.split("=", 1)[0]
        if not key.startswith("--"):  # short options bundle: -hh is -h -h
            key = key[:2]
        hits = [key] if key in options else [s for s in options if s.startswith(key) and key.startswith("--")]
        owned = sorted({options[h] for h in hits} & set(TOOL_OWNED))
        if owned:
            what = "--" + owned[0].replace("_", "-")
            raise UserError(f"{label}: {tok} ({what}) is chosen by the tool, not the plan; remove it")


def _llm_dry_run(label: str, args: list[str]) -> list[dict]:
    """Each run's config, from `llm.py ARGS --dry-run` (llm.py's own parser and checks; no shell)."""
    r = subprocess.run([sys.executable, str(DEFAULT_CODE), *args, "--dry-run"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        lines = [ln for ln in r.stderr.splitlines() if "error:" in ln] or r.stderr.splitlines() or ["no message"]
        raise UserError(f"{label}: llm.py refuses its args: {_one_line(lines[-1].split('error:', 1)[-1])}")
    head = re.search(r"(?m)^dry run: (\d+) runs", r.stdout)
    configs = [json.loads(m) for m in re.findall(r"(?m)^run \d+/\d+: (\{.*\})$", r.stdout)]
    if not head or len(configs) != int(head.group(1)):
        raise UserError(f"{label}: cannot read llm.py's dry run output: {_one_line(r.stdout, 160)}")
    return configs


def check_plan(entries: list[PlanEntry], max_runs: int) -> int:
    """Validate every entry with llm.py's parser before anything runs; fill in each entry's runs; return the
    total number of runs."""
    parser, total = llm_parser(), 0
    for i, e in enumerate(entries, 1):
        label = f"entry {i} ({e.name})"
        _check_flags(label, e.args, parser)
        e.runs = _llm_dry_run(label, e.args)
        total += len(e.runs)
        if total > max_runs:
            raise UserError(f"{label} brings the plan to {total} runs, more than --max-runs {max_runs}; shrink the "
                            "plan or raise --max-runs")
    return total


def shown(cmd: list[str]) -> str:
    """A command as the user would type it: `python` when that is this interpreter, llm.py relative if near."""
    exe = "python" if shutil.which("python") == sys.executable else cmd[0]
    script = os.path.relpath(cmd[1])
    return shlex.join([exe, cmd[1] if script.startswith("..") else script, *cmd[2:]])


def _shape(c: dict) -> tuple:
    return tuple(c.get(k) for k in ("d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k",
                                    "batch_size", "max_seq_len", "tokenizer", "use_amp"))


def estimate_time(entries: list[PlanEntry], csvs: list[Path]) -> str:
    """Training time from each run's tokens and the median tokens/s of earlier ok runs of the same model shape
    (of any shape when none matches, said so)."""
    rp, seen = _project_module("report"), []
    for csv in dict.fromkeys(csvs):
        try:
            df = rp._read_results(csv)
        except (OSError, ValueError):
            continue
        ok = df[df["status"].astype(str).str.strip().eq("ok")]
        for tps, cfg, dev in zip(ok["tokens_per_s"], ok["config_json"], ok["device"]):
            try:
                seen.append((float(tps), _shape(json.loads(cfg)), str(dev), csv.name))
            except (TypeError, ValueError):
                pass
    seen = [s for s in seen if s[0] > 0]
    if not seen:
        return "time: no estimate (no earlier results CSV with finished runs; --results CSV gives one)"
    seconds, used, other = 0.0, set(), 0
    for c in (c for e in entries for c in e.runs):
        tokens = c["max_steps"] * c["batch_size"] * c["max_seq_len"] * c["gradient_accumulation_steps"]
        same = [i for i, s in enumerate(seen) if s[1] == _shape(c)]
        other += not same
        same = same or range(len(seen))
        used.update(same)
        seconds += tokens / statistics.median(seen[i][0] for i in same)
    devices = ", ".join(dict.fromkeys(seen[i][2] for i in sorted(used)))
    files = ", ".join(dict.fromkeys(seen[i][3] for i in sorted(used)))
    rough = f"; {other} run(s) have a model shape no earlier run had, so theirs is rough" if other else ""
    return (f"time: about {seconds / 60:.1f} min of training, from the tokens/s of {len(used)} earlier "
            f"run(s) in {files} on {devices}; evaluation, data loading and start-up come on top{rough}")


def confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():  # checked up front by the commands too; this is the last guard
        raise UserError("nothing was run: there is no terminal to ask; add --yes to run without asking")
    print(f"{question} Type yes to start: ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() == "yes"


def _need_consent(args, what: str) -> None:
    if not args.yes and not sys.stdin.isatty():
        raise UserError(f"{what} trains without asking only with --yes, and there is no terminal to ask: add --yes "
                        "(nothing was sent or run)")


def show_plan(entries: list[PlanEntry], out_dir, source) -> None:
    total = sum(len(e.runs) for e in entries)
    print(f"plan {source}: {_count(len(entries), 'entry')}, {_count(total, 'run')}, results in "
          f"{out_dir}")
    for i, e in enumerate(entries, 1):
        print(f"  {i}. {e.name} ({_count(len(e.runs), 'run')})"
              + (f": {e.question}" if e.question else ""))
        print(f"     {shown(e.command(out_dir))}")


def _lock_out_dir(out_dir):
    """An exclusive lock on out_dir for the whole run, shared with each llm.py it starts (pass_fds): a second
    `runs`/`loop` on the same folder is refused while this one, or an llm.py it left running, still writes."""
    try:
        import fcntl
    except ImportError:  # Windows: one at a time is up to the user
        return None
    lock = open(Path(out_dir) / ".runs.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(f"another runs/loop (or an llm.py it started) is still writing in {out_dir}; wait for it "
                        "to finish, or use another --out-dir") from None
    return lock


def run_plan(entries: list[PlanEntry], out_dir) -> int:
    """Run the entries one after another with llm.py's own progress and resume; stop at the first failure."""
    make_dir(out_dir)
    lock = _lock_out_dir(out_dir)
    try:
        return _run_entries(entries, out_dir, () if lock is None else (lock.fileno(),))
    finally:
        if lock is not None:
            lock.close()


def _run_entries(entries: list[PlanEntry], out_dir, pass_fds) -> int:
    rp = _project_module("report")
    for i, e in enumerate(entries, 1):
        _note(f"\n== entry {i}/{len(entries)}: {e.name} ({_count(len(e.runs), 'run')})")
        sys.stdout.flush()
        proc = subprocess.Popen(e.command(out_dir), pass_fds=pass_fds)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save what it has
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            rc = 130
        if rc:
            why = "interrupted" if rc == 130 else f"llm.py exited with code {rc}"
            _note(f"{'' if rc == 130 else 'error: '}entry {i} ({e.name}): {why}; finished runs are saved in "
                  f"{e.csv(out_dir)}; rerun the same command to resume")
            return rc
    _note(f"\ndone: {_count(len(entries), 'entry')}; reports:")
    for e in entries:
        _note(f"  {rp.report_paths(e.csv(out_dir))[0]}")
    return 0


def _runs_command(args) -> int:
    if args.run:
        _need_consent(args, "runs --run")
    entries = read_plan(args.plan)
    total = check_plan(entries, args.max_runs)
    earlier = Path(args.results or DEFAULT_CSV_NAME)
    if args.results and not earlier.is_file():
        raise UserError(f"--results {earlier}: file not found")
    # a rerun: the plan's own finished runs are the best guide; a report stands for the CSV beside it
    csvs = [e.csv(args.out_dir) for e in entries] + [earlier if earlier.suffix == ".csv" else _csv_of(earlier)]
    show_plan(entries, args.out_dir, args.plan)
    print(estimate_time(entries, csvs))
    if not args.run:
        _note("nothing was run; add --run to run them")
        return 0
    created = not Path(args.out_dir).exists()
    make_dir(args.out_dir)  # before asking: a folder that cannot be used fails now
    if not confirm(f"Run these {total} runs?", args.yes):
        if created:
            Path(args.out_dir).rmdir()  # leave nothing behind
        _note("not confirmed: nothing was run")
        return 1
    return run_plan(entries, args.out_dir)


# The loop: per round, chain -> plan -> runs -> findings, in DIR/round{k}; state and ledger after every stage.

def headline(csv: Path) -> list[str]:
    """A sweep's findings in a few lines, from report.py's statistics: the best condition and every paired
    difference from the baseline with its interval and Holm-corrected p."""
    rp = _project_module("report")
    try:
        df = rp._read_results(csv)
    except (OSError, ValueError) as e:
        return [f"no findings: {_one_line(e)}"]
    import pandas as pd
    cc, table = rp.condition_columns(df), rp.condition_table(df)
    labels = rp._labels(table, cc)
    best = table["mean"].idxmin()
    out = [f"best: {labels[best]}, best val PPL {table['mean'][best]:.2f} (n={int(table['n'][best])}) of "
           f"{len(table)} condition(s)"]
    pc = rp.paired_comparisons(df)
    base = rp._labels(pd.DataFrame([rp.baseline_condition(df)]), cc)[0]
    for lab, r in zip(rp._labels(pc, cc), pc.itertuples()):
        if math.isnan(r.p_value):
            out.append(f"{lab} vs {base}: not tested ({int(r.n_pairs)} paired seed(s))")
        else:
            out.append(f"{lab} vs {base}: Δ {r.mean_diff:+.2f} PPL (95% CI {r.ci_low:.2f} to {r.ci_high:.2f}, "
                       f"p_holm {r.p_holm:.3g}{', significant' if r.significant else ''})")
    return out


def _rows_done(csv: Path) -> int:
    import csv as csvlib
    try:
        with open(csv, newline="", encoding="utf-8") as f:
            return sum(1 for row in csvlib.DictReader(f) if (row.get("status") or "").strip())
    except OSError:
        return 0


def _round_results(out: Path, k: int, rnd: dict) -> tuple[str, list[Path]]:
    """Round k's reports as the next round's {results}: one section per entry, headed by its question."""
    parts, csvs = [], []
    for e in rnd.get("entries", []):
        csv = out / f"round{k}" / f"{e['name']}.csv"
        md = _project_module("report").report_paths(csv)[0]
        body = _report_text(md) if md.is_file() else "No report: no run of this entry finished."
        parts.append(f"## Round {k}, entry {e['name']}: {e.get('question') or 'no question given'}\n\n{body}")
        csvs.append(csv)
    return "\n\n".join(parts), csvs


def _save_loop(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / LOOP_STATE, json.dumps(state, indent=2) + "\n")
    md = [f"# Research loop: {state['idea']}", "",
          f"{state['rounds']} round(s) asked. Each round: the chain plans from the last results, the plan's runs "
          "train, the reports feed the next round. Rerun the same command to continue an unfinished round.", ""]
    for k, rnd in sorted(state["round"].items(), key=lambda kv: int(kv[0])):
        md += [f"## Round {k}: {rnd['status']}", "", f"- Results read: {rnd.get('results_from') or 'none'}"]
        if rnd.get("plan"):
            md.append(f"- Plan: [{rnd['plan']}]({rnd['plan']})")
        if rnd.get("entries"):
            done = sum(_rows_done(out / f"round{k}" / f"{e['name']}.csv") for e in rnd["entries"])
            md += [f"- Runs done: {done} of {sum(e['runs'] for e in rnd['entries'])}", "- Commands:", "", "  ```"]
            md += [f"  {e['command']}" for e in rnd["entries"]] + ["  ```"]
        if rnd.get("findings"):
            md.append("- Findings:")
            for e in rnd["entries"]:
                md.append(f"  - **{e['name']}** ({e['question'] or 'no question given'}), "
                          f"[report](round{k}/{e['name']}_analysis.md):")
                md += [f"    - {line}" for line in rnd["findings"].get(e["name"], [])]
        md.append("")
    _write(out / LEDGER, "\n".join(md))


def _chain_inputs(llm: "SimpleLLM", args) -> list[dict]:
    """The steps, and the variables from the files and --var, as `chain` and `loop` read them."""
    steps = DEFAULT_STEPS
    if args.steps:
        try:
            steps = json.loads(_read_text(args.steps, "steps"))
        except ValueError as e:
            raise UserError(f"--steps {args.steps} is not valid JSON: {e}") from None
    llm.variables["user_input"] = llm.read_markdown_file(args.input)
    if args.code != str(DEFAULT_CODE):  # the defaults load only if a step uses them (run_chain does that)
        llm.variables["code_content"] = llm.read_code_file(args.code)  # "code file X not found" if missing
    if args.system != str(DEFAULT_SYSTEM):
        llm.variables["system_prompt"] = _read_text(args.system, "--system")
    if hasattr(args, "max_runs"):
        llm.variables["plan_format"] = plan_format(args.max_runs)
    llm.variables.update(_pairs(args.var, "--var"))  # last, so that --var wins over every other source
    return steps


def _loop_command(llm: "SimpleLLM", args) -> int:
    if not args.dry_run:
        _need_consent(args, "loop")
    out = Path(args.out_dir)
    try:
        state = json.loads((out / LOOP_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {"round": {}}
    except (OSError, ValueError) as e:
        raise UserError(f"{out / LOOP_STATE} is unreadable ({_one_line(e)}); fix or delete it") from None
    rounds = state.get("round") if isinstance(state, dict) else None
    if not isinstance(rounds, dict) or not all(isinstance(r, dict) and isinstance(r.get("status"), str)
                                               for r in rounds.values()):
        raise UserError(f"{out / LOOP_STATE} is not a loop state of this tool; fix or delete it")
    if state.get("idea") not in (None, str(args.input)):
        raise UserError(f"{out} holds a loop over {state['idea']}, not {args.input}; use another --out-dir (or "
                        "the same idea file)")
    state.update(idea=str(args.input), rounds=args.rounds)
    steps = _chain_inputs(llm, args)
    given = dict(llm.variables)  # --var and the files: the same in every round
    for k in range(1, args.rounds + 1):
        rnd = state["round"].setdefault(str(k), {"status": "not started"})
        if rnd["status"] == "done":
            _note(f"round {k}: done (see {out / LEDGER})")
            continue
        rdir = out / f"round{k}"
        llm.variables, csvs = dict(given), []
        if "results" in given:
            rnd["results_from"] = "--var results"
        elif k > 1:
            llm.variables["results"], csvs = _round_results(out, k - 1, state["round"][str(k - 1)])
            rnd["results_from"] = f"round {k - 1}'s reports"
        else:
            llm.variables["results"], csvs, source = load_results(args.results, not args.no_results,
                                                                  write=not args.dry_run)
            rnd["results_from"] = str(source) if source else None
        _note(f"\n==== round {k}/{args.rounds} in {rdir}")
        if args.dry_run:
            return _loop_dry_run(llm, steps, rdir, args, k)
        rnd["status"] = "chain"
        _save_loop(out, state)
        try:
            llm.run_chain(steps, out_dir=rdir, resume=True)
        except ChainError as e:
            rnd["status"] = f"chain failed at step {e.step}"
            _save_loop(out, state)
            e.args = (f"round {k}: {e}",)
            e.hint = f"finished steps are saved in {rdir}; rerun the same command to continue"
            raise
        except KeyboardInterrupt:
            rnd["status"] = "chain interrupted"
            _save_loop(out, state)
            _note(f"\ninterrupted in round {k}'s chain; rerun the same command to continue")
            return 130
        rnd["plan"] = f"round{k}/{step_file(len(steps), steps[-1]['title'])}"
        try:
            entries = read_plan(out / rnd["plan"])
            total = check_plan(entries, args.max_runs)
        except UserError as e:
            rnd["status"] = f"plan refused: {e}"
            _save_loop(out, state)
            raise UserError(f"round {k}: {e}; edit {out / rnd['plan']} and rerun the same command") from None
        rnd["entries"] = [{"name": e.name, "question": e.question, "args": e.args, "runs": len(e.runs),
                           "command": shown(e.command(rdir))} for e in entries]
        rnd["status"] = "runs"
        _save_loop(out, state)
        show_plan(entries, rdir, out / rnd["plan"])
        print(estimate_time(entries, [e.csv(rdir) for e in entries] + csvs))
        if not confirm(f"Round {k}: run these {total} runs?", args.yes):
            rnd["status"] = "runs not confirmed"
            _save_loop(out, state)
            _note("not confirmed: nothing was run; rerun the same command to be asked again")
            return 1
        rc = run_plan(entries, rdir)
        if rc:
            rnd["status"] = "runs interrupted" if rc == 130 else f"a run failed (llm.py exit code {rc})"
            _save_loop(out, state)
            return rc
        rnd["findings"] = {e.name: headline(e.csv(rdir)) for e in entries}
        rnd["status"] = "done"
        _save_loop(out, state)
        _note(f"round {k} done: findings in {out / LEDGER}")
    _note(f"\nloop complete: {args.rounds} round(s); see {out / LEDGER}")
    return 0


def _loop_dry_run(llm: "SimpleLLM", steps, rdir: Path, args, k: int) -> int:
    llm.run_chain(steps, out_dir=rdir, resume=True, dry_run=True)
    plan = rdir / step_file(len(steps), steps[-1]["title"])
    if plan.is_file():  # the chain of this round is done already: its runs are known
        entries = read_plan(plan)
        check_plan(entries, args.max_runs)
        show_plan(entries, rdir, plan)
    else:
        print(f"then: the runs in the ```json block of {plan} (written by the last step), each checked with "
              f"`llm.py ARGS --dry-run` (at most {args.max_runs} runs), shown and confirmed (typed yes or --yes), "
              f"run into {rdir}/NAME.csv with a report each; the findings go to {Path(args.out_dir) / LEDGER}"
              + (f", and round {k + 1} reads round {k}'s reports" if k < args.rounds else ""))
    _note("dry run: nothing was sent or run")
    return 0


# ------------------------------------------------------------------------------------------------------------
# Command line


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE with NAME made of letters, digits and _")
        out[key.strip()] = value
    return out


def _bounded(convert, low: float, above: bool = False):
    """An argparse type with a lower bound: a bad value gets the subcommand's usage line and exit 2."""
    def check(text: str):
        value = convert(text)
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'more than' if above else 'at least'} {low:g}, not {text}")
        return value
    check.__name__ = convert.__name__  # argparse names the type in "invalid int value"
    return check


def _model_id(text: str) -> tuple[str, str]:
    name, sep, model_id = (part.strip() for part in text.partition("="))
    if not sep or name not in PROVIDERS:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL_ID with NAME one of {', '.join(PROVIDERS)}, "
                                         f"not {text!r}")
    if not model_id:  # an empty id would be sent as is, or crash the SDK
        raise argparse.ArgumentTypeError(f"{name}= needs a model id, e.g. {name}={PROVIDERS[name].model}")
    return name, model_id


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    # provider settings
    common.add_argument("--max-tokens", type=_bounded(int, 1), default=DEFAULT_MAX_TOKENS,
                        help=f"longest answer in tokens, per call (default {DEFAULT_MAX_TOKENS}; gemini counts "
                             "its thinking too)")
    common.add_argument("--timeout", type=_bounded(float, 0, above=True), default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait to connect and between streamed chunks (default {DEFAULT_TIMEOUT:g})")
    common.add_argument("--retries", type=_bounded(int, 0), default=DEFAULT_RETRIES,
                        help=f"retries for 429, 5xx, timeouts and refused connections, with exponential backoff "
                             f"that honours Retry-After (default {DEFAULT_RETRIES}; 0 = off)")
    common.add_argument("--model", action="append", default=[], type=_model_id, metavar="NAME=MODEL_ID",
                        help="use another model id, e.g. gemini=gemini-2.5-flash (repeatable)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")

    parser = argparse.ArgumentParser(prog="simple_llm.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{gemini,kimi,chain,runs,loop}")
    for name, p in PROVIDERS.items():
        cmd = sub.add_parser(name, parents=[common], help=f"stream one answer from {name} ({p.model})")
        cmd.add_argument("prompt", nargs="*", help="the prompt (words are joined); '-' or nothing reads stdin")
    chain = sub.add_parser("chain", parents=[common], help="run the research chain on a markdown file")
    chain.add_argument("input", help="markdown file with the research idea: {user_input}")
    # what goes into the prompts
    chain.add_argument("--code", default=str(DEFAULT_CODE), help="code file for {code_content} (default llm.py)")
    chain.add_argument("--system", default=str(DEFAULT_SYSTEM),
                       help="constraints file for {system_prompt} (default research_system_prompt.md)")
    chain.add_argument("--steps", metavar="FILE.json",
                       help="JSON list of {title, model, prompt} replacing the built-in four steps")
    chain.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                       help="variable for {KEY} in prompts (repeatable; wins over all others, even {user_input} "
                            "and --code)")
    # where results go
    chain.add_argument("--out-dir", default=".", help="folder for step files and chain_run.json (default .)")
    chain.add_argument("--resume", action="store_true",
                       help="reuse saved step files from --out-dir and call only for the missing steps")
    chain.add_argument("--dry-run", action="store_true",
                       help="print each rendered prompt and its size; needs no key and sends nothing")
    _add_loop_commands(sub, chain)
    return parser.parse_args(argv)


def _add_loop_commands(sub, chain) -> None:
    """{results} options for chain, and the runs and loop commands (loop takes every chain option)."""
    results = chain.add_mutually_exclusive_group()
    results.add_argument("--results", metavar="FILE",
                         help="{results}: a report or a results CSV (its report is built); default: the report of "
                              f"{DEFAULT_CSV_NAME} in the current folder, if any")
    results.add_argument("--no-results", action="store_true", help="{results} says no results exist yet")
    runs = sub.add_parser("runs", help="check, show and (with --run) run the runs of a plan's ```json block")
    runs.add_argument("plan", help="markdown file ending in a ```json block of runs (a chain's final step)")
    runs.add_argument("--out-dir", default="runs", help="folder for each entry's NAME.csv and report (default runs)")
    runs.add_argument("--run", action="store_true", help="run them, after a typed yes (or --yes)")
    runs.add_argument("--yes", action="store_true", help="run without asking")
    runs.add_argument("--max-runs", type=_bounded(int, 1), default=DEFAULT_MAX_RUNS,
                      help=f"refuse plans with more runs than this (default {DEFAULT_MAX_RUNS})")
    runs.add_argument("--results", metavar="CSV", help="earlier results for the time estimate (default: "
                      f"{DEFAULT_CSV_NAME} here, if any)")
    runs.add_argument("--debug", action="store_true", help="show Python tracebacks")
    loop = sub.add_parser("loop", parents=[chain], conflict_handler="resolve",
                          help="rounds of chain -> runs -> report, each round planned from the last results")
    loop.add_argument("--rounds", type=_bounded(int, 1), default=1, help="rounds to run (default 1)")
    loop.add_argument("--out-dir", default=DEFAULT_LOOP_DIR,
                      help=f"folder for round{{k}}/, {LOOP_STATE} and {LEDGER} (default {DEFAULT_LOOP_DIR})")
    loop.add_argument("--max-runs", type=_bounded(int, 1), default=DEFAULT_MAX_RUNS,
                      help=f"refuse a round's plan with more runs than this (default {DEFAULT_MAX_RUNS})")
    loop.add_argument("--yes", action="store_true", help="run each round's runs without asking")
    loop.add_argument("--dry-run", action="store_true",
                      help="print the first unfinished round's prompts and what follows; no key, nothing sent")
    loop.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the loop always resumes


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "runs":
        return _runs_command(args)
    llm = SimpleLLM(max_tokens=args.max_tokens, timeout=args.timeout, retries=args.retries,
                    models=dict(args.model))
    if args.command == "loop":
        return _loop_command(llm, args)
    if args.command in PROVIDERS:
        prompt = " ".join(args.prompt)
        if prompt.strip() in ("", "-"):
            if sys.stdin.isatty():
                _note("reading the prompt from stdin; end it with Ctrl-D")
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise UserError("empty prompt: pass it as arguments or pipe it on stdin")
        llm.call_model(args.command, prompt)
        return 0

    steps = _chain_inputs(llm, args)
    llm.results_file, llm.use_results = args.results, not args.no_results
    try:
        results = llm.run_chain(steps, out_dir=args.out_dir, resume=args.resume, dry_run=args.dry_run)
    except ChainError as e:
        kept = f"{_first_steps(e.step - 1)} saved in {e.out_dir}" if e.step > 1 else "no step had finished"
        e.hint = f"{kept}; continue with: {_resume_command(argv)}"
        raise
    except KeyboardInterrupt:
        n = llm.interrupted_step
        kept = f"{_first_steps(n - 1)} kept in {args.out_dir}; " if n > 1 else ""
        if n:
            _note(f"\ninterrupted at step {n}; {kept}continue with: {_resume_command(argv)}")
        return 130
    if not args.dry_run:
        _note(f"\nchain complete: {_count(len(results), 'step')} saved in {args.out_dir} (see {MANIFEST})")
    return 0


def _first_steps(n: int) -> str:
    return "step 1 is" if n == 1 else f"steps 1-{n} are"


def _resume_command(argv: list[str]) -> str:
    script = sys.argv[0] if sys.argv[0].endswith("simple_llm.py") else "simple_llm.py"
    return " ".join(shlex.quote(a) for a in ["python", script, *(a for a in argv if a != "--resume"), "--resume"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        _note("interrupted")
        return 130
    except Exception as e:
        if args.debug:  # printed here, not re-raised, because SDK exceptions can carry a key in a header or body
            _note(redact("".join(traceback.format_exception(type(e), e, e.__traceback__))).rstrip())
        if isinstance(e, UserError):
            _note(redact(f"error: {e}" + (f"\n  {e.hint}" if e.hint else "")))
            return e.exit_code
        # a bug or an SDK surprise: one line unless --debug
        _note(f"error: unexpected {type(e).__name__}: {redact(_one_line(e))}"
              + ("" if args.debug else " (rerun with --debug for the traceback)"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
