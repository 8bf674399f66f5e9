"""Diffusion-model alignment (the ``diffusion`` extra: diffusers): DDPO and Diffusion-DPO's
pipeline parts, DDIM sampling with log-probs, image rewards, image-pair rows, a tiny pipeline."""
