"""The refresh job on real local Ray with a tiny model: quarantine, reconciliation, store contents."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steerstore.infra.artifacts import compose
from steerstore.infra.config import from_dict
from steerstore.infra.reader import StoreReader
from steerstore.infra.store import SteeringStore
from steerstore.jobs import refresh
from steerstore.operators.caa import pair_differences
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.scale import ScaleConfig
from tests.tiny import answers

CAA = {"layers": [1, 2], "recommended_layers": [2], "scale": 2.0}


def pair(user, pid, k=0, **change):
    row = {"user_id": user, "pair_id": pid, "prompt": f"Tell me about thing {k}.",
           "chosen": "Wow, I absolutely love it!", "rejected": "Noted. Brief and formal.", "weight": 1.0}
    return {**row, **change}


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


def config(tmp_path, tiny_model_folder, pairs, histories=None, **extra):
    return from_dict(refresh.RefreshConfig, {
        "inputs": {"preference_pairs": pairs, "histories": histories},
        "output": {"store": str(tmp_path / "store")},
        "model": {"name_or_path": str(tiny_model_folder)},
        "validate": {"max_tokens": 48}, "caa": CAA, "ray": {"progress_bars": False},
        "scale": {"sample_pairs": 4, "grid": [1.0, 4.0]}, **extra})


ALICE_WEIGHTS = [1.0, 3.0, 0.5]  # unequal: the job scales them to mean 1 (alice counts as 3 pairs)


def alice_pairs():
    return [pair("alice", f"a{k}", k, weight=w) for k, w in enumerate(ALICE_WEIGHTS)]


def bob_pairs():
    return [pair("bob", f"b{k}", k + 5) for k in range(2)]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-input")
    good = alice_pairs() + bob_pairs()
    bad = [
        pair("alice", "a-empty", chosen=""),                      # empty text
        pair("alice", 12),                                         # wrong-typed id
        {k: v for k, v in pair("bob", "b-missing").items() if k != "prompt"},  # missing field
        pair("bob", "b0", 5),                                      # identical duplicate of b0: one copy kept
        pair("carol", "c0"), pair("carol", "c0", chosen="Other!"),  # conflicting duplicates: both dropped
        pair("carol", "c1"),                                       # carol keeps 1 pair: too few
        pair("dave", "d-long", chosen="word " * 80),               # over the token limit: dave has no valid pair
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", good + bad, extra_lines=['{"user_id": "erin", "pair_id": '])
    histories = write_jsonl(tmp_path / "histories.jsonl", [
        {"user_id": "alice", "item_id": "h1", "input": "Write.", "output": "I wrote this.", "timestamp": 5},
        {"user_id": "frank", "item_id": "h1", "input": "Write.", "output": "Only history.", "timestamp": "nope"},
    ])
    return pairs, histories


@pytest.fixture(scope="module")
def bad_input_run(ray_cluster, tmp_path_factory, tiny_model_folder, bad_input):
    """One refresh over the bad-input files, shared by the tests that inspect its store."""
    tmp_path = tmp_path_factory.mktemp("bad-input-run")
    summary = refresh.main(config(tmp_path, tiny_model_folder, *bad_input))
    return summary, str(tmp_path / "store")


def test_bad_rows_are_quarantined_with_reasons_and_every_user_reconciles(bad_input_run):
    summary, store_uri = bad_input_run
    reader = StoreReader(store_uri)
    users = {r["user_id"]: r for r in reader.users().to_pylist()}
    assert set(users) == {"alice", "bob", "carol", "dave", "frank"}
    assert {u for u, r in users.items() if r["status"] == "stored"} == {"alice", "bob"}
    assert summary["users_in"] == 5 and summary["users_stored"] == 2 and summary["users_quarantined"] == 3
    assert users["carol"]["reason"].startswith("user has 1 valid preference pair(s)")
    assert users["bob"]["n_pairs_in"] == 4 and users["bob"]["n_pairs_used"] == 2

    quarantine = reader.store.read_table("quarantine", reader.version).to_pylist()
    reasons = {(q["user_id"], q["record_id"]): q["reason"] for q in quarantine}
    assert reasons[("alice", "a-empty")] == "empty text in field 'chosen'"
    assert reasons[("alice", "12")] == "field 'pair_id' must be a string, got int"
    assert reasons[("bob", "b-missing")] == "missing field 'prompt'"
    assert reasons[("bob", "b0")].startswith("duplicate pair_id 'b0' (identical copy")
    assert "conflicting content" in reasons[("carol", "c0")]
    assert reasons[("dave", "d-long")].startswith("text over token limit")
    assert reasons[("frank", "h1")].startswith("timestamp 'nope' is not ISO-8601")
    assert any(q["user_id"] is None and q["reason"].startswith("invalid JSON") for q in quarantine)
    # every input row is accounted for: used, or in quarantine
    assert summary["input_rows"] == 5 + 8 + 1 + 2
    assert summary["rows_quarantined"] == 9 and summary["rows_without_user"] == 1
    assert summary["rows_kept"] == 7  # alice 3 pairs + 1 history, bob 2, carol 1


def test_stored_vectors_equal_a_direct_in_process_computation(bad_input_run, tiny_model_folder):
    reader = StoreReader(bad_input_run[1])
    stored = reader.vectors(["alice", "bob", "carol"])
    assert set(stored) == {"alice", "bob"}
    rt = ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))
    d_alice = pair_differences(rt, alice_pairs(), [1, 2], "mean").astype(np.float64)  # (3, layers, hidden)
    d_bob = pair_differences(rt, bob_pairs(), [1, 2], "mean").astype(np.float64)
    w = np.asarray(ALICE_WEIGHTS)
    own_alice = (w[:, None, None] * d_alice).sum(axis=0) / w.sum()  # weighted mean: 1·d0 + 3·d1 + 0.5·d2 over 4.5
    own_bob = d_bob.mean(axis=0)
    # each user weighs in by their number of pairs (3 and 2), whatever the scale of their weights
    population = (3 * own_alice + 2 * own_bob) / 5
    kappa = 2.0  # the default κ: 2 pseudo-pairs of the population
    expected = {"alice": (3 * own_alice + kappa * population) / (3 + kappa),
                "bob": (2 * own_bob + kappa * population) / (2 + kappa)}
    for uid in ("alice", "bob"):
        np.testing.assert_allclose(stored[uid].vectors, expected[uid], rtol=1e-4, atol=1e-5)
        assert stored[uid].model_fingerprint == rt.fingerprint == reader.manifest["model"]["fingerprint"]
    assert stored["alice"].n_pairs == 3
    # the unequal weights matter: the plain mean would be a different vector
    plain = (3 * d_alice.mean(axis=0) + kappa * population) / (3 + kappa)
    assert np.abs(plain - expected["alice"]).max() > 1e-3
    stored_population = reader.population()
    np.testing.assert_allclose(stored_population.vectors, population, rtol=1e-4, atol=1e-5)
    assert stored_population.n_pairs == 5


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Equal Arrow types, whatever the list children are named (Parquet names them "element")."""
    if pa.types.is_list(a) or pa.types.is_fixed_size_list(a):
        return (type(a) is type(b) and getattr(a, "list_size", None) == getattr(b, "list_size", None)
                and _same_type(a.value_type, b.value_type))
    if pa.types.is_struct(a):
        return pa.types.is_struct(b) and [f.name for f in a] == [f.name for f in b] and \
            all(_same_type(x.type, y.type) for x, y in zip(a, b))
    return a.equals(b)


def test_every_store_table_is_written_with_its_explicit_schema(bad_input_run):
    from steerstore.schemas.store import STORE_TABLES, schema_from_b64, vectors_schema

    store = SteeringStore(bad_input_run[1])
    version = store.latest()
    manifest = store.read_manifest(version)
    physical = vectors_schema(manifest["model"]["hidden_size"], "float32")
    assert manifest["vector_dtype"] == "float32"
    assert schema_from_b64(manifest["tables"]["vectors"]["schema"]).equals(physical)
    for name, schema in {**STORE_TABLES, "vectors": physical}.items():
        files = store.table_files(version, name)
        assert files, name
        for f in files:
            got = pq.read_schema(f)
            assert got.names == schema.names, name
            assert all(_same_type(g.type, w.type) for g, w in zip(got, schema)), (name, got, schema)
    assert manifest["tables"]["vectors"]["rows"] == 3 and manifest["summary"]["users_in"] == 5
    assert manifest["tables"]["bt_coords"]["rows"] == 2 and manifest["tables"]["bt_basis"]["rows"] == 2


def test_a_second_run_publishes_a_new_immutable_version_and_moves_latest(ray_cluster, tmp_path, tiny_model_folder):
    pairs = write_jsonl(tmp_path / "p.jsonl", [pair("u", f"p{k}", k) for k in range(2)])
    first = refresh.main(config(tmp_path, tiny_model_folder, pairs))["version"]
    pairs2 = write_jsonl(tmp_path / "p2.parquet.jsonl", [pair("u", f"p{k}", k) for k in range(3)])
    second = refresh.main(config(tmp_path, tiny_model_folder, pairs2))["version"]
    store = SteeringStore(str(tmp_path / "store"))
    assert store.versions() == sorted([first, second]) and store.latest() == second
    assert StoreReader(store.uri, version=first).vectors(["u"])["u"].n_pairs == 2
    assert StoreReader(store.uri).vectors(["u"])["u"].n_pairs == 3


def test_parquet_inputs_are_read_like_jsonl(ray_cluster, tmp_path, tiny_model_folder):
    rows = [pair("p", f"p{k}", k) for k in range(2)] + [pair("q", "q0", chosen="")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    summary = refresh.main(config(tmp_path, tiny_model_folder, str(tmp_path / "pairs.parquet")))
    assert summary["users_stored"] == 1 and summary["users_quarantined"] == 1 and summary["rows_quarantined"] == 1


def test_generate_prints_unsteered_and_steered_answers_for_a_stored_user(bad_input_run, capsys):
    from steerstore.jobs import cli

    assert cli.main(["generate", "--store", bad_input_run[1], "--user", "alice", "--prompt", "Hi",
                     "--max_new_tokens", "6", "--scale", "8"]) == 0
    out = capsys.readouterr().out
    assert "user alice · method caa · layers [2] · alpha 8" in out
    plain, steered = answers(out)
    assert steered != plain  # α 8 on the tiny model changes the greedy answer
    for method in ("bt", "population"):
        assert cli.main(["generate", "--store", bad_input_run[1], "--user", "alice", "--prompt", "Hi",
                         "--max_new_tokens", "4", "--method", method]) == 0
        out = capsys.readouterr().out
        assert f"method {method}" in out
        plain, steered = answers(out)  # an answer the steering did not change is said so
        assert ("note: the steered answer equals the unsteered one" in out) == (plain == steered)


def test_generate_for_a_quarantined_user_says_why_it_has_no_vectors(bad_input_run, capsys):
    from steerstore.jobs import cli

    assert cli.main(["generate", "--store", bad_input_run[1], "--user", "carol", "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    # no method named: the store's recommendation, and carol has no artifact at all
    assert "'carol' has no artifacts" in err and "quarantined: user has 1 valid preference pair(s)" in err


def test_serving_refuses_a_model_whose_weights_differ_from_the_store(bad_input_run, tmp_path, capsys):
    from steerstore.infra.reader import FingerprintMismatch
    from steerstore.jobs.generate import load_runtime_for
    from tests.tiny import save_tiny

    from steerstore.jobs import cli

    other = save_tiny(tmp_path / "other", seed=1)
    uri = bad_input_run[1]
    with pytest.raises(FingerprintMismatch, match=rf"model '{other}' has weights fingerprint .* built with") as raised:
        load_runtime_for(StoreReader(uri), str(other))
    assert f"`steerstore model --store {uri}` prints where it is" in str(raised.value)
    # the model to serve with, printed and checked against the store's fingerprint
    assert cli.main(["model", "--store", uri, "--check"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == StoreReader(uri).manifest["model"]["name_or_path"] and "checked: " in out


def test_inspect_describes_versions_tables_and_model(bad_input_run, capsys):
    from steerstore.jobs import cli

    summary, uri = bad_input_run
    assert cli.main(["inspect", uri]) == 0
    out = capsys.readouterr().out
    assert f"{summary['version']} (LATEST)" in out and "users: 5 in = 2 stored + 3 quarantined" in out
    assert "by method: bt 2, caa 2" in out and "table quarantine: 12 rows" in out
    assert "weights fingerprint " + StoreReader(uri).manifest["model"]["fingerprint"] in out
    assert re.search(r"^\s+1  missing field '…'$", out, flags=re.MULTILINE), out  # reasons, values masked
    assert "KiB per stored user" in out and "fixed_size_list" not in out  # schemas only with --schema
    assert cli.main(["inspect", uri, "--schema", "true"]) == 0
    assert "vectors: list<item: fixed_size_list<item: float>[" in capsys.readouterr().out
    assert cli.main(["inspect", uri, "--users", "true", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["alice\tcaa,bt", "bob\tcaa,bt"] and "(1-2 of 5; --offset 2 for more)" in out
    assert cli.main(["inspect", uri, "--user", "carol"]) == 0
    out = capsys.readouterr().out
    assert "status quarantined (user has 1 valid preference pair(s)" in out and "caa: none — user 'carol'" in out
    assert "quarantined prepare c0: " in out or "quarantined validate c0: " in out
    assert cli.main(["inspect", uri, "--version", "nope"]) == 1
    assert f"its versions: {summary['version']}" in capsys.readouterr().err


def test_a_store_with_no_published_version_gives_a_clear_error(tmp_path, capsys):
    from steerstore.jobs import cli

    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "steerstore refresh" in capsys.readouterr().err


def test_a_run_where_every_user_is_quarantined_is_refused_or_when_allowed_publishes_a_consistent_version(
        ray_cluster, tmp_path, tiny_model_folder):
    folder = tmp_path / "inputs"
    folder.mkdir()
    write_jsonl(folder / "part-1.jsonl", [pair("solo", "s0")])
    write_jsonl(folder / "part-2.jsonl", [pair("other", "o0", chosen="")])
    with pytest.raises(refresh.PublishRefused, match=r"it stores 0 users \(publish.min_users=1; 2 users in"):
        refresh.main(config(tmp_path, tiny_model_folder, str(folder)))  # a folder of JSONL files
    summary = refresh.main(config(tmp_path, tiny_model_folder, str(folder), publish={"min_users": 0}))
    assert (summary["users_in"], summary["users_stored"], summary["users_quarantined"]) == (2, 0, 2)
    reader = StoreReader(str(tmp_path / "store"))
    assert reader.vectors(["solo"]) == {} and reader.population() is None
    assert reader.store.read_table("vectors", reader.version).num_rows == 0


def test_bt_ideal_points_and_the_basis_are_stored_and_compose_into_vectors(bad_input_run, tiny_model_folder):
    reader = StoreReader(bad_input_run[1])
    assert reader.manifest["methods"] == ["caa", "bt"]
    basis = reader.bt_basis()
    axes = np.stack([np.asarray(a) for a in basis.column("axes").to_pylist()])  # (layers, k, hidden)
    assert basis.column("layer").to_pylist() == [1, 2] and axes.shape[1] == 8
    for l in range(2):
        np.testing.assert_allclose(axes[l] @ axes[l].T, np.eye(8), atol=1e-4)
    population = reader.population()
    np.testing.assert_allclose(axes[:, 0], population.vectors / np.linalg.norm(population.vectors, axis=-1)[:, None],
                               atol=1e-4)  # two users: the basis sample is everyone, so axis 0 = population
    thetas = reader.bt_theta(["alice", "bob", "carol"])
    assert set(thetas) == {"alice", "bob"} and all(t.shape == (8,) for t in thetas.values())
    composed = reader.bt(["alice"])["alice"]
    norms = basis.column("population_norm").to_numpy()
    np.testing.assert_allclose(composed.vectors, compose(thetas["alice"], axes, norms), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(composed.vectors, axis=-1), norms, rtol=1e-4)
    coords = {r["user_id"]: r for r in reader.store.read_table("bt_coords", reader.version).to_pylist()}
    assert coords["alice"]["n_pairs"] == 3 and coords["bob"]["n_pairs"] == 2
    # train accuracy and log-likelihood recomputed from each pair's features x = mean_l B_l d_l / s_l and θ
    rt = ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))
    s = basis.column("feature_norm").to_numpy().astype(np.float64)
    for uid, pairs, w in (("alice", alice_pairs(), np.asarray(ALICE_WEIGHTS)), ("bob", bob_pairs(), np.ones(2))):
        d = pair_differences(rt, pairs, [1, 2], "mean").astype(np.float64)  # (pairs, layers, hidden)
        x = np.mean([d[:, l] @ axes[l].astype(np.float64).T / s[l] for l in range(2)], axis=0)  # (pairs, k)
        z = x @ thetas[uid].astype(np.float64)
        assert coords[uid]["train_accuracy"] == pytest.approx(np.count_nonzero(z > 0) / len(z)), uid
        w = w * len(w) / w.sum()  # the pair weights scaled to mean 1
        loglik = float(np.sum(w * np.log(1 / (1 + np.exp(-z)))))
        assert coords[uid]["log_likelihood"] == pytest.approx(loglik, rel=1e-3, abs=1e-4), uid


def test_the_recommended_scale_of_each_method_is_chosen_on_training_pairs(bad_input_run):
    reader = StoreReader(bad_input_run[1])
    choice = reader.manifest["scale_choice"]
    assert set(choice) >= {"population", "caa", "bt"} and choice["pairs"] == 4
    assert choice["pairs_scored"].startswith("out of sample")  # leave-one-pair-out vectors and θ
    budget, ratio = ScaleConfig().max_nll_increase, ScaleConfig().max_perplexity_ratio  # the default guards
    for method in ("population", "caa", "bt"):
        curve = choice[method]["curve"]
        assert [c["alpha"] for c in curve] == [1.0, 4.0]
        assert all(c["perplexity_ratio"] > 0 for c in curve) and choice[method]["plain_perplexity"] > 1
        # the rule: among α whose NLL rise and decoded answers' perplexity ratio stay within the guards (none: the
        # smallest α), the best accuracy, then the larger mean margin, then the smaller α
        # the content guard: at most max_drift_ratio × the drift the history prompt causes to the unsteered answers
        limit = choice[method]["drift_limit"]
        assert limit == pytest.approx(ScaleConfig().max_drift_ratio * choice[method]["drift_reference"]) and limit > 0
        assert all(-1e-6 <= c["content_drift"] <= 1 + 1e-6 and c["drift_limit"] == limit for c in curve)
        fluent = [c for c in curve if c["nll_increase"] <= budget and c["perplexity_ratio"] <= ratio
                  and c["content_drift"] <= limit]
        if not fluent:
            want = min(c["alpha"] for c in curve)
        else:
            top = [c for c in fluent if c["accuracy"] == max(f["accuracy"] for f in fluent)]
            top = [c for c in top if c["mean_margin"] == max(t["mean_margin"] for t in top)]
            want = min(c["alpha"] for c in top)
        assert choice[method]["alpha"] == want, (method, curve)
    # and again on top of each pair's user's retrieved history items (the composed condition)
    composed = choice["history"]
    assert 1 <= composed["pairs"] <= 4 and composed["history_items"] == ScaleConfig().history_items
    for method in ("population", "caa", "bt"):
        assert [c["alpha"] for c in composed[method]["curve"]] == [1.0, 4.0] and composed[method]["alpha"] in (1.0, 4.0)
        assert composed[method]["drift_reference"] == choice[method]["drift_reference"]  # the plain condition's
        assert all("content_drift" in c for c in composed[method]["curve"])
    assert reader.population().recommended_scale == choice["population"]["alpha"]
    assert reader.vectors(["alice"])["alice"].recommended_scale == choice["caa"]["alpha"]
    assert reader.bt(["alice"])["alice"].recommended_scale == choice["bt"]["alpha"]


def test_composed_strengths_show_each_pairs_user_history_but_never_the_item_the_pair_was_made_from():
    from steerstore.jobs.refresh.globals import _composed_pairs, _composed_scales

    composed = ScaleConfig().composed
    pairs = [{"prompt": "Tell me about cats.", "chosen": "Cats rule.", "rejected": "Meh."},
             {"prompt": "Tell me about dogs.", "chosen": "Dogs!", "rejected": "Meh."}]
    rows = {"u": {"histories": [{"input": "Tell me about cats.", "output": "Cats rule."},
                                {"input": "Tell me about birds.", "output": "Birds sing."}]},
            "v": {"histories": [{"input": "Tell me about dogs.", "output": "Dogs!"}]}}  # only its pair's own item
    methods = {"caa": {1: np.arange(2 * 3, dtype=np.float32).reshape(2, 3)}}
    called = {}

    class Pool:
        def first(self, name, shown, subset, positions, drift_reference):
            called.update(name=name, shown=shown, subset=subset, positions=positions, reference=drift_reference)
            return {"caa": {"alpha": 2.0, "curve": []}}

    keep, shown_pairs = _composed_pairs(composed, [("u", 0), ("v", 0)], rows, pairs)
    assert keep == [0]  # v's only item is its pair's own: v's pair is left out
    out = _composed_scales(Pool(), composed, keep, shown_pairs, methods, "response", 0.4)
    assert out == {"caa": {"alpha": 2.0, "curve": []}, "pairs": 1, "history_items": 2, "history_chars": 600}
    [shown] = called["shown"]
    assert called["reference"] == 0.4  # the content guard's reference, measured in the plain condition
    assert "Birds sing." in shown["prompt"] and "Cats rule." not in shown["prompt"].split("Prompt: Tell me about cats.")[0]
    assert shown["prompt"].endswith("Prompt: Tell me about cats.") and shown["chosen"] == "Cats rule."
    np.testing.assert_array_equal(called["subset"]["caa"][1], methods["caa"][1][[0]])
    rows = {u: {"histories": []} for u in rows}
    assert _composed_pairs(composed, [("u", 0), ("v", 0)], rows, pairs) == ([], [])
    assert _composed_scales(None, composed, [], [], methods, "response", None) == {
        "skipped": "no sampled pair's user has history items to show"}


def test_margin_gradient_directions_are_stored_as_caa_vectors_are(ray_cluster, tmp_path, tiny_model_folder):
    """caa.direction=margin_gradient: each pair contributes its margin's gradient at its activation difference's
    norm, and the stored user vectors and population are the same weighted, shrunk means of those."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", alice_pairs() + bob_pairs())
    cfg = config(tmp_path, tiny_model_folder, pairs, None, caa=dict(CAA, direction="margin_gradient"))
    refresh.main(cfg)
    reader = StoreReader(str(tmp_path / "store"))
    stored = reader.vectors(["alice", "bob"])
    rt = ModelRuntime(ModelConfig(name_or_path=str(tiny_model_folder)))
    e_alice = pair_differences(rt, alice_pairs(), [1, 2], "mean", "margin_gradient").astype(np.float64)
    e_bob = pair_differences(rt, bob_pairs(), [1, 2], "mean", "margin_gradient").astype(np.float64)
    d_bob = pair_differences(rt, bob_pairs(), [1, 2], "mean")
    np.testing.assert_allclose(np.linalg.norm(e_bob, axis=-1), np.linalg.norm(d_bob, axis=-1), rtol=1e-4)
    w = np.asarray(ALICE_WEIGHTS)
    own_alice = (w[:, None, None] * e_alice).sum(axis=0) / w.sum()
    own_bob = e_bob.mean(axis=0)
    population = (3 * own_alice + 2 * own_bob) / 5
    np.testing.assert_allclose(stored["alice"].vectors, (3 * own_alice + 2 * population) / 5, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored["bob"].vectors, (2 * own_bob + 2 * population) / 4, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reader.population().vectors, population, rtol=1e-4, atol=1e-5)
    # not the activation differences' means
    d_alice = pair_differences(rt, alice_pairs(), [1, 2], "mean").astype(np.float64)
    assert np.abs((w[:, None, None] * d_alice).sum(axis=0) / w.sum() - own_alice).max() > 1e-3
