"""Random-batch reads from a large pairs store: resident memory and throughput (issue 17).

    python benchmarks/store_read.py [--num_pairs 100000] [--batch 16] [--batches 400] [--dir runs/store_read]

Writes (once; reused when it exists) a synthetic store with the real layout and SD1.5-shaped latents (4x64x64
fp16, 32 KiB a pair: 100k pairs = 3.2 GB), then, in a fresh process, opens it with ``PairsStore`` and reads random
batches the way training does (``store.batch(rows)``: rows uniform over the store, noise re-derived). Reported:
peak RSS increase over the process before it opened the store, MB/s and batches/s with the page cache dropped for
the store's files first (``posix_fadvise(DONTNEED)``: cold reads from this machine's disk) and then warm.

What training consumes, for the >= 10x target: the paper's SD1.5 run (DMD, Sec. 5 / App.) used a regression batch
of 1152 per iteration on 72 A100 at about 6.5 s an iteration (20k iterations in ~36 h): 2.5 pairs/s per GPU, 20
pairs/s for an 8-GPU node reading one local disk. Our shipped sd15 config reads 1 pair per GPU per step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAPER_PAIRS_PER_GPU_S = 1152 / 72 / (36 * 3600 / 20000)  # 2.46 pairs/s per A100 (DMD's SD1.5 run)
GPUS_PER_NODE = 8


def drop_cache(store: Path) -> None:
    for p in (store / "shards").glob("*.parquet"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(store_dir: Path, batch: int, batches: int, verify: bool) -> dict:
    """Runs in a fresh process: the reader's own memory and speed."""
    import numpy as np

    from sd_dmd.data.pairs import PairsStore
    from sd_dmd.data.store import ROW_GROUP_ROWS
    from sd_dmd.tiny import write_synthetic_store

    warm_dir = store_dir.parent / (store_dir.name + "_warmup")
    if not warm_dir.exists():
        write_synthetic_store(warm_dir, 32)
    w = PairsStore(warm_dir)
    w.batch([0, 1], verify=verify)  # imports, pyarrow pools, first read: not the store's cost
    del w
    base, now0 = peak_mib(), rss_mib()
    t0 = time.perf_counter()
    store = PairsStore(store_dir)
    t_open = time.perf_counter() - t0
    most = rss_mib() - now0
    pair_bytes = int(np.prod(store.latent_shape)) * 2
    rng = np.random.default_rng(0)
    out = {"pairs": len(store), "open_s": t_open, "open_peak_mib": max(most, peak_mib() - base)}
    for phase in ("cold", "warm"):
        if phase == "cold":
            drop_cache(store_dir)
        t0 = time.perf_counter()
        for _ in range(batches):
            store.batch(rng.integers(0, len(store), batch).tolist(), verify=verify)
            most = max(most, rss_mib() - now0)
        dt = time.perf_counter() - t0
        out[phase] = {"batches_s": batches / dt, "pairs_s": batches * batch / dt,
                      "latent_mb_s": batches * batch * pair_bytes / dt / 1e6,
                      "group_mb_s": batches * batch * ROW_GROUP_ROWS * pair_bytes / dt / 1e6}
    # the larger of the peak-RSS increase and the largest RSS sampled after each batch over the RSS before opening
    out["peak_rss_increase_mib"] = max(most, peak_mib() - base)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_pairs", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--dir", default="runs/store_read")
    p.add_argument("--verify_noise", action="store_true", help="also re-derive and check each pair's noise digest")
    p.add_argument("--compare_digests", action="store_true",
                   help="instead: the read rate with row digests checked over the rate without (batches alternating "
                        "in one fresh process, cold then warm)")
    p.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_interleave", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    store_dir = Path(args.dir) / f"pairs_{args.num_pairs}"
    if args._measure:
        print(json.dumps(interleaved(store_dir, args.batch, args.batches) if args._interleave
                         else measure(store_dir, args.batch, args.batches, args.verify_noise)))
        return
    from common import device_line

    from sd_dmd.data.store import MANIFEST
    from sd_dmd.tiny import write_synthetic_store

    if not (store_dir / MANIFEST).exists():
        t0 = time.perf_counter()
        write_synthetic_store(store_dir, args.num_pairs, (4, 64, 64), progress=True)
        print(f"wrote {store_dir} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in (store_dir / "shards").glob("*.parquet"))
    cmd = [sys.executable, __file__, "--_measure", "--num_pairs", str(args.num_pairs), "--batch", str(args.batch),
           "--batches", str(args.batches), "--dir", args.dir] + (["--verify_noise"] if args.verify_noise else [])
    run = lambda *extra: json.loads(subprocess.run(cmd + list(extra), check=True, capture_output=True,
                                                   text=True).stdout.strip().splitlines()[-1])
    if args.compare_digests:
        return compare_digests(run, args)
    r = run()
    need = PAPER_PAIRS_PER_GPU_S * GPUS_PER_NODE
    print(f"command: python benchmarks/store_read.py --num_pairs {args.num_pairs} --batch {args.batch} "
          f"--batches {args.batches}" + (" --verify_noise" if args.verify_noise else ""))
    print(device_line())
    print(f"store: {r['pairs']} pairs (4x64x64 fp16), {size / 1e9:.2f} GB in {len(list((store_dir / 'shards').glob('*.parquet')))} "
          f"shards; opened in {r['open_s']:.2f} s")
    print(f"peak RSS increase (open + {2 * args.batches} random batches of {args.batch}): "
          f"{r['peak_rss_increase_mib']:.0f} MiB (target < 300 MB; opening alone: {r['open_peak_mib']:.0f} MiB)")
    print("| reads | batches/s | pairs/s | latent MB/s (used) | row-group MB/s (read) | x an 8-GPU node's consumption |")
    print("|---|---|---|---|---|---|")
    for phase, what in (("cold", "cold (page cache dropped)"), ("warm", "warm (page cache)")):
        x = r[phase]
        print(f"| {what} | {x['batches_s']:.1f} | {x['pairs_s']:.0f} | {x['latent_mb_s']:.1f} | {x['group_mb_s']:.0f} | "
              f"{x['pairs_s'] / need:.0f}x |")
    print(f"consumption reference: DMD's SD1.5 run, {PAPER_PAIRS_PER_GPU_S:.2f} pairs/s per GPU "
          f"(1152 pairs / iteration, 72 A100, ~6.5 s / iteration) = {need:.1f} pairs/s for {GPUS_PER_NODE} GPUs "
          "sharing a disk (target >= 10x)")


def interleaved(store_dir: Path, batch: int, batches: int) -> dict:
    """Runs in a fresh process: batches alternately read with and without the row-digest check (as reads of a store
    written before rows carried digests), cold (page cache dropped first) then warm; the time of each arm."""
    import numpy as np

    from sd_dmd.data.pairs import PairsStore

    store = PairsStore(store_dir)
    on, off = list(store._digested), [False] * len(store._digested)
    rng = np.random.default_rng(0)
    store.batch([0, 1])  # imports, pools
    out = {}
    for phase in ("cold", "warm"):
        if phase == "cold":
            drop_cache(store_dir)
        t = {True: 0.0, False: 0.0}
        for i in range(2 * batches):
            store._digested = on if i % 2 == 0 else off
            rows = rng.integers(0, len(store), batch).tolist()
            t0 = time.perf_counter()
            store.batch(rows)
            t[i % 2 == 0] += time.perf_counter() - t0
        out[phase] = {"with": batches * batch / t[True], "without": batches * batch / t[False]}
    return out


def compare_digests(run, args) -> None:
    """Pairs/s with row digests checked over pairs/s without, batches interleaved in one process, cold and warm."""
    from common import device_line

    r = run("--_interleave")
    print(f"command: python benchmarks/store_read.py --num_pairs {args.num_pairs} --batch {args.batch} "
          f"--batches {args.batches} --compare_digests")
    print(device_line())
    for phase, x in r.items():
        print(f"{phase}: {x['with']:.0f} pairs/s with row digests checked, {x['without']:.0f} without: "
              f"ratio {x['with'] / x['without']:.3f} ({args.batches} interleaved batches of {args.batch} each)")


if __name__ == "__main__":
    main()
