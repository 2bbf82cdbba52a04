"""What training reads: prompts, images, and the sharded, resumable stores (regression pairs, real latents)."""
