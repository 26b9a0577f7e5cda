"""Text metrics for the per-task test splits, all on a 0–100 scale so R-matrix cells are comparable.

Every metric has the same call shape, `fn(predictions, references, sources=None) -> float`, so the evaluator picks one
by the task's configured name via `score(...)` and never special-cases SARI. Each returns the mean over examples.

Choices (documented because they move numbers):
- `accuracy` / `options`: exact match after `" ".join(s.split())` and `casefold()` — labels like "World" vs
  "world " are the same answer; TRACE compares case-sensitively after strip, we are slightly more lenient.
- `first_letter` (ScienceQA): first non-space character, casefolded; an empty prediction is wrong.
- `rouge_l`: `rouge-score` ROUGE-L F-measure (its LCS), no stemming, with our `UnicodeTokenizer` instead of its
  default one, which keeps only [a-z0-9] and scores identical Chinese or Hindi strings 0: text is casefolded, every
  CJK ideograph / kana is one token (as Chinese ROUGE is computed per character), and any other run of Unicode
  letters, combining marks and digits (Unicode classes L, M, N: Devanagari vowel signs stay inside their word)
  is one token; punctuation is dropped. On English it gives rouge-score's default tokens.
- Empty references: a split whose references are all empty is refused by the loaders (`data/tasks.pairs`). A single
  empty (or whitespace-only) reference scores 0 in every metric, whatever the prediction: there is nothing to match,
  and an empty prediction must not earn 100 for saying nothing (rouge-score and TRACE's edit similarity already
  score such a pair 0; `accuracy` and `first_letter` follow them).
- `edit_sim` (Py150): TRACE's post-processing — `<NUM_LIT>`→"0", `<STR_LIT>`/`<CHAR_LIT>`→"", `<X_LIT:v>`→v — then
  `rapidfuzz.fuzz.ratio`. As in TRACE, a pair where either side is empty scores 0 (TRACE skips it but still divides
  by the total count).
- `sari` (20Minuten): see `sari` below; a reference may be a string or a list of strings.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Protocol, Sequence

import regex
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

Reference = str | Sequence[str]


class MetricFn(Protocol):
    def __call__(
        self, predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
    ) -> float: ...


def _check(predictions: Sequence[str], references: Sequence[Reference], name: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{name}: no examples to score")


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def accuracy(
    predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
) -> float:
    """Exact match after whitespace normalisation and casefolding, in percent."""
    _check(predictions, references, "accuracy")
    hits = sum(bool(_norm(str(r))) and _norm(p) == _norm(str(r)) for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def first_letter(
    predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
) -> float:
    """ScienceQA: the answer is an option letter, so only the first non-space character counts (casefolded)."""
    _check(predictions, references, "first_letter")
    hits = 0
    for p, r in zip(predictions, references):
        p, r = p.strip(), str(r).strip()
        hits += bool(p) and bool(r) and p[0].casefold() == r[0].casefold()
    return 100.0 * hits / len(predictions)


_CJK_OR_WORD = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[\p{L}\p{M}\p{N}]+")


class UnicodeTokenizer:
    """ROUGE tokens on any script (see the module docstring); the `tokenize(text)` interface rouge-score takes."""

    def tokenize(self, text: str) -> list[str]:
        return _CJK_OR_WORD.findall(text.casefold())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())


def rouge_l(predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None) -> float:
    """Mean ROUGE-L F-measure ×100 (rouge-score; target first, prediction second as its API expects)."""
    _check(predictions, references, "rouge_l")
    total = sum(_ROUGE.score(str(r), p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return 100.0 * total / len(predictions)


_LIT = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def trace_code_postprocess(code: str) -> str:
    """TRACE's Py150 clean-up: placeholder literals become neutral values, annotated ones their value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LIT.sub(lambda m: m.group(2), code)


def edit_sim(
    predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
) -> float:
    """Py150 edit similarity: mean rapidfuzz `fuzz.ratio` (0–100) after TRACE's literal post-processing."""
    _check(predictions, references, "edit_sim")
    total = 0.0
    for p, r in zip(predictions, references):
        p, r = trace_code_postprocess(p), trace_code_postprocess(str(r))
        if p and r.strip():  # an empty (or whitespace-only) reference scores 0
            total += fuzz.ratio(p, r)
    return total / len(predictions)


# --- SARI -------------------------------------------------------------------------------------------------------
# The 13a tokenizer of sacrebleu, which HF `evaluate`/EASSE apply (after lowercasing) before SARI; a few regexes, so
# we copy the rules rather than depend on sacrebleu (and its lxml/portalocker stack) for them.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation / symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    """sacrebleu's `13a` tokenization (as used by HF's `sari` metric), returned as tokens."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _sari_ngram(s: list[str], c: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n, exactly as HF/EASSE `SARIngram` (0/0 counts as 1)."""
    numref = len(refs)
    r_cnt = Counter(g for ref in refs for g in ref)
    s_rep = Counter({g: k * numref for g, k in Counter(s).items()})
    c_rep = Counter({g: k * numref for g, k in Counter(c).items()})

    keep = s_rep & c_rep
    keep_good = keep & r_cnt
    keep_all = s_rep & r_cnt
    keep_p = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0

    delete = s_rep - c_rep
    del_good = delete - r_cnt
    del_p = sum(del_good[g] / delete[g] for g in delete) / len(delete) if delete else 1.0

    add = set(c) - set(s)
    add_good = add & set(r_cnt)
    add_all = set(r_cnt) - set(s)
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one sentence in [0, 1]: mean over n=1..4 of keep F1, deletion precision and addition F1, then /3."""
    tok = lambda t: tokenize_13a(t.lower())  # noqa: E731
    s, c, rs = tok(source), tok(prediction), [tok(r) for r in references]
    parts = [_sari_ngram(_ngrams(s, n), _ngrams(c, n), [_ngrams(r, n) for r in rs]) for n in range(1, 5)]
    keep, dele, add = (sum(p[i] for p in parts) / 4 for i in range(3))
    return (keep + dele + add) / 3


def sari(predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None) -> float:
    """SARI (Xu et al. 2016) ×100, mean over sentences, matching HF `evaluate`'s `sari` (EASSE's fixed keep recall).

    Implemented here because no small, maintained package provides it: HF's needs `evaluate`+`datasets`+`sacrebleu`
    and EASSE is unmaintained with heavy pins. Tested against the HF metric card example and hand-worked cases.
    """
    _check(predictions, references, "sari")
    if sources is None or len(sources) != len(predictions):
        raise ValueError("sari: needs `sources`, one per prediction")
    total = 0.0
    for src, pred, ref in zip(sources, predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise ValueError("sari: an example has no reference")
        total += sari_sentence(src, pred, refs)
    return 100.0 * total / len(predictions)


METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "first_letter": first_letter,
    "options": accuracy,  # the evaluator picks the max-log-likelihood option; scoring it is exact match
    "rouge_l": rouge_l,
    "edit_sim": edit_sim,
    "sari": sari,
}


def score(
    metric: str,
    predictions: Sequence[str],
    references: Sequence[Reference],
    sources: Sequence[str] | None = None,
) -> float:
    """Score with the named metric (0–100). Unknown names raise ValueError listing the known ones."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}") from None
    return float(fn(predictions, references, sources))
