"""Tests of the built-in synthetic corpus and its coherence checker."""

import collections
import re
import subprocess
import sys

import pytest

from concept_diffusion.data import synthetic

NUM_DOCS = 200


def _docs(seed=0, count=NUM_DOCS):
  return [synthetic.generate_document(seed, i) for i in range(count)]


def test_same_seed_and_index_give_same_document():
  assert synthetic.generate_document(3, 17) == synthetic.generate_document(3, 17)


def test_document_depends_on_index_and_seed():
  docs = _docs(seed=0, count=50)
  assert len(set(docs)) == len(docs)
  assert docs != _docs(seed=1, count=50)


def test_random_access_matches_sequential_generation():
  assert synthetic.generate_documents(5, 40, 3) == [
      synthetic.generate_document(5, i) for i in (40, 41, 42)]


def test_negative_seed_or_index_is_rejected():
  with pytest.raises(ValueError, match="seed"):
    synthetic.generate_document(-1, 0)
  with pytest.raises(ValueError, match="index"):
    synthetic.generate_document(0, -1)


def test_documents_have_bounded_short_sentences():
  for doc in _docs():
    sentences = synthetic.split_sentences(doc)
    assert synthetic.MIN_SENTENCES <= len(sentences) <= synthetic.MAX_SENTENCES
    assert " ".join(sentences) == doc
    for sentence in sentences:
      assert sentence.endswith(".")
      assert 3 <= len(sentence.split()) <= 16, sentence


def test_vocabulary_is_modest_and_articles_fit():
  docs = _docs()
  words = {w.strip(".,") for doc in docs for w in doc.split()}
  assert len(words) < 400
  # Templates write "a" before slot words, so none may start with a vowel.
  assert not any(re.search(r"\ba [aeiouAEIOU]", doc) for doc in docs)


def test_every_generated_sentence_parses_back_to_its_fact():
  for i in range(NUM_DOCS):
    for fact in synthetic.generate_facts(0, i):
      assert synthetic.parse_sentence(fact.render()) == fact


def test_generated_documents_are_well_formed_and_consistent():
  for doc in _docs():
    scores = synthetic.check_continuation("", doc)
    assert scores["well_formed"] == 1.0
    assert scores["consistent"] == 1.0


def test_true_continuation_is_fully_consistent():
  for doc in _docs():
    sentences = synthetic.split_sentences(doc)
    for cut in (1, len(sentences) // 2, len(sentences) - 1):
      scores = synthetic.check_continuation(
          " ".join(sentences[:cut]), " ".join(sentences[cut:]))
      assert scores == {"well_formed": 1.0, "consistent": 1.0,
                        "num_sentences": len(sentences) - cut}


def test_every_template_is_reachable():
  seen = collections.Counter(
      (f.kind, f.template) for i in range(500)
      for f in synthetic.generate_facts(0, i))
  for kind, templates in synthetic.TEMPLATES.items():
    assert len(templates) >= 3, kind
    for t in range(len(templates)):
      assert seen[(kind, t)] > 0, (kind, templates[t])


PROMPT = ("Mara lives in Oslo. Mara works as a baker. Mara has four apples. "
          "The lamp is in the attic.")


@pytest.mark.parametrize("continuation", [
    "In Lima, Mara met a friend.",  # Wrong city.
    "Mara moved from Rome to Lima.",  # Moves from a city she is not in.
    "Mara moved from Oslo to Oslo.",  # A move that changes nothing.
    "As a pilot, Mara works hard.",  # Wrong job.
    "Now Mara has seven apples.",  # Wrong count.
    "Mara lost six apples.",  # Loses more than she has.
    "Mara found the lamp in the garden.",  # Object is elsewhere.
    "Mara took the lamp from the study to the garden.",
])
def test_contradiction_is_caught(continuation):
  scores = synthetic.check_continuation(PROMPT, continuation)
  assert scores == {"well_formed": 1.0, "consistent": 0.0, "num_sentences": 1}


def test_state_changes_are_tracked():
  continuation = ("Mara moved from Oslo to Lima. In Lima, Mara met a friend. "
                  "Mara got three more apples. Now Mara has seven apples. "
                  "Mara moved the lamp from the attic to the garden. "
                  "Tovin saw the lamp in the garden. In Oslo, Mara took a walk.")
  scores = synthetic.check_continuation(PROMPT, continuation)
  # Only the last sentence is stale: Mara has left Oslo.
  assert scores["num_sentences"] == 7
  assert scores["well_formed"] == 1.0
  assert scores["consistent"] == pytest.approx(6 / 7)


def test_verdicts_name_each_sentence_kind_and_judge_it_in_order():
  continuation = ("Mara moved from Oslo to Oslo. Mara moved from Oslo to Lima. "
                  "In Oslo, Mara took a walk. Lives Oslo in the. Now Mara has four apples.")
  assert synthetic.sentence_verdicts(PROMPT, continuation) == [
      ("move", False),  # Changes nothing.
      ("move", True),
      ("city_ref", False),  # Stale: she has just left Oslo.
      (None, False),  # No template.
      ("count_ref", True)]
  assert synthetic.sentence_verdicts(PROMPT, "") == []


def test_new_entities_are_consistent():
  scores = synthetic.check_continuation(
      PROMPT, "Tovin lives in Rome. Tovin has a pet goat. The key is in the study.")
  assert scores["consistent"] == 1.0


def test_contradicting_sentence_does_not_change_state():
  scores = synthetic.check_continuation(
      PROMPT, "Mara lives in Lima. In Oslo, Mara took a walk.")
  assert scores["consistent"] == 0.5


def test_garbage_and_near_misses_are_not_well_formed():
  garbage = ("the of cat blue. Mara lives in Atlantis. Mara lives in Oslo "
             "Mara lives  in?  colourless green ideas sleep furiously!")
  scores = synthetic.check_continuation(PROMPT, garbage)
  assert scores["num_sentences"] == 4
  assert scores["well_formed"] == 0.0
  assert scores["consistent"] == 0.0
  assert synthetic.parse_sentence("Mara lives in Oslo") is None  # No period.


def test_empty_continuation_scores_zero():
  for empty in ("", "   \n"):
    assert synthetic.check_continuation(PROMPT, empty) == {
        "well_formed": 0.0, "consistent": 0.0, "num_sentences": 0}


def test_parse_sentence_reads_slots_and_normalises_spaces():
  fact = synthetic.parse_sentence("  Mara   moved from Oslo to Lima. ")
  assert fact.kind == "move"
  assert (fact["name"], fact["city"], fact["city2"]) == ("Mara", "Oslo", "Lima")


def test_split_sentences_rules():
  assert synthetic.split_sentences("A b. C d! E f? G 3.5 h") == [
      "A b.", "C d!", "E f?", "G 3.5 h"]


def test_track_state_after_document():
  state = synthetic.track_state(PROMPT + " Mara lost two apples.")
  assert state.attrs[("Mara", "city")] == "Oslo"
  assert state.counts[("Mara", "apples")] == 2
  assert state.rooms["lamp"] == "attic"


def test_module_needs_no_jax():
  # Load the file alone: the data package itself may import heavier code.
  code = ("import importlib.util, sys; "
          f"s = importlib.util.spec_from_file_location('syn', {synthetic.__file__!r}); "
          "m = sys.modules['syn'] = importlib.util.module_from_spec(s); "
          "s.loader.exec_module(m); "
          "m.generate_document(0, 0); print('jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "False"
