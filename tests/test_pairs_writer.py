"""generate_pairs' shard writer thread (issue 17): the per-pair extras run beside sampling, at most two shards are
held, and a failure on the thread is raised in the main thread naming the shard, leaving nothing partial."""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import generate_pairs
from sd_dmd.data import pairs
from sd_dmd.data.pairs import PairsStats, ShardWriter, noise_digest, pair_noise, pair_seed, shard_path


class WordTokenizer:
    """Stands in for CLIP's: one token a word, context of 3."""

    model_max_length = 3

    def __call__(self, prompts, truncation, max_length):
        return SimpleNamespace(input_ids=[p.split()[:max_length] for p in prompts])


def _batch(indices):
    seeds = [pair_seed(0, i) for i in indices]
    noise = torch.stack([pair_noise(s, (4, 2, 2)) for s in seeds])
    return list(indices), [f"prompt {'x ' * i}".strip() for i in indices], seeds, noise, noise.half().numpy()


def test_writes_beside_sampling_and_holds_at_most_two_shards(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    real_write, written, held = pairs.write_shard, [], []

    def slow_write(path, rows):
        assert threading.current_thread() is not threading.main_thread()
        time.sleep(0.5)
        real_write(path, rows)
        written.append(path.name)

    monkeypatch.setattr(pairs, "write_shard", slow_write)
    stats = PairsStats()
    with ShardWriter(WordTokenizer(), stats) as w:
        for k in range(5):
            w.start(shard_path(tmp_path, k))
            held.append(k + 1 - len(written))  # shards started and not yet on disk, the new one included
            t0 = time.perf_counter()
            for b in (0, 2):
                w.add(*_batch(range(4 * k + b, 4 * k + b + 2)))
            w.finish()
            assert time.perf_counter() - t0 < 0.3  # the main thread does not wait for the write (0.5 s)
    assert max(held) == 2 and held[0] == 1
    assert written == [f"shard-0000{k}.parquet" for k in range(5)]
    assert stats.written == 20 and stats.over_77_tokens == sum(1 + i > 3 for i in range(20))
    t = pq.read_table(shard_path(tmp_path, 1)).to_pydict()
    idx, prompts, seeds, noise, lat = _batch(range(4, 8))
    assert t["index"] == idx and t["prompt"] == prompts and t["seed"] == seeds
    assert t["noise_sha1"] == [noise_digest(z) for z in noise] and t["latent"] == [a.tobytes() for a in lat]


def test_a_failure_of_the_main_thread_still_writes_the_sampled_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    stats = PairsStats()
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(WordTokenizer(), stats) as w:
            w.start(shard_path(tmp_path, 0))
            w.add(*_batch(range(2)))
            w.finish()
            w.start(shard_path(tmp_path, 1))
            w.add(*_batch(range(2, 4)))
            raise KeyboardInterrupt  # Ctrl-C while shard 1 is sampled: shard 0 is written, shard 1 is not
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-00000.parquet"] and stats.written == 2


def _argv(setup_dir, model, out):
    return ["--prompts", str(setup_dir / "p.txt"), "--pretrained_model_name_or_path", model, "--output_dir", str(out),
            "--resolution", "16", "--num_inference_steps", "2", "--batch_size", "1", "--shard_size", "2",
            "--num_pairs", "8"]


def test_writer_failure_is_raised_naming_the_shard_and_leaves_nothing_partial(tiny_pipe_dir, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a red cube\ntwo cats on a sofa\na blue sphere\n")
    generate_pairs.main(_argv(tmp_path, tiny_pipe_dir, tmp_path / "ref"))
    out = tmp_path / "pairs"
    real_write = pairs.write_shard

    def broken_write(path, rows):  # shard 1: a half-written temp file, then a failure that is not an OSError
        if path.name == "shard-00001.parquet":
            path.with_name(path.name + ".tmp").write_bytes(b"PAR1 half")
            raise ValueError("encoder exploded")
        real_write(path, rows)

    monkeypatch.setattr(pairs, "write_shard", broken_write)
    with pytest.raises(RuntimeError, match=r"shard-00001\.parquet: writing the shard failed \(ValueError: encoder "
                                           r"exploded\)") as e:
        generate_pairs.main(_argv(tmp_path, tiny_pipe_dir, out))
    assert isinstance(e.value.__cause__, ValueError)
    monkeypatch.undo()
    # shard 0 is complete, nothing partial, and nothing submitted after the failure was written
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.parquet"]
    generate_pairs.main(_argv(tmp_path, tiny_pipe_dir, out))  # resumes
    for k in range(4):
        a, b = pq.read_table(shard_path(out, k)), pq.read_table(shard_path(tmp_path / "ref", k))
        assert a.to_pylist() == b.to_pylist()
