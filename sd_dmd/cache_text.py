"""Prompt conditionings cached to disk, so that training never loads a text encoder (``--data.text_cache DIR``;
sd_dmd/data/text_cache.py has the format).

    python -m sd_dmd.cache_text --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
        --prompts prompts.parquet --extra_prompts "a photo of a cat" "a red cube" --output_dir text_cache/sd35
    accelerate launch -m sd_dmd.cache_text ...   # every process takes disjoint shards

Re-running the same command resumes (complete shards are kept); other prompts, encoders or settings are refused,
naming what differs.
"""
import sys

from sd_dmd.cli import guarded, run_cli
from sd_dmd.data.config import TextCacheConfig
from sd_dmd.data.text_cache import cache_text


def main(argv=None):
    cfg, flags = run_cli(TextCacheConfig, argv, __doc__)
    if not flags["dry_run"]:
        guarded(cache_text, cfg)


if __name__ == "__main__":
    sys.exit(main())
