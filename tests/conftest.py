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
