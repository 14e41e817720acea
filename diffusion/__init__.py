"""Diffusion: objectives (eps / v / flow), samplers, sample prompts and previews."""
