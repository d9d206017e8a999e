"""concept_diffusion: concept-level diffusion language models in JAX/Flax.

Axis letters, fixed project-wide, end every tensor name (`tokens_BxNxL`):
B = batch, N = concepts per example, L = tokens per concept, T = flat tokens,
D = concept dim, E = model width, H = heads, K = head dim, F = MLP width,
V = vocab, S = sampler steps.
"""

__version__ = "0.1.0"
