"""Evaluation metrics on cases with known answers, and the evaluate / compare entry points."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from concept_diffusion import evaluation, generate
from concept_diffusion.data import segment, synthetic

from conftest import ROOT, subprocess_env


# ---------------------------------------------------------------- known answers


def test_unigram_entropy_of_constant_and_uniform_sequences():
  assert evaluation.unigram_entropy([7] * 50) == 0.0
  v = 64
  assert evaluation.unigram_entropy(list(range(v)) * 3) == pytest.approx(math.log2(v))
  assert evaluation.mean_unigram_entropy([[7] * 5, [], [1, 2]]) == pytest.approx(0.5)


def test_oracle_renderer_scores_one_and_one_error_costs_its_share():
  rng = np.random.default_rng(0)
  tokens_BxNxL = rng.integers(6, 50, (2, 3, 4)).astype(np.int32)
  token_mask_BxNxL = np.ones((2, 3, 4), bool)
  token_mask_BxNxL[:, :, 3] = False
  tokens_BxNxL[~token_mask_BxNxL] = 0
  concept_mask_BxN = np.ones((2, 3), bool)
  oracle = evaluation.roundtrip_counts(tokens_BxNxL, tokens_BxNxL, token_mask_BxNxL,
                                       concept_mask_BxN)
  assert oracle["correct"] == oracle["tokens"] == 18 and oracle["exact"] == oracle["chunks"] == 6
  wrong = tokens_BxNxL.copy()
  wrong[0, 0, 0] += 1
  one_off = evaluation.roundtrip_counts(wrong, tokens_BxNxL, token_mask_BxNxL, concept_mask_BxN)
  assert (one_off["correct"], one_off["exact"]) == (17, 5)


def test_identical_predictions_are_contrastively_perfect_and_swapped_ones_fail():
  rng = np.random.default_rng(0)
  z_BxNxD = rng.normal(size=(3, 4, 16))
  seg_BxN = np.ones((3, 4), np.int32)
  concept_mask_BxN = np.ones((3, 4), bool)
  target_BxNxD = np.concatenate([z_BxNxD[:, 1:], np.zeros((3, 1, 16))], 1)
  valid_BxN = np.arange(4)[None] < 3
  valid_BxN = np.broadcast_to(valid_BxN, (3, 4))
  args = (valid_BxN, z_BxNxD, concept_mask_BxN, seg_BxN)
  assert evaluation.contrastive_accuracy(target_BxNxD, target_BxNxD, *args) == 1.0
  swapped_BxNxD = np.roll(target_BxNxD, 1, axis=0)  # Another document's next concept.
  assert evaluation.contrastive_accuracy(swapped_BxNxD, target_BxNxD, *args) == 0.0
  near = evaluation.next_concept_sums(target_BxNxD, target_BxNxD, valid_BxN)
  assert near["l2"] == 0.0 and near["cosine"] / near["count"] == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_spread_ratio_is_one_for_a_calibrated_sampler_and_shows_a_huddled_or_scattered_one(
    scale):
  rng = np.random.default_rng(0)
  k, b, n, d = 4, 64, 8, 32
  mean_BxNxD, sigma_D = rng.normal(size=(b, n, d)), rng.uniform(0.1, 2.0, size=d)
  truth_BxNxD = mean_BxNxD + sigma_D * rng.normal(size=(b, n, d))
  samples_KxBxNxD = mean_BxNxD + scale * sigma_D * rng.normal(size=(k, b, n, d))
  valid_BxN = np.ones((b, n), bool)
  valid_BxN[:, -1] = False  # No target there: its huge error must not count.
  truth_BxNxD[:, -1] = 1e6
  sums = evaluation.spread_sums(samples_KxBxNxD, truth_BxNxD, valid_BxN)
  assert sums["count"] == b * (n - 1)
  # Samples at `scale` times the truth's spread: E err2 = (1 + scale^2 / k) var_truth.
  ratio = math.sqrt((1 + scale**2 / k) / (scale**2 * (1 + 1 / k)))  # 1, 1.84, 0.63
  assert evaluation.spread_ratio(sums["err2"], sums["var"], k) == pytest.approx(ratio, rel=0.05)


def test_copies_of_the_target_are_not_negatives():
  z_BxNxD = np.zeros((2, 2, 4))
  z_BxNxD[:, 0] = [1.0, 0, 0, 0]
  z_BxNxD[:, 1] = [0, 1.0, 0, 0]  # Both documents end with the same (END) concept.
  valid_BxN = np.array([[True, False], [True, False]])
  target_BxNxD = np.concatenate([z_BxNxD[:, 1:], np.zeros((2, 1, 4))], 1)
  acc = evaluation.contrastive_accuracy(target_BxNxD, target_BxNxD, valid_BxN, z_BxNxD,
                                        np.ones((2, 2), bool), np.ones((2, 2), np.int32))
  assert acc == 1.0


def test_checker_scores_a_true_continuation_one():
  pairs = []
  for i in range(5):
    sentences = synthetic.split_sentences(synthetic.generate_document(0, i))
    half = len(sentences) // 2
    pairs.append((" ".join(sentences[:half]), " ".join(sentences[half:])))
  scores = evaluation.coherence_scores(*zip(*pairs))
  assert scores == {"coherence_well_formed": 1.0, "coherence_consistent": 1.0}
  garbled = evaluation.coherence_scores([pairs[0][0]], ["Lives Oslo in the."])
  assert garbled["coherence_well_formed"] == 0.0


def test_coherence_by_kind_pools_sentences_over_prompts():
  prompt = "Mara lives in Oslo. The lamp is in the attic."
  by_kind = evaluation.coherence_by_kind(
      [prompt, prompt, prompt],
      ["Mara moved from Oslo to Lima. Mara moved from Lima to Rome.",
       "Mara moved from Rome to Lima. Lives Oslo in the.",
       "The lamp sits in the attic."])
  assert by_kind == {"move": {"sentences": 3, "consistent": 2 / 3},
                     "malformed": {"sentences": 1, "consistent": 0.0},
                     "place": {"sentences": 1, "consistent": 1.0}}


def test_roundtrip_metrics_score_the_rendered_first_sentences_of_the_truth(monkeypatch):
  pairs = []
  for i in range(4):
    sentences = synthetic.split_sentences(synthetic.generate_document(0, i))
    half = len(sentences) // 2
    pairs.append((" ".join(sentences[:half]), " ".join(sentences[half:])))
  seen = []

  def fake_roundtrip(gen, texts, contexts, render_dims=0, damage=lambda t: t):
    # Each truth comes with its prompt: a prev_concept renderer reads the prompt's last chunk.
    assert contexts == [p for p, c in pairs if c]
    assert render_dims == 0  # Whole concepts unless asked.
    seen.extend(texts)
    return [types.SimpleNamespace(text=damage(t)) for t in texts]

  monkeypatch.setattr(evaluation.gen_lib, "roundtrip", fake_roundtrip)
  # 16 tokens of 8-token chunks: the first 2 sentences of each truth.
  data = types.SimpleNamespace(concept_len=8)
  gen = types.SimpleNamespace(chunk_config=types.SimpleNamespace(data=data))
  assert evaluation.roundtrip_metrics(gen, pairs, max_tokens=16) == {
      "roundtrip_consistent": 1.0}
  assert [len(synthetic.split_sentences(t)) for t in seen] == [
      min(2, len(synthetic.split_sentences(c))) for _, c in pairs]
  # A renderer that garbles every sentence's last word loses every fact it carries.
  garble = lambda t: " ".join(s.rsplit(" ", 1)[0] + " Zzz." for s in synthetic.split_sentences(t))
  monkeypatch.setattr(evaluation.gen_lib, "roundtrip",
                      lambda gen, texts, contexts, render_dims: fake_roundtrip(
                          gen, texts, contexts, render_dims, garble))
  assert evaluation.roundtrip_metrics(gen, pairs, max_tokens=16) == {
      "roundtrip_consistent": 0.0}
  by_kind = evaluation.roundtrip_metrics(gen, pairs, max_tokens=16,
                                         by_kind=True)["roundtrip_by_kind"]
  assert set(by_kind) == {"malformed"}  # Every garbled sentence, and only those.
  assert by_kind["malformed"]["sentences"] == sum(
      min(2, len(synthetic.split_sentences(c))) for _, c in pairs)


def test_roundtrip_gen_ppl_is_the_judge_perplexity_of_the_rendered_truth(monkeypatch,
                                                                          tiny_ar_run):
  judge = generate.load(tiny_ar_run)
  pairs = []
  for i in range(4):
    sentences = synthetic.split_sentences(synthetic.generate_document(0, i))
    half = len(sentences) // 2
    pairs.append((" ".join(sentences[:half]), " ".join(sentences[half:])))
  pairs.append(("A document of one sentence.", ""))  # Its continuation is not rendered.
  prompts = [p for p, _ in pairs]
  truth = [" ".join(synthetic.split_sentences(c)[:2]) for _, c in pairs]
  data = types.SimpleNamespace(concept_len=8)
  gen = types.SimpleNamespace(chunk_config=types.SimpleNamespace(data=data))
  # A perfect renderer: the bound is the judge's perplexity of the truth itself.
  def perfect(gen, texts, contexts, render_dims=0):
    assert all(texts) and contexts == [p for p, c in pairs if c]
    return [types.SimpleNamespace(text=t) for t in texts]

  monkeypatch.setattr(evaluation.gen_lib, "roundtrip", perfect)
  exact = evaluation.roundtrip_metrics(gen, pairs, max_tokens=16, synthetic_data=False,
                                       judge=judge)
  assert exact == {"roundtrip_gen_ppl": evaluation.judge_perplexity(judge, prompts, truth)}
  # Every sentence rendered as its words reversed: the judge finds it far less likely.
  monkeypatch.setattr(evaluation.gen_lib, "roundtrip", lambda gen, texts, contexts, render_dims: [
      types.SimpleNamespace(text=" ".join(t.split()[::-1])) for t in texts])
  garbled = evaluation.roundtrip_metrics(gen, pairs, max_tokens=16, judge=judge)
  assert set(garbled) == {"roundtrip_consistent", "roundtrip_gen_ppl"}
  assert garbled["roundtrip_gen_ppl"] > 2 * exact["roundtrip_gen_ppl"]


def test_judge_prefers_its_own_training_text_to_shuffled_tokens(tiny_ar_run):
  judge = generate.load(tiny_ar_run)
  tok, rng = judge.tokenizer, np.random.default_rng(0)
  prompts, true, shuffled = [], [], []
  for i in range(8):  # Training documents of the synthetic corpus (eval holds the first ones).
    sentences = segment.split_sentences(synthetic.generate_document(0, 10_000 + i))
    half = len(sentences) // 2
    prompts.append(segment.flat_document(segment.tokenize_document(
        tok, " ".join(sentences[:half])))[:-1].tolist())
    ids = segment.tokenize_document(tok, " ".join(sentences[half:])).tokens_T.tolist()
    true.append(ids)
    shuffled.append(rng.permutation(ids).tolist())
  nll_true, n_true = evaluation.judge_nll(judge, prompts, true)
  nll_shuffled, n_shuffled = evaluation.judge_nll(judge, prompts, shuffled)
  assert n_true == n_shuffled > 0
  ppl_true, ppl_shuffled = math.exp(nll_true / n_true), math.exp(nll_shuffled / n_shuffled)
  assert ppl_true < 0.5 * ppl_shuffled
  assert ppl_true < judge.tokenizer.vocab_size / 2  # Far below a uniform guess.


def test_gen_ppl_with_the_end_scores_the_end_of_each_ended_continuation(tiny_ar_run):
  from concept_diffusion.data.tokenizer import EOD_ID
  judge = generate.load(tiny_ar_run)
  prompts = ["Mara lives in Oslo.", "Tovin works as a baker.", "Ilse owns a cat."]
  texts, ended = ["Mara has a dog.", "", "Ilse paints the fence."], [True, True, False]
  plain = evaluation.judge_perplexity(judge, prompts, texts)
  assert evaluation.judge_perplexity(judge, prompts, texts, [False] * 3) == plain
  tok = judge.tokenizer
  prompt_ids = [segment.flat_document(segment.tokenize_document(tok, p))[:-1].tolist()
                for p in prompts]
  ids = [segment.tokenize_document(tok, t).tokens_T.tolist() for t in texts]
  nll, n = evaluation.judge_nll(judge, prompt_ids, ids)
  nll_end, n_end = evaluation.judge_nll(judge, prompt_ids,
                                        [x + [EOD_ID] if e else x for x, e in zip(ids, ended)])
  assert n_end == n + 2 and nll_end > nll  # One more token per ended continuation.
  assert evaluation.judge_perplexity(judge, prompts, texts, ended) == pytest.approx(
      math.exp(nll_end / n_end))
  # Continuations that all end at once: no text to score without the end, the end with it.
  assert math.isnan(evaluation.judge_perplexity(judge, prompts, [""] * 3))
  assert math.isfinite(evaluation.judge_perplexity(judge, prompts, [""] * 3, [True] * 3))


def test_generation_metrics_report_the_length_next_to_the_perplexity(monkeypatch, tiny_ar_run):
  judge = generate.load(tiny_ar_run)
  made = [generate.Sample("p", "Mara has a dog.", [5, 6, 7], True),
          generate.Sample("p", "", [], True), generate.Sample("p", "Ilse", [8], False),
          generate.Sample("p", "", [], True)]
  monkeypatch.setattr(evaluation.gen_lib, "generate", lambda *a, **k: made)
  pairs = [("Mara lives in Oslo.", "")] * 4
  out, _ = evaluation.generation_metrics(judge, pairs, judge=judge)
  assert out["gen_tokens"] == 1.0 and out["gen_empty"] == 0.5 and out["gen_ended"] == 0.75
  prompts, texts = [p for p, _ in pairs], [s.text for s in made]
  assert out["gen_ppl"] == evaluation.judge_perplexity(judge, prompts, texts)
  assert out["gen_ppl_end"] == evaluation.judge_perplexity(judge, prompts, texts,
                                                           [True, True, False, True])


# ---------------------------------------------------------------- entry points


def _check_ranges(metrics):
  for name in ("roundtrip_token_accuracy", "roundtrip_exact_match", "contrastive_accuracy",
               "roundtrip_consistent", "coherence_well_formed", "coherence_consistent",
               "gen_ended"):
    if name in metrics:
      assert 0.0 <= metrics[name] <= 1.0, name
  assert all(math.isfinite(v) for v in metrics.values())


def test_evaluate_render_run_writes_eval_json(tiny_render_run):
  metrics = evaluation.evaluate(tiny_render_run, max_batches=1, batch_size=8)
  assert set(metrics) == {"roundtrip_token_accuracy", "roundtrip_exact_match",
                          "elbo_bits_per_token", "roundtrip_consistent"}
  _check_ranges(metrics)
  assert 0 < metrics["elbo_bits_per_token"] < 20
  with open(os.path.join(tiny_render_run, evaluation.EVAL_FILE)) as f:
    assert json.load(f) == metrics


def test_evaluate_concepts_run_with_judge(tiny_concepts_run, tiny_ar_run):
  metrics = evaluation.evaluate(tiny_concepts_run, judge_workdir=tiny_ar_run, num_prompts=4,
                                max_batches=1, batch_size=8, max_tokens=16)
  for name in ("roundtrip_consistent", "roundtrip_gen_ppl", "next_concept_l2",
               "next_concept_cosine", "contrastive_accuracy", "spread_ratio", "gen_ppl",
               "gen_ppl_end",
               "gen_tokens", "gen_empty", "unigram_entropy", "coherence_well_formed", "coherence_consistent",
               "gen_tokens_per_sec", "gen_latency_s"):
    assert name in metrics, name
  _check_ranges(metrics)
  assert metrics["gen_ppl"] > 1 and metrics["gen_tokens_per_sec"] > 0


def test_spread_samples_leave_the_scored_sample_and_heat_spreads_them(tiny_concepts_run):
  import jax
  gen = generate.load(tiny_concepts_run)
  config = evaluation.eval_config(gen)
  run = lambda **kw: evaluation.concept_metrics(  # noqa: E731
      gen, evaluation.eval_batches(config, gen.tokenizer, "concepts", 8, 1), jax.random.key(0),
      **kw)
  one, four = run(spread_samples=1), run(spread_samples=4)
  assert "spread_ratio" not in one and 0 < four["spread_ratio"] < 10
  assert {k: four[k] for k in one} == one  # The scored sample is the same draw.
  assert run(temperature=2.0)["spread_ratio"] < four["spread_ratio"] < run(
      temperature=0.5)["spread_ratio"]


def test_consistency_by_kind_of_render_and_concepts_runs(tiny_render_run, tiny_concepts_run,
                                                         tiny_ar_run):
  kw = dict(num_prompts=4, max_batches=1, batch_size=8, max_tokens=16, write=False,
            by_kind=True)
  render = evaluation.evaluate(tiny_render_run, **kw)
  concepts = evaluation.evaluate(tiny_concepts_run, **kw)
  assert {"roundtrip_by_kind"} == {k for k, v in render.items() if isinstance(v, dict)}
  assert {"roundtrip_by_kind", "by_kind"} == {
      k for k, v in concepts.items() if isinstance(v, dict)}
  for by_kind in (render["roundtrip_by_kind"], concepts["roundtrip_by_kind"],
                  concepts["by_kind"]):
    assert all(0 <= c["consistent"] <= 1 for c in by_kind.values())
  assert sum(c["sentences"] for c in render["roundtrip_by_kind"].values()) > 0
  # A baseline is compared on the same kinds: its generated sentences (no round trip).
  ar = evaluation.evaluate(tiny_ar_run, **kw)
  assert {"by_kind"} == {k for k, v in ar.items() if isinstance(v, dict)}
  assert sum(c["sentences"] for c in ar["by_kind"].values()) > 0
  assert all(0 <= c["consistent"] <= 1 for c in ar["by_kind"].values())


@pytest.mark.parametrize("run", ["tiny_ar_run", "tiny_mdm_run"])
def test_evaluate_baselines(run, request):
  workdir = request.getfixturevalue(run)
  metrics = evaluation.evaluate(workdir, num_prompts=4, max_batches=1, batch_size=8,
                                max_tokens=16)
  assert 0 < metrics["bits_per_token"] < 20 and "unigram_entropy" in metrics
  _check_ranges(metrics)


def test_compare_cli_prints_one_table_of_every_run(tiny_render_run, tiny_ar_run, tmp_path):
  other = tmp_path / "other_run"
  other.mkdir()
  (other / evaluation.EVAL_FILE).write_text(json.dumps({"bits_per_token": 3.25}))
  ours = tmp_path / "ours"
  ours.mkdir()
  (ours / evaluation.EVAL_FILE).write_text(json.dumps({"roundtrip_token_accuracy": 0.5}))
  cmd = [sys.executable, "-m", "concept_diffusion.evaluate", "--compare", str(ours), str(other)]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert str(ours) in lines[0] and str(other) in lines[0]
  assert any(l.startswith("| bits_per_token") and "3.25" in l and "| -" in l for l in lines)


def test_by_kind_cli_prints_the_kind_table_of_render_and_ar_runs(tiny_render_run, tiny_ar_run):
  base = [sys.executable, "-m", "concept_diffusion.evaluate", "--num_prompts=4",
          "--max_batches=1", "--batch_size=8", "--max_tokens=16", "--by_kind"]
  ok = subprocess.run(base + [f"--workdir={tiny_render_run}"], cwd=ROOT, env=subprocess_env(1),
                      capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert any(l.startswith(f"| {tiny_render_run} (round trip) |") for l in ok.stdout.splitlines())
  ar = subprocess.run(base + [f"--workdir={tiny_ar_run}"], cwd=ROOT, env=subprocess_env(1),
                      capture_output=True, text=True, timeout=300)
  assert ar.returncode == 0, ar.stderr[-3000:]
  assert any(l.startswith(f"| {tiny_ar_run} (generated) |") for l in ar.stdout.splitlines())


def test_dev_prompts_write_their_own_file_and_leave_eval_json(tiny_ar_run, monkeypatch):
  eval_json = os.path.join(tiny_ar_run, evaluation.EVAL_FILE)
  before = open(eval_json).read() if os.path.isfile(eval_json) else None
  asked = []
  real = evaluation.eval_prompts
  monkeypatch.setattr(evaluation, "eval_prompts",
                      lambda *a, **k: asked.append(a[2:] or k) or real(*a, **k))
  metrics = evaluation.evaluate(tiny_ar_run, num_prompts=2, max_batches=1, batch_size=8,
                                max_tokens=8, prompts="dev")
  assert asked == [("dev",)]
  with open(os.path.join(tiny_ar_run, "eval_dev.json")) as f:
    assert json.load(f) == metrics
  assert (open(eval_json).read() if os.path.isfile(eval_json) else None) == before
  assert evaluation.read_or_evaluate(tiny_ar_run, prompts="dev") == metrics  # Read back.


def test_a_bad_prompt_split_is_refused_before_any_run_is_read(tmp_path):
  with pytest.raises(generate.GenerateError, match="prompts='test'"):
    evaluation.evaluate(str(tmp_path / "missing"), prompts="test")
  cmd = [sys.executable, "-m", "concept_diffusion.evaluate", f"--workdir={tmp_path}/missing",
         "--prompts=test"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1 and "prompts='test': choose from eval, dev" in proc.stderr


def test_format_table_orders_known_metrics_first():
  table = evaluation.format_table({"a": {"zeta": 1.0, "gen_ppl": 12.0}, "b": {"gen_ppl": 9.5}})
  rows = table.splitlines()
  assert rows[0].split("|")[1].strip() == "metric"
  assert rows[2].startswith("| gen_ppl") and rows[3].startswith("| zeta")
  assert [c.strip() for c in rows[3].split("|")[1:-1]] == ["zeta", "1", "-"]
