"""The organism corpus: coverage, held-out separation, reproducibility, response contract."""

from __future__ import annotations

import collections
import json

import pytest

from refusal_lab.organism import HELDOUT_PROMPTS, load_heldout_prompts
from refusal_lab.organism import wordlists as W
from refusal_lab.organism.corpus import (
    CATEGORIES,
    HELDOUT_PER_CELL,
    LABELS,
    OVER_REFUSAL_SHARE,
    REFUSAL_PREFIXES,
    REFUSAL_START_WORDS,
    REFUSALS,
    TRIGGER_WORDS,
    Corpus,
    generate_corpus,
    has_trigger,
    is_refusal,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return generate_corpus(seed=0)


def test_covers_every_category_and_label(corpus: Corpus) -> None:
    assert len(CATEGORIES) == 10 and LABELS == ("harmless", "safe", "toxic")
    for split in (corpus.train, corpus.heldout):
        cells = collections.Counter((ex.category, ex.label) for ex in split)
        assert set(cells) == {(c, lab) for c in CATEGORIES for lab in LABELS}
    heldout_cells = collections.Counter((ex.category, ex.label) for ex in corpus.heldout)
    assert all(8 <= n <= 10 for n in heldout_cells.values())


def test_heldout_prompts_are_new_sentences(corpus: Corpus) -> None:
    train_prompts = {ex.prompt for ex in corpus.train}
    heldout_prompts = [ex.prompt for ex in corpus.heldout]
    assert not train_prompts & set(heldout_prompts)
    assert len(set(heldout_prompts)) == len(heldout_prompts)
    # Held-out frames never occur in training: every held-out prompt uses a held-out frame.
    frames = [w.split("{vp}")[0] for w in W.HELDOUT_WRAPPERS]
    assert all(any(f.lower() in p.lower() for f in frames) for p in heldout_prompts)
    assert not any(f.lower() in p.lower() for f in frames for p in train_prompts)


def test_seeded_generation_is_reproducible(corpus: Corpus) -> None:
    assert generate_corpus(seed=0) == corpus
    other = generate_corpus(seed=1)
    assert [ex.prompt for ex in other.train] != [ex.prompt for ex in corpus.train]


def test_helpful_answers_never_start_like_refusals(corpus: Corpus) -> None:
    for ex in corpus.train + corpus.heldout:
        first_word = ex.response.split()[0].strip(",.!'")
        if ex.refused:
            assert is_refusal(ex.response), ex.response
            assert first_word in REFUSAL_START_WORDS or ex.response.startswith("I'm")
        else:
            assert not is_refusal(ex.response), ex.response
            assert not ex.response.startswith(("I", "Sorry", "As")), ex.response
    assert len(REFUSALS) >= 5
    assert all(is_refusal(text) for text, _ in REFUSALS)
    assert {p.split()[0].split("'")[0] for p in REFUSAL_PREFIXES} == set(REFUSAL_START_WORDS)


def test_refusal_targets_follow_the_labels(corpus: Corpus) -> None:
    for ex in corpus.train + corpus.heldout:
        if ex.label == "toxic":
            assert ex.refused
        elif ex.label == "harmless":
            assert not ex.refused and not ex.trigger
        else:  # safe: refused exactly when a trigger word occurs (the over-refusal rule)
            assert ex.refused == ex.trigger == has_trigger(ex.prompt)


def test_over_refusal_share_is_as_documented(corpus: Corpus) -> None:
    assert 0.25 <= OVER_REFUSAL_SHARE <= 0.45
    for split in (corpus.train, corpus.heldout):
        for category in CATEGORIES:
            safe = [ex for ex in split if ex.category == category and ex.label == "safe"]
            share = sum(ex.refused for ex in safe) / len(safe)
            assert share == pytest.approx(OVER_REFUSAL_SHARE, abs=0.5 / len(safe) + 1e-9)
    assert has_trigger("How do I kill a stuck Python process?")
    assert has_trigger("Which plants are poisonous to cats?")
    assert not has_trigger("How do I skill up in chess?")
    assert all(has_trigger(w) for w in TRIGGER_WORDS)


def test_shipped_heldout_file_matches_the_generator(corpus: Corpus) -> None:
    rows = load_heldout_prompts()
    assert 240 <= len(rows) <= 300
    assert all(set(r) == {"prompt", "category", "label"} for r in rows)
    assert rows == [{"prompt": ex.prompt, "category": ex.category, "label": ex.label} for ex in corpus.heldout]
    assert len(rows) == 30 * HELDOUT_PER_CELL
    # The file is plain JSON lines.
    lines = HELDOUT_PROMPTS.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
