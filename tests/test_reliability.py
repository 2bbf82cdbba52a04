"""Kills, preemption, non-finite steps, disk full, planted pickles, and fuzzed inputs (docs/RELIABILITY.md)."""
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import generate_pairs
from sd_dmd.training import state as ckpt
from sd_dmd.config import ConfigError, from_dict, load_config
from sd_dmd.data.pairs import PairsStore
from sd_dmd.data.prompts import PromptFilter, read_prompts
from sd_dmd.errors import PromptError, TrainingError
from sd_dmd.training.loop import train
from sd_dmd.training.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    (d / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(12)) + "\n")
    generate_pairs.main(["--prompts", str(d / "prompts.txt"), "--pretrained_model_name_or_path", tiny_pipe_dir,
                         "--output_dir", str(d / "pairs"), "--resolution", "16", "--num_inference_steps", "3",
                         "--num_pairs", "12", "--shard_size", "1", "--batch_size", "1"])
    return {"pipe": tiny_pipe_dir, "pairs": d / "pairs", "prompts": str(d / "prompts.txt"), "dir": d}


def _pairs_argv(setup, out):
    return ["--prompts", setup["prompts"], "--pretrained_model_name_or_path", setup["pipe"], "--output_dir", str(out),
            "--resolution", "16", "--num_inference_steps", "3", "--num_pairs", "12", "--shard_size", "1",
            "--batch_size", "1"]


def _train_argv(setup, out, *extra):
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
            "--regression.pairs_dir", str(setup["pairs"]), "--data.prompts", setup["prompts"],
            "--output_dir", str(out), *extra]


def _store(path):
    s = PairsStore(path)
    cols = s.rows(range(len(s)))
    return s.indices, cols["latent"], cols["prompt"]


# ----- generate_pairs under kill -9 ------------------------------------------------------------------
def test_pairs_survive_repeated_kill9(setup, tmp_path):
    out = tmp_path / "pairs"
    cmd = [sys.executable, str(ROOT / "generate_pairs.py"), *_pairs_argv(setup, out)]
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))  # start-up takes several seconds; kill at a random point
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        done = sorted((out / "shards").glob("shard-*.parquet")) if (out / "shards").exists() else []
        for p in done:  # every visible shard is complete and readable
            assert ckpt_rows(p) == 1
    assert kills >= 3
    generate_pairs.main(_pairs_argv(setup, out))
    a, b = _store(setup["pairs"]), _store(out)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2] and np.array_equal(a[1], b[1])


def ckpt_rows(path):
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_disk_full_during_shard_write_leaves_no_corrupt_store(setup, tmp_path, monkeypatch, capsys):
    import builtins

    out = tmp_path / "pairs"
    generate_pairs.main(_pairs_argv(setup, out))
    for p in list((out / "shards").glob("*.parquet"))[6:]:
        p.unlink()
    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if str(file).endswith(".parquet.tmp"):
            def fail(_data):
                raise OSError(28, "No space left on device")
            f.write = fail
        return f

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(SystemExit) as e:
        generate_pairs.main(_pairs_argv(setup, out))
    assert e.value.code == 2 and "No space left" in capsys.readouterr().err
    monkeypatch.undo()
    assert not list((out / "shards").glob("*.tmp"))
    assert len(list((out / "shards").glob("*.parquet"))) == 6
    for p in (out / "shards").glob("*.parquet"):
        assert ckpt_rows(p) == 1
    generate_pairs.main(_pairs_argv(setup, out))
    assert np.array_equal(_store(out)[1], _store(setup["pairs"])[1])


# ----- training under kill -9, a torn checkpoint, and SIGTERM --------------------------------------
def _final(out):
    return load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))


def _same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= tol


@pytest.fixture(scope="module")
def straight_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(load_config(Config, _train_argv(setup, out, "--train.max_steps", "8"))[0])
    return out


def test_training_kill9_then_resume_matches_uninterrupted(setup, straight_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train_text2image.py"), *_train_argv(setup, out, "--train.max_steps", "8")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoint-4" / ckpt.STATE_FILE).exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "--resume"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _same(_final(straight_run), _final(out))


def test_torn_checkpoint_is_never_chosen(setup, straight_run, tmp_path):
    out = tmp_path / "run"
    train(load_config(Config, _train_argv(setup, out, "--train.max_steps", "4", "--checkpointing.keep_last", "5"))[0])
    shutil.rmtree(out / "final")
    # a kill during the write of checkpoint-6 (temp dir) and a checkpoint-8 missing its state file
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6.tmp")
    (out / "checkpoint-6.tmp" / ckpt.STATE_FILE).unlink()
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / ckpt.STATE_FILE).unlink()
    assert ckpt.resolve_resume(out, "latest") == out / "checkpoint-4"
    t = train(load_config(Config, _train_argv(setup, out, "--train.max_steps", "8"))[0], resume=True)
    assert t.step == 8
    _same(_final(straight_run), _final(out))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_writes_checkpoint_and_exits(setup, tmp_path, sig, code):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT) both finish the step, write a checkpoint and exit."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train_text2image.py"),
           *_train_argv(setup, out, "--train.max_steps", "100000", "--checkpointing.every", "0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    for line in proc.stdout:
        if "step 2:" in line or time.time() > deadline:
            proc.send_signal(sig)
            break
    try:
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == code, rest[-2000:]
    ckpts = ckpt.list_checkpoints(out)
    assert ckpts and ckpts[-1][0] >= 2
    assert f"{sig.name} received" in rest


# ----- numerics -------------------------------------------------------------------------------------
def test_nonfinite_steps_are_skipped_and_counted(setup, tmp_path, monkeypatch):
    import sd_dmd.core.step as T

    real = T.dmd_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        loss, s = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), s) if calls["n"] in (2, 3) else (loss, s)

    monkeypatch.setattr(T, "dmd_loss", sometimes_nan)
    t = train(load_config(Config, _train_argv(setup, tmp_path / "r", "--train.max_steps", "3"))[0])
    assert t.step == 3 and t.nonfinite_total == 2
    for p in t.gen_params:
        assert torch.isfinite(p).all()


def test_consecutive_nonfinite_steps_stop_the_run(setup, tmp_path, monkeypatch):
    import sd_dmd.core.step as T

    real = T.dmd_loss
    calls = {"n": 0}

    def nan_after_two(*a, **k):
        loss, s = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), s) if calls["n"] > 2 else (loss, s)

    monkeypatch.setattr(T, "dmd_loss", nan_after_two)
    with pytest.raises(TrainingError, match="checkpoint-2"):
        train(load_config(Config, _train_argv(setup, tmp_path / "r", "--train.max_nonfinite_steps", "3"))[0])
    assert (tmp_path / "r" / "checkpoint-2" / ckpt.STATE_FILE).exists()


# ----- security --------------------------------------------------------------------------------------
class _Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('BOMB_MARKER', '/tmp/sd_dmd_bomb')}",))


def test_written_files_are_safe_formats_and_planted_pickles_are_ignored(setup, straight_run, tmp_path, monkeypatch):
    allowed = {".safetensors", ".json", ".jsonl", ".parquet", ".yaml", ".png", ".md"}
    for d in (straight_run, setup["pairs"]):
        bad = [p for p in Path(d).rglob("*") if p.is_file() and p.suffix not in allowed]
        assert not bad, bad
    marker = tmp_path / "exploded"
    monkeypatch.setenv("BOMB_MARKER", str(marker))
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    pairs = tmp_path / "pairs"
    shutil.copytree(setup["pairs"], pairs)
    ck = ckpt.list_checkpoints(run)[-1][1]
    for target in (ck / "optimizer.pt", ck / "rng_state.pkl", ck / "scheduler.bin", pairs / "shards" / "extra.pkl",
                   pairs / "data.pt"):
        target.write_bytes(pickle.dumps(_Bomb()))
    shutil.rmtree(run / "final")
    PairsStore(pairs).batch([0, 1], verify=True)
    train(load_config(Config, _train_argv(setup, run, "--train.max_steps", "10", "--regression.pairs_dir",
                                          str(pairs)))[0], resume=True)
    assert not marker.exists()


# ----- fuzzing ---------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8),
                    st.lists(st.integers(), max_size=3))
keys = st.sampled_from(["dmd", "model", "lora", "train", "optim", "nope", "t_min", "rank", "real_guidance_scale",
                        "generator", "resolution", "max_steps", "prompts", "data"])
trees = st.recursive(scalars, lambda inner: st.dictionaries(keys, inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(keys, trees, max_size=5))
def test_fuzz_config_loader_only_documented_errors(tree):
    try:
        from_dict(Config, tree)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(argv=st.lists(st.sampled_from(["--dmd.t_min", "--train.max_steps", "--lora.fake.rank", "--x", "5", "-1",
                                      "abc", "[1, 2]", "{a: 1}", "--data.prompts", "true", "1e9", ":", "--config"]),
                     max_size=6))
def test_fuzz_cli_only_documented_errors(argv):
    try:
        load_config(Config, argv)
    except (ConfigError, SystemExit):  # argparse exits 2 on a flag missing its value
        pass


cell = st.one_of(st.none(), st.text(max_size=20), st.floats(allow_nan=True), st.integers())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(cell, cell), max_size=8), name=st.sampled_from(["TEXT", "caption", "URL", "prompt"]),
       fmt=st.sampled_from(["parquet", "jsonl", "txt", "garbage"]))
def test_fuzz_caption_reader_only_documented_errors(tmp_path, rows, name, fmt):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"f.{'parquet' if fmt == 'garbage' else fmt}"
    if fmt == "parquet":
        col = [r[0] for r in rows]
        try:
            table = pa.table({name: col, "punsafe": [r[1] for r in rows]})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return  # pyarrow itself refuses mixed-type columns; no file to read
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({name: r[0]}, default=str) for r in rows))
    elif fmt == "txt":
        path.write_text("\n".join(str(r[0]) for r in rows))
    else:
        path.write_bytes(bytes(str(rows), "utf-8"))
    try:
        prompts, stats = read_prompts([str(path)], filters=PromptFilter(max_punsafe=0.5))
        assert prompts and all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    except PromptError:
        pass
