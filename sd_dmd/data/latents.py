"""The real-latents store (DESIGN.md, "DMD2 additions": real data for the GAN): images encoded by the teacher's VAE.

Layout of ``output_dir``:
  manifest.json                  VAE identity, resolution, latent shape/dtype, scaling factor, seed, source...
  shards/shard-00000.parquet     rows: index, caption, source, latent (fp16 bytes, C order, N(0,1)-ish SD scale),
                                 row_sha256 (a digest of the row's other values: pairs.row_digest)
  skipped.jsonl                  every skipped item: {"index", "source", "reason"} (written when the store completes)

Rows are defined over the *source items*: the source lists its items in a deterministic order (sorted file names;
parquet files sorted, rows in file order; dataset rows in order; see sd_dmd/image_sources.py) and item ``i`` goes to
shard ``i // shard_size``. A bad item (unreadable, truncated or zero-size image, missing caption, non-finite latent)
has no row, so a shard may hold fewer rows than items and ``index`` is not contiguous. Each shard records what it
covers in its parquet footer (key-value metadata :data:`SHARD_INFO`: first item, item count, row count, the skipped
items with their reasons), written in the same atomic rename as its rows: a shard is complete when that record says
it covers its whole item range, so a resume neither redoes a shard whose items were all skipped nor trusts a torn
one, and no sidecar can disagree with its shard. Shard ``k`` belongs to process ``k % world_size`` (as
``pairs.generate_pairs``); it is written to a temp file, fsynced and renamed.

Latent of item ``i`` = ``(vae.encode(x).latent_dist.sample(g_i) - shift_factor) * scaling_factor`` (shift 0 for
SD1.x), ``g_i`` a CPU generator seeded by ``pair_seed(base_seed, i)``: re-derivable whatever the batch size, process
count or resume point. ``x``: RGB, centre-cropped and Lanczos-resized to ``resolution``, in [-1, 1].

The manifest's identity (VAE config hash + weight probe, resolution, latent shape, seed, shard size, precision) and
the source's fingerprint (kind, item count, hashes of the item names and captions) must match to resume; a
difference is refused naming it. Images edited in place under the same names are not detected.
Readable without this package: ``datasets.load_dataset("parquet", data_files="DIR/shards/*.parquet")``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from sd_dmd.config import field
from sd_dmd.errors import LatentsError
from sd_dmd.data.pairs import ShardedStore, _atomic_write_bytes, corrupt_on_resume, pair_seed, shard_path, write_parquet

FORMAT = "sd_dmd.latents/1"
MANIFEST = "manifest.json"
SKIPPED_FILE = "skipped.jsonl"
SHARD_INFO = b"sd_dmd.data.latents.shard"  # parquet footer key: {"first_index", "items", "rows", "skipped"}
SD15 = "runwayml/stable-diffusion-v1-5"
# must agree between a store and the run that resumes it (the VAE is compared by same_vae, the source on its own)
IDENTITY_KEYS = ("format", "resolution", "latent_shape", "latent_dtype", "scaling_factor", "shift_factor",
                 "mixed_precision", "base_seed", "shard_size")
SOURCE_KEYS = {"kind": "source kind", "item_count": "item count", "items_sha256": "item names",
               "captions_sha256": "captions"}
NAMED_IN_SUMMARY = 10  # skipped items named in the summary line (all of them are in skipped.jsonl)


@dataclass
class EncodeConfig:
    """Settings of ``python -m sd_dmd.encode_images`` (flat: ``--images DIR``)."""

    source: Literal["auto", "folder", "parquet", "dataset", "digits"] = field(
        "auto", "what --images is (auto: a datasets directory, a folder of images, or parquet); digits: the "
                "1,797 scikit-learn digits with the shipped digits teacher's VAE")
    images: Optional[str] = field(None, "a folder of images, a parquet file/glob/folder, or a datasets directory "
                                        "(save_to_disk) or load_dataset name/path")
    captions: Optional[str] = field(None, "folder source: CSV/JSONL mapping file name -> caption (default: the "
                                          "folder's metadata.jsonl/metadata.csv, else a .txt beside each image)")
    image_column: Optional[str] = field(None, "parquet/dataset image column; auto among image, jpg, jpeg, png, "
                                              "webp, img")
    caption_column: Optional[str] = field(None, "caption column; auto among TEXT, caption, text, prompt, txt")
    file_column: Optional[str] = field(None, "file-name column of --captions; auto among file_name, filename, file, "
                                             "path, image")
    split: str = field("train", "dataset split (load_dataset, or a saved DatasetDict)")
    pretrained_model_name_or_path: Optional[str] = field(
        None, f"diffusers model whose vae/ encodes (or a VAE directory); default {SD15}, the shipped digits teacher "
              "for --source digits")
    revision: Optional[str] = field(None, "hub revision of the model")
    variant: Optional[str] = field(None, "weight variant, e.g. fp16")
    output_dir: str = field("real_latents", "the store directory (created, or resumed when it exists)")
    resolution: Optional[int] = field(None, "training resolution: images are centre-cropped and resized to it; "
                                            "default: the VAE's sample_size (512 for SD1.5, 32 for the digits)")
    batch_size: int = field(16, "images per VAE call")
    seed: int = field(0, "base seed; item i's posterior sample is seeded from (seed, i)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "VAE compute dtype (the noise is drawn in fp32)")
    shard_size: int = field(256, "source items per shard (the unit of atomic writes and of resume)")
    num_workers: int = field(4, "threads decoding images (PIL releases the GIL); 0: in the main thread")
    max_pixels: int = field(64_000_000, "skip an image whose header says more than this many pixels, before it is "
                                        "decoded (reason 'too large: W×H'): bounds a decode thread's memory; 0: only "
                                        "PIL's own limit (~179 Mpx)")

    def validate(self):
        from sd_dmd.config import ConfigError

        if self.source == "digits" and self.images:
            raise ConfigError("images: --source digits reads scikit-learn's digits; drop --images")
        if self.source != "digits" and not self.images:
            raise ConfigError("images: a folder, parquet file/glob or dataset is required (--images PATH), "
                              "or --source digits")
        if self.resolution is not None and self.resolution <= 0:
            raise ConfigError(f"resolution: must be positive, got {self.resolution}")
        for k in ("batch_size", "shard_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")


# ----- the VAE ---------------------------------------------------------------------------------------------------
def load_vae(path: str, revision: Optional[str] = None, variant: Optional[str] = None,
             dtype: torch.dtype = torch.float32):
    """``AutoencoderKL.from_pretrained(path, subfolder="vae")`` (or a VAE directory itself)."""
    from diffusers import AutoencoderKL

    p, sub = Path(path), "vae"
    if p.exists():
        if not (p / "vae").is_dir():
            if not (p / "config.json").is_file():
                raise LatentsError(f"{path}: no 'vae/' folder; expected a diffusers pipeline or a VAE directory")
            sub = None
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=sub, revision=revision, variant=variant, dtype=dtype)
    except Exception as e:  # offline hub id, corrupt weights...
        raise LatentsError(f"{path}: cannot load the VAE ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def vae_identity(vae) -> dict:
    """How a store recognises its VAE: a hash of its config and a probe of its weights (as pairs.teacher_identity:
    the first value of the first 64 tensors, compared with a tolerance, so fp32/fp16/bf16 copies match)."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    probe = [float(p.detach().flatten()[0].float()) for _, p in zip(range(64), vae.parameters())]
    return {"vae_config_sha256": sha, "vae_probe": probe}


def same_vae(a: dict, b: dict) -> bool:
    return a.get("vae_config_sha256") == b.get("vae_config_sha256") and np.allclose(
        a.get("vae_probe", []), b.get("vae_probe", []), rtol=1e-2, atol=1e-3)


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """SD-scaled fp32 latents (CPU) of images in [-1, 1]: ``(latent_dist.sample(gens) - shift) * scaling_factor``
    with one CPU generator per image seeded by ``seeds`` (the noise of ``randn_tensor`` for a list of CPU
    generators, drawn in fp32 whatever the VAE's dtype)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps = torch.stack([torch.randn(tuple(mean.shape[1:]), generator=torch.Generator("cpu").manual_seed(int(s)))
                       for s in seeds]).to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean + std * eps - shift) * vae.config.scaling_factor).cpu()


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
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise LatentsError(f"{path}: no {MANIFEST}; not a latents store") from None
    except json.JSONDecodeError as e:
        raise LatentsError(f"{path / MANIFEST}: corrupt manifest ({e.msg})") from None
    if m.get("format") != FORMAT:
        raise LatentsError(f"{path / MANIFEST}: unknown format {m.get('format')!r} (expected {FORMAT})")
    return m


def check_same_store(existing: dict, wanted: dict, where: Path) -> None:
    """Refuse to resume a store made from another VAE, settings or source, naming each difference."""
    if not same_vae(existing, wanted):
        raise LatentsError(f"{where}: holds latents from a different VAE ({existing.get('model')}); "
                           "use another --output_dir")
    diffs = [f"{k} {existing.get(k)!r} -> {wanted.get(k)!r}" for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]
    old, new = existing.get("source", {}), wanted["source"]
    for k, name in SOURCE_KEYS.items():
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
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        if existing is None:
            _atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    state.wait_for_everyone()
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


def gather_stats(stats: EncodeStats) -> EncodeStats:
    """The counts of every process summed (seconds: the slowest process)."""
    from accelerate.utils import gather_object

    parts = gather_object([asdict(stats)])
    return EncodeStats(**{k: (max if k == "seconds" else sum)(p[k] for p in parts) for k in asdict(stats)})


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
    rows, skipped, missing = 0, [], []
    for k in range(n_shards):
        info, items = shard_info(shard_path(out, k)), shard_items(k, shard_size, num_items)
        if info is None or (info["first_index"], info["items"]) != (items.start, len(items)):
            missing.append(k)
            continue
        rows += info["rows"]
        skipped += info["skipped"]
    if missing:
        return (f"store INCOMPLETE: {len(missing)} of {n_shards} shards missing (first: "
                f"{shard_path(out, missing[0])}); re-run the same command to finish it")
    _atomic_write_bytes(out / SKIPPED_FILE, "".join(json.dumps({"index": i, "source": s, "reason": r}) + "\n"
                                                    for i, s, r in skipped).encode())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
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


def encode_images(cfg: EncodeConfig, log=print) -> EncodeStats:
    """Create or complete the store described by ``cfg`` (see ``python -m sd_dmd.encode_images``); returns the
    counts of all processes."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from sd_dmd.dist import partial_state
    from sd_dmd.data.images import FolderSource, open_source
    from sd_dmd.models.shared_unet import DTYPES

    state = partial_state()
    out = Path(cfg.output_dir)
    # validate every input before anything is written
    source = open_source(cfg.source, cfg.images, cfg.captions, cfg.image_column, cfg.caption_column, cfg.file_column,
                         cfg.split)
    model = resolve_model(cfg)
    dtype = {"no": torch.float32, "fp16": DTYPES["fp16"], "bf16": DTYPES["bf16"]}[cfg.mixed_precision]
    vae = load_vae(model, cfg.revision, cfg.variant, dtype).to(state.device).eval()
    resolution, f = cfg.resolution or int(vae.config.sample_size), vae_factor(vae)
    if resolution % f:
        raise LatentsError(f"resolution {resolution} is not a multiple of the VAE factor {f} ({model})")
    if source.kind == "digits" and resolution != 32:
        raise LatentsError(f"resolution: the digits are 32x32 images, got --resolution {resolution}")
    latent_shape = (vae.config.latent_channels, resolution // f, resolution // f)
    manifest = open_store(out, manifest_for(cfg, model, vae, source, resolution, latent_shape), state)

    num_items, shard_size = len(source), cfg.shard_size
    n_shards = math.ceil(num_items / shard_size)
    stats, todo = EncodeStats(), []
    for k in range(state.process_index, n_shards, state.num_processes):
        items = shard_items(k, shard_size, num_items)
        shard_path(out, k).with_name(shard_path(out, k).name + ".tmp").unlink(missing_ok=True)  # a killed write
        if shard_is_complete(shard_path(out, k), items) and not corrupt_on_resume(shard_path(out, k), log):
            stats.already_done += len(items)
        else:
            todo.append(k)
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
    with (ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers else nullcontext()) as pool:
        for k in todo:
            rows, info = make_shard(vae, source, shard_items(k, shard_size, num_items), cfg, resolution, pool, bar)
            write_shard(shard_path(out, k), rows, info)
            stats.items += info["items"]
            stats.encoded += info["rows"]
            stats.skipped += len(info["skipped"])
    bar.close()
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
            math.ceil(n / size), lambda k, p: shard_is_complete(p, shard_items(k, size, n)),
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
