"""The real-latents store (DESIGN.md, "DMD2 additions": real data for the GAN): images encoded by the teacher's VAE.

Layout of ``output_dir``:
  manifest.json                  VAE identity, resolution, latent shape/dtype, scaling factor, seed, source...
  shards/shard-00000.parquet     rows: index, caption, source, latent (fp16 bytes, C order, N(0,1)-ish SD scale),
                                 row_sha256 (a digest of the row's other values: pairs.row_digest)
  skipped.jsonl                  every skipped item: {"index", "source", "reason"} (written when the store completes)

Rows are defined over the *source items*: the source lists its items in a deterministic order (sorted file names;
parquet files sorted, rows in file order; tar shards in pattern order, samples in tar order; dataset rows in order,
streamed or not; see sd_dmd/data/images.py) and item ``i`` goes to shard ``i // shard_size``. A bad item
(unreadable, truncated or zero-size image, missing caption, non-finite latent) has no row, so a shard may hold fewer
rows than items and ``index`` is not contiguous. Each shard records what it
covers in its parquet footer (key-value metadata :data:`SHARD_INFO`: first item, item count, row count, the skipped
items with their reasons), written in the same atomic rename as its rows: a shard is complete when that record says
it covers its whole item range, so a resume neither redoes a shard whose items were all skipped nor trusts a torn
one, and no sidecar can disagree with its shard. Shard ``k`` belongs to process ``k % world_size`` (as
``pairs.generate_pairs``); it is written to a temp file, fsynced and renamed.

Latent of item ``i`` = ``(vae.encode(x).latent_dist.sample(g_i) - shift_factor) * scaling_factor`` (shift 0 for
SD1.x), ``g_i`` a CPU generator seeded by ``pair_seed(base_seed, i)``: re-derivable whatever the batch size, process
count or resume point. ``x``: RGB, centre-cropped and Lanczos-resized to ``resolution``, in [-1, 1].

The manifest's identity (VAE config hash + weight probe, resolution, latent shape, seed, shard size, precision) and
the source's fingerprint (kind, item count, hashes of the item names and captions; a stream of declared length has
no captions hash, and its count alone is compared) must match to resume; a difference is refused naming it. Images
edited in place under the same names are not detected.
Readable without this package: ``datasets.load_dataset("parquet", data_files="DIR/shards/*.parquet")``.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sd_dmd.data.config import SD15, EncodeConfig
from sd_dmd.data.pairs import pair_seed
from sd_dmd.data.store import (MANIFEST, ShardedStore, atomic_write_bytes, gather_stats, incomplete_report,
                               missing_shards, pending_shards, prepare, read_manifest as _read, shard_path, store_bytes,
                               write_manifest, write_parquet)
from sd_dmd.errors import LatentsError
from sd_dmd.models.vae import encode_latents, load_vae, same_vae, vae_factor, vae_identity

FORMAT = "sd_dmd.latents/1"
SKIPPED_FILE = "skipped.jsonl"
SHARD_INFO = b"sd_dmd.latents.shard"  # parquet footer key: {"first_index", "items", "rows", "skipped"}
# must agree between a store and the run that resumes it (the VAE is compared by same_vae, the source on its own)
IDENTITY_KEYS = ("format", "resolution", "latent_shape", "latent_dtype", "scaling_factor", "shift_factor",
                 "mixed_precision", "base_seed", "shard_size")
SOURCE_KEYS = {"kind": "source kind", "item_count": "item count", "items_sha256": "item names",
               "captions_sha256": "captions"}
NAMED_IN_SUMMARY = 10  # skipped items named in the summary line (all of them are in skipped.jsonl)


# ----- manifest and resume ---------------------------------------------------------------------------------------
def manifest_for(cfg: EncodeConfig, model: str, vae, source, resolution: int, latent_shape) -> dict:
    return {
        "format": FORMAT,
        "model": model,
        "revision": cfg.revision,
        "variant": cfg.variant,
        **vae_identity(vae),
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "latent_dtype": "float16",
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "mixed_precision": cfg.mixed_precision,
        "base_seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "num_items": len(source),
        "source": {**source.fingerprint(), **source.describe()},
        "preprocess": "RGB (alpha over white), EXIF orientation, centre crop to a square, Lanczos resize to "
                      "resolution (PIL), x / 127.5 - 1",
        "seed_derivation": "numpy.random.SeedSequence([base_seed, index]).generate_state(1, uint64)[0] & (2**63-1)",
        "latent": "(vae.encode(x).latent_dist.sample(torch.Generator('cpu').manual_seed(seed)) - (shift_factor or 0))"
                  " * scaling_factor, noise drawn in fp32, stored fp16",
    }


def read_manifest(path: Path) -> dict:
    return _read(path, FORMAT, LatentsError, "latents store")


def check_same_store(existing: dict, wanted: dict, where: Path) -> None:
    """Refuse to resume a store made from another VAE, settings or source, naming each difference."""
    if not same_vae(existing, wanted):
        raise LatentsError(f"{where}: holds latents from a different VAE ({existing.get('model')}); "
                           "use another --output_dir")
    diffs = [f"{k} {existing.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]
    old, new = existing.get("source", {}), wanted["source"]
    for k, name in SOURCE_KEYS.items():
        if k == "captions_sha256" and None in (old.get(k), new.get(k)):
            continue  # a stream of declared length: its captions are not read up front
        if old.get(k) != new.get(k):
            diffs.append(f"{name} {old.get(k)!r} -> {new.get(k)!r}" if k in ("kind", "item_count")
                         else f"{name} changed")
    if diffs:
        raise LatentsError(f"{where}: holds a store made with other settings or from another source "
                           f"({'; '.join(diffs)}); use another --output_dir, or the same settings and source")


def open_store(out: Path, manifest: dict, state) -> dict:
    """Create the store, or check that it matches; every process raises on a mismatch, before anything is written."""
    existing = read_manifest(out) if (out / MANIFEST).exists() else None
    if existing is not None:
        check_same_store(existing, manifest, out)
    prepare(out, state, lambda: existing is None and write_manifest(out, manifest))
    return existing or manifest


# ----- shards ----------------------------------------------------------------------------------------------------
def shard_items(k: int, shard_size: int, num_items: int) -> range:
    return range(k * shard_size, min(num_items, (k + 1) * shard_size))


def write_shard(path: Path, rows: dict, info: dict) -> None:
    """Rows + the footer record of what the shard covers, in one atomic write (:func:`pairs.write_parquet`)."""
    import pyarrow as pa

    table = pa.table({"index": pa.array(rows["index"], pa.int64()), "caption": pa.array(rows["caption"], pa.string()),
                      "source": pa.array(rows["source"], pa.string()), "latent": pa.array(rows["latent"], pa.binary())})
    write_parquet(path, table.replace_schema_metadata({SHARD_INFO: json.dumps(info)}))


def shard_info(path: Path) -> Optional[dict]:
    """The shard's footer record, or None when the file is missing, torn or not one of ours."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        info = json.loads(meta.metadata[SHARD_INFO])
        return info if meta.num_rows == info["rows"] else None
    except Exception:
        return None


def shard_complete(num_items: int, shard_size: int):
    """``complete(k, path)`` for the engine: the shard's footer covers its whole item range."""
    return lambda k, path: shard_is_complete(path, shard_items(k, shard_size, num_items))


def shard_is_complete(path: Path, items: range) -> bool:
    info = shard_info(path)
    return info is not None and info["first_index"] == items.start and info["items"] == len(items)


def _decode_or_bad(raw, resolution: int, max_pixels: int):
    from sd_dmd.data.images import BadImage, decode_image

    try:
        return decode_image(raw, resolution, max_pixels)
    except BadImage as e:
        return e


def make_shard(vae, source, items: range, cfg: EncodeConfig, resolution: int, pool=None, bar=None):
    """(rows, footer record) of ``items``: decoded (in ``pool``'s threads), encoded in batches of cfg.batch_size;
    bad items are recorded as [index, source name, reason] and have no row."""
    from sd_dmd.data.images import BadImage

    rows = {"index": [], "caption": [], "source": [], "latent": []}
    skipped = []
    for b in range(0, len(items), cfg.batch_size):
        idx = list(items[b:b + cfg.batch_size])
        with_caption = [i for i in idx if source.captions[i] is not None]
        skipped += [[i, source.item_id(i), "missing caption"] for i in idx if source.captions[i] is None]
        raws = source.read(with_caption) if with_caption else []
        decoded = list((pool.map if pool else map)(lambda r: _decode_or_bad(r, resolution, cfg.max_pixels), raws))
        good = [(i, x) for i, x in zip(with_caption, decoded) if not isinstance(x, BadImage)]
        skipped += [[i, source.item_id(i), x.reason] for i, x in zip(with_caption, decoded) if isinstance(x, BadImage)]
        if good:
            lat = encode_latents(vae, torch.stack([x for _, x in good]),
                                 [pair_seed(cfg.seed, i) for i, _ in good]).numpy().astype(np.float16)
            for (i, _), a in zip(good, lat):
                if not np.isfinite(a).all():
                    skipped.append([i, source.item_id(i), "non-finite latent"])
                    continue
                rows["index"].append(i)
                rows["caption"].append(source.captions[i])
                rows["source"].append(source.item_id(i))
                rows["latent"].append(a.tobytes())
        if bar is not None:
            bar.update(len(idx))
    info = {"first_index": items.start, "items": len(items), "rows": len(rows["index"]),
            "skipped": sorted(skipped)}
    return rows, info


# ----- the run ---------------------------------------------------------------------------------------------------
@dataclass
class EncodeStats:
    items: int = 0  # source items processed by this run
    encoded: int = 0  # latents written by this run
    skipped: int = 0  # items of this run without a latent
    already_done: int = 0  # items in shards that were complete before this run
    seconds: float = 0.0


def log_problems(problems, log) -> None:
    """Damage a source found while listing (a corrupt tar member...): one warning line each, naming file and member;
    after NAMED_IN_SUMMARY x 2 a count (all are in the manifest's source.problems, up to 100)."""
    limit = 2 * NAMED_IN_SUMMARY
    for line in problems[:limit]:
        log(f"warning: {line}")
    if len(problems) > limit:
        log(f"warning: and {len(problems) - limit} more (the first 100 are in manifest.json, source.problems)")


def skipped_summary(skipped: list, num_items: int) -> str:
    """'skipped 3 of 20 items (missing caption: 1, unreadable: 2): a.jpg (missing caption); ...' (first few named)."""
    if not skipped:
        return f"skipped 0 of {num_items} items"
    counts: dict[str, int] = {}
    for _, _, reason in skipped:
        counts[reason.split(":")[0]] = counts.get(reason.split(":")[0], 0) + 1
    named = "; ".join(f"{src} ({reason})" for _, src, reason in skipped[:NAMED_IN_SUMMARY])
    more = f"; and {len(skipped) - NAMED_IN_SUMMARY} more" if len(skipped) > NAMED_IN_SUMMARY else ""
    why = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"skipped {len(skipped)} of {num_items} items ({why}): {named}{more}"


def store_report(out: Path, num_items: int, shard_size: int) -> str:
    """The skipped-items line and 'store complete: R latents of N items ...' (or which shards are missing);
    writes ``skipped.jsonl`` when the store is complete."""
    n_shards = math.ceil(num_items / shard_size)
    missing = missing_shards(out, n_shards, shard_complete(num_items, shard_size))
    if missing:
        return incomplete_report(out, missing, n_shards)
    infos = [shard_info(shard_path(out, k)) for k in range(n_shards)]
    rows, skipped = sum(i["rows"] for i in infos), [s for i in infos for s in i["skipped"]]
    atomic_write_bytes(out / SKIPPED_FILE, "".join(json.dumps({"index": i, "source": s, "reason": r}) + "\n"
                                                    for i, s, r in skipped).encode())
    size = store_bytes(out)
    return (f"{skipped_summary(skipped, num_items)}{f' (all in {out / SKIPPED_FILE})' if skipped else ''}\n"
            f"store complete: {rows} latents of {num_items} items, {size} bytes ({size / 2**20:.1f} MiB) in "
            f"{out.resolve()}")


def resolve_model(cfg: EncodeConfig) -> str:
    if cfg.pretrained_model_name_or_path:
        return cfg.pretrained_model_name_or_path
    if cfg.source == "digits":
        from sd_dmd.data.digits import TEACHER_DIR

        return str(TEACHER_DIR)
    return SD15


def _overflows_in_fp16(vae, separate: Optional[str], model: str) -> bool:
    """SDXL's VAE overflows in fp16: a separately saved VAE says so by ``force_upcast`` (the fp16-safe one says
    false); the VAE of an SDXL pipeline does. diffusers fills ``force_upcast`` = true into every VAE config without the
    key (SD1.5's too, which is fine in fp16), so a pipeline's own VAE is judged by its family."""
    if separate:
        return bool(vae.config.get("force_upcast", False))
    from sd_dmd.errors import ModelError
    from sd_dmd.models.family import SDXL, detect_family

    try:
        return detect_family(model) is SDXL
    except ModelError:  # a VAE directory, or a hub id not reachable here
        return False


def _encoder_vae(cfg: EncodeConfig, model: str, log):
    """The VAE that encodes: ``--vae`` or the model's, in ``--mixed_precision``, upcast to fp32 (said in one line)
    when fp16 was asked of a VAE that overflows in it (SDXL's: inf/NaN latents)."""
    from sd_dmd.models.shared_unet import DTYPES

    dtype = {"no": torch.float32, "fp16": DTYPES["fp16"], "bf16": DTYPES["bf16"]}[cfg.mixed_precision]
    vae = load_vae(cfg.vae, dtype=dtype, root=True) if cfg.vae else load_vae(model, cfg.revision, cfg.variant, dtype)
    if dtype == torch.float16 and _overflows_in_fp16(vae, cfg.vae, model):
        log(f"the VAE of {cfg.vae or model} says force_upcast (it overflows in fp16, as SDXL's does): encoding in "
            "fp32; pass --vae with an fp16-safe VAE to encode in fp16")
        vae = vae.float()
    return vae


def encode_images(cfg: EncodeConfig, log=print) -> EncodeStats:
    """Create or complete the store described by ``cfg`` (see ``python -m sd_dmd.encode_images``); returns the
    counts of all processes."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from sd_dmd.dist import partial_state
    from sd_dmd.data.images import FolderSource, open_source

    state = partial_state()
    out = Path(cfg.output_dir)
    # validate every input before anything is written
    source = open_source(cfg.source, cfg.images, cfg.captions, cfg.image_column, cfg.caption_column, cfg.file_column,
                         cfg.split, cfg.streaming, cfg.num_items, progress=state.is_main_process)
    if state.is_main_process:
        log_problems(source.problems, log)
    model = resolve_model(cfg)
    vae = _encoder_vae(cfg, model, log).to(state.device).eval()
    resolution, f = cfg.resolution or int(vae.config.sample_size), vae_factor(vae)
    if resolution % f:
        raise LatentsError(f"resolution {resolution} is not a multiple of the VAE factor {f} ({model})")
    if source.kind == "digits" and resolution != 32:
        raise LatentsError(f"resolution: the digits are 32x32 images, got --resolution {resolution}")
    latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)
    manifest = open_store(out, manifest_for(cfg, model, vae, source, resolution, latent_shape), state)

    num_items, shard_size = len(source), cfg.shard_size
    n_shards = math.ceil(num_items / shard_size)
    todo, done = pending_shards(out, n_shards, state, shard_complete(num_items, shard_size), log)
    stats = EncodeStats(already_done=sum(len(shard_items(k, shard_size, num_items)) for k in done))
    done_before = gather_stats(stats).already_done
    if state.is_main_process:
        where = manifest["source"].get("path", source.kind)
        log(f"{num_items} items ({source.kind}: {where}) -> latents {list(latent_shape)} at {resolution} px; "
            f"{n_shards} shards over {state.num_processes} process(es); {done_before} items already done")
        if isinstance(source, FolderSource) and source.unmatched:
            log(f"note: {source.unmatched} captions in {source.caption_file} name no image in the folder")
    t0 = time.time()
    bar = tqdm(total=sum(len(shard_items(k, shard_size, num_items)) for k in todo), unit="img", dynamic_ncols=True,
               disable=not state.is_main_process, desc=f"encoding (rank {state.process_index})")
    # the bar is closed on a failure too, so that its error line starts a line of its own
    with bar, (ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers else nullcontext()) as pool:
        for k in todo:
            rows, info = make_shard(vae, source, shard_items(k, shard_size, num_items), cfg, resolution, pool, bar)
            write_shard(shard_path(out, k), rows, info)
            stats.items += info["items"]
            stats.encoded += info["rows"]
            stats.skipped += len(info["skipped"])
    stats.seconds = time.time() - t0
    total = gather_stats(stats)
    state.wait_for_everyone()
    if state.is_main_process:
        rate = total.items / total.seconds if total.seconds else 0.0
        log(f"done: {total.items} items ({total.encoded} encoded, {total.skipped} skipped) by {state.num_processes} "
            f"process(es) ({rate:.1f} items/s), {total.already_done} were already there; {total.seconds:.1f}s")
        log(store_report(out, num_items, shard_size))
    state.wait_for_everyone()
    return total


# ----- reading, for training -------------------------------------------------------------------------------------
class LatentStore(ShardedStore):
    """Reader for training: verifies the manifest and reads each batch's rows from disk, as ``pairs.PairsStore``
    (:class:`pairs.ShardedStore`). Row ``r`` (0 <= r < len) is the r-th latent in item order; ``indices[r]`` is its
    item.
    """

    _COLUMNS = ["caption", "source", "latent"]
    _error = LatentsError
    _rows_name, _row_name = "latents", "item"

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        n, size = m["num_items"], m["shard_size"]
        indices, shard_of, row_of = self._index_shards(
            math.ceil(n / size), shard_complete(n, size),
            "is missing or partial; re-run python -m sd_dmd.encode_images with the same arguments to finish it",
            require_complete)
        if not sum(len(i) for i in indices):
            raise LatentsError(f"{self.path}: store holds no latents")
        self._set_index(indices, shard_of, row_of)

    def check_compatible(self, vae_identity: dict, resolution: int) -> None:
        """Training refuses latents from another VAE (another latent space) or at another resolution."""
        if not same_vae(self.manifest, vae_identity):
            raise LatentsError(f"{self.path}: latents were encoded by another VAE ({self.manifest.get('model')}) "
                               "than the model being trained")
        if self.manifest["resolution"] != resolution:
            raise LatentsError(f"{self.path}: latents are at resolution {self.manifest['resolution']}, "
                               f"training runs at {resolution}")

    def rows(self, rows: Sequence[int]) -> dict:
        """Columns ``index``, ``caption``, ``source`` (lists) and ``latent`` (fp16 array, N x C x H x W) of the given
        row positions, read from the row groups that hold them."""
        out = super().rows(rows)
        return {"index": [int(self.indices[int(r)]) for r in rows], **out}

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """(latents, fp32 N x C x H x W, SD-scaled; captions) of ``rows``: one read of the row groups holding them."""
        cols = self.rows(rows)
        return torch.from_numpy(cols["latent"].astype(np.float32)), cols["caption"]
