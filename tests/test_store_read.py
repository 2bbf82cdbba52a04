"""The pairs store reads batches from disk, never the whole store (issue 17, item 1)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_dmd.data.pairs import PairsStore, pair_noise, pair_seed, shard_path
from sd_dmd.errors import PairsError
from sd_dmd.tiny import synthetic_latent, write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]

# Peak RSS of a process that opens a store of 2000 SD1.5-shaped pairs (64 MiB of latents) and reads 100 random
# batches of 16, against the same process before it opened the store. Reading everything into RAM (the reader
# before issue 17) costs at least the 64 MiB; a lazy reader costs a few row groups (16 pairs x 32 KiB each).
RSS_PROBE = r'''
import json, resource, sys
import numpy as np, torch
from sd_dmd.data.pairs import PairsStore
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def now_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
warm = PairsStore(sys.argv[2]); warm.batch([0, 1]); del warm   # imports, pyarrow pools, first read
peak0, now0, most = peak_mib(), now_mib(), 0.0
store = PairsStore(sys.argv[1])
rng = np.random.default_rng(0)
for _ in range(100):
    z, y, p = store.batch(rng.integers(0, len(store), 16).tolist())
    most = max(most, now_mib() - now0)
print(json.dumps({"grew": max(most, peak_mib() - peak0), "n": len(store)}))
'''


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return write_synthetic_store(d / "big", 2000, (4, 64, 64), shard_size=256), write_synthetic_store(d / "small", 16)


def test_reads_rows_lazily_and_exactly(big_store):
    big, _ = big_store
    store = PairsStore(big)
    assert len(store) == 2000 and list(store.indices[:3]) == [0, 1, 2]
    rows = [1999, 0, 700, 701, 700, 255, 256]  # across shards and row groups, repeated, unsorted
    z, y, prompts = store.batch(rows, verify=True)
    assert prompts == [f"synthetic prompt {i}" for i in rows]
    assert torch.equal(y, torch.stack([torch.from_numpy(synthetic_latent(i, (4, 64, 64)).astype(np.float32))
                                       for i in rows]))
    assert torch.equal(z[2], pair_noise(pair_seed(0, 700), (4, 64, 64)))
    with pytest.raises(IndexError, match="row 2000 out of range"):
        store.batch([2000])


def test_resident_memory_stays_flat_as_the_store_grows(big_store):
    big, small = big_store
    res = subprocess.run([sys.executable, "-c", RSS_PROBE, str(big), str(small)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    store_mib = r["n"] * 4 * 64 * 64 * 2 / 2**20
    grew = r["grew"]  # the reader before issue 17 (whole store in RAM): +183 MiB here
    print(f"peak RSS +{grew:.1f} MiB while reading 100 batches of 16 from a {store_mib:.0f} MiB store")
    assert grew < 0.25 * store_mib, (grew, store_mib)


def test_a_corrupt_shard_is_named(big_store, tmp_path):
    _, small = big_store
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small, bad)
    data = shard_path(bad, 0).read_bytes()
    shard_path(bad, 0).write_bytes(data[: len(data) // 2])  # torn copy
    with pytest.raises(PairsError, match="shard-00000.parquet: unreadable shard"):
        PairsStore(bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["latent_shape"] = [4, 8, 4]
    (bad / "manifest.json").write_text(json.dumps(m))
    shutil.copy(shard_path(small, 0), shard_path(bad, 0))
    with pytest.raises(PairsError, match="shard-00000.parquet: pair 3 holds 32768 latent bytes"):
        PairsStore(bad).batch([3])
