"""WebDataset tar shards as img2dataset writes them: the shard list of a pattern and an index of each shard's samples,
for the image source (``images.TarSource``) and the prompt reader (``prompts.read_prompts``).

img2dataset writes ``{00000..09999}.tar``, each sample ``KEY.jpg`` (or .png/.webp) + ``KEY.txt`` (the caption) +
``KEY.json`` (the caption and its other metadata). A pattern is expanded as webdataset expands it
(``webdataset.shardlists.expand_urls``: braces; several patterns joined by ``::``); a glob or a folder of ``.tar``
files serves as well. Members are grouped into samples as ``webdataset.WebDataset`` groups them
(``webdataset.tariterators.base_plus_ext``: the key is the member name up to the first dot of its base name, the
extension the rest, lower-cased; consecutive members of one key are one sample; ``__*__`` meta files and names
without an extension are skipped), so a sample here is the sample the diffusers WebDataset scripts read.

Unlike webdataset's streaming reader, the index keeps each member's byte range from its tar header (``tarfile`` in
random-access mode seeks past the data): listing a shard reads its headers and its small text members, no image.
Item ``i`` of a source is so fixed before anything is encoded, and a store shard reads the images of its own samples
only, at any resume point.

Damage is skipped and named, never fatal, and is the same on every read (a resume sees the same samples): a shard
that is not a tar, a member the file cuts short, a header that does not parse (the rest of that shard is skipped),
a second member of one extension in a sample (the first is kept), a text member that is not UTF-8 or JSON. Each is
one line naming the shard, the member or sample key and what is lost.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

TEXT_EXTS = ("txt", "json")  # read while indexing: the caption and the metadata
MAX_TEXT_BYTES = 16 << 20  # a larger text member is named and not read
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skip_meta
_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")
_GLOB = re.compile(r"[*?\[]")


@dataclass
class TarSample:
    key: str
    members: dict = field(default_factory=dict)  # extension -> (byte offset of its data, size in bytes)
    texts: dict = field(default_factory=dict)  # extension -> bytes, for the TEXT_EXTS members read while indexing


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00099}.tar`` -> the 100 names, as webdataset expands a URL pattern."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def expand_tars(sources: Sequence[str] | str, error: type) -> list[Path]:
    """Brace patterns, globs, folders (every ``.tar`` below) and files -> sorted (a pattern: in its order),
    de-duplicated ``.tar`` shards; a missing one is an ``error`` naming it."""
    files: list[Path] = []
    for s in [sources] if isinstance(sources, (str, Path)) else sources:
        s, p = str(s), Path(s)
        if _REMOTE.match(s):
            raise error(f"{s}: only local tar shards are read (their members are read by byte range); mount or "
                        "download them")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.tar") if q.is_file())
        elif "{" in s and not p.exists():
            names = expand_braces(s)
            missing = [n for n in names if not Path(n).is_file()]
            if missing:
                raise error(f"{s}: {len(missing)} of {len(names)} shards missing (first: {missing[0]}); name the "
                            "shards that exist, e.g. with a glob 'DIR/*.tar'")
            found = [Path(n) for n in names]
        elif _GLOB.search(s):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if q.endswith(".tar"))
        elif p.is_file():
            found = [p]
        else:
            raise error(f"{s}: no such file")
        if not found:
            raise error(f"{s}: no .tar files")
        compressed = [q for q in found if q.suffix != ".tar"]
        if compressed:
            raise error(f"{compressed[0]}: not a .tar shard (compressed shards cannot be read by byte range; "
                        "decompress them)")
        files += found
    return list(dict.fromkeys(files))


def is_tar_pattern(source: str) -> bool:
    """Whether a source names tar shards: ``x.tar``, ``{00000..00009}.tar``, ``*.tar``, several joined by ``::``."""
    return all(part.endswith(".tar") for part in str(source).split("::"))


def _read_range(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _nonzero_after(f, start: int, end: int) -> bool:
    """Whether any byte in [start, end) is not zero (a tar ends in zero blocks; anything else is an unparsed header)."""
    f.seek(start)
    while start < end:
        chunk = f.read(min(1 << 20, end - start))
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True
        start += len(chunk)
    return False


class _Indexer:
    """One pass over a shard's headers: members grouped into samples (webdataset's rule), damage named."""

    def __init__(self, path: Path, f, size: int, read: Sequence[str]):
        self.path, self.f, self.size, self.read = path, f, size, read
        self.samples: list[TarSample] = []
        self.problems: list[str] = []
        self.cut_short = False  # the last member ran past the end of the file
        self.last = ""  # the name of the last member grouped into a sample

    def _after(self) -> str:
        return f"after member {self.last} (sample {self.samples[-1].key})" if self.samples else "before any sample"

    def add(self, ti) -> None:
        from webdataset.tariterators import base_plus_ext

        key, ext = base_plus_ext(ti.name)
        if not ti.isreg() or key is None or _SKIP_META.match(ti.name) or \
                ("/" not in ti.name and ti.name.startswith("__") and ti.name.endswith("__")):
            return
        ext = ext.lower()
        if not self.samples or self.samples[-1].key != key:
            self.samples.append(TarSample(key))
        s, self.last = self.samples[-1], ti.name
        if ext in s.members:
            self.problems.append(f"{self.path}: {ti.name}: a second '.{ext}' member of sample {key}; the first is "
                                 "kept")
            return
        have = max(0, self.size - ti.offset_data)
        if have < ti.size:
            self.cut_short = True
            self.problems.append(f"{self.path}: {ti.name}: truncated, {have} of {ti.size} bytes (the file ends "
                                 f"early){'; not read' if ext in self.read else ''}")
            if ext in self.read:
                return
        s.members[ext] = (ti.offset_data, ti.size)
        if ext in self.read:
            if ti.size > MAX_TEXT_BYTES:
                self.problems.append(f"{self.path}: {ti.name}: {ti.size:,} bytes, over {MAX_TEXT_BYTES:,}; not read")
            else:
                s.texts[ext] = _read_range(self.f, ti.offset_data, ti.size)

    def run(self) -> None:
        import tarfile

        try:
            tf = tarfile.open(fileobj=self.f, mode="r:")
        except tarfile.TarError as e:
            self.problems.append(f"{self.path}: not a tar file ({e}); its samples are skipped")
            return
        while True:
            at = tf.offset
            try:
                ti = tf.next()
            except tarfile.TarError as e:  # the header after a truncated member, or one that does not parse
                why = f"truncated at byte {self.size}" if at >= self.size else f"unreadable at byte {at} ({e})"
                if not self.cut_short:
                    self.problems.append(f"{self.path}: {why}, {self._after()}; the rest of the shard is skipped")
                return
            if ti is None:  # the end, or a header that does not parse (tarfile stops there without a word)
                if not self.cut_short and _nonzero_after(self.f, tf.offset, self.size):
                    self.problems.append(f"{self.path}: no valid tar header at byte {tf.offset}, {self._after()}; "
                                         f"the rest of the shard ({self.size - tf.offset} bytes) is skipped")
                return
            tf.members = []  # the headers are not kept
            self.add(ti)


def index_tar(path: Path, read: Sequence[str] = TEXT_EXTS) -> tuple[list[TarSample], list[str]]:
    """The samples of one shard in tar order (members' byte ranges; the ``read`` members' bytes), and one line for
    each damage found, naming the shard, the member or sample key, and what is skipped."""
    try:
        f = open(path, "rb")
    except OSError as e:
        return [], [f"{path}: unreadable ({e.strerror or e}); its samples are skipped"]
    with f:
        ix = _Indexer(Path(path), f, os.fstat(f.fileno()).st_size, read)
        ix.run()
    return ix.samples, ix.problems


def sample_fields(sample: TarSample, shard: Path) -> tuple[dict, list[str]]:
    """A sample's text fields: its JSON object's fields, and ``txt`` (the ``.txt`` member); with a line for each text
    member that cannot be read (not UTF-8, not a JSON object)."""
    fields, problems = {}, []
    raw = sample.texts.get("json")
    if raw is not None:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            obj, why = None, f"not JSON ({type(e).__name__}: {str(e)[:80]})"
        else:
            why = None if isinstance(obj, dict) else f"not a JSON object ({type(obj).__name__})"
        if why:
            problems.append(f"{shard}: {sample.key}.json: {why}; its fields are not read")
        else:
            fields.update(obj)
    raw = sample.texts.get("txt")
    if raw is not None:
        try:
            fields["txt"] = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{shard}: {sample.key}.txt: not UTF-8 ({e.reason} at byte {e.start}); not read")
    return fields, problems


def caption_of(fields: dict, caption_column: str | None, candidates: Sequence[str]):
    """The caption field: ``caption_column`` (``txt``: the .txt member; else a JSON field), or the first of
    ``candidates`` the sample has; None when it has none."""
    if caption_column is not None:
        return fields.get(caption_column)
    return next((fields[c] for c in candidates if c in fields), None)
