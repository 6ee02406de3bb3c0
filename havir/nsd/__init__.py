"""Readers of the Natural Scenes Dataset release (layout, betas, design, atlases, stimuli) and a synthetic NSD."""
