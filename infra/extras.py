"""Optional dependencies, grouped as the package's extras: a clear error naming the extra to install.

Serving and export need only the core dependencies (S3 goes through pyarrow's own filesystem), and so
does the refresh with ``scale.max_drift_ratio=0``. The evaluation's metrics and report need
``steerstore[eval]``, and so does the refresh's content guard on steering strengths (BERTScore, on by
default); vLLM generation ``steerstore[vllm]``; the test suite ``steerstore[test]``.
"""

from __future__ import annotations

import importlib.util

# extra -> the import names it provides (kept in step with pyproject.toml's optional-dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    "eval": ("nltk", "bert_score", "sacrebleu", "rouge_score", "matplotlib"),
    "vllm": ("vllm", "aiohttp"),  # ray.data.llm's vLLM stage needs aiohttp too (ray[llm])
    "test": ("pytest", "moto", "boto3"),
}


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says which extra installs it."""


def missing(extra: str) -> list[str]:
    """The import names of ``extra`` that are not installed."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raise MissingExtra unless every package of ``extra`` is importable; ``what`` names the feature."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{what} needs the '{extra}' extra ({', '.join(absent)} not installed): "
                           f"pip install 'steerstore[{extra}]'")
