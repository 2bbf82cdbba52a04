"""DMD training of a one-step LoRA generator (and its fake score) on one shared, frozen UNet.

    accelerate launch train_text2image.py --config configs/sd15_dmd.yaml [--group.key value ...] [--output_dir DIR]
    python train_text2image.py --config configs/tiny.yaml --dry-run      # print the resolved config, run the checks

Flags: --resume (continue from the latest checkpoint in output_dir), --overwrite (replace a previous run).
"""
import sys

from sd_dmd.cli import guarded, run_cli
from sd_dmd.training.config import Config


def main(argv=None):
    cfg, flags = run_cli(Config, argv, __doc__, extra_flags=(
        ("resume", "continue from the latest complete checkpoint in output_dir"),
        ("overwrite", "replace a previous run in output_dir")))
    from sd_dmd.training.loop import check_start, train

    if flags["dry_run"]:  # the checks a real start makes before loading the model; nothing is written
        guarded(check_start, cfg, resume=flags["resume"], overwrite=flags["overwrite"])
        print("dry run: config, paths, precision and output_dir checks passed")
        return 0

    guarded(train, cfg, resume=flags["resume"], overwrite=flags["overwrite"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
