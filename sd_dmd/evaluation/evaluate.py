"""COCO-style evaluation: FID and CLIP score of a one-step LoRA model or any diffusers pipeline.

    python -m sd_dmd.evaluate --model PATH_OR_ID --lora DIR --prompts captions_val2014.json \
        --reference coco_val2014_256/ --out_dir eval/dmd [--num_prompts 30000]
    python -m sd_dmd.evaluate --model PATH_OR_ID --steps 50 --guidance_scale 3 --scheduler pndm ...  # teacher

Protocol (DMD / GigaGAN): N captions drawn with a fixed seed from COCO-2014 val, one 512 px image each,
downsampled to 256 with Lanczos and kept on disk (re-running resumes; ``accelerate launch`` splits the work).
``out_dir/manifest.json`` records what makes the images (model, LoRA content hash, scheduler, steps, guidance, seed,
resolutions, caption-list hash); resuming with other settings is refused naming each difference, ``--overwrite``
starts over. At least one metric must be asked for (``--reference`` for FID, CLIP unless ``--clip_pretrained none``).
FID uses torchmetrics' FrechetInceptionDistance (the standard FID Inception weights from torch-fidelity,
identical to TF-FID's): a maintained implementation that runs on the GPU, takes a custom feature extractor for
tests, and reads local weights offline (``--fid_weights``). The reference is a folder of images (centre-cropped,
Lanczos-resized to 256) or statistics (.npz with mu/sigma[/n] as pytorch-fid/clean-fid write, or .safetensors).
CLIP score: mean cosine similarity x 100 between open_clip image and text embeddings (torchmetrics' CLIPScore
convention; default ViT-g-14 laion2b_s12b_b42k as DMD2). ``--clip_pretrained`` also takes a local file.
Offline: point ``--fid_weights`` and ``--clip_pretrained`` at local files, or pre-fill the libraries' caches.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from sd_dmd.config import ConfigError, field
from sd_dmd.core.schedule import lcm_timesteps_error
from sd_dmd.data.images import lanczos, load_images

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "manifest.json"
FORMAT = "sd_dmd.eval/1"
# what decides image i: an out_dir resumed with any of these changed would mix two models' images
IDENTITY_KEYS = ("model", "lora_sha256", "scheduler", "steps", "guidance_scale", "conditioning_timestep", "timesteps",
                 "seed",
                 "resolution", "eval_resolution", "num_captions", "captions_sha256")
_OPTIONAL_PATHS = ("lora", "reference", "fid_weights", "clip_pretrained")  # "none" on the command line -> None


class EvalError(ConfigError):
    """The evaluation cannot run as asked (an out_dir made by other settings, nothing to compute...)."""


@dataclass
class EvalConfig:
    model: str = field("runwayml/stable-diffusion-v1-5", "diffusers SD pipeline path or hub id")
    lora: Optional[str] = field(None, "one-step LoRA directory; none evaluates the plain pipeline")
    steps: int = field(1, "sampling steps (1 for the distilled model, 50 for the teacher)")
    guidance_scale: float = field(0.0, "CFG scale (0 for the distilled model, 3 for the guidance-3 teacher)")
    scheduler: Literal["lcm", "ddim_trailing", "pndm", "ddim", "euler"] = field(
        "lcm", "lcm/ddim_trailing for one step (lcm: FlowMatchLCMScheduler for SD3); pndm/ddim for an SD/SDXL teacher, "
               "euler (its own flow Euler) for an SD3 one")
    conditioning_timestep: int = field(999, "t* of the one-step generator (lcm)")
    timesteps: list[int] = field(default_factory=list, help=(
        "lcm sampling timesteps of a few-step generator; empty: the ones training recorded beside the LoRA, else "
        "[conditioning_timestep] for one step"))
    prompts: str = field("captions_val2014.json", "COCO annotations JSON, parquet or txt of captions")
    num_prompts: int = field(30000, "captions to draw (fixed seed)")
    seed: int = field(0, "caption sampling and per-image noise seed")
    resolution: int = field(512, "generation resolution")
    eval_resolution: int = field(256, "images are Lanczos-downsampled to this before the metrics")
    batch_size: int = field(16, "images per pipeline call")
    dtype: Literal["fp32", "fp16", "bf16"] = field("fp16", "pipeline dtype (fp32 on CPU)")
    out_dir: str = field("eval", "images and metrics.json go here")
    reference: Optional[str] = field(None, "reference image folder or statistics file for FID")
    fid_weights: Optional[str] = field(None, "local FID Inception weights (torch-fidelity pt_inception) for offline use")
    clip_model: str = field("ViT-g-14", "open_clip architecture")
    clip_pretrained: Optional[str] = field("laion2b_s12b_b42k", "open_clip pretrained tag or local file; none skips CLIP")
    pr_k: int = field(3, "k of precision/recall's k-NN balls (Kynkaanniemi et al.); computed with a reference folder")
    diversity_prompts: int = field(0, "per-prompt LPIPS diversity over this many prompts (the first captions); 0 = off")
    diversity_seeds: int = field(4, "seeds (images) per prompt for the LPIPS diversity")
    lpips_net: Literal["alex", "vgg"] = field("alex", "LPIPS backbone of the diversity")
    lpips_pretrained_backbone: bool = field(True, "the backbone's ImageNet weights (torchvision's cache); false: "
                                                  "random (offline tests)")

    def validate(self):
        for k in _OPTIONAL_PATHS:
            v = getattr(self, k)
            if isinstance(v, str) and v.strip().lower() in ("", "none", "null"):
                setattr(self, k, None)
        if self.scheduler == "lcm" and not self.timesteps and self.lora is not None:
            from sd_dmd.models.lora import resolve_lora

            try:
                self.timesteps = resolve_lora(self.lora).timesteps or []
            except FileNotFoundError:
                pass  # named by the LoRA check later, with the layouts it accepts
        if self.timesteps:
            ts = [int(t) for t in self.timesteps]
            if any(not 0 <= t <= 999 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ConfigError(f"timesteps: need decreasing timesteps in [0, 999], got {ts}")
            if self.scheduler != "lcm":
                raise ConfigError(f"timesteps: sampling at given timesteps needs --scheduler lcm, not {self.scheduler}")
            lcm_err = lcm_timesteps_error(ts)
            if lcm_err:
                raise ConfigError(f"timesteps: {lcm_err}")
            self.timesteps, self.steps = ts, len(ts)
        if self.diversity_prompts < 0 or (self.diversity_prompts and self.diversity_seeds < 2) or self.pr_k < 1:
            raise ConfigError("diversity_prompts / diversity_seeds / pr_k: need >= 0, >= 2 seeds when on, k >= 1")
        for k in ("num_prompts", "batch_size", "steps", "resolution", "eval_resolution"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.reference is None and self.clip_pretrained is None:
            raise EvalError("nothing to compute: no --reference for FID and CLIP skipped (--clip_pretrained none); "
                            "give a reference, a CLIP model, or both")


def read_captions(path: str, n: int, seed: int) -> list[str]:
    """Draw ``n`` captions with a fixed seed (COCO annotations JSON, parquet or txt)."""
    from sd_dmd.errors import PromptError
    from sd_dmd.data.prompts import read_prompts

    p = Path(path)
    if p.suffix == ".json":
        if not p.is_file():
            raise PromptError(f"{path}: no such file")
        try:
            ann = json.loads(p.read_text())["annotations"]
            caps = [a["caption"].strip() for a in ann if isinstance(a.get("caption"), str) and a["caption"].strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PromptError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    else:
        caps, _ = read_prompts([path])
    if not caps:
        raise PromptError(f"{path}: no captions")
    rng = random.Random(seed)
    return rng.sample(caps, n) if n <= len(caps) else [rng.choice(caps) for _ in range(n)]


def build_pipeline(cfg: EvalConfig, device):
    from sd_dmd.models.shared_unet import DTYPES
    from sd_dmd.models.teacher import teacher_pipeline
    from sd_dmd.outputs.sample import load_lora, one_step_pipeline

    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
    if cfg.scheduler in ("lcm", "ddim_trailing"):
        return one_step_pipeline(cfg.model, cfg.lora, cfg.scheduler, dtype, device, fuse=True)
    pipe = teacher_pipeline(cfg.model, cfg.scheduler, dtype, device)
    if cfg.lora:
        load_lora(pipe, cfg.lora)
    return pipe


def generate(cfg: EvalConfig, captions: list[str], image_dir: Path) -> None:
    """Write image i for caption i (skipping those on disk); processes take indices i % world == rank."""
    render(cfg, [(image_dir / f"{i:06d}.png", c, cfg.seed * 1_000_003 + i) for i, c in enumerate(captions)])


def diversity_jobs(cfg: EvalConfig, captions: list[str], folder: Path) -> list:
    """The per-prompt diversity's images: seeds 0..N-1 of each of the first prompts, on their own noise stream."""
    n = cfg.diversity_seeds
    return [(folder / f"{p:05d}_{s:02d}.png", captions[p], cfg.seed * 1_000_003 + 2_000_000_000 + p * n + s)
            for p in range(min(cfg.diversity_prompts, len(captions))) for s in range(n)]


def render(cfg: EvalConfig, jobs: list) -> None:
    """Each (path, caption, noise seed) job's image, skipping those on disk; processes take jobs j % world == rank."""
    from sd_dmd.dist import partial_state

    state = partial_state()
    todo = [job for j, job in enumerate(jobs) if j % state.num_processes == state.process_index
            and not job[0].exists()]
    for path in {job[0].parent for job in jobs}:
        path.mkdir(parents=True, exist_ok=True)
    if todo:
        _render(cfg, todo, state)
    state.wait_for_everyone()


def _render(cfg: EvalConfig, todo: list, state) -> None:
    from tqdm.auto import tqdm

    pipe = build_pipeline(cfg, state.device)
    kw = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.resolution,
              width=cfg.resolution)
    if cfg.scheduler == "lcm" and type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler":  # SD3: sigmas, not t
        from sd_dmd.outputs.sample import flow_sigmas

        ts = cfg.timesteps or [cfg.conditioning_timestep] * (cfg.steps == 1) or None
        if ts:
            kw["sigmas"] = flow_sigmas(pipe.scheduler, ts)
    elif cfg.scheduler == "lcm":
        kw["timesteps"] = cfg.timesteps or ([cfg.conditioning_timestep] if cfg.steps == 1 else None)
        if kw["timesteps"]:
            from sd_dmd.outputs.sample import fit_lcm_grid

            fit_lcm_grid(pipe.scheduler, kw["timesteps"])
    for b in tqdm(range(0, len(todo), cfg.batch_size), disable=not state.is_main_process, desc="images"):
        batch = todo[b:b + cfg.batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
        torch.manual_seed(batch[0][2])  # what a pipeline draws without its generator (SD3's few-step re-noising)
        images = pipe([c for _, c, _ in batch], generator=gens, **kw).images
        for (path, _, _), im in zip(batch, images):
            tmp = path.with_name(path.stem + ".tmp.png")
            lanczos(im, cfg.eval_resolution).save(tmp)
            tmp.replace(path)


def make_fid(feature=2048, weights: Optional[str] = None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    kw = {"feature_extractor_weights_path": weights} if weights and isinstance(feature, int) else {}
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, **kw)


def set_reference_stats(fid, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Load precomputed (mu, sigma, n) into torchmetrics' running sums."""
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    fid.real_features_sum = mu_t * n
    fid.real_features_cov_sum = sig * (n - 1) + n * torch.outer(mu_t, mu_t)
    fid.real_features_num_samples = torch.tensor(n)


def add_reference(fid, reference: str, size: int, batch: int = 64) -> None:
    p = Path(reference)
    if p.is_dir():
        imgs = load_images(p, size)
        for i in range(0, len(imgs), batch):
            fid.update(imgs[i:i + batch], real=True)
    elif p.suffix == ".npz":
        st = np.load(p, allow_pickle=False)
        set_reference_stats(fid, st["mu"], st["sigma"], int(st["n"]) if "n" in st else 50000)
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        st = load_file(str(p))
        set_reference_stats(fid, st["mu"].numpy(), st["sigma"].numpy(), int(st["n"].item()))
    else:
        raise FileNotFoundError(f"{reference}: not an image folder, .npz or .safetensors statistics file")


def fid_between(gen: torch.Tensor, reference, feature=2048, weights: Optional[str] = None, size: int = 256,
                batch: int = 64) -> float:
    """FID of uint8 images ``gen`` against ``reference`` (uint8 tensor, folder or stats file)."""
    fid = make_fid(feature, weights)
    if torch.is_tensor(reference):
        for i in range(0, len(reference), batch):
            fid.update(reference[i:i + batch], real=True)
    else:
        add_reference(fid, str(reference), size, batch)
    for i in range(0, len(gen), batch):
        fid.update(gen[i:i + batch], real=False)
    return float(fid.compute())


@torch.no_grad()
def clip_score(images: torch.Tensor, captions: list[str], model, preprocess_size: int, tokenizer,
               batch: int = 32) -> float:
    """Mean 100 * cos(image, text) with an open_clip model; images uint8 [N, 3, H, W].

    As torchmetrics' CLIPScore but without its floor at 0 (which would hide differences between weak models)."""
    import torch.nn.functional as F

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    dev = next(model.parameters()).device
    scores = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float() / 255.0
        x = F.interpolate(x, size=(preprocess_size, preprocess_size), mode="bicubic", align_corners=False)
        x = ((x - mean) / std).to(dev)
        fi = F.normalize(model.encode_image(x).float(), dim=-1)
        ft = F.normalize(model.encode_text(tokenizer(captions[i:i + batch]).to(dev)).float(), dim=-1)
        scores.append(100.0 * (fi * ft).sum(-1).cpu())
    return float(torch.cat(scores).mean())


def load_clip(name: str, pretrained: Optional[str], device="cpu"):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model.eval(), size, open_clip.get_tokenizer(name)


def check_metric_inputs(cfg: EvalConfig) -> None:
    """Fail before generating anything on inputs the metrics would only reject after it."""
    if cfg.reference is not None:
        p = Path(cfg.reference)
        if not (p.is_dir() or (p.is_file() and p.suffix in (".npz", ".safetensors"))):
            raise FileNotFoundError(f"{cfg.reference}: not an image folder, .npz or .safetensors statistics file")
    if cfg.fid_weights is not None and not Path(cfg.fid_weights).is_file():
        raise FileNotFoundError(f"{cfg.fid_weights}: no such FID weights file")
    if cfg.clip_pretrained is not None and not Path(cfg.clip_pretrained).is_file() \
            and not cfg.clip_model.startswith("hf-hub:"):
        import open_clip

        if cfg.clip_model not in open_clip.list_models():
            raise EvalError(f"clip_model: unknown open_clip architecture '{cfg.clip_model}'")
        tags = open_clip.list_pretrained_tags_by_model(cfg.clip_model)
        if cfg.clip_pretrained not in tags:
            raise EvalError(f"clip_pretrained: '{cfg.clip_pretrained}' is neither a file nor a pretrained tag of "
                            f"{cfg.clip_model} ({', '.join(tags) or 'none'}); 'none' skips CLIP")
        check_clip_cached(cfg.clip_model, cfg.clip_pretrained)


def check_clip_cached(model: str, tag: str) -> None:
    """Offline, an open_clip pretrained tag must already be in the Hugging Face cache (checked before any image)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    from sd_dmd.training.preflight import hub_offline

    hub = open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not hub_offline() or not hub:
        return
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if not any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        raise EvalError(f"clip_pretrained: offline and {model}/{tag} ({repo}) is not in the Hugging Face cache; pass "
                        "--clip_pretrained FILE (open_clip weights), pre-fill the cache, or --clip_pretrained none")


def probe_fid(cfg: EvalConfig) -> None:
    """Load the FID feature extractor now, so weights that cannot be had (offline) fail before any image is made."""
    try:
        make_fid(2048, cfg.fid_weights)
    except Exception as e:  # torchmetrics / torch-fidelity raise URLError, RuntimeError, OSError...
        raise EvalError(f"FID Inception weights could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); offline, pass --fid_weights FILE "
                        "(torch-fidelity's pt_inception weights)") from None


def weights_sha256(path: Path) -> str:
    """Content hash of a LoRA file: for .safetensors, its tensors (name, dtype, shape, bytes, by name) and its
    metadata with keys sorted, so a byte-different header order of the same weights hashes the same (diffusers'
    save_lora_weights writes the metadata keys in varying order); other files, their bytes."""
    raw = Path(path).read_bytes()
    if Path(path).suffix != ".safetensors":
        return hashlib.sha256(raw).hexdigest()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    h = hashlib.sha256()
    for name in sorted(header):
        info = header[name]
        a, b = info["data_offsets"]
        h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        h.update(raw[8 + n + a:8 + n + b])

    def canonical(v):
        try:
            return json.loads(v)
        except (TypeError, ValueError):
            return v

    h.update(json.dumps({k: canonical(v) for k, v in meta.items()}, sort_keys=True).encode())
    return h.hexdigest()


def eval_manifest(cfg: EvalConfig, captions: list[str]) -> dict:
    """What makes the images of ``cfg`` (IDENTITY_KEYS), plus informational fields."""
    lora_sha = None
    if cfg.lora is not None:
        from sd_dmd.models.lora import resolve_lora

        src = resolve_lora(cfg.lora)
        lora_sha = weights_sha256(src.file) if src.file else f"hub:{src.ref}"
    return {"format": FORMAT, "model": cfg.model, "lora": cfg.lora, "lora_sha256": lora_sha,
            "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
            "conditioning_timestep": cfg.conditioning_timestep, "timesteps": cfg.timesteps or None,
            "seed": cfg.seed, "resolution": cfg.resolution,
            "eval_resolution": cfg.eval_resolution, "num_captions": len(captions),
            "captions_sha256": hashlib.sha256(json.dumps(captions).encode()).hexdigest(), "prompts": cfg.prompts,
            "dtype": cfg.dtype}


def _show(key: str, v) -> str:
    return v[:12] if key.endswith("sha256") and isinstance(v, str) else repr(v)


def check_resume(out: Path, manifest: dict) -> None:
    """Refuse an out_dir whose images were made by other settings, naming each differing field."""
    images = [p for p in (out / "images").glob("*.png") if ".tmp" not in p.name] if (out / "images").is_dir() else []
    if not images:
        return
    if not (out / MANIFEST).is_file():
        raise EvalError(f"{out}: holds {len(images)} images but no {MANIFEST} saying what made them; pass "
                        "--overwrite to start over or use another --out_dir")
    try:
        old = json.loads((out / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{out / MANIFEST}: corrupt ({e.msg}); pass --overwrite to start over") from None
    diffs = [f"{k} {_show(k, old.get(k))} -> {_show(k, manifest[k])}" for k in IDENTITY_KEYS
             if old.get(k) != manifest[k]]
    if diffs:
        raise EvalError(f"{out}: its {len(images)} images were made with other settings ({'; '.join(diffs)}); "
                        "pass --overwrite to start over or use another --out_dir")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_out_dir(out: Path, manifest: dict, captions: list[str], overwrite: bool) -> None:
    """Check (or with ``overwrite`` clear) what ``out`` holds, then record ``manifest`` before any image."""
    from sd_dmd.dist import partial_state

    state = partial_state()
    if not overwrite:
        check_resume(out, manifest)  # every process: all of them raise, none waits on a barrier alone
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite:
            shutil.rmtree(out / "images", ignore_errors=True)
            shutil.rmtree(out / "diversity", ignore_errors=True)
            for name in (MANIFEST, "metrics.json", "captions.json"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
        _atomic_write_text(out / "captions.json", json.dumps(captions))
    state.wait_for_everyone()


def evaluate(cfg: EvalConfig, overwrite: bool = False) -> dict:
    """Generate (or resume) the images of ``cfg`` in ``cfg.out_dir`` and compute FID / CLIP score.

    ``overwrite`` removes images made by other settings instead of refusing them."""
    from sd_dmd.dist import partial_state

    cfg.validate()
    check_metric_inputs(cfg)
    state = partial_state()
    out = Path(cfg.out_dir)
    if cfg.reference is not None:
        with state.main_process_first():  # one download into the cache, then the others read it
            probe_fid(cfg)
    captions = read_captions(cfg.prompts, cfg.num_prompts, cfg.seed)
    prepare_out_dir(out, eval_manifest(cfg, captions), captions, overwrite)
    generate(cfg, captions, out / "images")
    if cfg.diversity_prompts:
        render(cfg, diversity_jobs(cfg, captions, out / "diversity"))
    if not state.is_main_process:
        return {}
    gen = load_images(out / "images", cfg.eval_resolution)
    metrics = {"num_images": len(gen), "model": cfg.model, "lora": cfg.lora, "steps": cfg.steps,
               "guidance_scale": cfg.guidance_scale, "fid_impl": "torchmetrics FrechetInceptionDistance (2048)"}
    if cfg.reference:
        metrics["fid"] = fid_between(gen, cfg.reference, 2048, cfg.fid_weights, cfg.eval_resolution)
        metrics.update(_precision_recall(cfg, gen))
    if cfg.diversity_prompts:
        from sd_dmd.evaluation.diversity import lpips_diversity, make_lpips

        div = load_images(out / "diversity", cfg.eval_resolution).split(cfg.diversity_seeds)
        metrics.update(lpips_diversity(list(div), make_lpips(cfg.lpips_net, cfg.lpips_pretrained_backbone)))
    if cfg.clip_pretrained:
        model, size, tok = load_clip(cfg.clip_model, cfg.clip_pretrained, state.device)
        metrics["clip_score"] = clip_score(gen, captions[:len(gen)], model, size, tok)
        metrics["clip_model"] = f"{cfg.clip_model}/{cfg.clip_pretrained}"
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


def _precision_recall(cfg: EvalConfig, gen: torch.Tensor) -> dict:
    """Precision and recall on FID's features, when the reference is a folder of images (statistics hold none)."""
    from sd_dmd.evaluation.diversity import inception_features, precision_recall

    if not Path(cfg.reference).is_dir():
        return {"precision_recall": "needs a reference folder of images (a statistics file holds no features)"}
    real = load_images(Path(cfg.reference), cfg.eval_resolution)
    if min(len(real), len(gen)) <= cfg.pr_k:  # a k-NN ball needs k other points: say so, do not fail the run
        return {"precision_recall": f"skipped: needs more than pr_k={cfg.pr_k} images in the reference and the "
                                    f"generated set (got {len(real)} and {len(gen)})"}
    feats = inception_features(torch.cat([real, gen]), make_fid(2048, cfg.fid_weights).inception)
    return precision_recall(feats[:len(real)], feats[len(real):], cfg.pr_k)


def main(argv=None):
    from sd_dmd.cli import guarded, run_cli

    cfg, flags = run_cli(EvalConfig, argv, __doc__, extra_flags=("overwrite",))
    if not flags["dry_run"]:
        guarded(evaluate, cfg, overwrite=flags["overwrite"])


if __name__ == "__main__":
    main()
