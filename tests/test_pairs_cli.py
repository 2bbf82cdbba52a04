"""generate_pairs: summaries over all processes, truncation counted not printed, extending a store, a changed
prompt list named, seeded prompt shuffling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import assert_one_line_error

import generate_pairs
from sd_dmd.data.pairs import PairsStore, prompt_order

ROOT = Path(__file__).resolve().parents[1]
LONG = "a photo of a " + "very " * 90 + "long caption"  # > 77 CLIP tokens
PROMPTS = ["a red cube", "two cats on a sofa", "a blue sphere", "the number seven", "a tree", "a boat"]


def _write(path, prompts):
    path.write_text("\n".join(prompts) + "\n")
    return path


def _args(prompts, model, out, **kw):
    base = dict(resolution=16, num_inference_steps=2, batch_size=2, shard_size=3, num_pairs=8, guidance_scale=3.0)
    base.update(kw)
    argv = ["--prompts", str(prompts), "--pretrained_model_name_or_path", model, "--output_dir", str(out)]
    for k, v in base.items():
        argv += [f"--{k}", str(v)]
    return argv


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}


def test_larger_num_pairs_extends_the_store(tiny_pipe_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "pairs"
    generate_pairs.main(_args(prompts, tiny_pipe_dir, out, num_pairs=8))
    before = _mtimes(out)
    generate_pairs.main(_args(prompts, tiny_pipe_dir, out, num_pairs=14))
    printed = capsys.readouterr().out
    assert "extending the store from 8 to 14 pairs" in printed and "6 already done" in printed
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 14
    after = _mtimes(out)
    assert all(after[k] == before[k] for k in ("shard-00000.parquet", "shard-00001.parquet"))  # full shards kept
    generate_pairs.main(_args(prompts, tiny_pipe_dir, tmp_path / "fresh", num_pairs=14))
    a, b = PairsStore(out), PairsStore(tmp_path / "fresh")
    ca, cb = a.rows(range(14)), b.rows(range(14))
    assert list(a.indices) == list(range(14)) and ca["prompt"] == cb["prompt"]
    assert np.abs(ca["latent"].astype(np.float32) - cb["latent"].astype(np.float32)).max() <= 1e-3
    # smaller: refused, nothing changed
    assert_one_line_error(generate_pairs.main, _args(prompts, tiny_pipe_dir, out, num_pairs=5), capsys,
                          "holds a store of 14 pairs, --num_pairs asks for 5; a store does not shrink")
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 14


def test_changed_prompt_list_is_named(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    generate_pairs.main(_args(_write(tmp_path / "p.txt", PROMPTS), tiny_pipe_dir, out, num_pairs=4))
    edited = PROMPTS[:2] + ["a green sphere"] + PROMPTS[3:]
    argv = _args(_write(tmp_path / "q.txt", edited), tiny_pipe_dir, out, num_pairs=4)
    assert_one_line_error(generate_pairs.main, argv, capsys,
                          "(6 prompts, first difference at prompt 2: 'a blue sphere' -> 'a green sphere')")
    assert_one_line_error(generate_pairs.main, _args(_write(tmp_path / "r.txt", PROMPTS + ["a fox"]), tiny_pipe_dir,
                                                     out, num_pairs=4), capsys,
                          "(prompt count 6 -> 7, first difference at prompt 6: (none) -> 'a fox')")


def test_shuffle_prompts_is_seeded_recorded_and_kept_on_resume(tiny_pipe_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "pairs"
    generate_pairs.main(_args(prompts, tiny_pipe_dir, out, num_pairs=6, shuffle_prompts="true", seed=3))
    m = json.loads((out / "manifest.json").read_text())
    assert m["shuffle_prompts"] is True and "permutation" in m["prompt_of_pair"]
    order = prompt_order(3, len(PROMPTS))
    store = PairsStore(out)
    shuffled = store.rows(range(len(store)))["prompt"]
    assert shuffled == [PROMPTS[j] for j in order] != PROMPTS
    assert list(order) == list(prompt_order(3, len(PROMPTS))) and list(order) != list(prompt_order(4, len(PROMPTS)))
    (out / "shards" / "shard-00001.parquet").unlink()
    generate_pairs.main(_args(prompts, tiny_pipe_dir, out, num_pairs=6, shuffle_prompts="true", seed=3))
    assert PairsStore(out).rows(range(len(store)))["prompt"] == shuffled
    assert_one_line_error(generate_pairs.main, _args(prompts, tiny_pipe_dir, out, num_pairs=6, seed=3), capsys,
                          "shuffle_prompts True -> False")


def test_truncation_counted_once_not_printed(tiny_pipe_dir, tmp_path, capfd, caplog):
    prompts = _write(tmp_path / "p.txt", [LONG, "a red cube", LONG + " again"])
    generate_pairs.main(_args(prompts, tiny_pipe_dir, tmp_path / "pairs", num_pairs=6))
    captured = capfd.readouterr()
    assert "prompts over 77 tokens (truncated as SD does): 4" in captured.out
    assert "<|endoftext|>" not in captured.out + captured.err and "very very" not in captured.err
    assert "indexing errors" not in captured.err  # transformers' false alarm: the pipeline truncates
    assert not any("truncated because CLIP" in r.getMessage() for r in caplog.records)


def test_two_process_summary_counts_every_process(tiny_pipe_dir, tmp_path):
    # pairs 6 and 7 (shard 3, rank 1's) have long prompts; shards 0 (rank 0) and 1 (rank 1) are already done
    prompts = _write(tmp_path / "p.txt", PROMPTS + [LONG, LONG + " too"])
    out = tmp_path / "pairs"
    argv = _args(prompts, tiny_pipe_dir, out, num_pairs=8, shard_size=2)
    generate_pairs.main(argv)
    for k in (2, 3):
        (out / "shards" / f"shard-0000{k}.parquet").unlink()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "generate_pairs.py"), *argv]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "over 2 process(es); 4 already done" in res.stdout, res.stdout
    assert "done: 4 pairs written by 2 process(es)" in res.stdout and ", 4 were already there" in res.stdout
    assert "prompts over 77 tokens (truncated as SD does): 2" in res.stdout
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert f"store complete: 8 pairs, {size} bytes" in res.stdout and str(out.resolve()) in res.stdout
    assert "<|endoftext|>" not in res.stderr and "indexing errors" not in res.stderr
    assert len(PairsStore(out)) == 8
