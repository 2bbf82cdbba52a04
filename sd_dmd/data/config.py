"""The settings of the data commands (flat: ``--num_pairs 1000``), with a help text on every field:
``generate_pairs.py`` (:class:`PairsConfig`) and ``python -m sd_dmd.encode_images`` (:class:`EncodeConfig`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from sd_dmd.config import ConfigError, field

SD15 = "runwayml/stable-diffusion-v1-5"


@dataclass
class PairsConfig:
    """Settings of ``generate_pairs.py`` (flat: ``--num_pairs 1000``)."""

    prompts: list[str] = field(default_factory=list, help="prompt files: parquet/txt/jsonl, WebDataset tar shards "
                                                          "('shards/{00000..00099}.tar'), globs or directories")
    pretrained_model_name_or_path: str = field("runwayml/stable-diffusion-v1-5", "teacher: diffusers dir or hub id")
    revision: Optional[str] = field(None, "hub revision of the teacher")
    variant: Optional[str] = field(None, "weight variant, e.g. fp16")
    output_dir: str = field("pairs", "the store directory (created, or resumed when it exists)")
    num_pairs: int = field(0, "number of pairs; 0 = one per prompt (prompts are cycled when fewer)")
    caption_column: Optional[str] = field(None, "caption column; auto-detected among TEXT, caption, text, prompt "
                                                "(tar shards: JSON fields, then txt, the .txt member)")
    guidance_scale: float = field(3.0, "teacher CFG scale, the same as the real score's (paper: 3)")
    num_inference_steps: int = field(50, "teacher sampling steps (paper: 50)")
    scheduler: Literal["auto", "pndm", "ddim", "euler"] = field(
        "auto", "teacher sampler: auto = PNDM for SD/SDXL (the paper's), euler for SD3 (its own flow-matching Euler, "
                "the only one a flow-matching teacher takes)")
    resolution: int = field(512, "image resolution; latents are resolution / 8")
    batch_size: int = field(8, "prompts per teacher call")
    seed: int = field(0, "base seed; pair i's noise is seeded from (seed, i)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "teacher compute dtype")
    shard_size: int = field(256, "pairs per shard (the unit of atomic writes and of resume)")
    min_aesthetic: Optional[float] = field(None, "keep rows with AESTHETIC_SCORE/aesthetic >= this")
    max_punsafe: Optional[float] = field(None, "keep rows with punsafe <= this")
    max_pwatermark: Optional[float] = field(None, "keep rows with pwatermark <= this")
    dedupe: bool = field(False, "drop duplicate captions")
    shuffle_prompts: bool = field(False, "pair i takes the prompts in a seeded random order (recorded in the "
                                         "manifest, so a resume keeps it) instead of file order")

    def validate(self):
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


@dataclass
class EncodeConfig:
    """Settings of ``python -m sd_dmd.encode_images`` (flat: ``--images DIR``)."""

    source: Literal["auto", "folder", "parquet", "webdataset", "dataset", "digits"] = field(
        "auto", "what --images is (auto: a datasets directory, .tar shards, parquet, or a folder of images); "
                "webdataset: img2dataset's tar shards; digits: the 1,797 scikit-learn digits with the shipped digits "
                "teacher's VAE")
    images: Optional[str] = field(None, "a folder of images, a parquet file/glob/folder, WebDataset tar shards "
                                        "('shards/{00000..00099}.tar', a glob or a folder of .tar), or a datasets "
                                        "directory (save_to_disk) or load_dataset name/path")
    captions: Optional[str] = field(None, "folder source: CSV/JSONL mapping file name -> caption (default: the "
                                          "folder's metadata.jsonl/metadata.csv, else a .txt beside each image)")
    image_column: Optional[str] = field(None, "parquet/dataset image column, or a tar sample's image extension; "
                                              "auto among image, jpg, jpeg, png, webp, img")
    caption_column: Optional[str] = field(None, "caption column; auto among TEXT, caption, text, prompt, txt (tar "
                                                "shards: txt is the .txt member, the others JSON fields)")
    file_column: Optional[str] = field(None, "file-name column of --captions; auto among file_name, filename, file, "
                                             "path, image")
    split: str = field("train", "dataset split (load_dataset, or a saved DatasetDict)")
    streaming: bool = field(False, "dataset source: iterate it without materialising it (load_dataset(..., "
                                   "streaming=True); a saved dataset: to_iterable_dataset()); its item count is "
                                   "--num_items, else a first pass counts the rows")
    num_items: Optional[int] = field(None, "with --streaming: encode the stream's first N rows, declared so that no "
                                           "counting pass is needed (a shorter stream is an error when it ends)")
    pretrained_model_name_or_path: Optional[str] = field(
        None, f"diffusers model whose vae/ encodes (or a VAE directory); default {SD15}, the shipped digits teacher "
              "for --source digits")
    vae: Optional[str] = field(None, "a separately saved VAE used instead of the model's vae/: a VAE directory or "
                                     "hub id with the VAE at its root, e.g. an fp16-safe SDXL VAE (SDXL's own VAE "
                                     "overflows in fp16); train with the same --model.vae")
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
        if self.source == "digits" and self.images:
            raise ConfigError("images: --source digits reads scikit-learn's digits; drop --images")
        if self.source != "digits" and not self.images:
            raise ConfigError("images: a folder, parquet file/glob, tar shards or dataset is required (--images PATH), "
                              "or --source digits")
        if self.streaming and self.source not in ("auto", "dataset"):
            raise ConfigError(f"streaming: iterates a datasets dataset (--source dataset), not --source {self.source}")
        if self.num_items is not None and not self.streaming:
            raise ConfigError("num_items: declares a streamed dataset's item count; pass --streaming too")
        if self.num_items is not None and self.num_items < 1:
            raise ConfigError(f"num_items: must be >= 1, got {self.num_items}")
        if self.resolution is not None and self.resolution <= 0:
            raise ConfigError(f"resolution: must be positive, got {self.resolution}")
        for k in ("batch_size", "shard_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class TextCacheConfig:
    """Settings of ``python -m sd_dmd.cache_text`` (flat: ``--shard_size 256``)."""

    prompts: list[str] = field(default_factory=list, help="prompt files, as generate_pairs.py reads them (every "
                                                          "caption, unfiltered, de-duplicated)")
    extra_prompts: list[str] = field(default_factory=list, help="prompts to add, e.g. the run's validation prompts")
    pretrained_model_name_or_path: str = field(SD15, "teacher: diffusers dir or hub id (its text encoders only)")
    revision: Optional[str] = field(None, "hub revision of the teacher")
    variant: Optional[str] = field(None, "weight variant, e.g. fp16")
    caption_column: Optional[str] = field(None, "caption column; auto-detected when absent")
    output_dir: str = field("text_cache", "the cache directory (created, or resumed when it exists)")
    resolution: Optional[int] = field(None, "SDXL only: the training resolution (its time ids are in the "
                                            "conditioning); default the model's")
    dtype: Literal["fp16", "fp32"] = field("fp16", "storage dtype of the conditionings (fp32: bit-equal to "
                                                   "encoding in fp32 during training; fp16: half the disk)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", "text encoders' compute dtype")
    batch_size: int = field(16, "prompts per encoder call")
    shard_size: int = field(256, "prompts per shard (the unit of atomic writes and of resume)")

    def validate(self):
        if not self.prompts and not self.extra_prompts:
            raise ConfigError("prompts: at least one prompt file (--prompts FILE) or --extra_prompts is required")
        for k in ("batch_size", "shard_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
