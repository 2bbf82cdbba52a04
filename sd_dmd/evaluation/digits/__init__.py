"""The digits instrument: a miniature latent text-to-image Stable Diffusion trained on scikit-learn's digits (no
download), its classifier-based metrics and sampling. Its data and shipped weights' paths are in sd_dmd/data/digits.py.

The embedded default of the project: ``make demo`` distils it with the same scripts used for SD v1.5.
"""
