"""The multi-node recipe (docs/DATA.md) for generate_pairs.py: `accelerate launch --num_machines 2 --machine_rank 0|1
--main_process_ip IP --main_process_port PORT`, run here as 2 "machines" x 1 process on localhost, makes the same store
as 1 machine x 2 processes (shard k belongs to global process k % world_size, so the shards stay disjoint across
nodes x processes). Every launch has a hard timeout: a hang fails the test instead of stalling the suite."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from sd_dmd.data.pairs import IDENTITY_KEYS

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 150  # seconds for a whole launch (start-up, rendezvous, sampling); ~15 s when it works
PROMPTS = ["a red cube", "two cats on a sofa", "a blue sphere", "the number seven", "a tree"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launch_flags: list[str], argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", *launch_flags, str(ROOT / "generate_pairs.py"), *argv]
    with open(log, "w") as f:  # a file, not a pipe: a hung worker holding a pipe would hang the test
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _kill(procs: list[subprocess.Popen]) -> None:
    """The launchers and their workers (torch's elastic agent starts each worker in a session of its own)."""
    victims = []
    for p in procs:
        try:
            victims += psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
        except psutil.NoSuchProcess:
            pass
    for v in victims:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.wait()


def _finish(procs: list[subprocess.Popen], what: str) -> list[str]:
    """Wait for every launch (TIMEOUT in all); a hang or a non-zero exit fails, with the logs."""
    deadline = time.time() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        _kill(procs)
        logs = "\n".join(f"--- {p.log.name}:\n{p.log.read_text()[-2000:]}" for p in procs)
        pytest.fail(f"{what} hung (killed after {TIMEOUT} s):\n{logs}")
    logs = [p.log.read_text() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{what}, {p.log.name}: exit {p.returncode}\n{log[-3000:]}"
    return logs


def _argv(prompts: Path, model: str, out: Path) -> list[str]:
    return ["--prompts", str(prompts), "--pretrained_model_name_or_path", model, "--output_dir", str(out),
            "--resolution", "16", "--num_inference_steps", "2", "--batch_size", "2", "--shard_size", "2",
            "--num_pairs", "8", "--guidance_scale", "3.0"]


def test_two_machines_make_the_same_store_as_one_machine(tiny_pipe_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    one, two = tmp_path / "one_machine", tmp_path / "two_machines"

    # 1 machine x 2 processes
    (log_single,) = _finish([_launch(["--num_machines", "1", "--num_processes", "2", "--main_process_port",
                                      str(_free_port())], _argv(prompts, tiny_pipe_dir, one), tmp_path / "single.log")],
                            "1 machine x 2 processes")
    # 2 machines x 1 process: one launch per node, both at once, the store directory shared (here: the same disk)
    port = _free_port()
    nodes = [_launch(["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
                      "127.0.0.1", "--main_process_port", str(port)], _argv(prompts, tiny_pipe_dir, two),
                     tmp_path / f"node{rank}.log") for rank in (0, 1)]
    log0, log1 = _finish(nodes, "2 machines x 1 process")

    for log in (log_single, log0):  # the summary of the global main process counts both processes' disjoint shards
        assert "8 pairs in 4 shards over 2 process(es); 0 already done" in log, log[-3000:]
        assert "done: 8 pairs written by 2 process(es)" in log and "store complete: 8 pairs" in log, log[-3000:]
    assert "done:" not in log1  # node 1 holds no main process: it prints no summary

    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert {k: m1[k] for k in IDENTITY_KEYS} == {k: m2[k] for k in IDENTITY_KEYS}
    assert m1 == m2
    shards = sorted(p.name for p in (one / "shards").iterdir())
    assert shards == [f"shard-0000{k}.parquet" for k in range(4)]
    assert sorted(p.name for p in (two / "shards").iterdir()) == shards  # no temp files either
    for name in shards:
        a, b = pq.read_table(one / "shards" / name), pq.read_table(two / "shards" / name)
        assert a.schema == b.schema and a.num_rows == b.num_rows == 2
        for i, (ra, rb) in enumerate(zip(a.to_pylist(), b.to_pylist())):
            assert ra == rb, f"{name} row {i} differs"
