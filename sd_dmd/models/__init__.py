"""The networks: the shared frozen UNet with its two LoRA adapters and the GAN head, the teacher pipeline, LoRA file
formats, and tiny stand-ins built from configs."""
