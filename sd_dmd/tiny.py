"""Offline building blocks: the real CLIP BPE tokenizer from open_clip's bundled vocabulary, a
tiny but complete ``StableDiffusionPipeline`` saved in diffusers layout (tests and the digits model), and
synthetic pairs stores of any size (reader tests and benchmarks).

Nothing here downloads anything; the pipelines are then loaded through the same ``from_pretrained``
path users run on SD v1.5.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sd_dmd.models.tiny import build_tiny_pipeline


TINY_PROMPTS = ["a red cube", "two cats on a sofa", "a blue sphere", "the number seven"]


def make_tiny_inputs(out: str | Path, num_pairs: int = 8) -> Path:
    """``out/pipe`` (the tiny pipeline), ``out/prompts.txt`` and ``out/pairs``: what configs/tiny.yaml names."""
    from sd_dmd.data.config import PairsConfig
    from sd_dmd.data.pairs import generate_pairs

    out = Path(out)
    if not (out / "pipe" / "model_index.json").is_file():
        build_tiny_pipeline(out / "pipe")
    (out / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    generate_pairs(PairsConfig(prompts=[str(out / "prompts.txt")], pretrained_model_name_or_path=str(out / "pipe"),
                               output_dir=str(out / "pairs"), num_pairs=num_pairs, resolution=16,
                               num_inference_steps=3, batch_size=num_pairs))
    return out


def synthetic_latent(index: int, latent_shape) -> np.ndarray:
    """The fp16 'teacher latent' of pair ``index`` in :func:`write_synthetic_store` (re-derivable, for checks)."""
    return np.random.default_rng(index).standard_normal(tuple(latent_shape), dtype=np.float32).astype(np.float16)


def write_synthetic_store(out: str | Path, num_pairs: int, latent_shape=(4, 64, 64), shard_size: int = 256,
                          progress: bool = False) -> Path:
    """A pairs store with the real layout and random latents, without a teacher: for read benchmarks and tests of
    the reader at sizes no teacher could fill here. Noise, seeds and digests are the real ones (verify-noise works);
    pair i's latent is :func:`synthetic_latent`."""
    from tqdm.auto import tqdm

    from sd_dmd.data.pairs import FORMAT, noise_digest, pair_noise, pair_seed, write_shard
    from sd_dmd.data.store import shard_path, write_manifest

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_manifest(out, {"format": FORMAT, "teacher": "synthetic", "latent_shape": list(latent_shape),
                         "latent_dtype": "float16", "num_pairs": num_pairs, "shard_size": shard_size, "base_seed": 0,
                         "resolution": latent_shape[-1] * 8, "guidance_scale": 0.0})
    for k in tqdm(range(math.ceil(num_pairs / shard_size)), desc="synthetic shards", disable=not progress):
        idx = list(range(k * shard_size, min(num_pairs, (k + 1) * shard_size)))
        seeds = [pair_seed(0, i) for i in idx]
        write_shard(shard_path(out, k), {
            "index": idx, "prompt": [f"synthetic prompt {i}" for i in idx], "seed": seeds,
            "noise_sha1": [noise_digest(pair_noise(s, latent_shape)) for s in seeds],
            "latent": [synthetic_latent(i, latent_shape).tobytes() for i in idx]})
    return out


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the tiny offline pipeline, prompts and pairs of configs/tiny.yaml.")
    p.add_argument("--out", default="runs/tiny_inputs", help="directory (default: runs/tiny_inputs)")
    args = p.parse_args(argv)
    out = make_tiny_inputs(args.out)
    print(f"wrote {out / 'pipe'}, {out / 'prompts.txt'} and {out / 'pairs'}")


if __name__ == "__main__":
    main()
