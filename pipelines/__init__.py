"""Ray Data pipelines: sources, decoding, and the model actors (CLIP, SAM, diffusion)."""
