"""Caption reading for pair generation and training: parquet (LAION-Aesthetics), .txt and .jsonl.

Missing/empty/NaN/non-string captions are skipped and counted; a missing column, an unreadable file or
no usable caption at all is a :class:`PromptError` naming the file.
"""
from __future__ import annotations

import glob
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CAPTION_COLUMNS = ("TEXT", "caption", "text", "prompt")
SUFFIXES = (".parquet", ".txt", ".jsonl")


class PromptError(ValueError):
    """Bad prompt input; the message names the file (and row/column where it applies)."""


@dataclass
class PromptFilter:
    min_aesthetic: Optional[float] = None  # keep rows with AESTHETIC_SCORE/aesthetic >= this
    max_punsafe: Optional[float] = None  # keep rows with punsafe <= this
    max_pwatermark: Optional[float] = None  # keep rows with pwatermark <= this
    dedupe: bool = False  # drop exact duplicate captions (first kept)


@dataclass
class PromptStats:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept} prompts kept of {self.read} read; skipped: {why}"


def expand_sources(sources: Sequence[str] | str) -> list[Path]:
    """Files, globs and directories -> a sorted, de-duplicated list of prompt files."""
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in SUFFIXES and q.is_file())
            if not found:
                raise PromptError(f"{s}: directory holds no .parquet/.txt/.jsonl files")
            files += found
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).suffix in SUFFIXES)
            if not found:
                raise PromptError(f"{s}: glob matches no .parquet/.txt/.jsonl files")
            files += found
        elif not p.exists():
            raise PromptError(f"{s}: no such file")
        elif p.suffix not in SUFFIXES:
            raise PromptError(f"{s}: unsupported prompt file type '{p.suffix}' (use .parquet, .txt or .jsonl)")
        else:
            files.append(p)
    if not files:
        raise PromptError("no prompt files given")
    return list(dict.fromkeys(files))


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


def _read_table(path: Path, caption_column: Optional[str]) -> tuple[list, dict]:
    """Return (captions, numeric filter columns) for one file."""
    if path.suffix == ".txt":
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
        extra = {k: [r.get(k) for r in rows] for k in ("AESTHETIC_SCORE", "aesthetic", "punsafe", "pwatermark")
                 if k in columns}
        return [r.get(col) for r in rows], extra
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        col = _pick_column(path, schema.names, caption_column)
        wanted = [col] + [k for k in ("AESTHETIC_SCORE", "aesthetic", "punsafe", "pwatermark") if k in schema.names]
        table = pq.read_table(path, columns=wanted)
    except PromptError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise PromptError(f"{path}: unreadable parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return table.column(col).to_pylist(), {k: table.column(k).to_pylist() for k in wanted[1:]}


def _bad_number(v) -> bool:
    """A filter value that is missing, NaN or not a number fails the filter (the row is skipped)."""
    return isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)


def read_prompts(sources: Sequence[str] | str, caption_column: Optional[str] = None,
                 filters: PromptFilter = PromptFilter()) -> tuple[list[str], PromptStats]:
    """Read every caption from ``sources`` in order, applying filters; raise if none is usable."""
    stats = PromptStats()
    out: list[str] = []
    seen: set[str] = set()
    for path in expand_sources(sources):
        captions, extra = _read_table(path, caption_column)
        aes = extra.get("AESTHETIC_SCORE", extra.get("aesthetic"))
        for i, c in enumerate(captions):
            stats.read += 1
            if c is None or (isinstance(c, float) and math.isnan(c)):
                stats.skipped["missing"] += 1
                continue
            if not isinstance(c, str):
                stats.skipped["not a string"] += 1
                continue
            c = c.strip()
            if not c:
                stats.skipped["empty"] += 1
                continue
            if filters.min_aesthetic is not None and aes is not None and (
                    _bad_number(aes[i]) or aes[i] < filters.min_aesthetic):
                stats.skipped["aesthetic below minimum"] += 1
                continue
            if filters.max_punsafe is not None and "punsafe" in extra and (
                    _bad_number(extra["punsafe"][i]) or extra["punsafe"][i] > filters.max_punsafe):
                stats.skipped["punsafe above maximum"] += 1
                continue
            if filters.max_pwatermark is not None and "pwatermark" in extra and (
                    _bad_number(extra["pwatermark"][i]) or extra["pwatermark"][i] > filters.max_pwatermark):
                stats.skipped["pwatermark above maximum"] += 1
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
