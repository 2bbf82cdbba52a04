"""Check a whole store (regression pairs or real latents): every shard there, complete, every row's digest.

    python -m sd_dmd.verify_store pairs/            # exit 0: all verified; 1: bad shards (named); 2: not a store

Each bad shard is named with why (missing, incomplete, unreadable, or the rows, by index, that do not match their
digests). Re-running the command that made the store (generate_pairs.py / python -m sd_dmd.encode_images, same
arguments) re-makes exactly those shards. Shards written before rows carried digests are counted as unverifiable:
their data cannot be checked.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def verify(path: str | Path, log=print) -> dict:
    """Check every shard of the pairs or latents store at ``path`` (:func:`store.verify_store`)."""
    from sd_dmd.data import latents, pairs
    from sd_dmd.data.store import MANIFEST, verify_store
    from sd_dmd.errors import PairsError

    path = Path(path)
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise PairsError(f"{path}: no {MANIFEST}; not a pairs or latents store") from None
    except ValueError as e:
        raise PairsError(f"{path / MANIFEST}: not a store manifest ({e})") from None
    kinds = {pairs.FORMAT: (pairs.shard_complete, "num_pairs"), latents.FORMAT: (latents.shard_complete, "num_items")}
    if m.get("format") not in kinds:
        raise PairsError(f"{path / MANIFEST}: unknown format {m.get('format')!r} (expected one of {sorted(kinds)})")
    complete, count = kinds[m["format"]]
    n, size = m[count], m["shard_size"]
    return verify_store(path, math.ceil(n / size), complete(n, size), log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Verify every shard of a pairs or real-latents store (row digests, "
                                            "completeness); exit 1 when any is bad.")
    p.add_argument("store", type=Path, help="the store directory (it holds manifest.json and shards/)")
    args = p.parse_args(argv)
    from sd_dmd.cli import guarded

    result = guarded(verify, args.store)
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
