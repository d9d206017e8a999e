"""Diffusion math as pure functions of arrays and PRNG keys (no models, no data).

masked.py: masked (absorbing) discrete diffusion for the renderer and the MDM
  baseline: loss, Monte-Carlo ELBO in bits, the iterative unmasking sampler.
continuous.py: flow-matching / x0 / mse losses and Euler / Heun / DDIM samplers
  with classifier-free guidance, for the concept model's diffusion head.
"""
