"""One-step Stable Diffusion by Distribution Matching Distillation, with LoRA adapters on one shared UNet."""
from . import _warnings

_warnings.install()
