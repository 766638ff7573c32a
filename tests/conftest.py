import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests honest about cost: `make test-fast` (-m "not slow") runs tiny random models only. A test that
# uses one of these fixtures is marked slow here; one that starts Ray, the S3 server, Chromium or loads
# the real default model or sentence encoder any other way without the mark fails (see _cost_guard).
HEAVY_FIXTURES = {"ray_cluster", "served_store", "s3_server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _cost_guard(request, monkeypatch):
    """Outside ``slow`` tests, refuse what makes a test slow, naming the fix."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what):
        def fn(*args, **kwargs):
            pytest.fail(f"this test {what}: mark it @pytest.mark.slow (make test-fast runs tiny models only)",
                        pytrace=False)
        return fn

    def packaged_only(real, what):
        from steerstore.operators.runtime import sources

        def fn(name, *args, **kwargs):
            if name in sources.PACKAGED_NAMES:
                refuse(what)()
            return real(name, *args, **kwargs)
        return fn

    import ray

    import tests.browser
    import tests.s3server
    from steerstore.operators import cluster
    from steerstore.operators.runtime import loading, sources, text

    monkeypatch.setattr(ray, "init", refuse("starts Ray"))
    monkeypatch.setattr(tests.s3server.S3Server, "start", refuse("starts the S3 test server"))
    monkeypatch.setattr(tests.browser, "_run", refuse("runs headless Chromium"))
    for module in (loading, text, sources):
        monkeypatch.setattr(module, "resolve_model_path",
                            packaged_only(sources.resolve_model_path, "loads the real default model"))
    for module in (sources, cluster):
        monkeypatch.setattr(module, "resolve_encoder_path",
                            packaged_only(sources.resolve_encoder_path, "loads the sentence encoder"))


@pytest.fixture(scope="session")
def tiny_runtime():
    from steerstore.operators.runtime import ModelConfig, ModelRuntime
    from tests.tiny import tiny_model, tiny_tokenizer

    return ModelRuntime(ModelConfig(name_or_path="tiny-llama"), model=tiny_model(), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def ray_cluster():
    """One small embedded Ray for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    from tests.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def served_store(ray_cluster, tmp_path_factory, tiny_model_folder):
    """A store on the tiny model with every method (CAA, BT, DPS, SteerX vectors and descriptions).

    Descriptions are written by the real default model (the tiny one writes no sentences).

    Shared by the serving, lookup and export tests. Returns (store URI, model folder).
    """
    from steerstore.infra.config import from_dict
    from steerstore.jobs import refresh
    from tests.tiny import write_jsonl

    tmp = tmp_path_factory.mktemp("served-store")
    styles = {"ann": "Wow, I absolutely love it! Amazing!", "ben": "Noted. Brief and formal.",
              "cat": "Wow, fantastic and wonderful!", "dan": "The quick brown fox."}
    histories = [{"user_id": u, "item_id": f"{u}{i}", "input": f"Tell me about thing {i}.",
                  "output": f"{text} {i}", "timestamp": i} for u, text in styles.items() for i in range(3)]
    pairs = [{"user_id": u, "pair_id": f"{u}p{k}", "prompt": f"Tell me about thing {k}.",
              "chosen": styles[u], "rejected": "Meh. Fine.", "weight": 1.0} for u in styles for k in range(3)]
    cfg = from_dict(refresh.RefreshConfig, {
        "inputs": {"preference_pairs": write_jsonl(tmp / "pairs.jsonl", pairs),
                   "histories": write_jsonl(tmp / "histories.jsonl", histories)},
        # two users per bucket file and a row group per row or two: lookups must find users across them
        "output": {"store": str(tmp / "store"), "users_per_bucket": 2, "min_buckets": 1, "row_group_bytes": 1024},
        "model": {"name_or_path": str(tiny_model_folder)},
        "validate": {"max_tokens": 48}, "caa": {"layers": [0, 1, 2], "recommended_layers": [1, 2]},
        "bt": {"k": 2}, "ray": {"progress_bars": False},
        # no content guard: the serving tests need strengths that visibly change a tiny random model's few greedy
        # tokens, and its drift against the history prompt's means nothing (the guard is tested on its own)
        "scale": {"sample_pairs": 4, "grid": [1.0, 4.0], "max_drift_ratio": 0},
        "dps": {"mode": "fast", "top_k": 3, "candidates": 6, "clusters": 2, "cluster_items": 4,
                "pcs_baseline": "none", "history": {"context_items": 1}},
        "steerx": {"min_anchors": 1, "history": {"context_items": 1}, "smoothing": {"max_new_tokens": 48, "model": {"name_or_path": "smollm2-135m-instruct"}},
                   "vectors": {"layers": [1, 3], "calibration_users": 2, "gamma_grid": [0.5, 1],
                               "neutral_max_new_tokens": 4}}})
    refresh.main(cfg)
    return str(tmp / "store"), str(tiny_model_folder)
