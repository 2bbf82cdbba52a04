"""generate_pairs.py on the tiny offline pipeline: determinism, resume, multi-process, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_one_line_error

import generate_pairs
from sd_dmd.data.pairs import PairsStore, pair_noise, pair_seed, teacher_identity
from sd_dmd.data.prompts import PromptFilter, read_prompts
from sd_dmd.errors import PairsError, PromptError
from sd_dmd.models.teacher import teacher_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "two cats on a sofa", "", None, "a blue sphere", "the number seven", "a tree"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "laion.parquet"
    pq.write_table(pa.table({"TEXT": PROMPTS, "punsafe": [0.1] * 7, "AESTHETIC_SCORE": [6.5] * 7}), p)
    return p


def _args(prompt_file, model, out, **kw):
    base = dict(resolution=16, num_inference_steps=3, batch_size=2, shard_size=3, num_pairs=8, guidance_scale=3.0)
    base.update(kw)
    argv = ["--prompts", str(prompt_file), "--pretrained_model_name_or_path", model, "--output_dir", str(out)]
    for k, v in base.items():
        argv += [f"--{k}", str(v)]
    return argv


def _store_arrays(out):
    s = PairsStore(out)
    cols = s.rows(range(len(s)))
    return s.indices.copy(), cols["latent"], cols["prompt"], np.array(cols["seed"])


def _same_store(a, b, atol=0.0):
    assert np.array_equal(a[0], b[0]) and a[2] == b[2] and np.array_equal(a[3], b[3])
    x, y = a[1].astype(np.float32), b[1].astype(np.float32)
    if atol == 0:
        assert np.array_equal(x, y)
        return
    # another process count sums in another order: fp32 values within atol may then round to neighbouring
    # fp16 values, one fp16 spacing apart (0.0039 at |x| in [4, 8))
    ulp = np.spacing(np.abs(a[1]).astype(np.float16)).astype(np.float32)
    excess = (np.abs(x - y) - atol - ulp).max()
    assert excess <= 0, excess


@pytest.fixture(scope="module")
def reference_store(prompt_file, tiny_pipe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "pairs"
    generate_pairs.main(_args(prompt_file, tiny_pipe_dir, out))
    return out


def test_store_contents_and_manifest(reference_store):
    m = json.loads((reference_store / "manifest.json").read_text())
    assert m["num_pairs"] == 8 and m["latent_shape"] == [4, 8, 8] and m["scheduler"] == "pndm"
    assert m["prompt_count"] == 5  # "" and None skipped
    store = PairsStore(reference_store)
    assert list(store.indices) == list(range(8))
    prompts = store.rows(range(len(store)))["prompt"]
    assert prompts[5] == prompts[0] == "a red cube"  # prompts cycle
    z = store.noise([3], verify=True)[0]
    assert torch.equal(z, pair_noise(pair_seed(0, 3), (4, 8, 8)))


def test_equals_plain_diffusers_pipeline(reference_store, tiny_pipe_dir):
    from diffusers import StableDiffusionPipeline

    store = PairsStore(reference_store)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = [0, 4, 7]
    z, y, prompts = store.batch(rows)
    ref = pipe(prompts, latents=z, num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
               output_type="latent").images
    diff = (ref - y).abs().max().item()
    print(f"max abs diff vs StableDiffusionPipeline(output_type='latent'): {diff:.2e} (fp16 storage)")
    assert diff <= 2e-3 * max(1.0, ref.abs().max().item())


def test_identical_across_batch_sizes(reference_store, prompt_file, tiny_pipe_dir, tmp_path):
    generate_pairs.main(_args(prompt_file, tiny_pipe_dir, tmp_path / "b1", batch_size=1))
    _same_store(_store_arrays(reference_store), _store_arrays(tmp_path / "b1"), atol=1e-3)


def test_resume_after_simulated_kill(reference_store, prompt_file, tiny_pipe_dir, tmp_path):
    out = tmp_path / "pairs"
    generate_pairs.main(_args(prompt_file, tiny_pipe_dir, out))
    # a kill mid-run: shard 1 never renamed (a half temp file left behind), shard 2 not started
    (out / "shards" / "shard-00001.parquet").unlink()
    (out / "shards" / "shard-00002.parquet").unlink()
    (out / "shards" / "shard-00001.parquet.tmp").write_bytes(b"PAR1 half written")
    with pytest.raises(PairsError, match="incomplete"):
        PairsStore(out)
    mtime0 = (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns
    generate_pairs.main(_args(prompt_file, tiny_pipe_dir, out))
    assert (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns == mtime0  # done work is kept
    assert not (out / "shards" / "shard-00001.parquet.tmp").exists()
    _same_store(_store_arrays(reference_store), _store_arrays(out))


def test_resume_after_real_kill(reference_store, prompt_file, tiny_pipe_dir, tmp_path):
    out = tmp_path / "pairs"
    cmd = [sys.executable, str(ROOT / "generate_pairs.py"), *_args(prompt_file, tiny_pipe_dir, out, batch_size=1,
                                                                    shard_size=1)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("shard-0000[2-9].parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    generate_pairs.main(_args(prompt_file, tiny_pipe_dir, out, batch_size=1, shard_size=1))
    a = _store_arrays(out)
    r = _store_arrays(reference_store)
    _same_store(r, a, atol=1e-3)


def test_two_processes_match_one(reference_store, prompt_file, tiny_pipe_dir, tmp_path):
    out = tmp_path / "pairs2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "generate_pairs.py"), *_args(prompt_file, tiny_pipe_dir, out)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "over 2 process(es)" in res.stdout
    _same_store(_store_arrays(reference_store), _store_arrays(out), atol=1e-3)


def test_readable_with_datasets(reference_store):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(reference_store / "shards" / "*.parquet"), split="train")
    assert len(ds) == 8 and set(ds.column_names) >= {"index", "prompt", "seed", "latent"}
    row = ds[0]
    lat = np.frombuffer(row["latent"], dtype=np.float16).reshape(4, 8, 8)
    assert np.array_equal(lat, PairsStore(reference_store).rows([row["index"]])["latent"][0].reshape(4, 8, 8))


def test_store_checks_teacher_and_resolution(reference_store, tiny_pipe_dir, tmp_path):
    from sd_dmd.models.tiny import build_tiny_pipeline

    store = PairsStore(reference_store)
    pipe = teacher_pipeline(tiny_pipe_dir, "pndm", torch.float32, "cpu")
    store.check_compatible(teacher_identity(pipe.unet), 16)
    with pytest.raises(PairsError, match="resolution"):
        store.check_compatible(teacher_identity(pipe.unet), 32)
    other = teacher_pipeline(str(build_tiny_pipeline(tmp_path / "other", seed=1)), "pndm", torch.float32, "cpu")
    with pytest.raises(PairsError, match="another teacher"):
        store.check_compatible(teacher_identity(other.unet), 16)
    # the same teacher held in fp16 is recognised
    store.check_compatible(teacher_identity(pipe.unet.to(torch.float16)), 16)


# ----- bad input: one line, exit 2, nothing written ---------------------------------------------------
def _fails(argv, capsys, match):
    assert_one_line_error(generate_pairs.main, argv, capsys, match)


def test_missing_prompt_file(tiny_pipe_dir, tmp_path, capsys):
    _fails(_args(tmp_path / "nope.parquet", tiny_pipe_dir, tmp_path / "o"), capsys, "nope.parquet: no such file")
    assert not (tmp_path / "o").exists()


def test_corrupt_parquet(tiny_pipe_dir, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file at all")
    _fails(_args(bad, tiny_pipe_dir, tmp_path / "o"), capsys, "bad.parquet: unreadable parquet")
    assert not (tmp_path / "o").exists()


def test_missing_caption_column(tiny_pipe_dir, tmp_path, capsys):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"URL": ["http://a"]}), p)
    _fails(_args(p, tiny_pipe_dir, tmp_path / "o"), capsys, "no caption column")
    _fails(_args(p, tiny_pipe_dir, tmp_path / "o") + ["--caption_column", "TEXT"], capsys, "'TEXT' not found")
    assert not (tmp_path / "o").exists()


def test_all_captions_empty(tiny_pipe_dir, tmp_path, capsys):
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"TEXT": ["", None, "   "]}), p)
    _fails(_args(p, tiny_pipe_dir, tmp_path / "o"), capsys, "no usable caption")


def test_store_from_other_teacher_or_resolution(reference_store, prompt_file, tmp_path, capsys):
    from sd_dmd.models.tiny import build_tiny_pipeline

    before = {p.name: p.stat().st_mtime_ns for p in (reference_store / "shards").iterdir()}
    other = str(build_tiny_pipeline(tmp_path / "other", seed=1))
    _fails(_args(prompt_file, other, reference_store), capsys, "different teacher")
    _fails(_args(prompt_file, str(Path(reference_store).parent / "x"), reference_store), capsys, "no such model")
    after = {p.name: p.stat().st_mtime_ns for p in (reference_store / "shards").iterdir()}
    assert before == after


def test_resolution_mismatch_refused(reference_store, prompt_file, tiny_pipe_dir, capsys):
    _fails(_args(prompt_file, tiny_pipe_dir, reference_store, resolution=32), capsys, "resolution")


def test_bad_resolution_and_guidance(prompt_file, tiny_pipe_dir, tmp_path, capsys):
    _fails(_args(prompt_file, tiny_pipe_dir, tmp_path / "o", resolution=20), capsys, "multiple of 8")
    _fails(_args(prompt_file, tiny_pipe_dir, tmp_path / "o", guidance_scale=-1), capsys, "guidance_scale")


# ----- the caption reader ------------------------------------------------------------------------------
def test_reader_formats_filters_dedupe(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\none\n")
    (tmp_path / "b.jsonl").write_text('{"caption": "three"}\n{"caption": 5}\n{"caption": ""}\n')
    pq.write_table(pa.table({"text": ["four", "five", "six"], "punsafe": [0.0, 0.9, 0.1],
                             "aesthetic": [7.0, 7.0, 5.0]}), tmp_path / "c.parquet")
    prompts, stats = read_prompts([str(tmp_path)], filters=PromptFilter(dedupe=True))
    assert prompts == ["one", "two", "three", "four", "five", "six"]
    assert stats.skipped == {"empty": 2, "duplicate": 1, "not a string": 1}
    # filters apply to files that have their columns (a .txt/.jsonl without them is an error: test_prompt_filters)
    prompts, stats = read_prompts([str(tmp_path / "c.parquet")], filters=PromptFilter(min_aesthetic=6.25,
                                                                                       max_punsafe=0.5))
    assert prompts == ["four"]
    assert stats.skipped == {"punsafe above maximum": 1, "aesthetic below minimum": 1}


def test_reader_glob_and_bad_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(PromptError, match=r"a\.jsonl: line 2"):
        read_prompts(str(tmp_path / "*.jsonl"))
    with pytest.raises(PromptError, match="glob matches no"):
        read_prompts(str(tmp_path / "*.parquet"))
