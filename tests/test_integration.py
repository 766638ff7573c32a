"""End to end on real parts: the default SmolLM2 model, local Ray and an S3-protocol server over HTTP."""

import json

import numpy as np
import pytest

from steerstore.infra.reader import StoreReader
from steerstore.infra.storage import write_text
from steerstore.jobs import cli, refresh
from steerstore.jobs.demo_data import demo_pairs
from steerstore.operators.caa import pair_differences, shrink
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from tests.s3server import S3Server
from tests.tiny import answers

pytestmark = pytest.mark.slow
BUCKET = "steer-integration"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


def storage_flags(server):
    cfg = server.storage_config()
    return ["--storage.endpoint_url", cfg.endpoint_url, "--storage.region", cfg.region,
            "--storage.access_key_id", cfg.access_key_id, "--storage.secret_access_key", cfg.secret_access_key]


@pytest.fixture(scope="module")
def s3_store(ray_cluster, s3):
    """The demo's pairs (2 users and a thin one) refreshed on the real model into the S3 server."""
    storage = s3.storage_config()
    rows = demo_pairs(users_per_style=1, pairs_per_user=4)
    write_text(f"s3://{BUCKET}/inputs/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows), storage)
    store_uri = f"s3://{BUCKET}/stores/demo"
    config = refresh.RefreshConfig(
        inputs=refresh.InputsConfig(preference_pairs=f"s3://{BUCKET}/inputs/pairs.jsonl"),
        output=refresh.OutputConfig(store=store_uri), storage=storage)
    config.ray.progress_bars = False
    config.scale.sample_pairs, config.scale.grid = 6, [1.0, 2.0]
    return store_uri, rows, refresh.main(config)


def test_the_refresh_job_on_the_real_model_writes_an_s3_store_that_matches_direct_computation(
        s3, s3_store, capsys):
    storage = s3.storage_config()
    store_uri, rows, summary = s3_store
    assert (summary["users_in"], summary["users_stored"], summary["users_quarantined"]) == (3, 2, 1)
    assert summary["rows_quarantined"] == 2

    reader = StoreReader(store_uri, storage)  # read back over HTTP from the S3 server
    runtime = ModelRuntime(ModelConfig())
    assert reader.manifest["model"]["fingerprint"] == runtime.fingerprint
    assert reader.manifest["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1"
    stored = reader.vectors(["enthusiastic-0", "formal-0", "thin-user"])
    assert set(stored) == {"enthusiastic-0", "formal-0"}
    valid = [r for r in rows if isinstance(r["pair_id"], str) and r["chosen"] and r["user_id"] != "thin-user"]
    population = pair_differences(runtime, valid, list(range(9, 17)), "mean").mean(axis=0)
    np.testing.assert_allclose(reader.population().vectors, population, rtol=1e-3, atol=1e-3)
    for user, vec in stored.items():
        pairs = [r for r in valid if r["user_id"] == user]
        expected = shrink(pair_differences(runtime, pairs, vec.layers, "mean").mean(axis=0), len(pairs), population, 2.0)
        assert vec.layers == list(range(9, 17)) and vec.recommended_layers == [12]
        np.testing.assert_allclose(vec.vectors, expected, rtol=1e-3, atol=1e-3)
    # the two styles point in opposite directions at the recommended layer
    e, f = stored["enthusiastic-0"].at([12])[12], stored["formal-0"].at([12])[12]
    assert float(e @ f) / (np.linalg.norm(e) * np.linalg.norm(f)) < -0.5
    # BT: both share the population axis (θ₀ > 0); the styles sit on opposite sides of the first personal axis
    theta = reader.bt_theta(["enthusiastic-0", "formal-0"])
    assert theta["enthusiastic-0"][0] > 0 and theta["formal-0"][0] > 0
    assert theta["enthusiastic-0"][1] * theta["formal-0"][1] < 0
    assert min(abs(theta["enthusiastic-0"][1]), abs(theta["formal-0"][1])) > 0.5

    assert cli.main(["inspect", store_uri, *storage_flags(s3)]) == 0
    out = capsys.readouterr().out
    assert "users: 3 in = 2 stored + 1 quarantined" in out and "table vectors: 3 rows" in out

    assert cli.main(["generate", "--store", store_uri, "--user", "enthusiastic-0", "--prompt",
                     "Tell me about cats.", "--max_new_tokens", "16", *storage_flags(s3)]) == 0
    unsteered, steered = answers(capsys.readouterr().out)
    assert unsteered and steered and unsteered != steered


def test_dps_head_ablation_and_decoding_on_the_real_model():
    """Forked exact ablation equals a per-head loop, and γ = 0 is greedy, on SmolLM2 (9 query / 3 KV heads)."""
    import torch

    from steerstore.operators.runtime import HeadContrast

    runtime = ModelRuntime(ModelConfig())
    assert (runtime.num_layers, runtime.num_heads, runtime.num_kv_heads, runtime.head_dim) == (30, 9, 3, 64)
    enc = runtime.encode(["Write a short note about your weekend."], ["Honestly, the weekend was lovely and calm."])
    heads = [(0, 0), (1, 3), (1, 5), (11, 1), (23, 7), (29, 8)]
    base, ablated = runtime.ablation_nll(enc, heads)
    torch.testing.assert_close(base, runtime.sequence_nll(enc), rtol=1e-5, atol=1e-3)
    for i, head in enumerate(heads):
        torch.testing.assert_close(ablated[i], runtime.sequence_nll(enc, runtime.head_gates([[head]])),
                                   rtol=1e-5, atol=1e-3)
    assert (ablated - base).abs().max() > 1e-3
    prompts = ["Tell me about cats.", "What is rain?"]
    plain = runtime.generate(prompts, max_new_tokens=8)
    contrast = HeadContrast([[(1, 3), (11, 1)], [(23, 7)]], gamma=0.0)
    assert runtime.generate(prompts, max_new_tokens=8, contrast=contrast) == plain


# ---- llama.cpp runs the exports (steerstore verify-export) -----------------------------------------


@pytest.mark.parametrize("method, user", [("caa", "enthusiastic-0"), ("bt", "formal-0"), ("population", None)])
def test_llama_cpp_steers_with_the_exported_vectors_as_the_hf_path_does(s3, s3_store, tmp_path, capsys, method, user):
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed (make setup builds llama-cpp-python)")
    figures = tmp_path / "figures.json"
    argv = ["verify-export", "--engine", "llama.cpp", "--store", s3_store[0], "--method", method,
            "--json", str(figures), *storage_flags(s3)] + (["--user", user] if user else [])
    assert cli.main(argv) == 0, capsys.readouterr()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"llama.cpp vs HF · {method} · {user or 'population'}") and last.endswith("OK")
    result = json.loads(figures.read_text())
    assert result["ok"] and result["shift_cosine_min"] >= 0.9 and result["signal"] >= 4
    assert result["steered_agree"] == result["unsteered_agree"] == len(result["prompts"])
    for row in result["prompts"]:
        assert 0.5 < row["shift_norm_llama_cpp"] / row["shift_norm_hf"] < 2  # the same size of shift
        assert row["steered_same"] >= 2  # mostly HF's very tokens, not near ties


def test_verify_export_catches_a_sign_flipped_export_with_exit_1(s3, s3_store, monkeypatch, capsys):
    """The check can fail: an encoder that wrote -v (a sign convention bug) is caught."""
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed (make setup builds llama-cpp-python)")
    import dataclasses

    from steerstore.infra.exports import ENCODERS

    right = ENCODERS["gguf"]

    def flipped(item):
        v = item.vectors
        return right(dataclasses.replace(item, vectors=dataclasses.replace(v, vectors=-v.vectors)))

    monkeypatch.setitem(ENCODERS, "gguf", flipped)
    assert cli.main(["verify-export", "--store", s3_store[0], "--user", "enthusiastic-0", *storage_flags(s3)]) == 1
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert "FAILED: the exported file does not hold the store's vectors" in last  # read back by ggml
    assert "logit-shift cosine -" in last  # and in the engine, the shift points the other way
    assert "steerstore verify-export: llama.cpp vs HF" in captured.err


def test_a_second_control_vector_replaces_every_layer_of_the_first_in_llama_cpp(tmp_path):
    """llama.cpp overwrites only the layers a buffer covers: the engine pads, so no layer of the first stays."""
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed (make setup builds llama-cpp-python)")
    from steerstore.infra.exports import ExportItem, encode_gguf
    from steerstore.infra.reader import UserVectors
    from steerstore.operators.llamacpp import LlamaCpp
    from steerstore.operators.runtime.sources import DEFAULT_MODEL, packaged_gguf

    rng = np.random.default_rng(0)

    def cvec(name, layers):
        v = UserVectors("u", layers, rng.standard_normal((len(layers), 576)).astype(np.float32), layers, 1.0,
                        "all", "m", "fp", 1)
        path = tmp_path / name
        path.write_bytes(encode_gguf(ExportItem(v, "caa", "pairs", "v1", "llama")).files[".gguf"])
        return path

    ids = [1, 504, 3365, 314, 260, 3728, 30]
    early, both = cvec("early.gguf", [3]), cvec("both.gguf", [3, 20])
    engine = LlamaCpp(packaged_gguf(DEFAULT_MODEL), n_ctx=64)
    engine.set_control_vector(both, 4.0)
    steered_both = engine.next_logits(ids)
    engine.set_control_vector(early, 4.0)
    fresh = LlamaCpp(packaged_gguf(DEFAULT_MODEL), n_ctx=64)
    fresh.set_control_vector(early, 4.0)
    np.testing.assert_allclose(engine.next_logits(ids), fresh.next_logits(ids), rtol=1e-4, atol=1e-3)
    assert not engine.rows[19].any()
    assert np.abs(steered_both - fresh.next_logits(ids)).max() > 0.1  # layer 20 did steer before
