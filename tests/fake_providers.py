"""A local stand-in for Novita's OpenAI-compatible API and the Gemini API, served by pytest-httpserver.

The real `openai` and `google-genai` clients talk to it over HTTP on 127.0.0.1 (through NOVITA_BASE_URL and
GEMINI_BASE_URL), so the tests exercise the same wire formats, status codes and headers as the providers:
OpenAI chat-completion SSE chunks with a usage chunk and `[DONE]`, and Gemini `streamGenerateContent?alt=sse`.
Each provider answers from a script of queued responses, then with a default answer; every request is kept.
Chunks name the model that answered (the one asked for unless `model=` says otherwise); `reasoning=` sends
thinking first (Kimi's `reasoning_content` deltas, Gemini's `"thought": true` parts); `gap=` spaces the events.
The list endpoints (GET {base}/models, GET /v1beta/models with pages) serve `FakeProviders.models`.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

from werkzeug import Request, Response

KIMI_PATH = "/openai/chat/completions"
GEMINI_PATH = re.compile(r"^/v1(beta)?/models/[^/]+:streamGenerateContent$")
GEMINI_LIST = re.compile(r"^/v1(beta)?/models$")
_ASKED = {"model": ""}  # the model id of the request being answered (the server is single-threaded)


@dataclass
class Call:
    provider: str
    path: str
    body: dict
    headers: dict

    @property
    def prompt(self) -> str:
        if self.provider == "kimi":
            return self.body["messages"][-1]["content"]
        return "".join(p.get("text", "") for c in self.body["contents"] for p in c["parts"])

    @property
    def model(self) -> str:
        return self.body["model"] if self.provider == "kimi" else self.path.split("/models/")[1].split(":")[0]


def _kimi_events(pieces: list[str], finish: str | None, model: str, reasoning: list[str]) -> list[str]:
    def chunk(delta: dict, finish_reason=None) -> str:
        data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return json.dumps(data)
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": None, "reasoning_content": r}) for r in reasoning]
    events += [chunk({"content": p}) for p in pieces]
    if finish:
        events.append(chunk({}, finish))
        usage = {"prompt_tokens": 11, "completion_tokens": len(pieces) + len(reasoning),
                 "total_tokens": 11 + len(pieces) + len(reasoning),
                 "completion_tokens_details": {"reasoning_tokens": len(reasoning)}}
        events.append(json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                                  "model": model, "choices": [], "usage": usage}))
        events.append("[DONE]")
    return events


def _gemini_events(pieces: list[str], finish: str | None, model: str, reasoning: list[str]) -> list[str]:
    events = [json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": r, "thought": True}]},
                                          "index": 0}], "modelVersion": model}) for r in reasoning]
    for i, piece in enumerate(pieces):
        cand = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}
        data = {"candidates": [cand], "modelVersion": model}
        if finish and i == len(pieces) - 1:
            cand["finishReason"] = finish
            data["usageMetadata"] = {"promptTokenCount": 13, "candidatesTokenCount": len(pieces),
                                     "thoughtsTokenCount": 5 + len(reasoning),
                                     "totalTokenCount": 18 + len(pieces) + len(reasoning)}
        events.append(json.dumps(data))
    return events


def answer(provider: str, text: str | list[str], *, finish: str | None = "default", pieces: int = 3,
           break_after: int | None = None, hold: threading.Event | None = None, model: str | None = None,
           reasoning: list[str] = (), gap: float = 0.0) -> Response:
    """A streamed answer split into `pieces` (or sent in the pieces given as a list). finish=None sends no finish
    reason (a stream cut off cleanly); break_after=N closes the connection after N events with the body
    incomplete (a dropped connection); hold makes the stream wait after its first event until the event is set
    (for Ctrl-C tests); model names another answering model; reasoning is streamed before the answer; gap
    waits that many seconds before each event."""
    if isinstance(text, list):
        parts = text
    else:
        size = max(1, -(-len(text) // pieces))
        parts = [text[i:i + size] for i in range(0, len(text), size)]
    if finish == "default":
        finish = "stop" if provider == "kimi" else "STOP"
    events = (_kimi_events if provider == "kimi" else _gemini_events)(parts, finish, model or _ASKED["model"],
                                                                       list(reasoning))
    headers = {}
    if break_after is not None:
        events = events[:break_after]
        headers["Content-Length"] = "1000000"  # promise more than is sent: the client sees a broken body

    def body():
        for i, event in enumerate(events):
            time.sleep(gap)
            yield f"data: {event}\n\n"
            if hold is not None and i == 1:
                hold.wait(60)  # the test sets it when done; a busy machine is slow to get there
                time.sleep(0.2)
    return Response(body(), content_type="text/event-stream", headers=headers)


def error(provider: str, status: int, message: str, *, headers: dict | None = None,
          retry_delay: str | None = None) -> Response:
    """An error in each provider's JSON shape; retry_delay adds Google's RetryInfo detail (e.g. "0s")."""
    if provider == "kimi":
        body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    else:
        names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
        body = {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}
        if retry_delay is not None:
            body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                         "retryDelay": retry_delay}]
    return Response(json.dumps(body), status=status, content_type="application/json", headers=headers or {})


def raw(body: str) -> Response:
    """An event stream sent exactly as given: for malformed chunks."""
    return Response(body, content_type="text/event-stream")


def blocked(reason: str = "SAFETY") -> Response:
    """Gemini refusing the prompt itself: promptFeedback.blockReason and no candidates."""
    data = {"promptFeedback": {"blockReason": reason}, "usageMetadata": {"promptTokenCount": 13}}
    return Response(f"data: {json.dumps(data)}\n\n", content_type="text/event-stream")


def stalled(release: threading.Event) -> Response:
    """A server that accepts the request and then says nothing until `release` is set (at most 30 s); the
    server is single-threaded, so the test must set it when done."""
    release.wait(30)
    return Response("{}", status=500, content_type="application/json")


class FakeProviders:
    """Both providers on one pytest-httpserver. `then(provider, factory, ...)` queues responses (callables
    returning a werkzeug Response); once a queue is empty the provider answers "<provider> answer <n>"."""

    def __init__(self, server):
        self.server = server
        self.calls: list[Call] = []
        self.script: dict[str, list] = {"kimi": [], "gemini": []}
        self.answers: dict[str, str] = {}  # provider -> template for default answers, "{n}" = request number
        self.models: dict[str, list[str]] = {"kimi": ["moonshotai/kimi-k2.5", "moonshotai/kimi-k2-0905"],
                                             "gemini": ["gemini-3.1-pro-preview", "gemini-pro-latest"]}
        server.expect_request(KIMI_PATH, method="POST").respond_with_handler(lambda r: self._handle("kimi", r))
        server.expect_request(GEMINI_PATH, method="POST").respond_with_handler(lambda r: self._handle("gemini", r))
        server.expect_request("/openai/models", method="GET").respond_with_handler(self._kimi_list)
        server.expect_request(GEMINI_LIST, method="GET").respond_with_handler(self._gemini_list)

    @property
    def kimi_url(self) -> str:
        return self.server.url_for("/openai")

    @property
    def gemini_url(self) -> str:
        return self.server.url_for("/")

    def then(self, provider: str, *factories) -> "FakeProviders":
        self.script[provider].extend(factories)
        return self

    def calls_to(self, provider: str) -> list[Call]:
        return [c for c in self.calls if c.provider == provider]

    def _kimi_list(self, request: Request) -> Response:
        self.calls.append(Call("kimi", request.path, {}, dict(request.headers)))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "novita"} for m in self.models["kimi"]]
        return Response(json.dumps({"object": "list", "data": data}), content_type="application/json")

    def _gemini_list(self, request: Request) -> Response:
        """Two pages: the SDK's pager must follow nextPageToken. An embedding model is listed too."""
        self.calls.append(Call("gemini", request.path, {}, dict(request.headers)))
        second = request.args.get("pageToken") == "page2"
        names = self.models["gemini"][1:] if second else self.models["gemini"][:1]
        models = [{"name": f"models/{m}", "supportedGenerationMethods": ["generateContent"]} for m in names]
        if second:
            models.append({"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]})
        body = {"models": models, **({} if second else {"nextPageToken": "page2"})}
        return Response(json.dumps(body), content_type="application/json")

    def _handle(self, provider: str, request: Request) -> Response:
        call = Call(provider, request.path, json.loads(request.get_data(as_text=True)), dict(request.headers))
        self.calls.append(call)
        _ASKED["model"] = call.model
        if self.script[provider]:
            return self.script[provider].pop(0)()
        n = len(self.calls_to(provider))
        template = self.answers.get(provider, provider + " answer {n}: keep {braces} and {step1_result} as text.")
        return answer(provider, template.replace("{n}", str(n)))
