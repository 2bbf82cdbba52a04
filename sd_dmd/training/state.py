"""Checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is written into ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N/`` only when complete
(``trainer_state.json`` is its last file), so a kill during the write leaves nothing that resume picks.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from sd_dmd.run_dir import STATE_FILE, list_checkpoints


TENSOR_REF = "__safetensors_key__"


def _split_tensors(obj, path: str, tensors: dict):
    """Replace every tensor in a nested dict/list by ``{TENSOR_REF: key}``, collecting it in ``tensors``.

    Any depth: bitsandbytes' 8-bit AdamW nests its quantisation state under
    ``__bnb_optimizer_quant_state__``. Keys are paths of the (stringified) dict keys."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"optimizer state at {path!r} holds a {type(obj).__name__}, which checkpoints cannot store")


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if TENSOR_REF in obj:
            return tensors[obj[TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_optimizer(optimizer, path: Path) -> None:
    """optimizer.state_dict() as ``path.safetensors`` (tensors) + ``path.json`` (the structure, with the
    original key types: dict items are stored as [key, value] pairs so integer parameter ids stay ints)."""
    tensors: dict = {}
    meta = _split_tensors(optimizer.state_dict(), "", tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_optimizer(optimizer, path: Path) -> None:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    state = _join_tensors(json.loads(path.with_suffix(".json").read_text()), tensors)
    optimizer.load_state_dict(state)


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_resume(output_dir: Path, resume_from: Optional[str]) -> Optional[Path]:
    if resume_from is None:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume_from)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"{p}: not a complete checkpoint (no {STATE_FILE})")
    return p


def rotate(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and stale ``.tmp`` ones."""
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        for _, p in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)


def save_rng(generator: torch.Generator, path: Path) -> None:
    save_file({"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}, str(path))


def load_rng(generator: torch.Generator, path: Path) -> None:
    st = load_file(str(path))
    generator.set_state(st["generator"])
    torch.set_rng_state(st["torch_cpu"])
