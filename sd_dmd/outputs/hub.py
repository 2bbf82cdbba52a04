"""Publishing a run on the Hugging Face Hub: ``final/`` to the repository's main branch, a checkpoint's generator LoRA
to a branch of its own (``step-N``), with huggingface_hub's ``create_repo`` and ``upload_folder``.

Why branches for checkpoints: main holds exactly what the card describes, and a checkpoint loads the same way as the
final LoRA, ``pipe.load_lora_weights(repo, revision="step-500")`` (same file names at the branch's root).

Nothing here may end a run: :func:`try_push` turns any failure (offline, refused, no token) into one logged line,
after the files are safely on disk. The token is never printed: messages are scrubbed of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

# Never uploaded, whatever sits in the folder: training state, optimisers, temporary files.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "optimizer*", "optimizer*/**", "*.pt", "*.pth", "*.bin", "*.pkl",
              "*.tmp", "*.tmp/**", "random_states*", "trainer_state.json", "logs/**"]


def checkpoint_branch(step: int) -> str:
    return f"step-{step}"


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                branch: Optional[str] = None, message: str = "sd_dmd: upload the distilled LoRA") -> str:
    """Upload ``folder`` to ``repo_id`` (created if missing; ``branch`` too, from main) and return the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no pytorch_lora_weights.safetensors to upload")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if branch is not None:
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=branch,
                             commit_message=message, ignore_patterns=list(HUB_IGNORE))
    return str(info.commit_url)


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<token>") if token else text


def try_push(folder: str | Path, repo_id: str, log: Callable[[str], None] = print, **kwargs) -> Optional[str]:
    """:func:`push_folder`, or on any failure one line naming the folder and how to push it later; None then."""
    token = kwargs.get("token")
    where = f"{repo_id}" + (f" (branch {kwargs['branch']})" if kwargs.get("branch") else "")
    try:
        url = push_folder(folder, repo_id, **kwargs)
    except Exception as e:  # noqa: BLE001 - an upload never fails the run: the files are on disk
        first = _scrub(str(e), token).strip().splitlines()[0] if str(e).strip() else ""
        log(f"hub: upload of {folder} to {where} failed ({type(e).__name__}: {first}); the files are safe on disk; "
            f"push them later with: python -m sd_dmd.export {Path(folder).parent} --push_to_hub {repo_id}")
        return None
    log(f"hub: pushed {folder} to {where}: {url}")
    return url
