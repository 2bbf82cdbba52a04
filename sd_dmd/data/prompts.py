"""Caption reading for pair generation and training: parquet (LAION-Aesthetics), .txt, .jsonl and WebDataset tar shards
(img2dataset: a sample's ``.txt``, or a field of its ``.json``; ``sd_dmd/data/tars.py``).

Missing/empty/NaN/non-string captions are skipped and counted; a missing column, an unreadable file or
no usable caption at all is a :class:`PromptError` naming the file. As LAION's tooling does, HTML entities
are unescaped (``html.unescape``) and captions that are empty once zero-width characters are removed are
skipped. A filter (``min_aesthetic``...) whose column a file lacks is an error naming the columns present;
filter columns are matched case-insensitively over the spellings LAION releases use (:data:`FILTER_COLUMNS`).
A tar shard's columns are ``txt`` and its samples' JSON fields (img2dataset keeps the columns it was asked to in the
JSON); a damaged member is skipped and named in :attr:`PromptStats.notes`. Sources may be brace patterns
(``shards/{00000..00099}.tar``); a directory holding ``.tar`` shards is read as those shards only (img2dataset writes a
metadata ``.parquet`` of the same samples beside each).
"""
from __future__ import annotations

import glob
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from sd_dmd.errors import PromptError

CAPTION_COLUMNS = ("TEXT", "caption", "text", "prompt")
SUFFIXES = (".parquet", ".txt", ".jsonl", ".tar")
# filter -> accepted column spellings, lower case, preferred first (LAION-Aesthetics: AESTHETIC_SCORE,
# laion2B-en-aesthetic: aesthetic; LAION-5B metadata: punsafe/pwatermark, some re-releases pUnsafe/pWatermark)
FILTER_COLUMNS = {"min_aesthetic": ("aesthetic_score", "aesthetic"), "max_punsafe": ("punsafe",),
                  "max_pwatermark": ("pwatermark",)}
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff\u2060"  # ZW space, ZW non-joiner, ZW joiner, BOM, word joiner
_EDGES = re.compile(f"^[\\s{ZERO_WIDTH}]+|[\\s{ZERO_WIDTH}]+$")


@dataclass
class PromptFilter:
    min_aesthetic: Optional[float] = None  # keep rows with aesthetic score >= this (FILTER_COLUMNS spellings)
    max_punsafe: Optional[float] = None  # keep rows with punsafe <= this
    max_pwatermark: Optional[float] = None  # keep rows with pwatermark <= this
    dedupe: bool = False  # drop exact duplicate captions (first kept)


@dataclass
class PromptStats:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    notes: list = field(default_factory=list)  # damaged tar members, one line each naming shard and member

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        damaged = f"; {len(self.notes)} damaged tar member(s) skipped (first: {self.notes[0]})" if self.notes else ""
        return f"{self.kept} prompts kept of {self.read} read; skipped: {why}{damaged}"

    def warnings(self, limit: int = 20) -> str:
        """'warning: ...' lines naming the first ``limit`` damaged tar members, then how many more."""
        more = [f"warning: and {len(self.notes) - limit} more damaged tar members"] if len(self.notes) > limit else []
        return "\n".join([f"warning: {n}" for n in self.notes[:limit]] + more)


def expand_sources(sources: Sequence[str] | str) -> list[Path]:
    """Files, globs, brace patterns and directories -> a sorted (a brace pattern: in its order), de-duplicated list
    of prompt files."""
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    files: list[Path] = []
    for s in _expand_braces(sources):
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in SUFFIXES and q.is_file())
            if any(q.suffix == ".tar" for q in found):  # img2dataset: a metadata .parquet beside each .tar
                found = [q for q in found if q.suffix == ".tar"]
            if not found:
                raise PromptError(f"{s}: directory holds no .parquet/.txt/.jsonl/.tar files")
            files += found
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).suffix in SUFFIXES)
            if not found:
                raise PromptError(f"{s}: glob matches no .parquet/.txt/.jsonl/.tar files")
            files += found
        elif not p.exists():
            raise PromptError(f"{s}: no such file")
        elif p.suffix not in SUFFIXES:
            raise PromptError(f"{s}: unsupported prompt file type '{p.suffix}' (use .parquet, .txt, .jsonl or .tar)")
        else:
            files.append(p)
    if not files:
        raise PromptError("no prompt files given")
    return list(dict.fromkeys(files))


def _expand_braces(sources: Sequence[str]) -> list[str]:
    """A brace pattern (``shards/{00000..00099}.tar``) that is not itself a file -> its names, each of which must
    exist (webdataset's expansion, as ``tars.expand_tars``)."""
    from sd_dmd.data.tars import expand_braces, expand_tars, is_tar_pattern

    out = []
    for s in map(str, sources):
        if "{" not in s or "}" not in s or Path(s).exists():
            out.append(s)
        elif is_tar_pattern(s):
            out += [str(p) for p in expand_tars(s, PromptError)]
        else:
            out += expand_braces(s)
    return out


def _pick_column(path: Path, columns: Sequence[str], caption_column: Optional[str]) -> str:
    if caption_column is not None:
        if caption_column not in columns:
            raise PromptError(f"{path}: caption column '{caption_column}' not found (columns: {list(columns)})")
        return caption_column
    for c in CAPTION_COLUMNS:
        if c in columns:
            return c
    raise PromptError(f"{path}: no caption column among {list(CAPTION_COLUMNS)} (columns: {list(columns)}); "
                      "pass --caption_column")


def _filter_columns(path: Path, columns: Sequence[str], filters: PromptFilter) -> dict[str, str]:
    """The file's column of each active filter (case-insensitive over :data:`FILTER_COLUMNS`); a filter
    whose column is absent is an error, not a filter silently off."""
    by_lower: dict[str, str] = {}
    for c in columns:
        by_lower.setdefault(str(c).lower(), c)
    out = {}
    for name, spellings in FILTER_COLUMNS.items():
        if getattr(filters, name) is None:
            continue
        col = next((by_lower[s] for s in spellings if s in by_lower), None)
        if col is None:
            present = list(columns) if columns else "none (a .txt file holds captions only)"
            raise PromptError(f"{path}: {name} needs a column named {' or '.join(spellings)} (any case); "
                              f"columns present: {present}")
        out[name] = col
    return out


def _read_tar(path: Path, caption_column: Optional[str], filters: PromptFilter, notes: list) -> tuple[list, dict]:
    """(captions, {filter name: values}) of a tar shard's samples: the caption is ``caption_column`` (``txt``: the
    .txt member; else a JSON field) or the first of ``(*CAPTION_COLUMNS, "txt")`` a sample has; damage -> ``notes``."""
    from sd_dmd.data.tars import caption_of, index_tar, sample_fields

    samples, problems = index_tar(path)
    notes += problems
    rows = []
    for sample in samples:
        fields, bad = sample_fields(sample, path)
        notes += bad
        rows.append(fields)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if caption_column is not None and rows and caption_column not in columns:
        raise PromptError(f"{path}: caption column '{caption_column}' not found (columns: txt (the .txt member) and "
                          f"the JSON fields {[c for c in columns if c != 'txt']})")
    wanted = _filter_columns(path, columns, filters)
    return ([caption_of(r, caption_column, (*CAPTION_COLUMNS, "txt")) for r in rows],
            {name: [r.get(c) for r in rows] for name, c in wanted.items()})


def _read_table(path: Path, caption_column: Optional[str], filters: PromptFilter,
                notes: Optional[list] = None) -> tuple[list, dict]:
    """Return (captions, {filter name: values of its column}) for one file; a tar shard's damage goes to ``notes``."""
    if path.suffix == ".tar":
        return _read_tar(path, caption_column, filters, notes if notes is not None else [])
    if path.suffix == ".txt":
        _filter_columns(path, [], filters)
        try:
            return path.read_text(encoding="utf-8").splitlines(), {}
        except UnicodeDecodeError as e:
            raise PromptError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise PromptError(f"{path}: line {i} is not a JSON object")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        col = _pick_column(path, columns, caption_column)
        wanted = _filter_columns(path, columns, filters)
        return [r.get(col) for r in rows], {name: [r.get(c) for r in rows] for name, c in wanted.items()}
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        col = _pick_column(path, schema.names, caption_column)
        wanted = _filter_columns(path, schema.names, filters)
        table = pq.read_table(path, columns=list(dict.fromkeys([col, *wanted.values()])))
    except PromptError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise PromptError(f"{path}: unreadable parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return table.column(col).to_pylist(), {name: table.column(c).to_pylist() for name, c in wanted.items()}


def _bad_number(v) -> bool:
    """A filter value that is missing, NaN or not a number fails the filter (the row is skipped)."""
    return isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)


# filter -> (does value v pass limit, reason counted when it does not)
_FILTER_TESTS = {"min_aesthetic": (lambda v, lim: v >= lim, "aesthetic below minimum"),
                 "max_punsafe": (lambda v, lim: v <= lim, "punsafe above maximum"),
                 "max_pwatermark": (lambda v, lim: v <= lim, "pwatermark above maximum")}


def clean_caption(c: str) -> str:
    """HTML entities unescaped, whitespace and zero-width characters stripped from both ends."""
    return _EDGES.sub("", html.unescape(c))


def read_prompts(sources: Sequence[str] | str, caption_column: Optional[str] = None,
                 filters: PromptFilter = PromptFilter(), progress: bool = False) -> tuple[list[str], PromptStats]:
    """Read every caption from ``sources`` in order, applying filters; raise if none is usable. ``progress``: a bar
    over the files when there are several."""
    from tqdm.auto import tqdm

    stats = PromptStats()
    out: list[str] = []
    seen: set[str] = set()
    files = expand_sources(sources)
    for path in tqdm(files, unit="file", desc="reading prompts", disable=not progress or len(files) < 2,
                     dynamic_ncols=True):
        captions, extra = _read_table(path, caption_column, filters, stats.notes)
        for i, c in enumerate(captions):
            stats.read += 1
            if c is None or (isinstance(c, float) and math.isnan(c)):
                stats.skipped["missing"] += 1
                continue
            if not isinstance(c, str):
                stats.skipped["not a string"] += 1
                continue
            if not c.strip():
                stats.skipped["empty"] += 1
                continue
            c = clean_caption(c)
            if not c:
                stats.skipped["empty after removing zero-width characters / HTML entities"] += 1
                continue
            failed = next((reason for name, (ok, reason) in _FILTER_TESTS.items() if name in extra and (
                _bad_number(extra[name][i]) or not ok(extra[name][i], getattr(filters, name)))), None)
            if failed:
                stats.skipped[failed] += 1
                continue
            if filters.dedupe:
                if c in seen:
                    stats.skipped["duplicate"] += 1
                    continue
                seen.add(c)
            out.append(c)
    stats.kept = len(out)
    if not out:
        raise PromptError(f"{', '.join(map(str, sources if not isinstance(sources, str) else [sources]))}: "
                          f"no usable caption ({stats.summary()})")
    return out, stats


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def describe_prompt_change(old: Optional[list[str]], old_count: int, new: list[str]) -> str:
    """'count 5 -> 6, first difference at prompt 2: 'a cat' -> 'a dog'' (without the old list: the count only)."""
    parts = [f"prompt count {old_count} -> {len(new)}" if old_count != len(new) else f"{len(new)} prompts"]
    if old is None:
        return ", ".join(parts + [f"the store has no prompts.jsonl to compare with"])
    i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    a = _short(old[i]) if i < len(old) else "(none)"
    b = _short(new[i]) if i < len(new) else "(none)"
    return ", ".join(parts + [f"first difference at prompt {i}: {a} -> {b}"])
