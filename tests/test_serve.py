"""The reference endpoint (`steerstore serve`): OpenAI-shaped answers over real HTTP, concurrent users in
mixed batches equal to each request served alone, clear 4xx errors, new store versions picked up."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from steerstore.jobs.bench import serving as bench_serving
from steerstore.jobs.serve import Endpoint, ServeConfig, parse_request
from steerstore.operators.serving import Request, personalised_generate


def _meta(rt, fingerprint=None):
    return {"layers": [1, 2], "recommended": [2], "hidden": 64, "k": 2, "norm": 4.0, "num_layers": 4,
            "num_heads": 4, "group": 2, "model_id": rt.model_id, "fingerprint": fingerprint or rt.fingerprint,
            "name_or_path": "tiny-llama", "model_config": {"use_chat_template": True}}


def _publish(uri, rt, seed, fingerprint=None):
    version, ids = bench_serving.synthetic_store(uri, None, 12, _meta(rt, fingerprint), seed, users_per_bucket=4,
                                                 row_group_bytes=1024)
    return version, ids


def _post(url, path, body):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", path, body=body if isinstance(body, (str, bytes)) else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _chat(user, prompt, method, max_tokens=6, **extra):
    return {"user": user, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}],
            "steerstore": {"method": method, **extra}}


@pytest.fixture
def endpoint(tmp_path, tiny_runtime):
    uri = str(tmp_path / "store")
    version, ids = _publish(uri, tiny_runtime, seed=0)
    ep = Endpoint(ServeConfig(store=uri, port=0, max_batch=8, batch_wait_ms=200, follow_interval_s=0.05),
                  runtime=tiny_runtime).start()
    yield ep, uri, version, ids
    ep.close()


def test_concurrent_users_are_batched_and_each_answer_equals_serving_that_request_alone(endpoint, tiny_runtime):
    ep, uri, version, ids = endpoint
    bodies = [_chat(ids[0], "Tell me about cats.", "caa"), _chat(ids[1], "Plan my weekend.", "bt", scale=2.0),
              _chat(ids[2], "Describe a park.", "dps"), _chat("someone-new", "Hello there.", "caa"),
              _chat(ids[3], "Describe a park.", "population"), _chat(ids[4], "Tell me about cats.", "none")]
    results: list = [None] * len(bodies)

    def send(i):
        results[i] = _post(ep.url, "/v1/chat/completions", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results), results
    assert max(ep.batcher.batches) > 1  # the 200 ms window gathered several users into one batch
    for body, (_, answer) in zip(bodies, results):
        assert answer["object"] == "chat.completion" and answer["model"] == tiny_runtime.model_id
        assert answer["steerstore"]["version"] == version and answer["steerstore"]["user"] == body["user"]
        alone = personalised_generate(tiny_runtime, None, [Request(body["user"], body["messages"][0]["content"],
                                                                   **body["steerstore"])], uri, max_new_tokens=6)[0]
        assert answer["choices"][0]["message"]["content"] == alone.text
        assert (answer["steerstore"]["applied"], answer["steerstore"]["scale"]) == (alone.applied, alone.scale)
        assert 0 < answer["usage"]["completion_tokens"] <= 6
    assert results[3][1]["steerstore"]["applied"] == "population"  # an unknown user: the fallback, said so
    status, plain = _post(ep.url, "/v1/completions", {"user": ids[0], "prompt": "Tell me about cats.", "max_tokens": 6})
    assert status == 200 and plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == results[0][1]["choices"][0]["message"]["content"]  # default method caa


@pytest.mark.parametrize("body, status, says", [
    ("not json", 400, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "'user' must name the user"),
    (_chat("u", "Hi", "steerx"), 400, "unknown method 'steerx'"),
    (_chat("u", "  ", "caa"), 400, "the prompt must be non-empty"),
    ({"user": "u", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
     400, "single-turn chats"),
    (_chat("u", "Hi", "caa", max_tokens=100000), 400, "'max_tokens' must be in [1, 512]"),
    (_chat("u", "Hi", "influence", layers=[1]), 400, "layers apply to the vector methods"),
    ({**_chat("u", "Hi", "caa"), "stream": True}, 400, "streaming is not supported"),
    ({**_chat("u", "Hi", "caa"), "steerstore": {"colour": "red"}}, 400, "unknown 'steerstore' fields ['colour']"),
])
def test_bad_requests_get_a_4xx_naming_what_is_wrong(endpoint, body, status, says):
    ep = endpoint[0]
    got, answer = _post(ep.url, "/v1/chat/completions", body)
    assert got == status and says in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_unknown_routes_models_and_health(endpoint, tiny_runtime):
    ep, _, version, _ = endpoint
    assert _post(ep.url, "/v1/embeddings", {})[0] == 404
    host, port = ep.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["data"][0]["id"] == tiny_runtime.model_id
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["version"] == version
    conn.close()


def test_the_endpoint_picks_up_a_new_version_but_never_one_built_from_other_weights(endpoint, tiny_runtime):
    ep, uri, first, ids = endpoint
    body = _chat(ids[0], "Tell me about cats.", "caa")
    assert _post(ep.url, "/v1/chat/completions", body)[1]["steerstore"]["version"] == first
    other, _ = _publish(uri, tiny_runtime, seed=1, fingerprint="sha256:other-weights")
    assert ep.follower.check() is False and other in ep.follower.refused
    assert _post(ep.url, "/v1/chat/completions", body)[1]["steerstore"]["version"] == first
    second, _ = _publish(uri, tiny_runtime, seed=2)
    assert ep.follower.check() is True
    answer = _post(ep.url, "/v1/chat/completions", body)[1]
    assert answer["steerstore"]["version"] == second
    alone = personalised_generate(tiny_runtime, None, [Request(ids[0], "Tell me about cats.", "caa")], uri,
                                  max_new_tokens=6)[0]
    assert answer["choices"][0]["message"]["content"] == alone.text


def test_request_parsing_defaults_and_sampling():
    config = ServeConfig(max_tokens=20)
    request, max_tokens, sampling = parse_request(
        {"user": "u", "prompt": "Hi", "temperature": 0.7, "top_p": 0.9, "seed": 3}, chat=False, config=config)
    assert (request.user_id, request.prompt, request.method, max_tokens) == ("u", "Hi", "caa", 20)
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.7, 0.9, 3)
    _, max_tokens, sampling = parse_request({"user": "u", "prompt": "Hi", "max_completion_tokens": 5}, False, config)
    assert max_tokens == 5 and sampling.temperature == 0.0  # absent temperature: greedy


def test_a_body_naming_no_method_gets_the_users_recommendation_when_the_store_records_them(tmp_path, tiny_runtime):
    from tests.test_recommended_serving import recommended_store

    uri, ids = recommended_store(tmp_path, tiny_runtime)
    ep = Endpoint(ServeConfig(store=uri, port=0, batch_wait_ms=0), runtime=tiny_runtime).start()
    try:
        answer = ep.answer("/v1/completions", {"user": ids[0], "prompt": "Describe a park.", "max_tokens": 4})
        info = answer["steerstore"]
        assert (info["method"], info["resolved"], info["applied"], info["scale"]) == ("recommended", "caa", "user", 2.5)
        assert info["note"].startswith("recommended for this user: caa")
        alone = personalised_generate(tiny_runtime, None, [Request(ids[0], "Describe a park.", "caa", scale=2.5,
                                                                   layers=[1])], uri, max_new_tokens=4)[0]
        assert answer["choices"][0]["text"] == alone.text
        named = ep.answer("/v1/completions", {"user": ids[0], "prompt": "Hi", "max_tokens": 4,
                                              "steerstore": {"method": "none"}})["steerstore"]
        assert (named["method"], named["resolved"]) == ("none", "none")
    finally:
        ep.close()
