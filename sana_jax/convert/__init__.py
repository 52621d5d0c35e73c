"""Converters between the released PyTorch weights (official .pth, diffusers folders) and
ours, as commands: dit.py, gemma.py, dcae.py and bundle_from_diffusers.py (`sana-convert
dit|gemma|dcae|bundle`; sana_jax/commands/convert.py). The conversions themselves are in
sana_jax/weights/."""
