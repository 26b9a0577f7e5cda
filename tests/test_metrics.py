"""Metric values on hand-worked examples (every expected number is derived in a comment)."""

import pytest

from saefd_ray.eval.metrics import METRICS, score, tokenize_13a, trace_code_postprocess


def test_accuracy_strips_and_casefolds():
    # "World"=="world" ✓, " sports "=="Sports" ✓, "x"!="y" ✗ -> 2/3
    assert score("accuracy", ["World", " sports ", "x"], ["world", "Sports", "y"]) == pytest.approx(200 / 3)


def test_options_is_exact_match_of_chosen_option():
    assert METRICS["options"] is METRICS["accuracy"]
    assert score("options", ["positive", "negative"], ["positive", "positive"]) == 50.0


def test_first_letter():
    # "A) foo"->a==a ✓, " b"->b==b ✓, ""-> empty ✗, "C"!="D" ✗ -> 2/4
    assert score("first_letter", ["A) foo", " b", "", "C"], ["A", "B", "A", "D"]) == 50.0


def test_rouge_l():
    # "the cat sat" vs "the cat sat on the mat": LCS=3, P=3/3, R=3/6, F=2·1·0.5/1.5=2/3; identical pair F=1
    value = score("rouge_l", ["the cat sat", "a b"], ["the cat sat on the mat", "a b"])
    assert value == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_trace_code_postprocess():
    assert trace_code_postprocess("x = <NUM_LIT>") == "x = 0"
    assert trace_code_postprocess('print(<STR_LIT>)') == "print()"
    assert trace_code_postprocess("c = <CHAR_LIT>") == "c = "
    assert trace_code_postprocess("s = <STR_LIT:hello> + <NUM_LIT:42>") == "s = hello + 42"


def test_edit_sim():
    # pair 1 equal after post-processing -> 100
    # pair 2 "abcd"/"abce": Indel distance 2 over 8 chars -> 100·(1-2/8)=75
    # pair 3 empty prediction -> 0 (TRACE skips it but divides by the total)
    value = score("edit_sim", ["x = <NUM_LIT>", "abcd", ""], ["x = 0", "abce", "y = 1"])
    assert value == pytest.approx((100 + 75 + 0) / 3)


def test_tokenize_13a():
    # '$' split as a symbol, "3.50" kept (period between digits), ',' before a space split, final '.' split
    assert tokenize_13a("It costs $3.50, ok.") == ["It", "costs", "$", "3.50", ",", "ok", "."]
    assert tokenize_13a("3-4 x-y") == ["3", "-", "4", "x-y"]


def test_sari_hf_metric_card_example():
    sources = ["About 95 species are currently accepted."]
    predictions = ["About 95 you now get in."]
    references = [
        ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    ]
    assert score("sari", predictions, references, sources) == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_hand_worked():
    # source "a b c", prediction "a d", reference "a b" (one reference).
    # n=1: keep {a}: P=1, R=|{a}|/|{a,b}|=1/2 -> F=2/3; delete {b,c}: b is in ref (bad), c not (good) -> P=1/2;
    #      add {d}: not in ref -> P=0, nothing to add (ref-src empty) -> R=1 -> F=0
    # n=2: keep {} -> P=1, R=0/|{"a b"}|=0 -> F=0; delete {"a b","b c"} -> P=1/2; add {"a d"} -> P=0 -> F=0
    # n=3: source "a b c" deleted, not in ref -> del P=1; keep/add empty -> 1, 1
    # n=4: nothing anywhere -> 1, 1, 1
    # keep=(2/3+0+1+1)/4=2/3, del=(1/2+1/2+1+1)/4=3/4, add=(0+0+1+1)/4=1/2 -> SARI=(2/3+3/4+1/2)/3=23/36
    assert score("sari", ["a d"], ["a b"], ["a b c"]) == pytest.approx(100 * 23 / 36)


def test_sari_identity_and_mean_over_examples():
    # prediction == source == reference: every keep/del/add term is 1 (0/0 counts as 1) -> 100
    assert score("sari", ["a b"], [["a b"]], ["a b"]) == pytest.approx(100.0)
    two = score("sari", ["a b", "a d"], ["a b", "a b"], ["a b", "a b c"])
    assert two == pytest.approx((100 + 100 * 23 / 36) / 2)


def test_sari_needs_sources():
    with pytest.raises(ValueError, match="sources"):
        score("sari", ["a"], ["a"])


def test_unknown_metric_lists_known():
    with pytest.raises(ValueError, match=r"'bleu'.*accuracy.*sari"):
        score("bleu", ["a"], ["a"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("accuracy", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        score("rouge_l", [], [])


def test_registry_covers_all_metrics_on_0_100_scale():
    assert set(METRICS) == {"accuracy", "first_letter", "options", "rouge_l", "edit_sim", "sari"}
    for name in METRICS:
        assert score(name, ["same text"], ["same text"], ["same text"]) == pytest.approx(100.0)


def test_rouge_l_on_chinese_and_hindi():
    # identical non-Latin strings are a perfect match (rouge-score's default tokenizer gave 0.0)
    assert score("rouge_l", ["我喜欢猫", "हिन्दी भाषा सुंदर है"], ["我喜欢猫", "हिन्दी भाषा सुंदर है"]) == 100.0
    # Chinese per character: "我喜欢狗" vs "我喜欢猫": LCS 3 of 4 chars, P=R=3/4, F=3/4
    assert score("rouge_l", ["我喜欢狗"], ["我喜欢猫"]) == pytest.approx(75.0)
    # Hindi per word, vowel signs kept inside words: "हिन्दी भाषा" vs "हिन्दी भाषा सुंदर है": LCS 2, P=1, R=2/4,
    # F=2·1·0.5/1.5=2/3 (a tokenizer splitting at the signs ि ा ु would count other units)
    assert score("rouge_l", ["हिन्दी भाषा"], ["हिन्दी भाषा सुंदर है"]) == pytest.approx(200 / 3)
    # German umlauts stay in the word: "Grüße aus Zürich" vs "grüße aus Bern": LCS 2 of 3, F=2/3
    assert score("rouge_l", ["Grüße aus Zürich"], ["grüße aus Bern"]) == pytest.approx(200 / 3)


def test_rouge_l_english_matches_rouge_score_default():
    from rouge_score import rouge_scorer

    pairs = [("The cat, sat on 3 mats!", "a cat sat on mats"), ("Budget approved 5-2.", "the budget was approved")]
    default = rouge_scorer.RougeScorer(["rougeL"])
    expected = 100 * sum(default.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    assert score("rouge_l", [p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["accuracy", "options", "first_letter", "rouge_l", "edit_sim"])
def test_empty_reference_scores_zero_whatever_the_prediction(metric):
    # an empty prediction must not earn 100 for an empty reference; the non-empty pair scores 100 -> mean 50
    assert score(metric, ["", "A"], ["", "A"]) == pytest.approx(50.0)
    assert score(metric, [" "], ["  "]) == 0.0
