import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_runtime():
    from operators.runtime import ModelConfig, ModelRuntime
    from tests.tiny import tiny_model, tiny_tokenizer

    return ModelRuntime(ModelConfig(name_or_path="tiny-llama"), model=tiny_model(), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="session")
def ray_cluster():
    """One small embedded Ray for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    from tests.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-model"))
