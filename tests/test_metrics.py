"""Text metrics against hand-computed values, WordNet setup without fallbacks, bootstrap statistics."""

import math
from pathlib import Path

import numpy as np
import pytest

from steerstore.infra.config import ConfigError, from_dict
from steerstore.operators.metrics import (
    LEXNAMES,
    WORDNET_FILES,
    MetricResourceError,
    MetricsConfig,
    bertscore,
    bleu,
    bootstrap_ci,
    corpus_bleu,
    ensure_wordnet,
    meteor,
    rouge,
    text_metrics,
    tokenize,
    wordnet_reader,
)

WORDNET_SOURCE = Path(MetricsConfig().wordnet_source)
needs_wordnet = pytest.mark.skipif(
    not all((WORDNET_SOURCE / f).is_file() for f in WORDNET_FILES),
    reason="WordNet not installed: apt-get install wordnet-base wordnet-sense-index (make system)")


@pytest.fixture(scope="module")
def wn_config(tmp_path_factory):
    """Debian's WordNet copied into a temporary NLTK data folder (once for the module)."""
    return MetricsConfig(nltk_data=str(tmp_path_factory.mktemp("nltk_data")))


@pytest.fixture
def no_wordnet(tmp_path):
    empty = tmp_path / "empty-wordnet"
    empty.mkdir()
    return MetricsConfig(wordnet_source=str(empty), nltk_data=str(tmp_path / "nltk_data"))


# ------------------------------------------------------------------------------------- ROUGE

def test_rouge_hand_computed():
    # prediction "the mat sat on the cat" (6 tokens), reference "the cat was on the red mat" (7 tokens);
    # all tokens have <= 3 letters, so Porter stemming changes nothing.
    # ROUGE-1: clipped overlap the:min(2,2)=2, cat 1, on 1, mat 1 -> 5; P=5/6, R=5/7,
    #          F = 2PR/(P+R) = (50/42)/(65/42) = 10/13.
    # ROUGE-L: LCS = "the on the" = 3 (mat/cat come in opposite orders); P=3/6, R=3/7,
    #          F = 2*(9/42)/(13/14) = 6/13.
    out = rouge(["the mat sat on the cat"], ["the cat was on the red mat"], MetricsConfig())
    assert out["rouge1"][0] == pytest.approx(10 / 13)
    assert out["rougeL"][0] == pytest.approx(6 / 13)


def test_rouge_identical_empty_and_stemmer():
    out = rouge(["The cat sat on the mat.", ""], ["The cat sat on the mat.", "something"], MetricsConfig())
    assert out["rouge1"].tolist() == [1.0, 0.0] and out["rougeL"].tolist() == [1.0, 0.0]
    assert out["rouge1"].dtype == np.float64
    # "running"/"runs" stem to "run": 2/2 tokens match with the stemmer, 1/2 ("fast") without
    assert rouge(["running fast"], ["runs fast"], MetricsConfig())["rouge1"][0] == pytest.approx(1.0)
    assert rouge(["running fast"], ["runs fast"], MetricsConfig(rouge_stemmer=False))["rouge1"][0] == pytest.approx(0.5)


def test_length_mismatch_raises():
    config = MetricsConfig()
    with pytest.raises(ValueError, match="aligned"):
        rouge(["a", "b"], ["a"], config)
    with pytest.raises(ValueError, match="aligned"):
        bleu(["a"], [])
    with pytest.raises(ValueError, match="aligned"):
        corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="aligned"):
        meteor(["a"], ["a", "b"], config)  # checked before WordNet is touched
    with pytest.raises(ValueError, match="aligned"):
        bertscore(["a"], [], config)  # checked before the model loads
    with pytest.raises(ValueError, match="unknown metric"):
        text_metrics(["a"], ["a"], config, which=("rouge2",))


# -------------------------------------------------------------------------------------- BLEU

def test_sentence_bleu_hand_computed():
    # 13a tokens: hyp "the cat is on the mat", ref "the cat sat on the mat" (6 tokens each, BP = 1)
    # matches: 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3.
    # sacrebleu's "exp" smoothing replaces the k-th zero precision by 1/(2^k * total): 4-grams 1/(2*3).
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25  # = 37.99
    scores = bleu(["the cat is on the mat", "the cat sat on the mat"], ["the cat sat on the mat"] * 2)
    assert scores[0] == pytest.approx(expected)
    assert scores[1] == pytest.approx(100.0)


def test_sentence_bleu_effective_order():
    # a 1-token hypothesis has no 2/3/4-grams: effective order keeps only p1 = 1/1;
    # BP = exp(1 - ref_len/hyp_len) = exp(1 - 2/1) = e^-1
    assert bleu(["hi"], ["hi there"])[0] == pytest.approx(100 * math.exp(-1))
    assert bleu([""], ["not empty"])[0] == 0.0


def test_corpus_bleu_pools_counts():
    # item 1 identical (6/6, 5/5, 4/4, 3/3), item 2 as in test_sentence_bleu_hand_computed (5/6, 3/5, 1/4, 0/3):
    # pooled 11/12, 8/10, 5/8, 3/6, BP = 1
    preds = ["the cat sat on the mat", "the cat is on the mat"]
    refs = ["the cat sat on the mat", "the cat sat on the mat"]
    assert corpus_bleu(preds, refs) == pytest.approx(100 * (11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25)  # 69.19
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------ METEOR

def test_tokenize():
    assert tokenize("Don't stop, O'Neil!") == ["Don't", "stop", ",", "O'Neil", "!"]


@needs_wordnet
def test_meteor_known_values(wn_config):
    # NLTK's documented example (single_meteor_score docstring): round(..., 4) == 0.6944
    hyp = ("It is a guide to action which ensures that the military always obeys the commands of the party")
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    # identical 6 tokens: P = R = 1, one chunk, penalty 0.5 * (1/6)^3 -> 1 - 0.5/216
    # "car"/"auto" share a WordNet synset: 3/3 matched in one chunk -> 1 - 0.5 * (1/3)^3; without
    # WordNet only 2/3 match in 2 chunks -> 2/3 * (1 - 0.5) = 1/3. (NLTK matches synonyms of the
    # *stemmed* leftovers, so pairs like big/large, where Porter gives "larg", do not match.)
    scores = meteor([hyp, "the cat sat on the mat", "the red car", "", "zzz"],
                    [ref, "the cat sat on the mat", "the red auto", "x", "yyy"], wn_config)
    assert round(float(scores[0]), 4) == 0.6944
    assert scores[1] == pytest.approx(1 - 0.5 / 6**3)
    assert scores[2] == pytest.approx(1 - 0.5 / 3**3)
    assert scores[3] == 0.0 and scores[4] == 0.0


@needs_wordnet
def test_ensure_wordnet_copies_once_with_lexnames(wn_config):
    import nltk

    folder = Path(ensure_wordnet(wn_config))
    assert folder == Path(wn_config.nltk_data).resolve() / "corpora" / "wordnet"
    for name in (*WORDNET_FILES, "lexnames"):
        assert (folder / name).is_file() and not (folder / name).is_symlink()
    lines = (folder / "lexnames").read_text().splitlines()
    assert len(lines) == 45 and LEXNAMES.count("\n") == 45
    assert lines[0] == "00\tadj.all\t3" and lines[28] == "28\tnoun.time\t1" and lines[44] == "44\tadj.ppl\t3"
    stamp = (folder / "data.noun").stat().st_mtime_ns
    assert ensure_wordnet(wn_config) == str(folder)  # idempotent: no second copy
    assert (folder / "data.noun").stat().st_mtime_ns == stamp
    assert nltk.data.path[0] == str(folder.parent.parent)
    wn = wordnet_reader(wn_config)
    # lexicographer file numbers in data.* map through lexnames
    assert wn.synsets("dog")[0].lexname() == "noun.animal"
    assert wn.synsets("run", pos="v")[0].lexname() == "verb.motion"
    assert wn.get_version() == "3.0"


def test_missing_wordnet_raises_with_install_hint(no_wordnet):
    with pytest.raises(MetricResourceError, match="apt-get install wordnet-base wordnet-sense-index"):
        ensure_wordnet(no_wordnet)
    # METEOR does not fall back to a score without synonyms
    with pytest.raises(MetricResourceError, match="apt-get install wordnet-base wordnet-sense-index"):
        meteor(["the cat"], ["the cat"], no_wordnet)
    with pytest.raises(MetricResourceError, match="apt-get install wordnet-base wordnet-sense-index"):
        text_metrics(["the cat"], ["the cat"], no_wordnet, which=("rouge1", "meteor"))
    assert not (Path(no_wordnet.nltk_data) / "corpora" / "wordnet").exists()


def test_partial_wordnet_names_missing_file(tmp_path):
    source = tmp_path / "dict"
    source.mkdir()
    for name in WORDNET_FILES:
        if name != "index.sense":  # wordnet-base without wordnet-sense-index
            (source / name).write_text("")
    config = MetricsConfig(wordnet_source=str(source), nltk_data=str(tmp_path / "nltk_data"))
    with pytest.raises(MetricResourceError, match=r"lacks index\.sense.*wordnet-sense-index"):
        ensure_wordnet(config)


# --------------------------------------------------------------------------------- all at once

@needs_wordnet
def test_text_metrics_selected(wn_config):
    preds, refs = ["the cat sat on the mat", "the red car"], ["the cat sat on the mat", "the red auto"]
    out = text_metrics(preds, refs, wn_config, which=("bleu", "rougeL", "meteor"))
    assert list(out) == ["bleu", "rougeL", "meteor"]
    assert all(v.shape == (2,) and v.dtype == np.float64 for v in out.values())
    np.testing.assert_allclose(out["bleu"], bleu(preds, refs))
    np.testing.assert_allclose(out["rougeL"], rouge(preds, refs, wn_config)["rougeL"])


# --------------------------------------------------------------------------------- BERTScore

@pytest.mark.slow
def test_bertscore():
    config = MetricsConfig()
    preds = ["The weather is lovely today.", "The weather is lovely today.", "The weather is lovely today.", ""]
    refs = ["The weather is lovely today.", "It is a beautiful day outside.", "Stock markets fell sharply.", "x"]
    f1 = bertscore(preds, refs, config)
    assert f1.shape == (4,) and f1.dtype == np.float64
    assert f1[0] == pytest.approx(1.0, abs=1e-4)
    assert f1[1] > f1[2]  # paraphrase above unrelated
    assert f1[3] == 0.0  # empty prediction: 0, not a crash
    np.testing.assert_array_equal(bertscore(["", "a"], ["b", " "], config), [0.0, 0.0])


# -------------------------------------------------------------------------------- statistics

def test_bootstrap_reproducible_and_contains_mean():
    values = np.random.default_rng(1).normal(0.5, 0.1, size=200)
    config = MetricsConfig(bootstrap_resamples=500, seed=3)
    mean, lo, hi = bootstrap_ci(values, config)
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi
    assert bootstrap_ci(values, config) == (mean, lo, hi)  # same seed, same interval
    assert bootstrap_ci(values, config, seed=4) != (mean, lo, hi)
    # the standard error of the mean is 0.1/sqrt(200) ~ 0.007: a 95% interval is about +-0.014
    assert 0.02 < hi - lo < 0.04


def test_bootstrap_confidence_widens_interval():
    values = np.random.default_rng(2).uniform(size=100)
    _, lo80, hi80 = bootstrap_ci(values, resamples=1000, confidence=0.80)
    _, lo99, hi99 = bootstrap_ci(values, resamples=1000, confidence=0.99)
    assert lo99 < lo80 and hi99 > hi80


def test_bootstrap_degenerate_and_invalid():
    assert bootstrap_ci([0.3] * 50) == pytest.approx((0.3, 0.3, 0.3))
    _, lo, hi = bootstrap_ci([0.3] * 50)
    assert hi - lo == pytest.approx(0.0, abs=1e-15)
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.1, 0.2], confidence=1.0)


def test_config_checks_and_yaml():
    with pytest.raises(ConfigError, match="confidence"):
        MetricsConfig(confidence=1.0)
    with pytest.raises(ConfigError, match="bootstrap_resamples"):
        MetricsConfig(bootstrap_resamples=0)
    config = from_dict(MetricsConfig, {"rouge_stemmer": "false", "bootstrap_resamples": "100", "confidence": "0.9"})
    assert config.rouge_stemmer is False and config.bootstrap_resamples == 100 and config.confidence == 0.9
    assert config.wordnet_source == "/usr/share/wordnet"
