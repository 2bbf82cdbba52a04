"""What a run gives its user: sampling in plain diffusers, the fused export, the model card."""
