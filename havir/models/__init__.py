"""Models: Versatile Diffusion's components (the backbone) and HAVIR's decoders."""
