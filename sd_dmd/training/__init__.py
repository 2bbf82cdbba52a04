"""The training run: its config, the random draws of a step, checkpoint state, start checks and the loop."""
