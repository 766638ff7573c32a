"""A reference endpoint: an OpenAI-compatible HTTP server that personalises each request from the store.

Launch: ``steerstore serve --store ./steerstore-out/store [--port 8000]``, then e.g.

    curl localhost:8000/v1/chat/completions -d '{"user": "formal-0", "max_tokens": 32,
         "messages": [{"role": "user", "content": "What do you think of cats?"}],
         "steerstore": {"method": "caa", "scale": 4}}'

Each request is personalised by its ``user`` field with the method and strength of the optional
``steerstore`` object. A request that names no method gets ``serve.method`` if set, else ``recommended``
(the method and strength the refresh chose for that user) when the store version records
recommendations, else ``caa`` at the store's recommended strength (stores from before recommendations). Concurrent
requests from different users are decoded together as one mixed batch on the reference Hugging Face
path (``personalised_generate``): requests that arrive within ``batch_wait_ms`` of each other, up to
``max_batch``, grouped by their decoding settings. The store is followed (``StoreFollower``): each
night's version is picked up without a restart, never one built from other weights. Bad requests get a
4xx with an OpenAI-style error body naming the field.

This is the reference path, for trying the store and for checking an engine's output against; a
production deployment serves the exported vectors from its engine (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from steerstore.infra.config import check, option
from steerstore.infra.follow import StoreFollower
from steerstore.infra.storage import StorageConfig
from steerstore.jobs.generate import load_runtime_for
from steerstore.operators.runtime import ModelRuntime, Sampling
from steerstore.operators.serving import (
    BadRequest,
    Request,
    check_request,
    default_method,
    personalised_generate,
    request_prompt,
)
from steerstore.schemas.methods import Method

log = logging.getLogger("steerstore")
MAX_BODY_BYTES = 1 << 20


@dataclass
class ServeConfig:
    store: str = option("./steerstore-out/store", help="store URI (local folder or s3://bucket/prefix)")
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, help="port to listen on (0: any free port)")
    model: str | None = option(None, help="model to load; default: the one the store was built with")
    method: Method | None = option(
        None, help="method for requests that name none in their 'steerstore' object; default: recommended (each "
                   "user's own choice) when the store version records recommendations, else caa")
    follow_interval_s: float = option(60.0, help="seconds between checks of the store's LATEST (new versions)")
    max_batch: int = option(16, help="most requests decoded together in one mixed batch")
    batch_wait_ms: float = option(10.0, help="how long the first queued request waits for others to join its batch")
    max_tokens: int = option(64, help="max_tokens of a request that gives none")
    max_tokens_limit: int = option(512, help="the largest max_tokens a request may ask for")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "serve.port must be in 0..65535")
        check(self.max_batch >= 1 and self.batch_wait_ms >= 0, "max_batch >= 1 and batch_wait_ms >= 0")
        check(1 <= self.max_tokens <= self.max_tokens_limit, "1 <= max_tokens <= max_tokens_limit")
        check(self.follow_interval_s > 0, "follow_interval_s must be > 0")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class _Job:
    request: Request
    max_tokens: int
    sampling: Sampling
    future: Future


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise HTTPError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise HTTPError(400, f"'{name}' must be in [{low}, {high}], got {value!r}", name)
    return kind(value)


def parse_request(body: object, chat: bool, config: ServeConfig,
                  default: str | None = None) -> tuple[Request, int, Sampling]:
    """An OpenAI-style body as a serving ``Request`` with its max_tokens and sampling; HTTPError(400) if bad.

    A body that names no method gets ``config.method``, else ``default`` (the store's ``default_method``), else caa.
    """
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "'messages' must be a non-empty list", "messages")
        if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
            roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
            raise HTTPError(400, f"this reference endpoint answers single-turn chats: one message with role 'user' "
                                 f"(got roles {roles})", "messages")
        prompt = messages[0].get("content")
    else:
        prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise HTTPError(400, "the prompt must be non-empty text", "messages" if chat else "prompt")
    if body.get("n", 1) != 1:
        raise HTTPError(400, "'n' must be 1", "n")
    if body.get("stream"):
        raise HTTPError(400, "streaming is not supported by the reference endpoint", "stream")
    user = body.get("user")
    if not isinstance(user, str) or not user:
        raise HTTPError(400, "'user' must name the user to personalise for (a non-empty string)", "user")
    extra = body.get("steerstore") or {}
    if not isinstance(extra, dict):
        raise HTTPError(400, "'steerstore' must be an object {method?, scale?, source?, layers?, history?}",
                        "steerstore")
    unknown = sorted(set(extra) - {"method", "scale", "source", "layers", "history"})
    if unknown:
        raise HTTPError(400, f"unknown 'steerstore' fields {unknown}; known: method, scale, source, layers, history",
                        "steerstore")
    method = extra.get("method", str(config.method or default or Method.CAA))
    request = Request(user, prompt, method, extra.get("scale"), extra.get("source"), extra.get("layers"),
                      extra.get("history"))
    try:
        check_request(request)
    except BadRequest as exc:
        raise HTTPError(400, str(exc), "steerstore") from None
    max_tokens = _number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                         config.max_tokens, int, 1, config.max_tokens_limit)
    temperature = _number(body, "temperature", 0.0, float, 0.0, 2.0)  # absent: greedy (reproducible answers)
    top_p = _number(body, "top_p", 1.0, float, 1e-6, 1.0)
    seed = _number(body, "seed", 0, int)
    return request, max_tokens, Sampling(temperature, top_p, seed)


class Batcher:
    """One decoding thread: takes queued requests, groups those with the same decoding settings, and
    decodes each group as one mixed batch from the follower's current version."""

    def __init__(self, runtime: ModelRuntime, follower: StoreFollower, max_batch: int, wait_s: float):
        self.runtime, self.follower, self.max_batch, self.wait_s = runtime, follower, max_batch, wait_s
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches decoded (for the load test and the log)
        self._thread = threading.Thread(target=self._loop, name="steerstore-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request, max_tokens: int, sampling: Sampling) -> Future:
        future: Future = Future()
        self.queue.put(_Job(request, max_tokens, sampling, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(30)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, deadline = [first], time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)
                    break
                jobs.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.max_tokens, job.sampling.temperature, job.sampling.top_p, job.sampling.seed),
                                  []).append(job)
            for group in groups.values():
                self._decode(group)

    def _decode(self, jobs: list[_Job]) -> None:
        try:
            served = personalised_generate(self.runtime, None, [j.request for j in jobs], self.follower,
                                           max_new_tokens=jobs[0].max_tokens, sampling=jobs[0].sampling)
            self.batches.append(len(jobs))
            for job, out in zip(jobs, served):
                job.future.set_result(out)
        except Exception as exc:  # noqa: BLE001 — every waiting request gets the error, the server goes on
            log.exception("serving a batch of %d requests failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)


class Endpoint:
    """The HTTP server and its batcher; ``start()`` serves in a thread, ``url`` says where."""

    def __init__(self, config: ServeConfig, runtime: ModelRuntime | None = None):
        self.config = config
        self.follower = StoreFollower(config.store, config.storage, interval_s=config.follow_interval_s)
        reader = self.follower.current()
        if runtime is None:  # the model the store was built with (or config.model), its weights checked
            runtime = load_runtime_for(reader, config.model)
        else:
            reader.check_model(runtime.fingerprint, f"model {runtime.model_id!r}")
        self.runtime = runtime
        self.batcher = Batcher(self.runtime, self.follower, config.max_batch, config.batch_wait_ms / 1000)
        self.httpd = ThreadingHTTPServer((config.host, config.port), self._handler())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Endpoint":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="steerstore-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def answer(self, path: str, body: object) -> dict:
        chat = path == "/v1/chat/completions"
        # per request: the store followed may gain (or lose) recommendations with a new version
        request, max_tokens, sampling = parse_request(body, chat, self.config, default_method(self.follower.current()))
        try:
            served = self.batcher.submit(request, max_tokens, sampling).result(timeout=600)
        except BadRequest as exc:
            raise HTTPError(400, str(exc)) from None
        tokenizer = self.runtime.tokenizer
        # re-encoding the text counts about the tokens decoded (at most max_tokens were)
        completion = min(max_tokens, len(tokenizer(served.text, add_special_tokens=False)["input_ids"]))
        prompt_tokens = len(tokenizer(request_prompt(request), add_special_tokens=False)["input_ids"])  # with history
        finish = "length" if completion >= max_tokens else "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": served.text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": served.text, "finish_reason": finish, "logprobs": None})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.runtime.model_id, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion},
                "steerstore": {"user": served.user_id, "method": served.method, "resolved": served.resolved,
                               "applied": served.applied,
                               "scale": served.scale, "layers": served.layers, "note": served.note,
                               "version": served.version}}

    def _handler(self):
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # one line per request on the steerstore logger
                log.debug("%s %s", self.address_string(), fmt % args)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, exc: HTTPError) -> None:
                kind = "invalid_request_error" if exc.status < 500 else "server_error"
                self._send(exc.status, {"error": {"message": exc.message, "type": kind, "param": exc.param,
                                                  "code": None}})

            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    self._send(200, {"status": "ok", "store": endpoint.config.store,
                                     "version": endpoint.follower.version})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": endpoint.runtime.model_id, "object": "model",
                                                                 "owned_by": "steerstore"}]})
                else:
                    self._error(HTTPError(404, f"no route {self.path}; routes: POST /v1/chat/completions, "
                                               "POST /v1/completions, GET /v1/models, GET /health"))

            def do_POST(self):  # noqa: N802
                try:
                    if self.path not in ("/v1/chat/completions", "/v1/completions"):
                        raise HTTPError(404, f"no route {self.path}; POST /v1/chat/completions or /v1/completions")
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY_BYTES:
                        raise HTTPError(413, f"the body is over {MAX_BODY_BYTES} bytes")
                    try:
                        body = json.loads(self.rfile.read(length) or b"null")
                    except (ValueError, UnicodeDecodeError) as exc:
                        raise HTTPError(400, f"the body is not valid JSON: {exc}") from None
                    self._send(200, endpoint.answer(self.path, body))
                except HTTPError as exc:
                    self._error(exc)
                except Exception as exc:  # noqa: BLE001 — a 500 with the reason, not a dropped connection
                    log.exception("request failed")
                    self._error(HTTPError(500, f"{type(exc).__name__}: {exc}"))

        return Handler


def main(config: ServeConfig) -> dict:
    endpoint = Endpoint(config)
    print(f"serving store {config.store} (version {endpoint.follower.version}, model {endpoint.runtime.model_id}) "
          f"at {endpoint.url}/v1 — POST /v1/chat/completions with a 'user' field; Ctrl-C stops", flush=True)
    try:
        endpoint.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
    return {"url": endpoint.url, "batches": len(endpoint.batcher.batches)}
