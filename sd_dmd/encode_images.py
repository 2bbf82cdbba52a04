"""Real images -> SD-VAE latents with captions: the real data of DMD2's GAN (sd_dmd/data/latents.py has the format).

    python -m sd_dmd.encode_images --images photos/ --output_dir real/photos          # .txt beside each image,
                                                                                    # or metadata.jsonl/csv
    python -m sd_dmd.encode_images --images photos/ --captions captions.csv ...     # file name -> caption
    python -m sd_dmd.encode_images --images 'laion/*.parquet' --output_dir real/laion --resolution 512
    python -m sd_dmd.encode_images --images 'shards/{00000..00099}.tar' ...          # img2dataset's tar shards
    python -m sd_dmd.encode_images --images my_dataset/ ...                           # datasets save_to_disk dir
    python -m sd_dmd.encode_images --source dataset --images user/name --streaming [--num_items N] ...  # iterated
    python -m sd_dmd.encode_images --source dataset --images user/name --split train --image_column image ...
    python -m sd_dmd.encode_images --source digits --output_dir real/digits          # the 1,797 digits
    accelerate launch -m sd_dmd.encode_images ...   # every process takes disjoint shards

Re-running the same command resumes (complete shards are kept); another source, VAE or setting is refused naming
what differs. Bad images (unreadable, truncated, zero-size, too large: over --max_pixels by their header, checked
before any pixel is decoded) and missing captions are skipped, counted and named in the summary; all of them are
listed in ``output_dir/skipped.jsonl``. A damaged tar member (a truncated file, a header that does not parse) is
skipped and named, shard and member, in a warning line.
"""
import sys

from sd_dmd.cli import guarded, run_cli
from sd_dmd.data.config import EncodeConfig
from sd_dmd.data.latents import encode_images


def main(argv=None):
    cfg, flags = run_cli(EncodeConfig, argv, __doc__)
    if not flags["dry_run"]:
        guarded(encode_images, cfg)


if __name__ == "__main__":
    sys.exit(main())
