"""Prompt conditionings computed once (``data.text_cache``, issue 38): training reads them and never loads a text
encoder. SD3.5's T5-XXL alone is 4.7 B parameters (9.4 GB in bf16) that a run would otherwise hold only to encode
prompts.

    python -m sd_dmd.cache_text --pretrained_model_name_or_path M --prompts prompts.txt [--extra_prompts "a cat" ...]
        --output_dir text_cache/                                     # then train with --data.text_cache text_cache/

A store on the engine of data/store.py (manifest, atomic shards, resume, row digests, lazy reads): row ``i`` holds
item ``i``'s prompt and its conditioning, exactly what ``DMDModel.encode_prompts`` returns for it (the family's
packed tensor: SD's CLIP states; SDXL's with the pooled embedding and time ids; SD3's CLIP + T5 tokens and pooled),
in ``dtype`` (fp32 or fp16). Item 0 is CFG's unconditional conditioning (``DMDModel.uncond_embedding``: SDXL's zeros,
the others' encoding of ""). The items are the unique prompts of ``--prompts`` (every caption, unfiltered: training
filters its own list, which the cache must contain) and ``--extra_prompts`` (the validation prompts, say), in order.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sd_dmd.data.store import (MANIFEST, ShardedStore, pending_shards, prepare, read_manifest as _read, shard_path,
                               write_manifest, write_parquet)
from sd_dmd.errors import PairsError

FORMAT = "sd_dmd.text_cache/1"
UNCOND = "\x00unconditional"  # item 0's prompt: CFG's unconditional conditioning (no prompt text is this)
SHARD_INFO = b"sd_dmd_shard"
DTYPES = {"fp32": np.float32, "fp16": np.float16}  # storage dtypes
IDENTITY_KEYS = ("format", "family", "text_identity", "latent_shape", "latent_dtype", "resolution", "shard_size",
                 "num_items", "prompts_sha256")


class TextCacheError(PairsError):
    """A text cache that is missing, damaged, made for another teacher, or lacking a prompt."""


def text_identity(encoders: list) -> list:
    """How a cache recognises its text encoders: ``teacher_identity`` of each (the same encoders in fp32, fp16 or
    bf16 match)."""
    from sd_dmd.models.teacher import teacher_identity

    return [teacher_identity(e) for e in encoders]


def _same_identity(a: list, b: list) -> bool:
    from sd_dmd.models.teacher import same_teacher

    return len(a) == len(b) and all(same_teacher(x, y) for x, y in zip(a, b))


def prompts_sha256(items: list[str]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


# ----- making it -------------------------------------------------------------------------------------------------
def cache_items(prompt_sources: Sequence[str], extra: Sequence[str], caption_column: Optional[str]) -> list[str]:
    """Item 0 the unconditional marker, then every unique prompt of the sources and the extras, in order."""
    from sd_dmd.data.prompts import read_prompts

    prompts = read_prompts(list(prompt_sources), caption_column)[0] if prompt_sources else []
    return [UNCOND] + list(dict.fromkeys([*prompts, *extra]))


def _write_shard(path: Path, index: list, prompts: list, blobs: list, first: int) -> None:
    import pyarrow as pa

    table = pa.table({"index": pa.array(index, pa.int64()), "prompt": pa.array(prompts, pa.string()),
                      "latent": pa.array(blobs, pa.binary())})
    info = {"first_index": first, "rows": len(index)}
    write_parquet(path, table.replace_schema_metadata({SHARD_INFO: json.dumps(info)}))


def _complete(num_items: int, shard_size: int):
    import pyarrow.parquet as pq

    def complete(k: int, path: Path) -> bool:
        want = min(num_items, (k + 1) * shard_size) - k * shard_size
        try:
            meta = pq.read_metadata(path)
            info = json.loads(meta.metadata[SHARD_INFO])
        except Exception:
            return False
        return info["first_index"] == k * shard_size and info["rows"] == want == meta.num_rows

    return complete


def _open_store(out: Path, manifest: dict, state) -> None:
    """Create the store, or check that it is the same one (every process raises before anything is written)."""
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        diffs = [k for k in IDENTITY_KEYS if k != "text_identity" and old.get(k) != manifest.get(k)]
        if not _same_identity(old.get("text_identity", []), manifest["text_identity"]):
            diffs.insert(0, "text encoders")
        if diffs:
            raise TextCacheError(f"{out}: holds a text cache made from other prompts, encoders or settings "
                                 f"({', '.join(diffs)} differ); use another --output_dir")
    prepare(out, state, lambda: (out / MANIFEST).exists() or write_manifest(out, manifest))


def _encode(prompts: list[str], text, uncond: torch.Tensor, batch_size: int, np_dtype, bar) -> list[bytes]:
    """Each prompt's conditioning as bytes of ``np_dtype``, ``batch_size`` prompts an encoder call; the
    unconditional marker takes ``uncond``."""
    blobs = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        conds = [uncond] if chunk[0] == UNCOND else []
        rest = chunk[1:] if chunk[0] == UNCOND else chunk
        if rest:
            conds.append(text.encode(rest))
        blobs += [e.tobytes() for e in torch.cat(conds).float().cpu().numpy().astype(np_dtype)]
        bar.update(len(chunk))
    return blobs


def cache_text(cfg, log=print) -> dict:
    """Create or complete the cache described by ``cfg`` (:class:`sd_dmd.data.config.TextCacheConfig`): only the
    text encoders and tokenizers are loaded (the network's config alone, for the conditioning's sizes)."""
    from tqdm.auto import tqdm

    from sd_dmd.dist import partial_state
    from sd_dmd.models.family import detect_family, model_index

    state = partial_state()
    out = Path(cfg.output_dir)
    items = cache_items(cfg.prompts, cfg.extra_prompts, cfg.caption_column)  # every input checked first
    index = model_index(cfg.pretrained_model_name_or_path, cfg.revision)
    family = detect_family(cfg.pretrained_model_name_or_path, cfg.revision, index)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    comps = family.load_text_components(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, dtype)
    for e in comps.text_encoders:
        e.to(state.device).eval().requires_grad_(False)
    if cfg.resolution is None:  # the model's: the network's sample size times the VAE's factor, as DMDModel's
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.load_config(cfg.pretrained_model_name_or_path, subfolder="vae", revision=cfg.revision)
        resolution = int(comps.unet.config.sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        resolution = cfg.resolution
    text = family.conditioner(comps, resolution, index.get("force_zeros_for_empty_prompt", True))
    probe = text.uncond()
    manifest = {"format": FORMAT, "model": cfg.pretrained_model_name_or_path, "revision": cfg.revision,
                "family": family.name, "text_identity": text_identity(comps.text_encoders),
                "latent_shape": list(probe.shape[1:]), "latent_dtype": np.dtype(DTYPES[cfg.dtype]).name,
                "resolution": resolution if family.name == "sdxl" else None, "mixed_precision": cfg.mixed_precision,
                "shard_size": cfg.shard_size, "num_items": len(items), "prompts_sha256": prompts_sha256(items),
                "item_0": "CFG's unconditional conditioning (DMDModel.uncond_embedding)"}
    _open_store(out, manifest, state)
    n_shards = math.ceil(len(items) / cfg.shard_size)
    todo, _ = pending_shards(out, n_shards, state, _complete(len(items), cfg.shard_size), log)
    t0, done = time.time(), 0
    bar = tqdm(total=sum(min(len(items), (k + 1) * cfg.shard_size) - k * cfg.shard_size for k in todo),
               unit="prompt", disable=not state.is_main_process, desc="encoding prompts", dynamic_ncols=True)
    with bar:
        for k in todo:
            ids = list(range(k * cfg.shard_size, min(len(items), (k + 1) * cfg.shard_size)))
            blobs = _encode([items[i] for i in ids], text, probe, cfg.batch_size, DTYPES[cfg.dtype], bar)
            _write_shard(shard_path(out, k), ids, [items[i] for i in ids], blobs, ids[0])
            done += len(ids)
    from accelerate.utils import gather_object

    total = sum(gather_object([done]))
    state.wait_for_everyone()
    if state.is_main_process:
        log(f"done: {len(items) - 1} prompts + the unconditional conditioning, {list(probe.shape[1:])} each "
            f"({cfg.dtype}), {total} encoded now in {time.time() - t0:.1f}s -> {out}")
    return manifest


# ----- reading it, for training ----------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    return _read(path, FORMAT, TextCacheError, "text cache")


class TextCache(ShardedStore):
    """Reader: the prompt -> row map (the ``prompt`` column of every shard, read once) and lazy reads of the rows a
    batch needs, each checked against its digest."""

    _COLUMNS = ["prompt", "latent"]
    _error = TextCacheError
    _rows_name, _row_name = "prompts", "item"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        n, size = m["num_items"], m["shard_size"]
        indices, shard_of, row_of = self._index_shards(
            math.ceil(n / size), _complete(n, size),
            "is missing or partial; re-run python -m sd_dmd.cache_text with the same arguments to finish it", True)
        self._set_index(indices, shard_of, row_of)
        prompts = self.column_values("prompt")
        order = np.argsort(np.concatenate(indices), kind="stable")
        self.row = {prompts[int(j)]: r for r, j in enumerate(order)}

    def check_compatible(self, family: str, identity: Optional[list], resolution: int) -> None:
        """Training refuses a cache made for another family or text encoders (``identity`` None: the encoders are
        not loaded, so they are not compared), or for SDXL at another resolution (its time ids are packed in)."""
        m = self.manifest
        if m["family"] != family:
            raise TextCacheError(f"{self.path}: a text cache for the {m['family']} family, the teacher is {family}")
        if identity is not None and not _same_identity(m["text_identity"], identity):
            raise TextCacheError(f"{self.path}: made with other text encoders ({m['model']}) than the teacher's")
        if m["resolution"] is not None and m["resolution"] != resolution:
            raise TextCacheError(f"{self.path}: made at resolution {m['resolution']} (SDXL's time ids), training "
                                 f"runs at {resolution}")

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self.row]

    def lookup(self, prompts: Sequence[str]) -> torch.Tensor:
        miss = self.missing(prompts)
        if miss:
            raise TextCacheError(f"{self.path}: no conditioning for {len(miss)} prompt(s), e.g. {miss[0]!r}; add "
                                 "them (python -m sd_dmd.cache_text ... --prompts/--extra_prompts) into a new cache")
        return torch.from_numpy(self.rows([self.row[p] for p in prompts])["latent"].astype(np.float32))


class CachedText:
    """A family conditioner whose prompts come from a :class:`TextCache`: ``encode``/``uncond`` read the cache (on
    the model's device, in its dtype), ``unet_kwargs`` is the family's own."""

    def __init__(self, cache: TextCache, text, device, dtype):
        self.cache, self.text, self.device, self.dtype = cache, text, device, dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.cache.lookup(list(prompts)).to(self.device, self.dtype)

    def uncond(self) -> torch.Tensor:
        return self.encode([UNCOND])

    def unet_kwargs(self, cond: torch.Tensor) -> dict:
        return self.text.unet_kwargs(cond)
