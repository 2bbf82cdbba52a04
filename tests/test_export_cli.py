"""``python -m sd_dmd.export --lora ... --out fused/``: a plain UNet with the LoRA merged at its own rank/alpha."""
import pytest
import torch
from conftest import assert_one_line_error

from sd_dmd.outputs import export
from sd_dmd.models.lora import KOHYA_FILE, export_kohya, save_lora
from sd_dmd.models.shared_unet import GENERATOR

PROMPTS = ["a red cube", "two cats on a sofa"]


@pytest.mark.parametrize("form", ["final", "kohya", "checkpoint"])
def test_fused_unet_reproduces_lora_unet(tiny_model, tiny_pipe_dir, tmp_path, capsys, form):
    from diffusers import UNet2DConditionModel

    m = tiny_model  # generator LoRA rank 4, alpha 8: a fuse at alpha = rank would be off by 2x
    g = torch.Generator().manual_seed(3)
    for p in m.adapter_parameters(GENERATOR):
        p.data = torch.randn(p.shape, generator=g) * 0.1
    save_lora(m, tmp_path / "run" / "final", GENERATOR)
    export_kohya(m, tmp_path / "run" / "final" / KOHYA_FILE, GENERATOR)
    save_lora(m, tmp_path / "run" / "checkpoint-7" / "generator", GENERATOR)
    lora = {"final": tmp_path / "run" / "final", "kohya": tmp_path / "run" / "final" / KOHYA_FILE,
            "checkpoint": tmp_path / "run" / "checkpoint-7"}[form]
    export.main(["--model", tiny_pipe_dir, "--lora", str(lora), "--out", str(tmp_path / "fused")])
    printed = capsys.readouterr().out
    assert "rank 4, alpha 8.0" in printed, printed
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused")
    assert not any("lora" in n for n, _ in fused.named_parameters())
    base = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([999, 500]), m.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = m._predict(GENERATOR)(x, t, c)
        out = fused(x, t, encoder_hidden_states=c).sample
        plain = base(x, t, encoder_hidden_states=c).sample
    assert (out - ref).abs().max().item() < 1e-4
    assert (plain - ref).abs().max().item() > 1e-2  # the LoRA matters: the check can fail


def test_export_refuses_existing_out_and_non_lora(tiny_pipe_dir, tmp_path, capsys):
    (tmp_path / "fused").mkdir()
    (tmp_path / "empty").mkdir()
    argv = ["--model", tiny_pipe_dir, "--lora", str(tmp_path / "empty"), "--out"]
    assert_one_line_error(export.main, argv + [str(tmp_path / "fused")], capsys, "already exists")
    assert_one_line_error(export.main, argv + [str(tmp_path / "new")], capsys, "no pytorch_lora_weights")
    assert not (tmp_path / "new").exists()
