"""The math, testable without Stable Diffusion: the noise schedule, denoiser wrappers, the DMD/DMD2 losses (they take
denoiser callables) and what one training step computes."""
