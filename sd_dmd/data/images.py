"""Image + caption sources of the real-latents store (sd_dmd/data/latents.py): a folder, parquet files, WebDataset
tar shards (img2dataset), a Hugging Face ``datasets`` dataset (materialised or streamed), or scikit-learn's digits.

A source is a deterministic list of items (sorted file names; parquet files sorted, rows in file order; tar shards in
pattern order, samples in tar order; dataset rows in order, streamed or not). Item ``i`` has a name
(:meth:`ImageSource.item_id`: a relative file name, ``file.parquet:row``, ``shard.tar:KEY`` or ``row 17``), a
caption (``None`` when missing or empty, after :func:`sd_dmd.prompts.clean_caption`) and image bytes read on demand
(:meth:`ImageSource.read`), so listing 500k LAION rows holds names and captions only (a streamed dataset reads its
captions with its rows).
:func:`decode_image` turns bytes into a [3, R, R] tensor in [-1, 1] (RGB, alpha over white, EXIF orientation,
centre crop, Lanczos resize as ``sd_dmd.evaluate.lanczos``) or raises :class:`BadImage` with the reason; a bad
item is the caller's to skip and count, never a crash.

Memory of one decode is bounded: an image whose header says more than ``max_pixels`` (:data:`MAX_PIXELS`) pixels is
skipped as 'too large: W×H ...' before any pixel is decoded (PIL itself only warns up to ~179 Mpx: one small PNG with a
12000x12000 header took 1.5 GB), and an encoded image over :data:`MAX_FILE_BYTES` is refused unread (a folder file is
stat'ed first). A decode thread so holds the encoded bytes plus a few copies of at most ``max_pixels`` pixels while
converting (PIL stores 1-4 bytes a pixel: <= 256 MB a copy at the default).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sd_dmd.data.prompts import CAPTION_COLUMNS as PROMPT_CAPTION_COLUMNS
from sd_dmd.data.prompts import clean_caption
from sd_dmd.errors import SourceError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# auto-detected columns, preferred first: LAION metadata (TEXT), img2dataset (jpg/txt), HF image datasets (image/text)
CAPTION_COLUMNS = (*PROMPT_CAPTION_COLUMNS, "txt")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
FILE_COLUMNS = ("file_name", "filename", "file", "path", "image")  # caption maps: HF imagefolder's metadata.jsonl
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # found in a folder when --captions is not given
DIGITS_CAPTION_SEED = 0  # the template of digit image i: default_rng(DIGITS_CAPTION_SEED).integers(6, size=N)[i]
MAX_PIXELS = 64_000_000  # default pixel limit of decode_image (EncodeConfig.max_pixels)
MAX_FILE_BYTES = 512 << 20  # 64 Mpx x 8 bytes (16-bit RGBA, uncompressed): no image within MAX_PIXELS needs more
_OPEN_LOCK = threading.Lock()  # guards PIL's global Image.MAX_IMAGE_PIXELS while _open_image turns its check off


class BadImage(Exception):
    """One item cannot be used; ``reason`` is '<category>: <detail>' (category: zero-size, unreadable, ...)."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.reason = str(self)


def _clean(c) -> Optional[str]:
    c = clean_caption(c) if isinstance(c, str) else None
    return c or None


def _pick(where, columns: Sequence[str], given: Optional[str], choices: Sequence[str], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise SourceError(f"{where}: {what} column '{given}' not found (columns: {list(columns)})")
        return given
    found = next((c for c in choices if c in columns), None)
    if found is None:
        raise SourceError(f"{where}: no {what} column among {list(choices)} (columns: {list(columns)}); "
                          f"pass --{what}_column")
    return found


class ImageSource:
    """Items 0..N-1: ``captions[i]`` (None = missing), :meth:`item_id`, :meth:`read` (bytes or a tensor each)."""

    kind = ""
    captions: list[Optional[str]]
    problems: Sequence[str] = ()  # damage found while listing, one line each naming file and member (logged)

    def __len__(self) -> int:
        return len(self.captions)

    def item_id(self, i: int) -> str:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> list:
        """Raw images of ``indices``, in order: bytes, a [3, R, R] tensor, or a :class:`BadImage`."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Human-readable settings for the manifest (paths, columns); not compared on resume."""
        return {}

    def fingerprint(self) -> dict:
        """What a resumed store must share with its source: item count, names and captions (hashes)."""
        items, caps = hashlib.sha256(), hashlib.sha256()
        for i in range(len(self)):
            items.update(self.item_id(i).encode() + b"\n")
            caps.update(json.dumps(self.captions[i]).encode() + b"\n")
        return {"kind": self.kind, "item_count": len(self), "items_sha256": items.hexdigest(),
                "captions_sha256": caps.hexdigest()}


def _read_bytes(path: Path):
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # not read at all
            return BadImage("too large", f"{size:,} bytes encoded (limit {MAX_FILE_BYTES:,})")
        return path.read_bytes()
    except OSError as e:
        return BadImage("unreadable", f"{type(e).__name__}: {e.strerror or e}")


def _caption_map(path: Path, file_column: Optional[str], caption_column: Optional[str]) -> dict[str, Optional[str]]:
    """file name -> caption from a CSV (header row) or JSONL file."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: unreadable caption file ({type(e).__name__}: {e})") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise SourceError(f"{path}: no rows of file name -> caption (a CSV with a header row, or JSON objects)")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    fcol = _pick(path, columns, file_column, FILE_COLUMNS, "file")
    ccol = _pick(path, columns, caption_column, CAPTION_COLUMNS, "caption")
    return {str(r.get(fcol)).replace("\\", "/"): _clean(r.get(ccol)) for r in rows if r.get(fcol) is not None}


class FolderSource(ImageSource):
    """Image files under ``root`` (recursive, sorted by relative path); captions from ``captions`` (CSV/JSONL mapping
    a file name, relative path or bare name, to its caption), else the folder's metadata.jsonl/metadata.csv, else a
    ``.txt`` beside each image (same stem)."""

    kind = "folder"

    def __init__(self, root: str | Path, captions: Optional[str] = None, file_column: Optional[str] = None,
                 caption_column: Optional[str] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{root}: no such folder")
        self.files = sorted((p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                             if p.suffix.lower() in IMAGE_EXT and p.is_file()))
        if not self.files:
            raise SourceError(f"{root}: folder holds no images ({', '.join(IMAGE_EXT)})")
        found = [self.root / m for m in METADATA_FILES if (self.root / m).is_file()]
        self.caption_file = Path(captions) if captions else (found[0] if found else None)
        if self.caption_file is not None:
            if not self.caption_file.is_file():
                raise SourceError(f"{captions}: no such caption file")
            table = _caption_map(self.caption_file, file_column, caption_column)
            self.captions = [table.get(f, table.get(Path(f).name)) for f in self.files]
            self.unmatched = len(set(table) - set(self.files) - {Path(f).name for f in self.files})
        else:
            self.captions = [self._sidecar(f) for f in self.files]
            self.unmatched = 0

    def _sidecar(self, rel: str) -> Optional[str]:
        try:
            return _clean((self.root / rel).with_suffix(".txt").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None

    def item_id(self, i: int) -> str:
        return self.files[i]

    def read(self, indices):
        return [_read_bytes(self.root / self.files[i]) for i in indices]

    def describe(self):
        return {"path": str(self.root.resolve()),
                "captions": str(self.caption_file.resolve()) if self.caption_file else ".txt beside each image"}


def expand_parquet(sources: Sequence[str]) -> list[Path]:
    """Files, globs and directories -> sorted, de-duplicated .parquet files."""
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.parquet") if q.is_file())
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if q.endswith(".parquet"))
        elif p.is_file():
            found = [p]
        else:
            raise SourceError(f"{s}: no such file")
        if not found:
            raise SourceError(f"{s}: no .parquet files")
        files += found
    return list(dict.fromkeys(files))


class ParquetSource(ImageSource):
    """Rows of parquet files (LAION / img2dataset / HF layout): image bytes in a binary column or a struct with
    ``bytes`` (and ``path``); captions auto-detected among :data:`CAPTION_COLUMNS`. Only captions are read up front;
    images are read per row group (the last one read is cached: a shard reads its rows in order)."""

    kind = "parquet"

    def __init__(self, sources: Sequence[str], image_column: Optional[str] = None,
                 caption_column: Optional[str] = None):
        import pyarrow.parquet as pq

        self.files = expand_parquet(sources)
        self.root = Path(os.path.commonpath([str(p.resolve().parent) for p in self.files]))
        self.names = [p.resolve().relative_to(self.root).as_posix() for p in self.files]
        self.captions, starts, self.group_starts, self.image_columns = [], [0], [], []
        for p in self.files:
            try:
                pf = pq.ParquetFile(p)
                names = pf.schema_arrow.names
                self.image_columns.append(_pick(p, names, image_column, IMAGE_COLUMNS, "image"))
                ccol = _pick(p, names, caption_column, CAPTION_COLUMNS, "caption")
                caps = pf.read(columns=[ccol]).column(ccol).to_pylist()
            except SourceError:
                raise
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise SourceError(f"{p}: unreadable parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
                    from None
            self.captions += [_clean(c) for c in caps]
            starts.append(starts[-1] + len(caps))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self.group_starts.append(np.cumsum([0] + sizes[:-1]))
        self.file_starts = np.array(starts)
        self.image_column, self.caption_column = image_column, caption_column
        self._cached = (None, None)

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.file_starts, i, side="right") - 1)
        return f, i - int(self.file_starts[f])

    def item_id(self, i: int) -> str:
        f, row = self._locate(i)
        return f"{self.names[f]}:{row}"

    def _group(self, f: int, g: int):
        import pyarrow.parquet as pq

        if self._cached[0] != (f, g):
            col = self.image_columns[f]
            self._cached = ((f, g), pq.ParquetFile(self.files[f]).read_row_group(g, columns=[col]).column(col))
        return self._cached[1]

    def read(self, indices):
        out = []
        for i in indices:
            f, row = self._locate(i)
            g = int(np.searchsorted(self.group_starts[f], row, side="right") - 1)
            try:
                value = self._group(f, g)[row - int(self.group_starts[f][g])].as_py()
            except Exception as e:
                out.append(BadImage("unreadable", f"{type(e).__name__}: {e}"))
                continue
            out.append(_image_value(value, self.files[f].parent))
        return out

    def describe(self):
        return {"path": str(self.root), "files": self.names, "image_columns": sorted(set(self.image_columns)),
                "caption_column": self.caption_column or "auto (" + "/".join(CAPTION_COLUMNS) + ")"}


class TarSource(ImageSource):
    """WebDataset tar shards (img2dataset: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``; ``sd_dmd/data/tars.py``):
    samples in shard order (a brace pattern in its order; a glob or folder sorted), then in tar order; item ``i`` is
    named ``shard.tar:KEY``. Its image is the sample's first member among :data:`IMAGE_COLUMNS` (or
    ``image_column``, an extension), its caption the first of :data:`CAPTION_COLUMNS` it has (``txt``: the ``.txt``
    member; the others: fields of its ``.json``), or ``caption_column``. Listing reads the tar headers and the text
    members; an image is read by its byte range when its store shard is made. Damage found while listing is skipped
    and named in :attr:`problems`; a member cut short is read as a 'truncated' bad image."""

    kind = "webdataset"

    def __init__(self, sources: Sequence[str], image_column: Optional[str] = None,
                 caption_column: Optional[str] = None, progress: bool = True):
        from array import array

        from tqdm.auto import tqdm

        from sd_dmd.data.tars import caption_of, expand_tars, index_tar, sample_fields

        self.files = expand_tars(sources, SourceError)
        self.root = Path(os.path.commonpath([str(p.resolve().parent) for p in self.files]))
        self.names = [p.resolve().relative_to(self.root).as_posix() for p in self.files]
        self.image_column, self.caption_column = image_column, caption_column
        self.captions, self.keys, self.problems, exts, fields_seen = [], [], [], set(), set()
        self._file, self._offset, self._size = array("i"), array("q"), array("q")
        for f, path in enumerate(tqdm(self.files, unit="shard", desc="listing tar shards", dynamic_ncols=True,
                                      disable=not progress or len(self.files) < 2)):
            samples, problems = index_tar(path)
            self.problems += problems
            for sample in samples:
                fields, bad = sample_fields(sample, path)
                self.problems += bad
                exts.update(sample.members)
                fields_seen.update(fields)
                ext = image_column if image_column else next((c for c in IMAGE_COLUMNS if c in sample.members), None)
                offset, size = sample.members.get(ext, (-1, 0))
                self._file.append(f)
                self._offset.append(offset)
                self._size.append(size)
                self.keys.append(sample.key)
                self.captions.append(_clean(caption_of(fields, caption_column, CAPTION_COLUMNS)))
        self._check_found(sources, exts, fields_seen)

    def _check_found(self, sources, exts: set, fields: set) -> None:
        where = "::".join(map(str, sources))
        if not self.keys:
            raise SourceError(f"{where}: no samples in {len(self.files)} tar shard(s)"
                              + (f" ({self.problems[0]})" if self.problems else ""))
        if self.image_column is not None and self.image_column not in exts:
            raise SourceError(f"{where}: no sample has a '.{self.image_column}' member (extensions: {sorted(exts)})")
        if self.image_column is None and not exts & set(IMAGE_COLUMNS):
            raise SourceError(f"{where}: no image member among {list(IMAGE_COLUMNS)} (extensions: {sorted(exts)}); "
                              "pass --image_column")
        if self.caption_column is not None and self.caption_column not in fields:
            raise SourceError(f"{where}: no sample has the caption field '{self.caption_column}' (txt: the .txt "
                              f"member; JSON fields: {sorted(fields - {'txt'})})")

    def item_id(self, i: int) -> str:
        return f"{self.names[self._file[i]]}:{self.keys[i]}"

    def _member(self, i: int, handles: dict):
        """Item i's image bytes, read by its byte range (``handles``: the shards opened by this read), or BadImage."""
        offset, size = self._offset[i], self._size[i]
        if offset < 0:
            return BadImage("missing image", f"no {self.image_column or '/'.join(IMAGE_COLUMNS)} member")
        if size > MAX_FILE_BYTES:
            return BadImage("too large", f"{size:,} bytes encoded (limit {MAX_FILE_BYTES:,})")
        try:
            f = handles.get(self._file[i])
            if f is None:
                f = handles[self._file[i]] = open(self.files[self._file[i]], "rb")
            f.seek(offset)
            data = f.read(size)
        except OSError as e:
            return BadImage("unreadable", f"{type(e).__name__}: {e.strerror or e}")
        return data if len(data) == size else BadImage("truncated", f"{len(data)} of {size} bytes (the tar ends early)")

    def read(self, indices):
        handles: dict = {}
        try:
            return [self._member(i, handles) for i in indices]
        finally:
            for f in handles.values():
                f.close()

    def describe(self):
        return {"path": str(self.root), "files": self.names,
                "image_column": self.image_column or "auto (" + "/".join(IMAGE_COLUMNS) + ")",
                "caption_column": self.caption_column or "auto (" + "/".join(CAPTION_COLUMNS) + ")",
                "problems": list(self.problems[:100]), "problem_count": len(self.problems)}


def _image_value(value, base: Optional[Path] = None):
    """bytes | {'bytes', 'path'} | a path string (relative to ``base``) -> bytes or BadImage."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        p = Path(value)
        return _read_bytes(p if p.is_absolute() or base is None else base / p)
    if value is None:
        return BadImage("missing image", "no bytes and no path")
    if hasattr(value, "save"):  # a PIL image (a dataset whose column could not be read undecoded)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return BadImage("unreadable", f"unsupported image value {type(value).__name__}")


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json"))


def load_dataset_split(name_or_path: str, split: str, streaming: bool = False):
    """A ``datasets`` dataset: a ``save_to_disk`` directory (``load_from_disk``; streamed: ``to_iterable_dataset``)
    or a ``load_dataset`` name/path (``streaming=streaming``), the split ``split``; a SourceError names what fails."""
    import datasets

    try:
        if _is_saved_dataset(Path(name_or_path)):
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path, split=split, streaming=streaming)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            if split not in ds:
                raise SourceError(f"{name_or_path}: no split '{split}' (splits: {list(ds)}); pass --split")
            ds = ds[split]
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{name_or_path}: cannot load the dataset ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else ds


def _dataset_columns(name: str, ds, columns, image_column: Optional[str], caption_column: Optional[str]):
    """(image column, caption column, ``ds`` with its image column read undecoded)."""
    import datasets

    image_column = _pick(name, columns, image_column, IMAGE_COLUMNS, "image")
    caption_column = _pick(name, columns, caption_column, CAPTION_COLUMNS, "caption")
    if ds.features is not None and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return image_column, caption_column, ds


class DatasetSource(ImageSource):
    """A ``datasets`` dataset: a ``save_to_disk`` directory (``load_from_disk``) or a ``load_dataset`` name/path
    (``split``). Image columns are read undecoded (``datasets.Image(decode=False)``) and decoded here, so a bad image
    is one skipped row."""

    kind = "dataset"

    def __init__(self, name_or_path: str, split: str = "train", image_column: Optional[str] = None,
                 caption_column: Optional[str] = None):
        ds = load_dataset_split(name_or_path, split)
        self.image_column, self.caption_column, ds = _dataset_columns(name_or_path, ds, ds.column_names,
                                                                      image_column, caption_column)
        self.name, self.split, self.ds = name_or_path, split, ds
        self.captions = [_clean(c) for c in ds[self.caption_column]]
        self.dataset_fingerprint = getattr(ds, "_fingerprint", None)

    def item_id(self, i: int) -> str:
        return f"row {i}"

    def read(self, indices):
        try:
            values = self.ds[list(indices)][self.image_column]
        except Exception:  # one bad row spoils the batch: read row by row
            values = []
            for i in indices:
                try:
                    values.append(self.ds[int(i)][self.image_column])
                except Exception as e:
                    values.append(BadImage("unreadable", f"{type(e).__name__}: {e}"))
        return [v if isinstance(v, BadImage) else _image_value(v) for v in values]

    def describe(self):
        return {"path": self.name, "split": self.split, "image_column": self.image_column,
                "caption_column": self.caption_column, "dataset_fingerprint": self.dataset_fingerprint}


class _StreamCursor:
    """Rows of an iterable dataset by index, read forward. A requested row's caption and image are held (the image
    until :meth:`image` takes it; both at most :data:`HOLD` rows behind the cursor); rows passed over unrequested are
    not. A row behind the cursor and no longer held restarts the stream at it (``IterableDataset.skip``)."""

    HOLD = 1024

    def __init__(self, ds, num_items: int, image_column: str, caption_column: str, name: str):
        self.ds, self.num_items, self.name = ds, num_items, name
        self.image_column, self.caption_column = image_column, caption_column
        self._it, self._next = None, 0
        self._captions: dict[int, Optional[str]] = {}
        self._images: dict[int, object] = {}

    def _reach(self, i: int) -> None:
        if not 0 <= i < self.num_items:
            raise IndexError(f"{self.name}: row {i} out of range ({self.num_items} items)")
        if self._it is None or i < self._next:
            self._it, self._next = iter(self.ds.skip(i) if i else self.ds), i
            self._captions.clear()
            self._images.clear()
        while self._next <= i:
            try:
                row = next(self._it)
            except StopIteration:
                raise SourceError(f"{self.name}: the stream ended after {self._next} rows; --num_items declares "
                                  f"{self.num_items}") from None
            except Exception as e:  # the stream itself failed: no row can be trusted to be row i after it
                self._it = None
                raise SourceError(f"{self.name}: reading row {self._next} of the stream failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            if self._next == i:
                self._captions[i] = _clean(row.get(self.caption_column))
                self._images[i] = row.get(self.image_column)
            self._next += 1
        for held in (self._captions, self._images):
            while held and next(iter(held)) < self._next - self.HOLD:
                del held[next(iter(held))]

    def caption(self, i: int) -> Optional[str]:
        if i not in self._captions:
            self._reach(i)
        return self._captions[i]

    def image(self, i: int):
        if i not in self._images:
            self._reach(i)
        return self._images.pop(i)


class _StreamCaptions:
    """``captions`` of a streamed source: read through its cursor when asked."""

    def __init__(self, cursor: _StreamCursor):
        self.cursor = cursor

    def __len__(self) -> int:
        return self.cursor.num_items

    def __getitem__(self, i: int) -> Optional[str]:
        return self.cursor.caption(i)


class StreamedDatasetSource(ImageSource):
    """A ``datasets`` dataset iterated, never materialised (``--streaming``): ``load_dataset(..., streaming=True)``,
    or a ``save_to_disk`` directory through ``to_iterable_dataset()``. Item ``i`` is the stream's row ``i``, named
    ``row i`` as :class:`DatasetSource` names it (same kind, same fingerprint: either source resumes the other's
    store). The item count is declared (``num_items``: the first N rows; a shorter stream is an error when it ends;
    captions are then not hashed up front, so the resume check compares the count only) or counted by a first pass
    over the caption column, which also hashes the captions. Rows are read forward (:class:`_StreamCursor`): a process
    reads the stream from its first shard to its last and keeps the rows of its own shards."""

    kind = "dataset"

    def __init__(self, name_or_path: str, split: str = "train", image_column: Optional[str] = None,
                 caption_column: Optional[str] = None, num_items: Optional[int] = None, progress: bool = True):
        ds = load_dataset_split(name_or_path, split, streaming=True)
        columns = ds.column_names
        if columns is None:  # features unknown until a row is read (e.g. JSON files)
            columns = list(next(iter(ds), None) or {})
        self.image_column, self.caption_column, ds = _dataset_columns(name_or_path, ds, columns, image_column,
                                                                      caption_column)
        self.name, self.split, self.ds, self.declared = name_or_path, split, ds, num_items is not None
        self.captions_sha256 = None
        if num_items is None:
            num_items, self.captions_sha256 = self._count(progress)
        self._cursor = _StreamCursor(ds, num_items, self.image_column, self.caption_column, name_or_path)
        self.captions = _StreamCaptions(self._cursor)

    def _count(self, progress: bool) -> tuple[int, str]:
        """(rows, sha256 of their captions as :meth:`ImageSource.fingerprint` hashes them): one pass over the
        caption column."""
        from tqdm.auto import tqdm

        h, n = hashlib.sha256(), 0
        for row in tqdm(self.ds.select_columns([self.caption_column]), unit="row", disable=not progress,
                        desc=f"counting the rows of {self.name}", dynamic_ncols=True):
            h.update(json.dumps(_clean(row[self.caption_column])).encode() + b"\n")
            n += 1
        if not n:
            raise SourceError(f"{self.name}: the stream holds no rows (split '{self.split}')")
        return n, h.hexdigest()

    def item_id(self, i: int) -> str:
        return f"row {i}"

    def read(self, indices):
        return [_image_value(self._cursor.image(int(i))) for i in indices]

    def fingerprint(self) -> dict:
        items = hashlib.sha256()
        for i in range(len(self)):
            items.update(self.item_id(i).encode() + b"\n")
        return {"kind": self.kind, "item_count": len(self), "items_sha256": items.hexdigest(),
                "captions_sha256": self.captions_sha256}

    def describe(self):
        return {"path": self.name, "split": self.split, "image_column": self.image_column,
                "caption_column": self.caption_column, "streaming": True,
                "item_count_from": "--num_items" if self.declared else "a counting pass"}


class DigitsSource(ImageSource):
    """scikit-learn's 1,797 digits as 32x32 images (``sd_dmd.digits.data.load_images``); item i's caption is a
    template of its label, chosen by ``default_rng(DIGITS_CAPTION_SEED)`` (the templates of the training prompts)."""

    kind = "digits"

    def __init__(self):
        from sd_dmd.data.digits import TEMPLATES, WORDS, load_images

        self.images, labels = load_images()
        pick = np.random.default_rng(DIGITS_CAPTION_SEED).integers(len(TEMPLATES), size=len(labels))
        self.captions = [TEMPLATES[t].format(w=WORDS[k], k=k) for t, k in zip(pick.tolist(), labels.tolist())]

    def item_id(self, i: int) -> str:
        return f"digit {i}"

    def read(self, indices):
        return [self.images[i] for i in indices]

    def describe(self):
        return {"path": "sklearn.datasets.load_digits", "captions": "digits.data.TEMPLATES, "
                f"default_rng({DIGITS_CAPTION_SEED}).integers(len(TEMPLATES), size=N)"}


def _rgb(img):
    """RGB; transparent pixels over white (as LAION tooling does), not black."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _open_image(data: bytes, max_pixels: int):
    """``Image.open`` of ``data`` (the header read, no pixel decoded); raises :class:`BadImage` 'too large: W×H ...'
    over ``max_pixels`` pixels (<= 0: over PIL's own limit, 2 x ``Image.MAX_IMAGE_PIXELS``, unless that is None)."""
    from PIL import Image

    # PIL checks the size inside Image.open: it warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises
    # DecompressionBombError above twice that, before the size can be read. So open with its check off and apply the
    # limit here. MAX_IMAGE_PIXELS is a module global: it is switched under a lock, held by every open of this
    # module (opening reads the header only: cheap), and restored at once.
    with _OPEN_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    limit = max_pixels if max_pixels > 0 else 2 * (pil_limit or 0)
    w, h = img.size
    if limit and w * h > limit:
        img.close()
        raise BadImage("too large", f"{w}×{h} pixels (limit {limit:,}{', max_pixels' if max_pixels > 0 else ''})")
    return img


def decode_image(data, resolution: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """bytes (or a ready tensor) -> float [3, resolution, resolution] in [-1, 1]; raises :class:`BadImage`, 'too
    large: W×H ...' for an image of more than ``max_pixels`` pixels (<= 0: PIL's own limit only), before decoding."""
    from PIL import ImageOps



    if isinstance(data, BadImage):
        raise data
    if isinstance(data, torch.Tensor):
        if tuple(data.shape) != (3, resolution, resolution):
            raise BadImage("wrong size", f"{list(data.shape)}, expected [3, {resolution}, {resolution}]")
        return data.float()
    if not data:
        raise BadImage("zero-size", "0 bytes")
    if len(data) > MAX_FILE_BYTES:
        raise BadImage("too large", f"{len(data):,} bytes encoded (limit {MAX_FILE_BYTES:,})")
    try:
        with _open_image(data, max_pixels) as img:  # the size is checked before load()
            img.load()  # decode it all now: a truncated file fails here, not later
            ImageOps.exif_transpose(img, in_place=True)  # in place: one full-size copy fewer
            img = _rgb(img)
        if min(img.size) < 1:
            raise BadImage("zero-size", f"{img.size[0]}x{img.size[1]} pixels")
        img = lanczos(img, resolution)
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        raise BadImage("unreadable", f"{type(e).__name__}: {_BYTESIO.sub('', str(e))[:200]}") from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1


def _auto_kind(images: str) -> str:
    p = Path(images)
    if _is_saved_dataset(p):
        return "dataset"
    from sd_dmd.data.tars import is_tar_pattern

    # before parquet: img2dataset's webdataset output holds a metadata .parquet (no images) beside each .tar
    if is_tar_pattern(images) or (p.is_dir() and next(p.rglob("*.tar"), None) is not None):
        return "webdataset"
    if images.endswith(".parquet") or (p.is_dir() and any(p.rglob("*.parquet"))):
        return "parquet"
    if p.is_dir():
        return "folder"
    raise SourceError(f"{images}: not a folder, a .parquet file/glob, .tar shards or a dataset directory; pass "
                      "--source")


def open_source(kind: str, images: Optional[str], captions: Optional[str] = None, image_column: Optional[str] = None,
                caption_column: Optional[str] = None, file_column: Optional[str] = None, split: str = "train",
                streaming: bool = False, num_items: Optional[int] = None, progress: bool = True) -> ImageSource:
    """The source named by the CLI settings; ``kind='auto'``: a datasets directory, tar shards, parquet or a folder
    of images (``streaming``: a dataset, iterated). ``progress``: bars on the listing or counting pass."""
    if kind == "digits":
        return DigitsSource()
    if not images:
        raise SourceError("images: a folder, parquet file/glob, tar shards or dataset is required (--images PATH)")
    if kind == "auto":
        try:
            kind = _auto_kind(images)
        except SourceError:
            if not streaming:
                raise
            kind = "dataset"  # a load_dataset name
    if streaming and kind != "dataset":
        raise SourceError(f"streaming: iterates a datasets dataset, not a {kind} source ({kind} sources are read "
                          f"lazily already): drop --streaming, or pass --source dataset to stream {images} with "
                          "load_dataset")
    if kind == "folder":
        return FolderSource(images, captions, file_column, caption_column)
    if kind == "parquet":
        return ParquetSource([images], image_column, caption_column)
    if kind == "webdataset":
        return TarSource(images.split("::"), image_column, caption_column, progress)
    if kind == "dataset" and streaming:
        return StreamedDatasetSource(images, split, image_column, caption_column, num_items, progress)
    if kind == "dataset":
        return DatasetSource(images, split, image_column, caption_column)
    raise SourceError(f"source: unknown kind '{kind}'")


# ----- shared image helpers (evaluation resizes with the same Lanczos) -----
def lanczos(img, size: int):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.convert("RGB").resize((size, size), Image.LANCZOS)


def load_images(folder: Path, size: int, limit: Optional[int] = None) -> torch.Tensor:
    """uint8 [N, 3, size, size] (centre crop + Lanczos), sorted by file name."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXT and ".tmp" not in p.name)
    if not files:
        raise FileNotFoundError(f"{folder}: no images")
    files = files[:limit] if limit else files
    arr = [np.asarray(lanczos(Image.open(f), size)) for f in files]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()
