"""Measuring a result: prompt-set evaluation (FID, CLIP score) and the digits instrument."""
