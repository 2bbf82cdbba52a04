"""A miniature latent text-to-image Stable Diffusion trained on scikit-learn's digits (no download).

The embedded default of the project: ``make demo`` distils it with the same scripts used for SD v1.5.
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"  # a diffusers StableDiffusionPipeline
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"
