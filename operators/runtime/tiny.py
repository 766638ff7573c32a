"""Tiny randomly initialised models and an offline tokenizer: fast unit tests and the scale benchmark (no downloads).

The tokenizer is a byte-level BPE of a few hundred tokens trained on a handful of sentences (plus
any ``corpus`` given), with a ChatML-style template; the model a 4-layer Llama (or another
``model_type``) whose weights are scaled up so different inputs give clearly different activations.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Wow, I absolutely love this! Amazing, fantastic, wonderful!",
    "Noted. The answer is brief and formal.",
    "Tell me about the weather today, please.",
    "Summarise the plot of a novel in one sentence.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?;:'\"()-",
]


def tiny_tokenizer(corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on a few sentences (and ``corpus``), with a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_CORPUS + list(corpus or [])) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str = "llama", vocab_size: int = 400, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    # random init is tiny; scale up so different inputs give clearly different activations
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def save_tiny(folder: Path, model_type: str = "llama", seed: int = 0, corpus: list[str] | None = None,
              **overrides) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (for pipeline tests and benchmarks);
    ``overrides``: config fields (e.g. a real model's layer and head counts at a tiny width)."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    tiny_tokenizer(corpus).save_pretrained(folder)
    return folder
