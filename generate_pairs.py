"""Latent noise -> image pairs from the multi-step teacher (DMD's regression targets).

    python generate_pairs.py --prompts laion6.25.parquet --pretrained_model_name_or_path PATH_OR_ID \
        --output_dir pairs/ [--num_pairs N] [--guidance_scale 3] [--scheduler pndm|ddim] ...
    python generate_pairs.py --prompts 'shards/{00000..00099}.tar' ...   # img2dataset's tar shards: .txt or .json
    accelerate launch generate_pairs.py ...   # every process takes disjoint shards
    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0|1 --main_process_ip IP \
        --main_process_port PORT --num_processes TOTAL generate_pairs.py ...   # multi-node (docs/DATA.md)

Re-running the same command resumes; a larger --num_pairs extends the store; --shuffle_prompts takes the prompts in
a seeded order (kept on resume). The summary counts every process and ends with the store's size and path.
See sd_dmd/data/pairs.py for the store format (docs/DATA.md for the commands).
"""
import sys

from sd_dmd.cli import guarded, run_cli
from sd_dmd.data.config import PairsConfig
from sd_dmd.data.pairs import generate_pairs


def main(argv=None):
    cfg, flags = run_cli(PairsConfig, argv, __doc__)
    if not flags["dry_run"]:
        guarded(generate_pairs, cfg)


if __name__ == "__main__":
    sys.exit(main())
