"""The store engine that the regression pairs (data/pairs.py) and the real latents (data/latents.py) share: items
mapped to rows in parquet shards, written resumably by any number of processes and read lazily by training.

Layout of a store directory:
  manifest.json                  what the store holds; a run that extends or reads it must match (each store checks
                                 its own keys)
  shards/shard-00000.parquet     rows in row groups of ROW_GROUP_ROWS; each row carries ``row_sha256``, a digest of
                                 its other values (:func:`row_digest`)

Written once here: the shard paths, atomic writes (temp file + fsync + rename), the manifest's read and write, which
shards a process makes (shard ``k`` belongs to process ``k % world_size``) and which are still to do on a resume
(a torn temp file is removed; a complete-looking shard whose rows do not match their digests is re-made, and named),
the counts summed over processes, a background thread that encodes and writes shards while the caller computes the
next one, the lazy row reader (:class:`ShardedStore`) and the whole-store check (:func:`verify_store`). A store
module says only what its rows are, how a batch of them is made, and what its manifest must agree on.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from sd_dmd.errors import PairsError

MANIFEST = "manifest.json"


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / "shards" / f"shard-{k:05d}.parquet"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename. On failure (disk full...) the temp file is removed and the target is
    untouched, so readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PairsError(f"{path}: write failed ({e.strerror or e}); nothing partial was left, free space and "
                         "re-run the same command to resume") from None


# Pairs per parquet row group: the unit a reader fetches for one pair (512 KiB at SD1.5's 4x64x64 fp16 latents).
ROW_GROUP_ROWS = 16


# Every row carries a digest of its values (DIGEST_COLUMN, written with the shard): reads check the rows they return,
# a resume and verify_store check every row. Shards written before it have no such column: named as unverifiable.
DIGEST_COLUMN = "row_sha256"


def row_digest(values) -> str:
    """sha256 (first 128 bits, hex) of one row's values in column order (index first, latent bytes last): each value
    as its bytes (ints 8 bytes little-endian, text UTF-8) preceded by their length."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, str):
            b = memoryview(v.encode())
        elif isinstance(v, (int, np.integer)):
            b = memoryview(int(v).to_bytes(8, "little", signed=True))
        else:  # bytes, or a pyarrow Buffer (no copy)
            b = memoryview(v)
        h.update(b.nbytes.to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def write_parquet(path: Path, table) -> None:
    """Write ``table`` as one shard: each row's digest added (:func:`row_digest` of its values in column order), row
    groups of :data:`ROW_GROUP_ROWS`, one atomic write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [table.column(c).to_pylist() for c in table.column_names]
    table = table.append_column(DIGEST_COLUMN, pa.array([row_digest(v) for v in zip(*cols)], pa.string()))
    sink = pa.BufferOutputStream()
    if table.num_rows:
        pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS)
    else:  # no row group at all: `datasets` reads a 0-row group as batch size 0 and fails
        pq.ParquetWriter(sink, table.schema).close()
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def corrupt_rows(path: Path) -> Optional[list[str]]:
    """Every row of a shard whose values do not match their digest, as 'index I (row group G)'; None when the shard
    has no digests (written before they were). Reads the whole shard: for resumes and verify_store."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if DIGEST_COLUMN not in names:
        return None
    values = [c for c in names if c != DIGEST_COLUMN]
    bad = []
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g)
        cols = [t.column(c).to_pylist() for c in values]
        for row, digest in zip(zip(*cols), t.column(DIGEST_COLUMN).to_pylist()):
            if row_digest(row) != digest:
                bad.append(f"index {row[0]} (row group {g})")
    return bad


def shard_corruption(path: Path) -> Optional[str]:
    """Why a complete-looking shard cannot be trusted ('rows that do not match their digest: index 3 (row group 0)'),
    or None when every row matches or the shard has no digests."""
    try:
        bad = corrupt_rows(path)
    except Exception as e:  # the footer parsed for the completeness check, but a page does not decode
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not bad:
        return None
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{len(bad)} row(s) do not match their digest: {', '.join(bad[:5])}{more}"


def corrupt_on_resume(path: Path, log) -> bool:
    """A resume re-makes a complete-looking shard whose pages do not verify, and says so."""
    why = shard_corruption(path)
    if why is not None:
        log(f"{path}: corrupt, re-making it: {why}")
    return why is not None


class ShardedStore:
    """The row map and row reads that ``PairsStore`` and ``latents.LatentStore`` share.

    Nothing but a row -> (shard, row group, offset) map is held in memory (16 bytes a row): a batch reads only the
    parquet row groups that hold its rows (``pyarrow.parquet.ParquetFile.read_row_group``; shards are written in
    groups of :data:`ROW_GROUP_ROWS` rows), so resident memory stays flat as the store grows. Row ``r``
    (0 <= r < len) is the r-th row in index order; ``indices[r]`` is its index. A subclass names its columns besides
    ``index`` (``latent`` last), its error, and the words its messages use.
    """

    _COLUMNS: list[str] = []
    _error: type = PairsError
    _rows_name = "rows"  # "store holds N <rows_name>"
    _row_name = "row"  # "<row_name> N holds B latent bytes"

    def _index_shards(self, num_shards: int, complete, incomplete: str, require_complete: bool) -> tuple:
        """Read every shard's ``index`` column and row-group sizes; ``complete(k, path)`` says whether shard k is
        there (else it is skipped, or with ``require_complete`` an error ending in ``incomplete``). Returns per-shard
        (indices, shard numbers, rows) arrays: the subclass checks them for emptiness, then :meth:`_set_index`."""
        import pyarrow.parquet as pq

        self.latent_shape = tuple(self.manifest["latent_shape"])
        self._latent_dtype = np.dtype(self.manifest.get("latent_dtype") or "float16")  # fp16; a text cache's may be fp32
        self._latent_bytes = int(np.prod(self.latent_shape)) * self._latent_dtype.itemsize
        self._shards: list[Path] = []
        self._group_starts: list[np.ndarray] = []  # first row of each row group, per shard
        self.unverifiable: list[Path] = []  # shards written without row digests (older stores)
        self._digested: list[bool] = []  # per shard: whether its rows carry digests
        indices, shard_of, row_of = [], [], []
        for k in range(num_shards):
            p = shard_path(self.path, k)
            if not complete(k, p):
                if require_complete:
                    raise self._error(f"{self.path}: incomplete store, {p.name} {incomplete}")
                continue
            try:
                pf = pq.ParquetFile(p)
                missing = {"index", *self._COLUMNS} - set(pf.schema_arrow.names)
                if missing:
                    raise self._error(f"{p}: shard lacks column(s) {sorted(missing)}")
                idx = pf.read(columns=["index"]).column("index").to_numpy()
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            except self._error:
                raise
            except Exception as e:
                raise self._error(f"{p}: unreadable shard ({type(e).__name__}: {e})") from None
            self._digested.append(DIGEST_COLUMN in pf.schema_arrow.names)
            if not self._digested[-1]:
                self.unverifiable.append(p)
            indices.append(idx)
            shard_of.append(np.full(len(idx), len(self._shards), np.int32))
            row_of.append(np.arange(len(idx), dtype=np.int32))
            self._shards.append(p)
            self._group_starts.append(np.cumsum([0] + sizes[:-1]))
        return indices, shard_of, row_of

    def verification_note(self) -> Optional[str]:
        """One line when some shards cannot be verified (written before rows carried digests), else None."""
        if not self.unverifiable:
            return None
        return (f"note: {len(self.unverifiable)} of {len(self._shards)} shards of {self.path} were written without "
                f"row digests (before sd_dmd wrote them); their data cannot be verified (first: "
                f"{self.unverifiable[0].name})")

    def _set_index(self, indices: list, shard_of: list, row_of: list) -> None:
        order = np.argsort(np.concatenate(indices), kind="stable")
        self.indices = np.concatenate(indices)[order]
        self._shard_of = np.concatenate(shard_of)[order]
        self._row_of = np.concatenate(row_of)[order]

    def __len__(self) -> int:
        return len(self.indices)

    def column_values(self, name: str) -> list:
        """One small column (captions, prompts) of every row, in shard order: one read of that column alone."""
        import pyarrow.parquet as pq

        return [v for p in self._shards for v in pq.read_table(p, columns=[name]).column(0).to_pylist()]

    def rows(self, rows: Sequence[int]) -> dict:
        """The columns (lists; ``latent`` an fp16 array, N x C x H x W) of the given row positions (0 <= row <
        len(self), in index order), read from the row groups that hold them."""
        import pyarrow.parquet as pq

        rows = [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"{self.path}: row {r} out of range (store holds {len(self)} {self._rows_name})")
        by_group: dict[tuple[int, int], list[int]] = {}
        for j, r in enumerate(rows):
            s, row = int(self._shard_of[r]), int(self._row_of[r])
            g = int(np.searchsorted(self._group_starts[s], row, side="right") - 1)
            by_group.setdefault((s, g), []).append(j)
        lists = [c for c in self._COLUMNS if c != "latent"]
        out = {c: [None] * len(rows) for c in lists}
        latent = np.empty((len(rows), *self.latent_shape), self._latent_dtype)
        for s in sorted({s for s, _ in by_group}):
            path = self._shards[s]
            columns = self._COLUMNS + [DIGEST_COLUMN] * self._digested[s]
            try:
                pf = pq.ParquetFile(path)
                for g in sorted(g for t, g in by_group if t == s):
                    table = pf.read_row_group(g, columns=columns)
                    for j in by_group[(s, g)]:
                        at = int(self._row_of[rows[j]] - self._group_starts[s][g])
                        for c in lists:
                            out[c][j] = table.column(c)[at].as_py()
                        buf = table.column("latent")[at].as_buffer()
                        index = int(self.indices[rows[j]])
                        if self._digested[s] and row_digest([index, *(out[c][j] for c in lists), buf]) != \
                                table.column(DIGEST_COLUMN)[at].as_py():
                            raise self._error(
                                f"{path}: corrupt shard, {self._row_name} {index} (row group {g}) does not match its "
                                f"digest; re-run the command that made {self.path} to re-make the shard (python -m "
                                f"sd_dmd.verify_store {self.path} lists every bad one)")
                        if buf.size != self._latent_bytes:
                            raise self._error(f"{path}: {self._row_name} {index} holds "
                                              f"{buf.size} latent bytes, the manifest's shape "
                                              f"{list(self.latent_shape)} needs {self._latent_bytes}")
                        latent[j] = np.frombuffer(buf, self._latent_dtype).reshape(self.latent_shape)
            except self._error:
                raise
            except Exception as e:
                raise self._error(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
        out["latent"] = latent
        return out


def warm_up_arrow() -> None:
    """pyarrow's first array imports pandas (~0.25 s on 2 CPU cores), once per process: pay it at set-up rather than
    in the first shard's encode, which in a one-shard run comes after the last batch. A failure here is left for
    write_shard to report."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"i": pa.array([0], pa.int64()), "b": pa.array([b""], pa.binary())}),
                       pa.BufferOutputStream())
    except Exception:
        pass


# ----- the manifest ----------------------------------------------------------------------------------------------
def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(path: Path, fmt: str, error: type = PairsError, what: str = "store") -> dict:
    """The manifest of the store at ``path``, whose format must be ``fmt``; ``error`` names the file otherwise."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no {MANIFEST}; not a {what}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path / MANIFEST}: corrupt manifest ({e.msg})") from None
    if m.get("format") != fmt:
        raise error(f"{path / MANIFEST}: unknown format {m.get('format')!r} (expected {fmt})")
    return m


def prepare(out: Path, state, write: Callable[[], None]) -> None:
    """Every process arrives (each has checked the existing manifest first, so all raise together); the main one
    creates ``shards/`` and calls ``write`` (manifest and side files); every process waits for it."""
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write()
    state.wait_for_everyone()


# ----- which shards this process makes ---------------------------------------------------------------------------
def pending_shards(out: Path, num_shards: int, state, complete: Callable[[int, Path], bool], log) -> tuple[list, list]:
    """(to make, already done): this process's shards (``k % world_size == rank``). A killed write's temp file is
    removed; a shard counts as done when ``complete(k, path)`` (its footer) says so and its rows match their digests
    (else it is re-made, and named)."""
    todo, done = [], []
    for k in range(state.process_index, num_shards, state.num_processes):
        p = shard_path(out, k)
        p.with_name(p.name + ".tmp").unlink(missing_ok=True)
        (done if complete(k, p) and not corrupt_on_resume(p, log) else todo).append(k)
    return todo, done


def missing_shards(out: Path, num_shards: int, complete: Callable[[int, Path], bool]) -> list[int]:
    return [k for k in range(num_shards) if not complete(k, shard_path(out, k))]


def incomplete_report(out: Path, missing: list[int], num_shards: int) -> str:
    return (f"store INCOMPLETE: {len(missing)} of {num_shards} shards missing (first: {shard_path(out, missing[0])}); "
            "re-run the same command to finish it")


def store_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def gather_stats(stats):
    """A counts dataclass summed over every process (``seconds``: the slowest process's)."""
    from accelerate.utils import gather_object

    parts = gather_object([asdict(stats)])
    return type(stats)(**{k: (max if k == "seconds" else sum)(p[k] for p in parts) for k in asdict(stats)})


# ----- writing shards off the caller's thread --------------------------------------------------------------------
class BackgroundShardWriter:
    """One background thread assembles, encodes and writes shards while the caller computes the next batch.

    ``start(path, rows)`` begins a shard; ``submit(fn, *args)`` runs ``fn(*args)`` on the thread (e.g. adding a batch
    to ``rows``); ``finish(write)`` runs ``write(path, rows)``. Jobs run in submission order. At most ``max_shards``
    shards are held at once (the one being filled and those waiting for their write): :meth:`start` waits for the
    oldest write beyond that, so memory stays flat. A failure in the thread is raised in the caller's thread by the
    next call (``submit``, ``start``, ``finish`` or the end of the ``with`` block): a :class:`PairsError` as the write
    raised it (it names the file), anything else as a RuntimeError naming the shard. The failed shard leaves no file,
    and nothing submitted after it runs. When the caller fails instead, the shards already filled are still written.
    """

    def __init__(self, max_shards: int = 2, name: str = "shard-writer"):
        self._max_shards = max_shards
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: deque[Future] = deque()  # submitted, outcome not yet collected; in order
        self._writes: deque[Future] = deque()  # shard writes not known to be done
        self._error: Optional[BaseException] = None  # the thread's first failure; later jobs are skipped
        self._raised = False
        self._path: Optional[Path] = None
        self._rows: Optional[dict] = None
        warm_up_arrow()  # here, in set-up: on the thread it would hold the GIL the caller's first batch needs

    def start(self, path: Path, rows: dict) -> None:
        """Begin the shard written to ``path``, filled into ``rows``; waits while ``max_shards`` are held."""
        self._check()
        while len(self._writes) >= self._max_shards:
            self._writes[0].exception()  # waits; the failure itself is raised by _check, in order
            self._check()
        self._path, self._rows = path, rows

    def finish(self, write: Callable[[Path, dict], None]) -> None:
        """The current shard is complete: ``write(path, rows)`` on the thread."""
        self._writes.append(self.submit(write, self._path, self._rows))
        self._path = self._rows = None

    def submit(self, fn, *args) -> Future:
        self._check()
        fut = self._pool.submit(self._run, self._path, fn, *args)
        self._jobs.append(fut)
        return fut

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._pool.shutdown(wait=True)
        if exc is None:
            self._check()
        elif self._error is not None and not self._raised:
            exc.add_note(f"the shard writer failed too: {self._error}")

    def _check(self) -> None:
        """Collect finished jobs; raise the thread's failure here, in the caller's thread."""
        while self._writes and self._writes[0].done():
            self._writes.popleft()
        while self._jobs and self._jobs[0].done():
            fut = self._jobs.popleft()
            if fut.exception() is not None:
                self._raised = True
                fut.result()

    def _run(self, path: Path, fn, *args) -> None:  # on the writer's thread
        if self._error is not None:
            return
        try:
            fn(*args)
        except PairsError as e:  # atomic_write_bytes' own (disk full...): it names the file, removed its temp file
            self._error = e
            raise
        except BaseException as e:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            self._error = RuntimeError(f"{path}: writing the shard failed ({type(e).__name__}: {e}); nothing "
                                       "partial was left")
            raise self._error from e


# ----- checking a whole store ------------------------------------------------------------------------------------
def verify_store(path: Path, num_shards: int, complete: Callable[[int, Path], bool], log=print) -> dict:
    """Check every shard: there, ``complete(k, path)`` (its footer), every row matching its digest. Returns
    {"bad": {name: why}, "ok": n, "unverifiable": n}; logs each bad shard and a summary."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    bad, ok, unverifiable = {}, 0, 0
    for k in tqdm(range(num_shards), unit="shard", desc=f"verifying {path.name}", dynamic_ncols=True):
        p = shard_path(path, k)
        if not p.exists():
            bad[p.name] = "missing"
        elif not complete(k, p):
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
        log(f"note: {unverifiable} of {num_shards} shards were written without row digests (before sd_dmd wrote "
            "them); their data cannot be verified")
    log(f"{path}: {num_shards} shards: {ok} verified, {len(bad)} bad, {unverifiable} unverifiable"
        + ("; re-run the command that made the store (same arguments) to re-make the bad ones" if bad else ""))
    return {"bad": bad, "ok": ok, "unverifiable": unverifiable}
