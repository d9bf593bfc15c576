"""Masked training's masks: `masks` reads, checks and transforms them and makes the loss's weight maps; `cache` keeps
them at the latents' size beside the latent cache."""
