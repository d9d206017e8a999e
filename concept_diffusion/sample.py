"""Generates continuations from a trained run (concepts, ar or mdm), or round-trips text.

  python -m concept_diffusion.sample --workdir=runs/concepts --prompt "Mara lives in Oslo." \
      --num_concepts=8 --show_steps
  python -m concept_diffusion.sample --workdir=runs/ar --prompt_file=prompts.txt --max_tokens=64
  python -m concept_diffusion.sample --workdir=runs/render --roundtrip --prompt "Mara has a cat."
"""

import sys

from absl import app, flags, logging

from concept_diffusion.config import CANDIDATE_RULES

_WORKDIR = flags.DEFINE_string("workdir", None, "A concepts, ar or mdm run (render: --roundtrip).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "One prompt a line, generated as a batch.")
_NUM_CONCEPTS = flags.DEFINE_integer("num_concepts", 8, "Concepts to generate (concepts runs).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate (ar / mdm runs).")
_CONCEPT_STEPS = flags.DEFINE_integer("concept_steps", None, "Concept sampler steps "
                                      "(default concepts.sample_steps).")
_RENDER_STEPS = flags.DEFINE_integer("render_steps", None, "Unmasking steps (default "
                                     "render.sample_steps; mdm: max_tokens).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance (default "
                               "concepts.guidance; 1 = off).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Token temperature (ar / mdm, default 1); "
                                  "scale of the concept sampler's starting noise (concepts, "
                                  "default concepts.temperature).")
_RENDER_TEMPERATURE = flags.DEFINE_float("render_temperature", 0.0, "Renderer token temperature "
                                         "(0 = argmax).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_REENCODE = flags.DEFINE_bool("reencode", None, "Concepts runs: render each concept as it is "
                              "sampled and re-encode it as context (default concepts.reencode).")
_CANDIDATES = flags.DEFINE_integer("num_candidates", None, "Concepts runs: candidates sampled "
                                   "per concept, the consensus one kept (default "
                                   "concepts.num_candidates; 1 = off).")
_END_NOISE = flags.DEFINE_float("end_noise", None, "Concepts runs: stop the concept sampler at "
                                "this noise and render the concept under it (the render "
                                "stage's render.z_noise: its training input; default "
                                "concepts.end_noise; 0 = clean).")
_RENDER_DIMS = flags.DEFINE_integer("render_dims", None, "Render only this prefix of each "
                                    "concept, for a render run trained on nested concepts "
                                    "(render.nested_dims; default concepts.render_dims of a "
                                    "concepts run, else 0 = all).")
_END_TEMPERATURE = flags.DEFINE_float("end_temperature", None, "Concepts runs: decide END "
                                     "by one more sample per concept at this temperature, "
                                     "unguided, and keep a candidate that does not end "
                                     "(default concepts.end_temperature; 0 = off).")
_CANDIDATE_RULE = flags.DEFINE_enum("candidate_rule", None, list(CANDIDATE_RULES),
                                    "Concepts runs: which candidate is kept, the consensus or "
                                    "the one that round-trips best (needs reencode; default "
                                    "concepts.candidate_rule).")
_DRAFT_STEPS = flags.DEFINE_integer("draft_steps", None, "Concepts runs: render the "
                                    "candidates in this many steps for the choice, the kept "
                                    "one again in --render_steps (needs reencode; default "
                                    "concepts.draft_steps; 0 = off).")
_SHOW_STEPS = flags.DEFINE_bool("show_steps", False, "Print every denoising step (masks as _).")
_ROUNDTRIP = flags.DEFINE_bool("roundtrip", False, "Encode the prompt's chunks and render them "
                                "back (a render or concepts run).")
_RENDER_WORKDIR = flags.DEFINE_string("render_workdir", None, "Render run of a concepts run "
                                      "(default: the one its config names).")
flags.mark_flag_as_required("workdir")


def _prompts() -> list[str]:
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      return [line.strip() for line in f if line.strip()]
  if _PROMPT.value:
    return [_PROMPT.value]
  raise app.UsageError("give --prompt or --prompt_file")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax's read-only notices are not for people.
    logging.set_verbosity(logging.ERROR)
  from concept_diffusion import generate  # After flags: keeps --help fast.
  from concept_diffusion.train import checkpoint
  prompts = _prompts()
  try:
    gen = generate.load(_WORKDIR.value, render_workdir=_RENDER_WORKDIR.value)
    if _ROUNDTRIP.value:
      samples = generate.roundtrip(gen, prompts, render_steps=_RENDER_STEPS.value,
                                   seed=_SEED.value, show_steps=_SHOW_STEPS.value,
                                   render_dims=_RENDER_DIMS.value)
    else:
      samples = generate.generate(
          gen, prompts, num_concepts=_NUM_CONCEPTS.value, max_tokens=_MAX_TOKENS.value,
          concept_steps=_CONCEPT_STEPS.value, render_steps=_RENDER_STEPS.value,
          guidance=_GUIDANCE.value, temperature=_TEMPERATURE.value,
          render_temperature=_RENDER_TEMPERATURE.value, seed=_SEED.value,
          show_steps=_SHOW_STEPS.value, reencode=_REENCODE.value,
          num_candidates=_CANDIDATES.value, end_noise=_END_NOISE.value,
          render_dims=_RENDER_DIMS.value, end_temperature=_END_TEMPERATURE.value,
          candidate_rule=_CANDIDATE_RULE.value, draft_steps=_DRAFT_STEPS.value)
  except (generate.GenerateError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(generate.format_samples(samples, _SHOW_STEPS.value), flush=True)


if __name__ == "__main__":
  app.run(main)
