"""simple_llm.py against a local fake of both providers: the real openai and google-genai clients, real HTTP.

Covers: both direct commands stream text (arguments and stdin); the four-step chain sends its requests in order
to the right models, step 1 carries the user's file, the code and the system prompt, later steps carry earlier
answers, and step files and chain_run.json are written; substitution is one pass and strict, and --var wins over
every built-in variable; 429/5xx then 200 succeeds for both providers, with a line per retry, and a Retry-After
over the cap fails at once naming the wait; 401 fails fast with one request; a stalled server times out; a
malformed chunk is a provider error that keeps its cause under --debug; a missing key, an empty model id, a bad
number, an unusable --out-dir and a prompt far over any context stop before any request; a step failing
mid-chain (error, broken stream, or an answer that cannot be saved) keeps earlier files and --resume finishes
with only the missing requests, and keeps warning about a stale step; Ctrl-C exits 130 and keeps finished steps;
a closed stdout stops the echo, not the chain; dry-run and unknown variables send nothing; step titles become
safe file names; cut answers and Gemini's refusals are reported; the keys never appear in output, files,
tracebacks or later prompts, even when a server echoes them in its answer split across chunks, split by
whitespace, base64- or URL-encoded. Issue 20: `models` prints each SDK's list (Gemini's pager followed) with
the defaults marked; a retired model (404 / "deprecated") costs one request and names the fix; an answer from
another model warns and is recorded; reasoning (Kimi's reasoning_content, Gemini's thought parts) never
reaches the answer, the file or the next prompt, is counted, and a long reasoning phase does not trip
--timeout. Issue 16: answers over --max-answer-chars or past --deadline fail in one line keeping the partial
file; escape sequences and format characters never reach the terminal, a file or a prompt; .env sets only
the tool's variables and child_env() drops keys; planted symlinks are never written through.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import simple_llm
from fake_providers import FakeProviders, answer, blocked, error, raw, stalled
from conftest import sigint_default

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simple_llm.py"
KIMI_KEY = "nv-SECRET-kimi-7f3a9c"
GEMINI_KEY = "AIza-SECRET-gem-51d2e8"
IDEA = "# Idea\nDoes router noise help when the balancing loss is off? MARKER-IDEA\n"
CODE = "def f(x):\n    return f\"{x}\"  # MARKER-CODE {not_a_variable}\n"
SYSTEM = "Use only SmolLM. MARKER-SYSTEM\n"


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch):
    monkeypatch.setenv("SIMPLE_LLM_NO_DOTENV", "1")  # a developer's real .env must never reach the tests


@pytest.fixture
def fake(httpserver, monkeypatch):
    providers = FakeProviders(httpserver)
    monkeypatch.setenv("NOVITA_BASE_URL", providers.kimi_url)
    monkeypatch.setenv("GEMINI_BASE_URL", providers.gemini_url)
    monkeypatch.setenv("NOVITA_API_KEY", KIMI_KEY)
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    return providers


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A chain input, a code file and a constraints file in tmp_path, which is also the working directory."""
    (tmp_path / "idea.md").write_text(IDEA)
    (tmp_path / "code.py").write_text(CODE)
    (tmp_path / "system.md").write_text(SYSTEM)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args, cwd, stdin=None, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=dict(os.environ),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def cli_into_head(*args, cwd, stderr_too=False, timeout=60):
    """Run the CLI with its stdout (and stderr, like `2>&1`) read by a process that takes 10 bytes and exits,
    like `| head -c 10`. Returns the CompletedProcess and the 10 bytes."""
    head = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read(10))"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=dict(os.environ),
                           stdout=head.stdin, stderr=head.stdin if stderr_too else subprocess.PIPE, text=True,
                           timeout=timeout)
    finally:
        head.stdin.close()
        first = head.stdout.read()
        head.stdout.close()
        head.wait(timeout)
    return r, first


def chain_args(out="out", *extra):
    return ["chain", "idea.md", "--code", "code.py", "--system", "system.md", "--out-dir", out, *extra]


def assert_no_keys(*texts, folder=None):
    files = [p.read_text(errors="replace") for p in Path(folder).rglob("*") if p.is_file()] if folder else []
    for text in [*texts, *files]:
        assert KIMI_KEY not in text and GEMINI_KEY not in text


def assert_one_error_line(stderr: str):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------- direct calls

@pytest.mark.slow
@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_direct_command_streams_answer(fake, tmp_path, provider):
    fake.answers[provider] = "Hello from the fake " + provider + ", streamed in pieces."
    r = cli(provider, "Write", "a", "haiku", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Hello from the fake {provider}, streamed in pieces.\n"
    (call,) = fake.calls
    assert call.provider == provider and call.prompt == "Write a haiku"
    assert call.model == simple_llm.PROVIDERS[provider].model
    key_header = "Authorization" if provider == "kimi" else "X-Goog-Api-Key"
    assert (KIMI_KEY if provider == "kimi" else GEMINI_KEY) in call.headers[key_header]
    if provider == "kimi":
        assert call.body["stream"] is True and call.body["stream_options"] == {"include_usage": True}
        assert call.body["max_tokens"] >= 8192
    else:
        config = call.body["generationConfig"]
        assert config["maxOutputTokens"] >= 8192
        assert -1 in config["thinkingConfig"].values()  # dynamic thinking, as the original
    assert_no_keys(r.stdout, r.stderr)


@pytest.mark.slow
def test_prompt_from_stdin_with_model_and_token_overrides(fake, tmp_path):
    r = cli("kimi", "-", "--model", "kimi=other/model", "--max-tokens", "9000", cwd=tmp_path,
            stdin="a prompt {with braces} from stdin\n")
    assert r.returncode == 0, r.stderr
    (call,) = fake.calls
    assert call.prompt == "a prompt {with braces} from stdin\n"
    assert call.model == "other/model" and call.body["max_tokens"] == 9000


def test_model_env_override(fake, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_MODEL", "gemini-2.5-flash")
    assert simple_llm.SimpleLLM().call_model("gemini", "hi") == "gemini answer 1: keep {braces} and " \
                                                                "{step1_result} as text."
    assert fake.calls[0].model == "gemini-2.5-flash"
    assert "gemini answer 1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("provider,var", [("kimi", "NOVITA_API_KEY"), ("gemini", "GEMINI_API_KEY")])
def test_missing_key_stops_before_any_request(fake, tmp_path, monkeypatch, provider, var):
    monkeypatch.delenv(var)
    r = cli(provider, "hello", cwd=tmp_path)
    assert r.returncode == 2
    assert_one_error_line(r.stderr)
    assert var in r.stderr and ".env.example" in r.stderr
    assert fake.calls == []


@pytest.mark.slow
@pytest.mark.parametrize("provider,var", [("kimi", "NOVITA_API_KEY"), ("gemini", "GEMINI_API_KEY")])
def test_rejected_key_fails_fast_and_is_never_shown(fake, tmp_path, provider, var):
    # A gateway that echoes the key back in its error message: the CLI must still not print it.
    fake.then(provider, lambda: error(provider, 401, f"Incorrect API key provided: {KIMI_KEY} {GEMINI_KEY}"))
    r = cli(provider, "hello", cwd=tmp_path)
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert "rejected the key" in r.stderr and var in r.stderr and "401" in r.stderr
    assert len(fake.calls) == 1  # no retry
    assert_no_keys(r.stdout, r.stderr, folder=tmp_path)


def test_gemini_invalid_key_400_counts_as_rejected(fake):
    fake.then("gemini", lambda: error("gemini", 400, "API key not valid. Please pass a valid API key. "
                                      "reason: API_KEY_INVALID"))
    with pytest.raises(simple_llm.ProviderError, match="rejected the key in GEMINI_API_KEY"):
        simple_llm.SimpleLLM().call_model("gemini", "hi")
    assert len(fake.calls) == 1


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
@pytest.mark.parametrize("status", [429, 503])
def test_transient_error_then_success(fake, capsys, provider, status):
    # retry-after-ms is what the openai SDK reads first; Gemini sends Retry-After or a RetryInfo detail.
    headers = {"retry-after-ms": "10", "Retry-After": "0"}
    fake.then(provider, lambda: error(provider, status, "slow down", headers=headers,
                                      retry_delay="0s" if provider == "gemini" else None))
    reply = simple_llm.SimpleLLM().reply(provider, "hi")
    assert reply.text.startswith(f"{provider} answer 2")
    assert len(fake.calls) == 2
    # the server's short wait was honoured, not a long backoff, and both providers say so the same way
    line = rf"^{provider}: HTTP {status}\b.*, retrying in 0\.0 s \(attempt 2 of 5\)$"
    assert re.search(line, capsys.readouterr().err, re.M)


def test_gemini_honours_retry_info_without_headers(fake, capsys):
    fake.then("gemini", lambda: error("gemini", 429, "quota", retry_delay="0.05s"))
    assert simple_llm.SimpleLLM().reply("gemini", "hi").finish_reason == "STOP"
    assert len(fake.calls) == 2
    assert "gemini: HTTP 429 RESOURCE_EXHAUSTED, retrying in 0.1 s (attempt 2 of 5)" in capsys.readouterr().err


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_long_retry_after_fails_at_once_naming_the_wait(fake, provider):
    # Not waited for (the cap is MAX_SERVER_WAIT) and not misreported: one attempt was made, retries were on.
    fake.then(provider, lambda: error(provider, 429, "quota", headers={"Retry-After": "600"}))
    with pytest.raises(simple_llm.ProviderError) as e:
        simple_llm.SimpleLLM().reply(provider, "hi")
    assert f"{provider}: HTTP 429" in str(e.value) and "after 1 attempt: quota" in str(e.value)
    assert "the server asks to wait 600 s" in str(e.value)
    assert len(fake.calls) == 1


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_stalled_server_times_out(fake, capsys, provider):
    # The server accepts the request and then says nothing: --timeout must end the wait for both clients.
    release = threading.Event()
    fake.then(provider, lambda: stalled(release))
    try:
        assert simple_llm.main([provider, "hi", "--timeout", "0.3", "--retries", "0"]) == 1
    finally:
        release.set()
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"error: {provider}: no data for 0.3 s" in err and "(retries are off)" in err


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_malformed_chunk_is_a_provider_error_and_debug_keeps_the_cause(fake, capsys, provider):
    # A broken gateway that also echoes the request's key header into the chunk it garbles.
    garbled = lambda: raw(f"data: {{not json x-goog-api-key={GEMINI_KEY} {KIMI_KEY}\n\n")  # noqa: E731
    fake.then(provider, garbled, garbled)
    assert simple_llm.main([provider, "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"error: {provider}: the stream sent a malformed chunk" in err and "unexpected" not in err
    assert simple_llm.main([provider, "hi", "--debug"]) == 1
    debug = capsys.readouterr().err
    assert "Traceback" in debug and "JSONDecodeError" in debug and "ProviderError" in debug
    assert_no_keys(err, debug)
    assert len(fake.calls) == 2  # not retried


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_key_echoed_in_the_answer_is_redacted(fake, capsys, provider):
    # Cut inside each key, so no one chunk holds a whole key.
    pieces = ["your key is " + KIMI_KEY[:5], KIMI_KEY[5:] + " and " + GEMINI_KEY[:-3], GEMINI_KEY[-3:] + "."]
    fake.then(provider, lambda: answer(provider, pieces))
    reply = simple_llm.SimpleLLM().reply(provider, "hi")
    assert reply.text == "your key is *** and ***."
    assert capsys.readouterr().out == "your key is *** and ***.\n"


def test_redactor_catches_a_key_split_anywhere(monkeypatch):
    monkeypatch.setattr(simple_llm, "_SECRETS", {})
    simple_llm.add_secret(KIMI_KEY)
    simple_llm.add_secret(GEMINI_KEY)
    text = f"a {KIMI_KEY} b {GEMINI_KEY}{KIMI_KEY} c"
    for cut in range(len(text) + 1):
        r = simple_llm.Redactor()
        assert r.feed(text[:cut]) + r.feed(text[cut:]) + r.flush() == "a *** b ****** c"
    r = simple_llm.Redactor()
    assert "".join(r.feed(c) for c in text) + r.flush() == "a *** b ****** c"


def test_failed_call_ends_the_partial_answer_line(fake, capsys):
    fake.then("kimi", lambda: answer("kimi", "the first half of an answer", break_after=2))
    assert simple_llm.main(["kimi", "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "the first\n"  # on a terminal, the error line starts on a line of its own
    assert_one_error_line(captured.err)


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_empty_model_id_is_rejected_before_any_request(fake, capsys, provider):
    with pytest.raises(SystemExit) as e:
        simple_llm.main([provider, "hi", "--model", f"{provider}="])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: simple_llm.py {provider}") and "needs a model id" in err
    assert "Traceback" not in err and fake.calls == []


@pytest.mark.parametrize("flag,value", [("--max-tokens", "0"), ("--timeout", "-1"), ("--timeout", "nan"),
                                        ("--retries", "-1"), ("--max-tokens", "many")])
def test_bad_number_shows_the_subcommand_usage(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        simple_llm.main(["chain", "idea.md", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: simple_llm.py chain") and f"argument {flag}: " in err


def test_prompt_far_over_any_context_is_refused(fake):
    with pytest.raises(simple_llm.UserError, match="far more than any model's context"):
        simple_llm.SimpleLLM().reply("gemini", "y" * (simple_llm.MAX_PROMPT_CHARS + 1))
    assert fake.calls == []


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_persistent_server_error_gives_one_clear_error(fake, provider):
    for _ in range(3):
        fake.then(provider, lambda: error(provider, 500, "backend down", headers={"retry-after-ms": "1",
                                                                                 "Retry-After": "0"}))
    with pytest.raises(simple_llm.ProviderError, match="HTTP 500.*after 3 attempts.*backend down"):
        simple_llm.SimpleLLM(retries=2).reply(provider, "hi")
    assert len(fake.calls) == 3


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
@pytest.mark.parametrize("how", ["dropped", "no_finish"])
def test_stream_cut_mid_answer_is_an_error(fake, provider, how):
    kw = {"break_after": 2} if how == "dropped" else {"finish": None}
    fake.then(provider, lambda: answer(provider, "the first half of an answer", **kw))
    with pytest.raises(simple_llm.ProviderError, match="broke off|before the answer was finished"):
        simple_llm.SimpleLLM().reply(provider, "hi")
    assert len(fake.calls) == 1  # text was already shown: not silently re-bought


def test_kimi_error_event_inside_stream(fake):
    from werkzeug import Response
    body = ('data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,'
            '"delta":{"content":"partial"},"finish_reason":null}]}\n\ndata: {"error":{"message":"overloaded"}}\n\n')
    fake.then("kimi", lambda: Response(body, content_type="text/event-stream"))
    with pytest.raises(simple_llm.ProviderError, match="overloaded"):
        simple_llm.SimpleLLM().reply("kimi", "hi")


def test_gemini_timeout_is_retried_then_reported(fake):
    from werkzeug import Response

    def slow():
        time.sleep(0.6)
        return Response("{}", content_type="application/json")
    fake.then("gemini", slow)
    reply = simple_llm.SimpleLLM(timeout=0.2, retries=1).reply("gemini", "hi")  # the retry gets an answer
    assert reply.text.startswith("gemini answer 2")
    fake.then("gemini", slow)
    with pytest.raises(simple_llm.ProviderError, match=r"no data for 0.2 s .*\(retries are off\)"):
        simple_llm.SimpleLLM(timeout=0.2, retries=0).reply("gemini", "hi")


@pytest.mark.parametrize("provider,finish", [("kimi", "length"), ("gemini", "MAX_TOKENS")])
def test_cut_by_length_is_reported(fake, capsys, provider, finish):
    fake.then(provider, lambda: answer(provider, "a long plan that stops", finish=finish))
    reply = simple_llm.SimpleLLM(max_tokens=5).reply(provider, "hi")
    assert reply.cut and reply.finish_reason == finish and reply.text == "a long plan that stops"
    assert f"warning: {provider} stopped at the --max-tokens limit (5)" in capsys.readouterr().err


def test_gemini_refusing_the_prompt_is_one_clear_error(fake, capsys):
    fake.then("gemini", lambda: blocked("SAFETY"))
    assert simple_llm.main(["gemini", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "error: gemini refused the prompt (SAFETY); rephrase it" in err
    assert len(fake.calls) == 1


# ---------------------------------------------------------------------------------------------- variables

def test_substitution_is_one_pass_and_strict():
    values = dict(code="x = {'a': 1}; f'{x}' {user_input}", user_input="IDEA {code}")
    text = simple_llm.substitute("{user_input} | {code} | {{user_input}} | {\"json\": 1} | {0}", values)
    assert text == "IDEA {code} | x = {'a': 1}; f'{x}' {user_input} | {user_input} | {\"json\": 1} | {0}"
    with pytest.raises(simple_llm.UserError, match=r"\{missing\}"):
        simple_llm.substitute("{missing}", values)
    assert simple_llm.substitute("{missing}", values, strict=False) == "{missing}"


def test_code_file_is_fenced_whole_up_to_its_limit(tmp_path):
    (tmp_path / "a.py").write_text("print('{x}')\n```\n")
    fenced = simple_llm.fenced_code(tmp_path / "a.py")
    assert fenced.startswith("````python\n") and fenced.endswith("\n````") and "print('{x}')" in fenced
    with pytest.raises(simple_llm.UserError, match="not found"):
        simple_llm.fenced_code(tmp_path / "nope.py")
    with pytest.raises(simple_llm.UserError, match="more than the 10 sent whole"):
        simple_llm.fenced_code(tmp_path / "a.py", limit=10)


@pytest.mark.parametrize("title", ["../../etc/passwd", "a/b\\c", "..", "Final Plan: v2!", "", "🙂"])
def test_step_titles_become_safe_file_names(title):
    name = simple_llm.step_file(3, title)
    assert name.startswith("step3_") and name.endswith(".md")
    assert "/" not in name and "\\" not in name and ".." not in name


# ---------------------------------------------------------------------------------------------- chain

def test_chain_sends_four_requests_in_order_and_writes_files(fake, work, capsys):
    assert simple_llm.main(chain_args()) == 0
    out = work / "out"
    assert [(c.provider, c.model) for c in fake.calls] == [
        ("kimi", "moonshotai/kimi-k2.5"), ("gemini", "gemini-3.1-pro-preview"),
        ("kimi", "moonshotai/kimi-k2.5"), ("gemini", "gemini-3.1-pro-preview")]
    prompts = [c.prompt for c in fake.calls]
    answers = ["kimi answer 1", "gemini answer 1", "kimi answer 2", "gemini answer 2"]
    answers = [a + ": keep {braces} and {step1_result} as text." for a in answers]
    # step 1 carries the user's file, the code (braces intact, in a python fence) and the constraints
    for marker in ("MARKER-IDEA", "```python\n" + CODE.rstrip() + "\n```", "MARKER-SYSTEM"):
        assert marker in prompts[0]
    assert "{user_input}" not in prompts[0] and "{code_content}" not in prompts[0]
    # later steps carry the earlier answers verbatim (their braces are not substituted again)
    assert answers[0] in prompts[1]
    assert answers[0] in prompts[2] and answers[1] in prompts[2]
    assert all(a in prompts[3] for a in answers[:3]) and "MARKER-IDEA" in prompts[3]
    names = ["step1_research_plan.md", "step2_critical_review.md", "step3_critique_analysis.md",
             "step4_final_plan.md"]
    assert [(out / n).read_text() for n in names] == answers
    manifest = json.loads((out / "chain_run.json").read_text())
    assert manifest["status"] == "complete"
    steps = manifest["steps"]
    assert [s["output"] for s in steps] == names
    assert [s["model"] for s in steps] == ["kimi", "gemini", "kimi", "gemini"]
    assert [s["prompt_chars"] for s in steps] == [len(p) for p in prompts]
    assert [s["finish_reason"] for s in steps] == ["stop", "STOP", "stop", "STOP"]
    assert steps[0]["usage"]["completion_tokens"] > 0 and steps[1]["usage"]["total_token_count"] > 0
    assert all(s["seconds"] >= 0 and s["cut"] is False for s in steps)
    assert [s["answered_by"] for s in steps] == [s["model_id"] for s in steps]  # no reroute, no warning
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert all(a in captured.out for a in answers)  # streamed as it arrived
    assert_no_keys(captured.out, captured.err, folder=work)


def test_chain_uses_default_code_and_system_files(fake, work, capsys):
    assert simple_llm.main(["chain", "idea.md", "--out-dir", "o"]) == 0
    first = fake.calls[0].prompt
    assert "```python\n" in first and "MARKER-IDEA" in first
    assert (ROOT / "research_system_prompt.md").read_text().strip() in first
    assert (ROOT / "llm.py").read_text().rstrip() in first  # the whole of llm.py: it is small enough


@pytest.mark.slow
def test_chain_failure_keeps_earlier_steps_and_resume_finishes(fake, work):
    fake.then("kimi", lambda: answer("kimi", "plan one"),
              lambda: error("kimi", 500, "backend exploded", headers={"retry-after-ms": "1"}))
    r = cli(*chain_args("out", "--retries", "0"), cwd=work)
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert "step 3 (Critique_Analysis, kimi)" in r.stderr and "backend exploded" in r.stderr
    assert "--resume" in r.stderr and "steps 1-2 are saved" in r.stderr
    out = work / "out"
    assert (out / "step1_research_plan.md").read_text() == "plan one"
    assert (out / "step2_critical_review.md").is_file()
    assert not (out / "step3_critique_analysis.md").exists() and not (out / "step4_final_plan.md").exists()
    manifest = json.loads((out / "chain_run.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"][-1]["step"] == 3
    assert len(fake.calls) == 3

    r = cli(*chain_args("out", "--resume"), cwd=work)
    assert r.returncode == 0, r.stderr
    assert [c.provider for c in fake.calls[3:]] == ["kimi", "gemini"]  # only the missing steps
    assert "plan one" in fake.calls[3].prompt and "gemini answer 1" in fake.calls[3].prompt
    assert (out / "step4_final_plan.md").read_text().startswith("gemini answer 2")
    manifest = json.loads((out / "chain_run.json").read_text())
    assert manifest["status"] == "complete"
    assert [s.get("reused", False) for s in manifest["steps"]] == [True, True, False, False]
    assert manifest["steps"][0]["usage"]["completion_tokens"] > 0  # kept from the first run
    assert_no_keys(r.stdout, r.stderr, folder=work)


def test_stream_broken_mid_step_is_not_saved(fake, work, capsys):
    fake.then("gemini", lambda: answer("gemini", "a review that never ends", break_after=2))
    assert simple_llm.main(chain_args()) == 1
    err = capsys.readouterr().err
    assert "step 2 (Critical_Review, gemini)" in err and "broke off" in err and "--resume" in err
    out = work / "out"
    assert (out / "step1_research_plan.md").is_file()
    assert not (out / "step2_critical_review.md").exists()
    assert (out / "step2_critical_review.partial.md").read_text().startswith("a review")  # paid for, kept
    assert len(fake.calls) == 2
    assert simple_llm.main(chain_args("out", "--resume")) == 0
    assert [c.provider for c in fake.calls[2:]] == ["gemini", "kimi", "gemini"]
    assert not (out / "step2_critical_review.partial.md").exists()


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_finished_steps(fake, work):
    release = threading.Event()
    fake.then("gemini", lambda: answer("gemini", "a slow review " * 5, hold=release))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *chain_args()], cwd=work, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    try:
        deadline = time.time() + 60  # step 2 is held (up to 60 s) once it starts
        while len(fake.calls) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the first piece of step 2 arrive
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    out = work / "out"
    assert (out / "step1_research_plan.md").is_file()
    assert not (out / "step2_critical_review.md").exists()
    assert json.loads((out / "chain_run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_dry_run_needs_no_key_and_sends_nothing(fake, work, monkeypatch):
    monkeypatch.delenv("NOVITA_API_KEY")
    monkeypatch.delenv("GEMINI_API_KEY")
    r = cli(*chain_args(), "--dry-run", cwd=work)
    assert r.returncode == 0, r.stderr
    assert fake.calls == []
    assert r.stdout.count("==== step") == 4 and "characters" in r.stdout
    assert "MARKER-IDEA" in r.stdout and "<output of step 1 (Research_Plan)>" in r.stdout
    assert not (work / "out").exists()


@pytest.mark.slow
def test_unknown_variable_sends_nothing_and_var_fills_it(fake, work):
    steps = [{"title": "Ask", "model": "kimi", "prompt": "{user_input} in {language}"},
             {"title": "../../Escape", "model": "gemini", "prompt": "Check: {step1_result} {step3_result}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    r = cli(*chain_args(), "--steps", "steps.json", cwd=work)
    assert r.returncode == 2
    assert_one_error_line(r.stderr)
    assert "step 1 (Ask)" in r.stderr and "{language}" in r.stderr and "--var" in r.stderr
    assert fake.calls == []

    steps[1]["prompt"] = "Check: {step1_result}"
    (work / "steps.json").write_text(json.dumps(steps))
    r = cli(*chain_args(), "--steps", "steps.json", "--var", "language=Python {3}", cwd=work)
    assert r.returncode == 0, r.stderr
    assert fake.calls[0].prompt == IDEA + " in Python {3}"
    assert [p.name for p in sorted((work / "out").iterdir())] == [
        "chain_run.json", "step1_ask.md", "step2_escape.md"]


def test_var_wins_over_every_built_in_variable(fake, work, capsys):
    steps = [{"title": "All", "model": "kimi", "prompt": "{user_input}|{code_content}|{system_prompt}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    args = chain_args("out", "--steps", "steps.json", "--var", "user_input=U", "--var", "code_content=C",
                      "--var", "system_prompt=S")
    assert simple_llm.main(args) == 0  # chain_args also passes the input file, --code and --system
    assert fake.calls[0].prompt == "U|C|S"
    assert "chain complete: 1 step saved" in capsys.readouterr().err


def test_key_echoed_in_a_chain_answer_is_never_printed_saved_or_passed_on(fake, work, capsys):
    fake.then("kimi", lambda: answer("kimi", ["plan: " + KIMI_KEY[:7], KIMI_KEY[7:] + " end"]))
    assert simple_llm.main(chain_args()) == 0
    captured = capsys.readouterr()
    assert "plan: *** end" in fake.calls[1].prompt  # what Gemini got in step 2
    assert (work / "out" / "step1_research_plan.md").read_text() == "plan: *** end"
    assert_no_keys(captured.out, captured.err, *(c.prompt for c in fake.calls), folder=work)


def test_chain_debug_traceback_keeps_the_cause_without_keys(fake, work, capsys):
    fake.then("gemini", lambda: raw(f"data: {{oops x-goog-api-key={GEMINI_KEY}\n\n"))
    assert simple_llm.main(chain_args("out", "--debug")) == 1
    err = capsys.readouterr().err
    assert "UnknownApiResponseError" in err and "ChainError" in err
    assert "step 2 (Critical_Review, gemini) failed: gemini: the stream sent a malformed chunk" in err
    assert "step 1 is saved in out; continue with:" in err
    assert_no_keys(err, folder=work)


@pytest.mark.parametrize("out", ["notes.md", "notes.md/plans"])
def test_unusable_out_dir_is_found_before_any_request(fake, work, capsys, out):
    (work / "notes.md").write_text("mine")
    assert simple_llm.main(chain_args(out)) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"cannot create --out-dir {out} (a file is in the way)" in err
    assert fake.calls == [] and (work / "notes.md").read_text() == "mine"


def test_answer_that_cannot_be_saved_is_kept_as_partial_with_resume_hint(fake, work, capsys):
    def review_then_block():
        (work / "out" / "step2_critical_review.md").mkdir()  # the folder changes while step 2 is asked
        return answer("gemini", "a review worth keeping")
    fake.then("gemini", review_then_block)
    assert simple_llm.main(chain_args()) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "step 2 (Critical_Review, gemini) failed: cannot write out/step2_critical_review.md" in err
    assert "step 1 is saved in out; continue with:" in err and "--resume" in err
    out = work / "out"
    assert (out / "step2_critical_review.partial.md").read_text() == "a review worth keeping"
    manifest = json.loads((out / "chain_run.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"][-1]["partial"] == "step2_critical_review.partial.md"


def test_resume_keeps_warning_while_a_reused_step_is_stale(fake, work, capsys):
    assert simple_llm.main(chain_args()) == 0
    first = json.loads((work / "out" / "chain_run.json").read_text())["steps"][0]
    (work / "idea.md").write_text(IDEA + "A new thought.\n")
    capsys.readouterr()
    for _ in range(2):  # the second --resume must still know that step 1 was made from the old input
        assert simple_llm.main(chain_args("out", "--resume")) == 0
        assert "warning: step 1's prompt changed" in capsys.readouterr().err
    assert len(fake.calls) == 4  # everything was reused
    again = json.loads((work / "out" / "chain_run.json").read_text())["steps"][0]
    assert again["reused"] is True and again["prompt_sha256"] == first["prompt_sha256"]


def test_empty_input_file_warns(work, capsys):
    (work / "idea.md").write_text("\n")
    steps = [{"title": "Only", "model": "kimi", "prompt": "Idea: {user_input}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    assert simple_llm.main(chain_args("out", "--steps", "steps.json", "--dry-run")) == 0
    err = capsys.readouterr().err
    assert "warning: {user_input} is empty" in err and "dry run: 1 step," in err


def test_prompt_far_over_any_context_stops_the_chain_before_any_request(fake, work, capsys):
    (work / "idea.md").write_text("x" * 20_000_000)  # 20 MB: about 5M tokens
    assert simple_llm.main(chain_args()) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "step 1 (Research_Plan)'s prompt is 20,0" in err and "far more than any model's context" in err
    assert fake.calls == [] and not (work / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stderr_too", [False, True])
def test_closed_stdout_stops_the_echo_but_not_the_chain(fake, work, stderr_too):
    # Answers larger than a pipe holds, so writing fails once the reader has gone.
    fake.answers = {"kimi": "k" * 100_000 + " {n}", "gemini": "g" * 100_000 + " {n}"}
    steps = [{"title": "Plan", "model": "kimi", "prompt": "{user_input}"},
             {"title": "Review", "model": "gemini", "prompt": "{step1_result}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    r, first = cli_into_head(*chain_args("out", "--steps", "steps.json"), cwd=work, stderr_too=stderr_too)
    assert r.returncode == 0, r.stderr
    if not stderr_too:
        assert first == b"k" * 10
        assert "Traceback" not in r.stderr and "error" not in r.stderr and "chain complete: 2 steps" in r.stderr
    out = work / "out"
    assert (out / "step1_plan.md").read_text() == "k" * 100_000 + " 1"
    assert (out / "step2_review.md").read_text() == "g" * 100_000 + " 1"
    assert json.loads((out / "chain_run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_closed_stdout_ends_a_single_call_quietly(fake, tmp_path):
    fake.answers["kimi"] = "k" * 100_000
    r, first = cli_into_head("kimi", "hi", cwd=tmp_path)
    assert first == b"k" * 10
    assert r.returncode == 0 and r.stderr == ""


def test_bad_steps_file_is_a_user_error(fake, work, capsys):
    (work / "steps.json").write_text(json.dumps([{"title": "x", "model": "gpt", "prompt": "hi"}]))
    assert simple_llm.main(chain_args("out", "--steps", "steps.json")) == 2
    assert "unknown model 'gpt'" in capsys.readouterr().err
    (work / "steps.json").write_text("{not json")
    assert simple_llm.main(chain_args("out", "--steps", "steps.json")) == 2
    assert fake.calls == []


def test_dotenv_sets_only_the_tools_own_variables_and_names_the_rest(work, monkeypatch, capsys):
    # issue 16 item 4: an idea folder's .env with PYTHONPATH= or a redirecting base URL
    monkeypatch.delenv("SIMPLE_LLM_NO_DOTENV")
    monkeypatch.setenv("GEMINI_API_KEY", "from-environment")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(simple_llm, "_DOTENV_NAMES", set())
    (work / ".env").write_text("GEMINI_API_KEY=from-dotenv\nNOVITA_API_KEY=nv-from-dotenv\n"
                               "PYTHONPATH=/tmp/evil\nHF_TOKEN=hf_x\nKIMI_MODEL=other/kimi\n")
    try:
        simple_llm.load_env()
        assert os.environ["GEMINI_API_KEY"] == "from-environment"  # set variables win
        assert os.environ["NOVITA_API_KEY"] == "nv-from-dotenv" and os.environ["KIMI_MODEL"] == "other/kimi"
        assert "PYTHONPATH" not in os.environ and "HF_TOKEN" not in os.environ
        assert "sets HF_TOKEN, PYTHONPATH: ignored" in capsys.readouterr().err
        env = simple_llm.child_env()
        assert not {"GEMINI_API_KEY", "NOVITA_API_KEY", "KIMI_MODEL", "PYTHONPATH"} & set(env)
    finally:
        os.environ.pop("NOVITA_API_KEY", None)
        os.environ.pop("KIMI_MODEL", None)


def test_debug_shows_the_traceback(work, capsys):
    assert simple_llm.main(["kimi", "hi", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError: NOVITA_API_KEY is not set" in err
    assert err.rstrip().splitlines()[-1].startswith("error: NOVITA_API_KEY")


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_stream_dropped_before_the_first_word_is_retried(fake, capsys, provider):
    fake.then(provider, lambda: answer(provider, "never seen", break_after=1 if provider == "kimi" else 0))
    assert simple_llm.SimpleLLM().reply(provider, "hi").text.startswith(f"{provider} answer 2")
    assert len(fake.calls) == 2


def test_bad_base_url_is_one_clear_error(fake, monkeypatch):
    monkeypatch.setenv("GEMINI_BASE_URL", "localhost:1/")  # no scheme
    with pytest.raises(simple_llm.ProviderError, match="gemini: connection to localhost:1/ failed"):
        simple_llm.SimpleLLM().reply("gemini", "hi")


def test_a_key_is_redacted_before_a_long_message_is_cut(monkeypatch):
    # A message cut at its length limit must not keep the front of a key that redaction would no longer match.
    monkeypatch.setenv("NOVITA_API_KEY", KIMI_KEY)
    simple_llm.load_env()
    for cut in range(len(KIMI_KEY)):
        text = str(simple_llm._rejected("kimi", 401, "x" * (160 - 5 - cut) + " key " + KIMI_KEY))
        assert KIMI_KEY[:6] not in text


# ---------------------------------------------------------------------------------------------- models (issue 20)

def test_models_lists_what_each_key_can_call_marking_the_defaults(fake, tmp_path, capsys):
    assert simple_llm.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["gemini\tgemini-3.1-pro-preview\tdefault", "gemini\tgemini-pro-latest",
                     "kimi\tmoonshotai/kimi-k2-0905", "kimi\tmoonshotai/kimi-k2.5\tdefault"]
    assert [c.path for c in fake.calls].count("/openai/models") == 1  # gemini's pager asked for two pages
    assert simple_llm.main(["models", "kimi", "--model", "kimi=moonshotai/kimi-k2-0905"]) == 0
    assert capsys.readouterr().out.splitlines() == ["kimi\tmoonshotai/kimi-k2-0905\tdefault",
                                                    "kimi\tmoonshotai/kimi-k2.5"]


def test_models_without_a_key_is_one_line_and_sends_nothing(fake, monkeypatch, capsys):
    monkeypatch.delenv("NOVITA_API_KEY")
    assert simple_llm.main(["models"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "NOVITA_API_KEY is not set" in err and fake.calls == []


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_a_retired_model_fails_at_once_with_a_hint(fake, capsys, provider):
    fake.then(provider, lambda: error(provider, 404, "models/old-model is not found for API version v1, or is "
                                      "not supported for generateContent."))
    assert simple_llm.main([provider, "hi", "--model", f"{provider}=old-model"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    var = simple_llm.PROVIDERS[provider].model_env
    assert f"model 'old-model' is not available (HTTP 404" in err
    assert f"python simple_llm.py models {provider}" in err and f"--model {provider}=ID" in err and var in err
    assert len(fake.calls) == 1  # no retry


def test_a_deprecated_model_error_is_the_same_hint(fake):
    fake.then("kimi", lambda: error("kimi", 400, "The model moonshotai/kimi-k2-0905 has been deprecated"))
    with pytest.raises(simple_llm.ProviderError, match="is not available .* it may be retired"):
        simple_llm.SimpleLLM().reply("kimi", "hi")
    assert len(fake.calls) == 1


def test_a_rerouted_answer_warns_and_is_recorded(fake, work, capsys):
    fake.then("gemini", lambda: answer("gemini", "a review", model="gemini-2.5-flash"))
    steps = [{"title": "Plan", "model": "kimi", "prompt": "{user_input}"},
             {"title": "Review", "model": "gemini", "prompt": "{step1_result}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    assert simple_llm.main(chain_args("out", "--steps", "steps.json")) == 0
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: gemini answered with model gemini-2.5-flash, not gemini-3.1-pro-preview as "
                        "asked (the provider rerouted the request; --model or the env variable picks another)"]
    entries = json.loads((work / "out" / "chain_run.json").read_text())["steps"]
    assert [(e["model_id"], e["answered_by"]) for e in entries] == [
        ("moonshotai/kimi-k2.5", "moonshotai/kimi-k2.5"), ("gemini-3.1-pro-preview", "gemini-2.5-flash")]


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_reasoning_never_reaches_the_answer_file_or_next_prompt(fake, work, capsys, provider):
    # A long thinking phase: each chunk comes within --timeout, the whole phase takes longer than it.
    thoughts = [f"THOUGHT-{i} the user wants a plan; " for i in range(6)]
    fake.then(provider, lambda: answer(provider, "the plan itself", reasoning=thoughts, gap=0.15))
    other = "gemini" if provider == "kimi" else "kimi"
    steps = [{"title": "Plan", "model": provider, "prompt": "{user_input}"},
             {"title": "Review", "model": other, "prompt": "Review: {step1_result}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    assert simple_llm.main(chain_args("out", "--steps", "steps.json", "--timeout", "0.6")) == 0
    out = capsys.readouterr().out
    assert (work / "out" / "step1_plan.md").read_text() == "the plan itself"
    assert "THOUGHT" not in out and "THOUGHT" not in fake.calls[1].prompt
    assert fake.calls[1].prompt == "Review: the plan itself"
    entry = json.loads((work / "out" / "chain_run.json").read_text())["steps"][0]
    assert entry["reasoning_chars"] == len("".join(thoughts))
    assert entry["reasoning_tokens"] == (6 if provider == "kimi" else 11)  # the fake's usage counts


# ---------------------------------------------------------------------------------------------- answer limits

def test_an_endless_answer_stops_at_the_cap_keeping_the_part_received(fake, work, capsys):
    # issue 16 item 7: an answer far over the cap fails its step in one line; what arrived is kept, not passed on
    fake.then("kimi", lambda: answer("kimi", ["x" * 400] * 20))
    assert simple_llm.main(chain_args("out", "--max-answer-chars", "1000")) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "passed the cap of 1,000 characters (--max-answer-chars)" in err
    partial = (work / "out" / "step1_research_plan.partial.md").read_text()
    assert partial == "x" * 800 and len(fake.calls) == 1
    assert not (work / "out" / "step1_research_plan.md").exists()


def test_a_drip_fed_answer_stops_at_the_deadline(fake, capsys):
    # issue 16 item 7: one chunk every 0.15 s never trips a 2 s --timeout, but the step has a total deadline
    fake.then("gemini", lambda: answer("gemini", ["drip "] * 40, gap=0.15))
    assert simple_llm.main(["gemini", "hi", "--timeout", "2", "--deadline", "0.8"]) == 1
    captured = capsys.readouterr()
    assert_one_error_line(captured.err)
    assert "no complete answer within the --deadline of 0.8 s" in captured.err
    assert captured.out.startswith("drip drip") and len(fake.calls) == 1


# ---------------------------------------------------------------------------------------------- text safety

ESCAPES = ("\x1b[2J\x1b[1;1H\x1b[3;20r", "\x1b]52;c;ZWNobyBwd25lZA==\x07", "\x9b2J", "\r", "\u202e", "\u200b",
           "\u2028", "\ufeff", "\U000e0041", "\x00", "\x1bP1$r\x1b\\")


@pytest.mark.parametrize("provider", ["kimi", "gemini"])
def test_terminal_control_never_reaches_the_terminal_a_file_or_the_next_prompt(fake, work, capsys, provider):
    # issue 16 items 3 and 10: a screen clear + scroll region, OSC 52 (clipboard), C1 CSI, bidi, zero-width...
    text = "safe " + "".join(f"{e}part{i} " for i, e in enumerate(ESCAPES)) + "end\twith tab\n"
    fake.then(provider, lambda: answer(provider, [text[:9], text[9:30], text[30:]]))
    other = "gemini" if provider == "kimi" else "kimi"
    steps = [{"title": "A", "model": provider, "prompt": "{user_input}"},
             {"title": "B", "model": other, "prompt": "{step1_result}"}]
    (work / "steps.json").write_text(json.dumps(steps))
    assert simple_llm.main(chain_args("out", "--steps", "steps.json")) == 0
    out = capsys.readouterr().out
    saved = (work / "out" / "step1_a.md").read_text()
    for seen in (out, saved, fake.calls[1].prompt):
        assert simple_llm.clean(seen) == seen and "\x1b" not in seen and "\r" not in seen
        assert "part0" in seen and "part10" in seen and "end\twith tab\n" in seen
    # cut inside sequences, a chunk may leave a harmless remainder ("2J"); whole, each goes entirely
    assert simple_llm.clean(text) == "safe " + "".join(f"part{i} " for i in range(len(ESCAPES))) + "end\twith tab\n"


def test_provider_error_text_is_cleaned(fake, capsys):
    fake.then("kimi", lambda: error("kimi", 400, "bad \x1b]52;c;aGk=\x07request\x1b[2J \u202e"))
    assert simple_llm.main(["kimi", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "\x1b" not in err and "\u202e" not in err and "bad request" in err


def test_redaction_covers_split_base64_and_url_encoded_keys(monkeypatch):
    # issue 16 item 12
    import base64
    import urllib.parse
    monkeypatch.setattr(simple_llm, "_SECRETS", {})
    simple_llm.add_secret(KIMI_KEY)
    forms = [KIMI_KEY[:8] + " " + KIMI_KEY[8:], KIMI_KEY[:5] + "\n  " + KIMI_KEY[5:],
             urllib.parse.quote(KIMI_KEY + "/+", safe=""), urllib.parse.quote_plus(KIMI_KEY)]
    for prefix in ("", "u", "us", "use"):  # base64 of a longer text: the key at each alignment
        forms.append(base64.b64encode(f"{prefix}:{KIMI_KEY}:tail".encode()).decode())
        forms.append(base64.urlsafe_b64encode(f"{prefix}{KIMI_KEY}".encode()).decode())
    for form in forms:
        out = simple_llm.redact(f"Authorization: Basic {form} end")
        assert "***" in out, form
        core = base64.b64encode(KIMI_KEY.encode()).decode()[2:-2]
        assert KIMI_KEY not in out and core not in out and KIMI_KEY[6:14] not in out
    assert simple_llm.redact("nothing secret here") == "nothing secret here"


def test_a_planted_temp_file_symlink_is_never_followed(fake, work, tmp_path):
    # issue 16 item 9: step1_*.md.tmp -> a file of the user's; and the step file itself a symlink
    victim = tmp_path / "bashrc"
    victim.write_text("mine\n")
    out = work / "out"
    out.mkdir()
    (out / "step1_research_plan.md.tmp").symlink_to(victim)
    (out / "step2_critical_review.md").symlink_to(victim)
    for n in range(4):
        (out / f".step1_research_plan.md.{n}.tmp").symlink_to(victim)
    assert simple_llm.main(chain_args()) == 0
    assert victim.read_text() == "mine\n"
    assert not (out / "step2_critical_review.md").is_symlink()
    assert (out / "step2_critical_review.md").read_text().startswith("gemini answer 1")
