"""Model loading: config, device/dtype resolution, decoder-block lookup and a weights fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from steerstore.infra.config import check, option
from steerstore.operators.runtime.sources import DEFAULT_MODEL, resolve_model_path

# model_type -> attribute path of the ModuleList of decoder blocks. Each block's attention
# output projection is ``<block>.self_attn.o_proj`` in all of these.
DECODER_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
}


@dataclass
class ModelConfig:
    name_or_path: str = option(
        DEFAULT_MODEL,
        help="model to load: 'smollm2-135m-instruct' (packaged default), a local Hugging Face folder or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights/activations dtype; auto = bfloat16 on CUDA, float32 on CPU")
    device: str = option("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option(
        "sdpa", help="attention kernel passed to from_pretrained")
    max_batch_tokens: int = option(
        8192, help="padded tokens per forward micro-batch (sequences are length-bucketed to fill it)")
    max_backward_tokens: int = option(
        8192, help="padded tokens per micro-batch of a pass with a backward (DPS attribution): its saved "
                   "activations need several times a forward's memory (an 8B model: ~50 GB at 8192 tokens)")
    use_chat_template: bool = option(
        True, help="wrap prompts in the model's chat template when it has one")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the hub")

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "model.name_or_path must not be empty")
        check(self.max_batch_tokens >= 64 and self.max_backward_tokens >= 64,
              "model.max_batch_tokens and model.max_backward_tokens must be >= 64")


class UnsupportedArchitecture(ValueError):
    """The model's decoder blocks cannot be located; the message says how to add them."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM, by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_LAYER_PATHS.get(model_type or "")
    if path is None:
        raise UnsupportedArchitecture(
            f"steerstore does not know where the decoder blocks of model_type={model_type!r} are. "
            f"Supported: {sorted(DECODER_LAYER_PATHS)}. To add it, put the attribute path of its "
            "ModuleList of decoder blocks (e.g. 'model.layers') into DECODER_LAYER_PATHS in "
            "operators/runtime/loading.py; each block must return its hidden states and have "
            "self_attn.o_proj.")
    node = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            raise UnsupportedArchitecture(
                f"model_type={model_type!r}: expected decoder blocks at '{path}' but "
                f"'{part}' is missing; fix DECODER_LAYER_PATHS in operators/runtime/loading.py")
    return node  # type: ignore[return-value]


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap fingerprint of a model's weights: names, shapes and a strided sample of values.

    Values are rounded to bfloat16 before hashing, so the same weights loaded in float32 or
    bfloat16 give the same fingerprint, while different weights almost surely do not.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.bfloat16).to(torch.float32).cpu().numpy()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(values.tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def load_model(config: ModelConfig) -> tuple[torch.nn.Module, object]:
    """(model on its device, tokenizer) for ``config.name_or_path``; transformers is imported here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config.name_or_path)
    device = resolve_device(config)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(config, device), attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code)
    model.to(device)
    return model, tokenizer


def model_shape(config: ModelConfig) -> dict:
    """num_layers, hidden_size, num_heads of ``config``'s model from its config file alone (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_path(config.name_or_path),
                                     trust_remote_code=config.trust_remote_code)
    cfg = getattr(cfg, "text_config", None) or cfg
    return {"num_layers": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size),
            "num_heads": int(cfg.num_attention_heads)}
