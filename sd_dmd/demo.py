"""`make demo`: the main job on the embedded default (the 2D toy until the digits teacher lands)."""
import argparse
from pathlib import Path

from . import toy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    args = p.parse_args(argv)
    toy.main(["--out", str(args.out / "toy")])
    print(f"\nFigure: {args.out / 'toy' / 'figure3.png'}")


if __name__ == "__main__":
    main()
