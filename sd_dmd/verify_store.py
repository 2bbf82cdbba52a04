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


def shard_ranges(manifest: dict):
    """(shard number, whether its footer says it is complete: a callable of the path) for every shard expected."""
    from sd_dmd.data import latents, pairs

    if manifest.get("format") == pairs.FORMAT:
        n, size = manifest["num_pairs"], manifest["shard_size"]
        for k in range(math.ceil(n / size)):
            yield k, lambda p, k=k: pairs.shard_is_complete(p, min(size, n - k * size))
    elif manifest.get("format") == latents.FORMAT:
        n, size = manifest["num_items"], manifest["shard_size"]
        for k in range(math.ceil(n / size)):
            yield k, lambda p, k=k: latents.shard_is_complete(p, latents.shard_items(k, size, n))
    else:
        raise ValueError(f"unknown format {manifest.get('format')!r} (expected {pairs.FORMAT} or {latents.FORMAT})")


def verify_store(path: str | Path, log=print) -> dict:
    """Check every shard of the store at ``path``; returns {"bad": {shard name: why}, "ok": n, "unverifiable": n}."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from sd_dmd.data.pairs import DIGEST_COLUMN, MANIFEST, shard_corruption, shard_path
    from sd_dmd.errors import PairsError

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = list(shard_ranges(manifest))
    except FileNotFoundError:
        raise PairsError(f"{path}: no {MANIFEST}; not a pairs or latents store") from None
    except (ValueError, KeyError) as e:
        raise PairsError(f"{path / MANIFEST}: not a store manifest ({e})") from None
    bad, ok, unverifiable = {}, 0, 0
    for k, complete in tqdm(expected, unit="shard", desc=f"verifying {path.name}", dynamic_ncols=True):
        p = shard_path(path, k)
        if not p.exists():
            bad[p.name] = "missing"
        elif not complete(p):
            bad[p.name] = "incomplete (its footer does not cover its whole range)"
        elif (why := shard_corruption(p)) is not None:
            bad[p.name] = f"corrupt: {why}"
        elif DIGEST_COLUMN in pq.read_schema(p).names:
            ok += 1
        else:
            unverifiable += 1
    for name, why in bad.items():
        log(f"BAD {path / 'shards' / name}: {why}")
    if unverifiable:
        log(f"note: {unverifiable} of {len(expected)} shards were written without row digests (before sd_dmd "
            "wrote them); their data cannot be verified")
    log(f"{path}: {len(expected)} shards: {ok} verified, {len(bad)} bad, {unverifiable} unverifiable"
        + ("; re-run the command that made the store (same arguments) to re-make the bad ones" if bad else ""))
    return {"bad": bad, "ok": ok, "unverifiable": unverifiable}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Verify every shard of a pairs or real-latents store (row digests, "
                                            "completeness); exit 1 when any is bad.")
    p.add_argument("store", type=Path, help="the store directory (it holds manifest.json and shards/)")
    args = p.parse_args(argv)
    from sd_dmd.cli import guarded

    result = guarded(verify_store, args.store)
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
