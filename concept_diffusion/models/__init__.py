"""Flax Linen models: layers, concept encoder, renderer, concept model, baselines.

Logical axis names (the only ones used; `parallel/` maps them onto the mesh):
batch, concepts, length, embed, mlp, heads, kv_heads, kv, vocab, concept_embed,
head_mlp, layers.

Modules take a hashable `layers.ModelConfig` (`ModelConfig.from_config(config,
vocab_size)`); `build.build_models(config, vocab_size)` gives a stage's modules.
Parameters are float32; compute runs in config.model.dtype.
"""
