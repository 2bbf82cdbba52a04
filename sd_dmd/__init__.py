"""One-step Stable Diffusion by Distribution Matching Distillation, with LoRA adapters on one shared UNet."""
from . import _offline, _warnings

_offline.install()  # before anything imports peft (which imports bitsandbytes): no Hub kernels
_warnings.install()
