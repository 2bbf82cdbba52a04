"""Plain diffusers, in the environment `make install` builds, stays offline and quiet (issue 37, item 5).

The README's "use the result" snippet runs as a user runs it (``python snippet.py``: diffusers alone, no sd_dmd) on a
tiny pipeline and LoRA, in a fresh interpreter whose sockets refuse and record every connection and name lookup
(a ``sitecustomize`` on its PYTHONPATH), with HF_HUB_OFFLINE unset. It must open no connection and print nothing
from bitsandbytes. bitsandbytes >= 0.49, once installed, asks the Hub for a 4-bit CPU kernel when imported on an
AVX512-bf16 CPU (``get_kernel("kernels-community/quantization-bitsandbytes")`` in its backends/cpu/ops.py), and
diffusers and peft import it whenever it is installed: it is the ``[adamw8bit]`` extra, which make install leaves out.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from net_guard import SOURCE

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("bitsandbytes", "gemm_4bit", "kernels-community", "publisher trust", "offline mode")

GUARD = SOURCE + r'''
import atexit, json, os
atexit.register(lambda: open(os.environ["GUARD_LOG"], "w").write(json.dumps(tried)))
'''


def readme_snippet(model: str, lora: str, out: str) -> str:
    """README.md's "use the result" block, on the tiny pipeline and LoRA, on the CPU in fp32; saves the image."""
    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "use the result" in b)
    for old, new in (('"runwayml/stable-diffusion-v1-5"', repr(model)), ('"runs/sd15_dmd/final"', repr(lora)),
                     ("torch.float16", "torch.float32"), ('.to("cuda")', '.to("cpu")')):
        assert old in code, f"README's snippet changed: no {old} in\n{code}"
        code = code.replace(old, new)
    return code + f"image.save({out!r})\nimport sys\nassert 'sd_dmd' not in sys.modules\n"


def run_guarded(args, tmp_path: Path):
    """``python ARGS`` with the socket guard, online settings (no *_OFFLINE), an empty HF_HOME, no sd_dmd on the path.
    Returns (stdout + stderr, the connections and lookups tried)."""
    (tmp_path / "guard").mkdir(exist_ok=True)
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tmp_path / "guard"), GUARD_LOG=str(tmp_path / "tried.json"),
               HF_HOME=str(tmp_path / "hf_home"))
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    return out, json.loads((tmp_path / "tried.json").read_text())


@pytest.fixture(scope="module")
def tiny_lora(tiny_pipe_dir, tmp_path_factory):
    from sd_dmd.models.lora import save_lora
    from sd_dmd.models.shared_unet import DMDModel, LoraSpec

    out = tmp_path_factory.mktemp("quiet_offline") / "final"
    save_lora(DMDModel.from_pretrained(tiny_pipe_dir, generator_lora=LoraSpec(rank=4, alpha=8.0),
                                       fake_lora=LoraSpec(rank=4, alpha=4.0)), out)
    return str(out)


def test_readme_snippet_opens_no_connection_and_bitsandbytes_says_nothing(tiny_pipe_dir, tiny_lora, tmp_path):
    (tmp_path / "snippet.py").write_text(readme_snippet(tiny_pipe_dir, tiny_lora, str(tmp_path / "cat.png")))
    out, tried = run_guarded(["snippet.py"], tmp_path)
    assert (tmp_path / "cat.png").is_file(), out[-3000:]
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "bitsandbytes"], capture_output=True, text=True)
    why = (" (bitsandbytes is installed in this environment; make install leaves it out: it is the [adamw8bit] "
           "extra, see docs/TRAINING.md)") if installed.returncode == 0 else ""
    assert tried == [], f"connections tried: {tried}{why}"
    for noise in NOISE:
        assert noise not in out, next(line for line in out.splitlines() if noise in line) + why


def test_the_guard_sees_a_connection(tmp_path):
    """The guard above is not blind: a plain connection attempt in the child is recorded and refused."""
    code = "import socket\ntry:\n    socket.create_connection(('huggingface.co', 443))\nexcept OSError:\n    pass\n"
    _, tried = run_guarded(["-c", code], tmp_path)
    assert len(tried) == 1 and "huggingface.co" in tried[0], tried


def test_adamw8bit_without_bitsandbytes_is_a_config_error(monkeypatch):
    from sd_dmd.config import ConfigError
    from sd_dmd.training.preflight import check_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: find_spec answers None
    with pytest.raises(ConfigError, match=r"adamw8bit.*\[adamw8bit\]"):
        check_optimizer("adamw8bit")
    check_optimizer("adamw")
