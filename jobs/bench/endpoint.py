"""Load test of the reference endpoint (``steerstore serve``) over loopback HTTP.

``steerstore bench endpoint --store ./steerstore-out/store`` starts the endpoint in this process on a
free port and sends the same set of chat requests twice with a real HTTP client (``http.client``, one
connection per client thread): first from ``--clients`` concurrent users (the endpoint groups them into
mixed batches), then one at a time (the baseline: each request alone). Reported: p50/p99 latency,
requests/s, the speed-up of concurrent over one-at-a-time, and the batch sizes the endpoint formed.
Bounded by ``--requests`` and ``--max_seconds`` per phase.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np

from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import device_info, latency_percentiles, write_figures
from steerstore.jobs.serve import Endpoint, ServeConfig

PROMPTS = ["What do you think of cats?", "Plan my weekend.", "Describe a city park.", "Tell me about the weather."]
METHODS = ["caa", "bt", "dps", "population", "none"]


@dataclass
class BenchEndpointConfig:
    store: str = option("./steerstore-out/store", help="the store to serve (e.g. the demo's)")
    model: str | None = option(None, help="model; default: the one the store was built with")
    clients: int = option(8, help="concurrent HTTP clients (users) in the concurrent phase")
    requests: int = option(32, help="requests per phase")
    max_tokens: int = option(16, help="max_tokens of each request")
    max_batch: int = option(16, help="the endpoint's max_batch")
    batch_wait_ms: float = option(10.0, help="the endpoint's batch_wait_ms")
    max_seconds: float = option(300.0, help="stop sending in a phase after this long (requests not sent are counted)")
    json: str = option("docs/figures/bench-endpoint.json", help="where to write the figures ('' = print only)")

    def __post_init__(self) -> None:
        check(self.clients >= 1 and self.requests >= 1 and self.max_tokens >= 1, "clients, requests, max_tokens >= 1")


def _bodies(users: list[str], n: int, max_tokens: int) -> list[dict]:
    """n chat requests cycling over users, prompts and methods (unknown users would get the fallback)."""
    return [{"user": users[i % len(users)], "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
             "steerstore": {"method": METHODS[i % len(METHODS)]}} for i in range(n)]


def _phase(url: str, bodies: list[dict], clients: int, max_seconds: float) -> dict:
    """Send ``bodies`` from ``clients`` threads (each its own keep-alive connection); latencies and answers."""
    parsed = urlparse(url)
    latencies: list[float] = [0.0] * len(bodies)
    answers: list[dict | None] = [None] * len(bodies)
    errors: list[str] = []
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
        try:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None or time.perf_counter() - start > max_seconds:
                    return
                data = json.dumps(bodies[i])
                t0 = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = json.loads(resp.read())
                latencies[i] = time.perf_counter() - t0
                if resp.status != 200:
                    errors.append(f"{resp.status}: {payload}")
                answers[i] = payload
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [k for k, a in enumerate(answers) if a is not None]
    percentiles = latency_percentiles([latencies[k] for k in done]) if done else {"p50_ms": None, "p99_ms": None}
    return {"clients": clients, "sent": len(done), "not_sent": len(bodies) - len(done), "errors": errors[:5],
            "error_count": len(errors), "seconds": round(wall, 3),
            "requests_per_s": round(len(done) / wall, 3) if wall > 0 else None,
            "p50_ms": percentiles["p50_ms"], "p99_ms": percentiles["p99_ms"], "answers": answers}


def main(config: BenchEndpointConfig) -> dict:
    endpoint = Endpoint(ServeConfig(store=config.store, port=0, model=config.model, max_batch=config.max_batch,
                                    batch_wait_ms=config.batch_wait_ms, max_tokens=config.max_tokens)).start()
    try:
        reader = endpoint.follower.current()
        users = sorted(u for u, s in zip(*(reader.users().column(c).to_pylist() for c in ("user_id", "status")))
                       if s == "stored")
        check(bool(users), f"store {config.store} has no stored users to send requests for")
        bodies = _bodies(users, config.requests, config.max_tokens)
        _phase(endpoint.url, bodies[:2], 1, config.max_seconds)  # warm-up: the first decode pays one-off costs
        endpoint.batcher.batches.clear()
        concurrent = _phase(endpoint.url, bodies, config.clients, config.max_seconds)
        batches = list(endpoint.batcher.batches)
        endpoint.batcher.batches.clear()
        alone = _phase(endpoint.url, bodies, 1, config.max_seconds)
    finally:
        endpoint.close()
    # greedy decoding: a request's answer is the same whether it was batched with others or alone
    same = [a is not None and b is not None and a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
            for a, b in zip(concurrent.pop("answers"), alone.pop("answers"))]
    result = {
        "benchmark": "endpoint", "store": config.store, "version": reader.version, "users": len(users),
        "requests": config.requests, "max_tokens": config.max_tokens, "methods": METHODS,
        "concurrent": concurrent, "one_at_a_time": alone,
        "batches": {"count": len(batches), "mean_size": round(float(np.mean(batches)), 2) if batches else 0,
                    "max_size": max(batches, default=0)},
        "speedup_requests_per_s": round(concurrent["requests_per_s"] / alone["requests_per_s"], 2)
        if concurrent["requests_per_s"] and alone["requests_per_s"] else None,
        "answers_equal_batched_vs_alone": int(sum(same)), "answers_compared": len(same),
        "device": device_info(endpoint.runtime), "date": time.strftime("%Y-%m-%d")}
    write_figures(result, config.json)
    return result
