"""The regression-pairs store (DESIGN.md, "Pairs store"): generation and reading.

Layout of ``output_dir``:
  manifest.json                  teacher, scheduler, steps, guidance, resolution, latent shape/dtype, seeds...
  shards/shard-00000.parquet     rows: index, prompt, seed, noise_sha1, latent (fp16 bytes, C order)

Pair ``i`` uses prompt ``prompts[i % len(prompts)]`` and noise from its own CPU generator seeded by
:func:`pair_seed` (base_seed, i), so it is re-derivable whatever the batch size, process count or resume
point. Shard ``k`` holds indices [k * shard_size, (k + 1) * shard_size) and belongs to process
``k % world_size``; it is written to a temp file, fsynced and renamed, so readers never see a partial one.
Readable without this package: ``datasets.load_dataset("parquet", data_files="DIR/shards/*.parquet")``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

FORMAT = "sd_dmd.pairs/1"
MANIFEST = "manifest.json"
# fields that must agree between a store and the run that extends or consumes it
IDENTITY_KEYS = ("format", "teacher_config_sha256", "scheduler", "num_inference_steps", "guidance_scale",
                 "resolution", "latent_shape", "latent_dtype", "base_seed", "num_pairs", "shard_size",
                 "prompts_sha256", "mixed_precision")


from .config import field


@dataclass
class PairsConfig:
    """Settings of ``generate_pairs.py`` (flat: ``--num_pairs 1000``)."""

    prompts: list[str] = field(default_factory=list, help="prompt files: parquet/txt/jsonl, globs or directories")
    pretrained_model_name_or_path: str = field("runwayml/stable-diffusion-v1-5", "teacher: diffusers dir or hub id")
    revision: Optional[str] = field(None, "hub revision of the teacher")
    variant: Optional[str] = field(None, "weight variant, e.g. fp16")
    output_dir: str = field("pairs", "the store directory (created, or resumed when it exists)")
    num_pairs: int = field(0, "number of pairs; 0 = one per prompt (prompts are cycled when fewer)")
    caption_column: Optional[str] = field(None, "caption column; auto-detected among TEXT, caption, text, prompt")
    guidance_scale: float = field(3.0, "teacher CFG scale, the same as the real score's (paper: 3)")
    num_inference_steps: int = field(50, "teacher sampling steps (paper: 50)")
    scheduler: Literal["pndm", "ddim"] = field("pndm", "teacher sampler (paper: PNDM)")
    resolution: int = field(512, "image resolution; latents are resolution / 8")
    batch_size: int = field(8, "prompts per teacher call")
    seed: int = field(0, "base seed; pair i's noise is seeded from (seed, i)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "teacher compute dtype")
    shard_size: int = field(256, "pairs per shard (the unit of atomic writes and of resume)")
    min_aesthetic: Optional[float] = field(None, "keep rows with AESTHETIC_SCORE/aesthetic >= this")
    max_punsafe: Optional[float] = field(None, "keep rows with punsafe <= this")
    max_pwatermark: Optional[float] = field(None, "keep rows with pwatermark <= this")
    dedupe: bool = field(False, "drop duplicate captions")

    def validate(self):
        from .config import ConfigError

        if not self.prompts:
            raise ConfigError("prompts: at least one prompt file is required (--prompts FILE)")
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"resolution: must be a positive multiple of 8, got {self.resolution}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
        for k in ("batch_size", "num_inference_steps", "shard_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.num_pairs < 0:
            raise ConfigError(f"num_pairs: must be >= 0, got {self.num_pairs}")


class PairsError(ValueError):
    """A pairs store cannot be created, extended or used; the message names the file/field."""


def pair_seed(base_seed: int, index: int) -> int:
    """63-bit seed of pair ``index``: numpy SeedSequence([base_seed, index]) mixes both."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


def pair_noise(seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """fp32 N(0, I) latent noise from a CPU generator seeded with ``seed``."""
    return torch.randn(tuple(latent_shape), generator=torch.Generator("cpu").manual_seed(seed))


def noise_digest(noise: torch.Tensor) -> str:
    return hashlib.sha1(noise.contiguous().numpy().tobytes()).hexdigest()[:16]


def teacher_identity(unet) -> dict:
    """How a store recognises its teacher: a hash of the UNet config and a probe of base weights.

    The probe (first weight value of the first 64 base tensors) is compared with a tolerance, so the
    same teacher held in fp32, fp16 or bf16 matches while another checkpoint does not.
    """
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    probe = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            continue
        probe.append(float(p.detach().flatten()[0].float()))
        if len(probe) == 64:
            break
    return {"teacher_config_sha256": sha, "teacher_probe": probe}


def same_teacher(a: dict, b: dict) -> bool:
    return a["teacher_config_sha256"] == b["teacher_config_sha256"] and np.allclose(
        a["teacher_probe"], b["teacher_probe"], rtol=1e-2, atol=1e-3)


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / "shards" / f"shard-{k:05d}.parquet"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
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


def write_manifest(out_dir: Path, manifest: dict) -> None:
    _atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(path: Path) -> dict:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise PairsError(f"{path}: no {MANIFEST}; not a pairs store") from None
    except json.JSONDecodeError as e:
        raise PairsError(f"{path / MANIFEST}: corrupt manifest ({e.msg})") from None
    if m.get("format") != FORMAT:
        raise PairsError(f"{path / MANIFEST}: unknown format {m.get('format')!r} (expected {FORMAT})")
    return m


def check_same_store(existing: dict, wanted: dict, where: Path) -> None:
    """Refuse to extend a store made with other settings, naming the first differing field."""
    if not same_teacher(existing, wanted):
        raise PairsError(f"{where}: holds pairs from a different teacher ({existing.get('teacher')}); "
                         "use another --output_dir")
    for k in IDENTITY_KEYS:
        if existing.get(k) != wanted.get(k):
            raise PairsError(f"{where}: holds a store with {k}={existing.get(k)!r}, this run has {wanted.get(k)!r}; "
                             "use another --output_dir or the same settings")


def write_shard(path: Path, rows: dict) -> None:
    """Write one shard atomically (temp file + fsync + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"index": pa.array(rows["index"], pa.int64()), "prompt": pa.array(rows["prompt"], pa.string()),
                      "seed": pa.array(rows["seed"], pa.int64()), "noise_sha1": pa.array(rows["noise_sha1"], pa.string()),
                      "latent": pa.array(rows["latent"], pa.binary())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def shard_is_complete(path: Path, expected_rows: int) -> bool:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == expected_rows
    except Exception:
        return False


@dataclass
class PairsStats:
    written: int = 0
    already_done: int = 0
    seconds: float = 0.0
    over_77_tokens: int = 0


class PairsStore:
    """Reader for training: verifies the manifest and regenerates (and can verify) each pair's noise."""

    def __init__(self, path: str | Path, require_complete: bool = True):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.latent_shape = tuple(m["latent_shape"])
        n_shards = math.ceil(m["num_pairs"] / m["shard_size"])
        tables = []
        for k in range(n_shards):
            p = shard_path(self.path, k)
            if p.exists():
                try:
                    tables.append(pq.read_table(p, columns=["index", "prompt", "seed", "noise_sha1", "latent"]))
                except Exception as e:
                    raise PairsError(f"{p}: unreadable shard ({type(e).__name__})") from None
            elif require_complete:
                raise PairsError(f"{self.path}: incomplete store, {p.name} is missing; re-run generate_pairs.py "
                                 "with the same arguments to finish it")
        if not tables:
            raise PairsError(f"{self.path}: store has no shards")
        t = pa.concat_tables(tables)
        order = np.argsort(t.column("index").to_numpy())
        self.indices = t.column("index").to_numpy()[order]
        self.prompts = [t.column("prompt")[int(i)].as_py() for i in order]
        self.seeds = t.column("seed").to_numpy()[order]
        self.digests = [t.column("noise_sha1")[int(i)].as_py() for i in order]
        lat = t.column("latent").to_pylist()
        n = int(np.prod(self.latent_shape))
        self._latents = np.stack([np.frombuffer(lat[int(i)], dtype=np.float16, count=n) for i in order])

    def __len__(self) -> int:
        return len(self.indices)

    def check_compatible(self, identity: dict, resolution: int) -> None:
        """Training refuses a store whose teacher or resolution differ from the model it trains."""
        if not same_teacher(self.manifest, identity):
            raise PairsError(f"{self.path}: pairs were made by another teacher ({self.manifest.get('teacher')}) "
                             "than the model being trained")
        if self.manifest["resolution"] != resolution:
            raise PairsError(f"{self.path}: pairs are at resolution {self.manifest['resolution']}, "
                             f"training runs at {resolution}")

    def latents(self, rows: Sequence[int]) -> torch.Tensor:
        """Teacher latents (fp32) of the given row positions."""
        return torch.from_numpy(self._latents[list(rows)].astype(np.float32)).reshape(len(rows), *self.latent_shape)

    def noise(self, rows: Sequence[int], verify: bool = False) -> torch.Tensor:
        out = []
        for r in rows:
            z = pair_noise(int(self.seeds[r]), self.latent_shape)
            if verify and noise_digest(z) != self.digests[r]:
                raise PairsError(f"{self.path}: regenerated noise of pair {int(self.indices[r])} does not match "
                                 "its stored digest (different torch RNG?)")
            out.append(z)
        return torch.stack(out)

    def batch(self, rows: Sequence[int], verify: bool = False):
        """(noise z_ref, teacher latents y_ref, prompts) for ``rows``."""
        return self.noise(rows, verify), self.latents(rows), [self.prompts[r] for r in rows]


def manifest_for(cfg, identity: dict, prompts: list[str], prompt_files: list[str], latent_shape) -> dict:
    return {
        "format": FORMAT,
        "teacher": cfg.pretrained_model_name_or_path,
        "revision": cfg.revision,
        **identity,
        "scheduler": cfg.scheduler,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "resolution": cfg.resolution,
        "latent_shape": list(latent_shape),
        "latent_dtype": "float16",
        "mixed_precision": cfg.mixed_precision,
        "base_seed": cfg.seed,
        "num_pairs": cfg.num_pairs or len(prompts),
        "shard_size": cfg.shard_size,
        "prompt_source": prompt_files,
        "prompt_count": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "caption_column": cfg.caption_column,
        "filters": {"min_aesthetic": cfg.min_aesthetic, "max_punsafe": cfg.max_punsafe,
                    "max_pwatermark": cfg.max_pwatermark, "dedupe": cfg.dedupe},
        "seed_derivation": "numpy.random.SeedSequence([base_seed, index]).generate_state(1, uint64)[0] & (2**63-1)",
        "noise": "torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(seed))",
        "prompt_of_pair": "prompts[index % prompt_count]",
    }


def teacher_pipeline(path: str, scheduler: str, dtype: torch.dtype, device, revision=None, variant=None):
    """The plain diffusers pipeline used as the 50-step teacher (PNDM as in the paper, or DDIM)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    from .model import check_eps_prediction, check_model_dir

    check_model_dir(path)
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, revision=revision, variant=variant,
                                                   safety_checker=None, requires_safety_checker=False)
    check_eps_prediction(pipe.scheduler.config, path)
    if scheduler == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    else:
        raise PairsError(f"unknown scheduler '{scheduler}' (pndm or ddim)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def teacher_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
                    resolution: int) -> torch.Tensor:
    """The teacher's final latents from the given noise: exactly ``pipe(..., output_type="latent")``."""
    return pipe(prompts, latents=noise.to(pipe.device, pipe.unet.dtype), num_inference_steps=steps,
                guidance_scale=guidance, height=resolution, width=resolution, output_type="latent").images


def generate_pairs(cfg, log=print) -> PairsStats:
    """Create or complete the store described by ``cfg`` (see ``generate_pairs.py``)."""
    from .dist import partial_state
    from tqdm.auto import tqdm

    from .model import DTYPES
    from .prompts import PromptFilter, expand_sources, read_prompts

    state = partial_state()
    out = Path(cfg.output_dir)
    # validate every input before anything is written
    prompt_files = [str(p) for p in expand_sources(cfg.prompts)]
    prompts, pstats = read_prompts(prompt_files, cfg.caption_column,
                                   PromptFilter(cfg.min_aesthetic, cfg.max_punsafe, cfg.max_pwatermark, cfg.dedupe))
    dtype = {"no": torch.float32, "fp16": DTYPES["fp16"], "bf16": DTYPES["bf16"]}[cfg.mixed_precision]
    pipe = teacher_pipeline(cfg.pretrained_model_name_or_path, cfg.scheduler, dtype, state.device,
                            cfg.revision, cfg.variant)
    vae_factor = pipe.vae_scale_factor
    if cfg.resolution % vae_factor:
        raise PairsError(f"resolution {cfg.resolution} is not a multiple of the VAE factor {vae_factor}")
    latent_shape = (pipe.unet.config.in_channels, cfg.resolution // vae_factor, cfg.resolution // vae_factor)
    manifest = manifest_for(cfg, teacher_identity(pipe.unet), prompts, prompt_files, latent_shape)
    if (out / MANIFEST).exists():
        check_same_store(read_manifest(out), manifest, out)
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST).exists():
            write_manifest(out, manifest)
    state.wait_for_everyone()

    num_pairs, shard_size = manifest["num_pairs"], cfg.shard_size
    n_shards = math.ceil(num_pairs / shard_size)
    mine = [k for k in range(n_shards) if k % state.num_processes == state.process_index]
    stats = PairsStats()
    todo = []
    for k in mine:
        rows = min(shard_size, num_pairs - k * shard_size)
        shard_path(out, k).with_name(shard_path(out, k).name + ".tmp").unlink(missing_ok=True)  # a killed write
        if shard_is_complete(shard_path(out, k), rows):
            stats.already_done += rows
        else:
            todo.append((k, rows))
    if state.is_main_process:
        log(f"{pstats.summary()}\n{num_pairs} pairs in {n_shards} shards over {state.num_processes} process(es); "
            f"{stats.already_done} already done here")
    t0 = time.time()
    bar = tqdm(total=sum(r for _, r in todo), unit="pair", disable=not state.is_main_process, dynamic_ncols=True,
               desc=f"pairs (rank {state.process_index})")
    for k, rows in todo:
        idx = list(range(k * shard_size, k * shard_size + rows))
        shard = {"index": [], "prompt": [], "seed": [], "noise_sha1": [], "latent": []}
        for b in range(0, rows, cfg.batch_size):
            bidx = idx[b:b + cfg.batch_size]
            bprompts = [prompts[i % len(prompts)] for i in bidx]
            seeds = [pair_seed(cfg.seed, i) for i in bidx]
            noise = torch.stack([pair_noise(s, latent_shape) for s in seeds])
            lat = teacher_latents(pipe, bprompts, noise, cfg.num_inference_steps, cfg.guidance_scale, cfg.resolution)
            lat16 = lat.detach().to("cpu", torch.float16).numpy()
            lengths = pipe.tokenizer(bprompts, truncation=False).input_ids
            stats.over_77_tokens += sum(len(x) > pipe.tokenizer.model_max_length for x in lengths)
            shard["index"] += bidx
            shard["prompt"] += bprompts
            shard["seed"] += seeds
            shard["noise_sha1"] += [noise_digest(z) for z in noise]
            shard["latent"] += [a.tobytes() for a in lat16]
            bar.update(len(bidx))
        write_shard(shard_path(out, k), shard)
        stats.written += rows
    bar.close()
    stats.seconds = time.time() - t0
    state.wait_for_everyone()
    if state.is_main_process:
        rate = stats.written / stats.seconds if stats.seconds else 0.0
        log(f"done: {stats.written} pairs written by rank 0 ({rate:.2f} pairs/s), {stats.already_done} were already "
            f"there; {pstats.summary()}; prompts over 77 tokens (truncated as SD does): {stats.over_77_tokens}; "
            f"{stats.seconds:.1f}s")
    return stats

