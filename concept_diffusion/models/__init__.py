"""Flax Linen models: layers, concept encoder, renderer, concept model, baselines.

Logical axis names (the only ones used; `parallel/` maps them onto the mesh):
batch, concepts, length, embed, mlp, heads, kv_heads, kv, vocab, concept_embed,
head_mlp, layers.
"""
