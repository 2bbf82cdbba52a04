"""The store engine (sd_dmd/data/store.py) on its own: no teacher, no VAE; a store of its own rows."""
import hashlib
import threading
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from sd_dmd.data import store as S
from sd_dmd.errors import PairsError


class OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def value(i: int) -> bytes:  # 32 incompressible bytes: a 16-element fp16 "latent"
    return hashlib.sha256(str(i).encode()).digest()


def write(path: Path, first: int, n: int) -> None:
    S.write_parquet(path, pa.table({"index": pa.array(range(first, first + n), pa.int64()),
                                    "latent": pa.array([value(i) for i in range(first, first + n)])}))


def complete(n_rows: int):
    import pyarrow.parquet as pq

    return lambda k, p: p.exists() and pq.read_metadata(p).num_rows == n_rows


class Rows(S.ShardedStore):
    _COLUMNS = ["latent"]

    def __init__(self, path):
        self.path, self.manifest = Path(path), {"latent_shape": [16]}  # 16 fp16 = 32 bytes
        self._set_index(*self._index_shards(2, lambda k, p: p.exists(), "missing", True))


def test_shards_claimed_by_process_resumed_and_read(tmp_path):
    (tmp_path / "shards").mkdir()
    # process 1 of 2 owns shards 1 and 3; shard 1 done, shard 3 torn (a temp file left by a kill)
    write(S.shard_path(tmp_path, 1), 10, 10)
    S.shard_path(tmp_path, 3).with_name("shard-00003.parquet.tmp").write_bytes(b"torn")
    state = SimpleNamespace(process_index=1, num_processes=2)
    todo, done = S.pending_shards(tmp_path, 4, state, complete(10), log=print)
    assert (todo, done) == ([3], [1]) and not list((tmp_path / "shards").glob("*.tmp"))
    write(S.shard_path(tmp_path, 0), 0, 10)
    rows = Rows(tmp_path)
    assert len(rows) == 20 and list(rows.indices[:3]) == [0, 1, 2]
    assert rows.rows([12])["latent"][0].tobytes() == value(12)
    assert S.missing_shards(tmp_path, 4, complete(10)) == [2, 3]


def test_a_shard_whose_rows_do_not_match_their_digests_is_remade_and_named(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    p = S.shard_path(tmp_path, 0)
    write(p, 0, 4)
    data = bytearray(p.read_bytes())
    at = data.find(value(2))
    assert at > 0
    data[at + 3] ^= 1  # one bit of row 2's value, footer intact
    p.write_bytes(bytes(data))
    todo, done = S.pending_shards(tmp_path, 1, OneProcess(), complete(4), log=print)
    assert (todo, done) == ([0], [])
    assert "corrupt, re-making it: 1 row(s) do not match their digest: index 2 (row group 0)" in capsys.readouterr().out
    result = S.verify_store(tmp_path, 1, complete(4), log=lambda *_: None)
    assert list(result["bad"]) == ["shard-00000.parquet"] and result["ok"] == 0


def test_row_digest_covers_every_value_and_its_boundaries():
    base = S.row_digest([1, "ab", b"cd"])
    assert base != S.row_digest([1, "a", b"bcd"])  # lengths are hashed: no ambiguity at the boundaries
    assert base != S.row_digest([2, "ab", b"cd"]) and base == S.row_digest([1, "ab", memoryview(b"cd")])


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(PairsError, match="no manifest.json; not a thing store"):
        S.read_manifest(tmp_path, "f/1", PairsError, "thing store")
    (tmp_path / S.MANIFEST).write_text("{")
    with pytest.raises(PairsError, match="manifest.json: corrupt manifest"):
        S.read_manifest(tmp_path, "f/1")
    S.write_manifest(tmp_path, {"format": "g/1"})
    with pytest.raises(PairsError, match="unknown format 'g/1' \\(expected f/1\\)"):
        S.read_manifest(tmp_path, "f/1")


def test_background_writer_keeps_order_and_raises_the_threads_failure_in_the_caller(tmp_path):
    written, threads = [], set()

    def add(rows, i):
        threads.add(threading.current_thread().name)
        rows["i"].append(i)

    def save(path, rows):
        written.append((path.name, list(rows["i"])))

    with S.BackgroundShardWriter(max_shards=1) as w:
        for k in range(3):
            w.start(tmp_path / f"s{k}", {"i": []})
            for i in range(k, k + 3):
                w.submit(add, w._rows, i)
            w.finish(save)
    assert written == [("s0", [0, 1, 2]), ("s1", [1, 2, 3]), ("s2", [2, 3, 4])]
    assert threads and threading.current_thread().name not in threads

    def boom(path, rows):
        raise ValueError("no")

    with pytest.raises(RuntimeError, match="s9: writing the shard failed \\(ValueError: no\\)"):
        with S.BackgroundShardWriter() as w:
            w.start(tmp_path / "s9", {"i": []})
            w.finish(boom)


def test_counts_are_summed_and_the_slowest_time_kept():
    from dataclasses import dataclass

    from accelerate import PartialState

    PartialState()

    @dataclass
    class Counts:
        written: int = 0
        seconds: float = 0.0

    assert S.gather_stats(Counts(3, 1.5)) == Counts(3, 1.5)  # one process: itself
