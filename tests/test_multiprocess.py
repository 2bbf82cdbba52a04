"""Stops and skips are collective decisions under 2 CPU processes (issue 13, item 3).

Before the fix, a SIGTERM that reached one rank while rank 0 rendered validation, or a NaN on one rank,
left the ranks in different collectives: the run hung. Each launch here has a hard timeout, so a hang
is a failure, not a stuck suite.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_dmd.training import state as ckpt

ROOT = Path(__file__).resolve().parents[1]

HARNESS = r'''
import os, sys, time, json
from pathlib import Path
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from sd_dmd.config import load_config
from sd_dmd.models.shared_unet import DMDModel, FAKE, GENERATOR
from sd_dmd.training.loop import Trainer, train
from sd_dmd.training.config import Config

hd, mode = Path(os.environ["HARNESS_DIR"]), os.environ["HARNESS_MODE"]
rank = int(os.environ.get("RANK", "0"))
(hd / f"pid{{rank}}").write_text(str(os.getpid()))
if mode == "slow_validation" and rank == 0:
    render, first = Trainer.validation_grid, [True]
    def slow(self, tag):
        if first[0]:
            first[0] = False
            (hd / "validating").touch()
            time.sleep(6)
            (hd / "validated").touch()
        return render(self, tag)
    Trainer.validation_grid = slow
if mode == "nan" and rank == 1:  # one sample of the teacher's output is NaN in step 2 on rank 1 only
    pair, calls = DMDModel.dm_denoisers, [0]
    def nan_real(self):
        f, fake = pair(self)
        def g(x_t, t, cond):
            out = f(x_t, t, cond)
            calls[0] += 1
            if calls[0] == 2:
                out = out.clone()
                out[0] = float("nan")
            return out
        return g, fake
    DMDModel.dm_denoisers = nan_real
code = 0
try:
    t = train(load_config(Config, sys.argv[1:])[0])
    save_file({{f"{{a}}.{{k}}": p.detach().contiguous() for a in (GENERATOR, FAKE)
               for k, p in t.model.adapter_named_parameters(a).items()}}, str(hd / f"rank{{rank}}.safetensors"))
    (hd / f"state{{rank}}.json").write_text(json.dumps({{"step": t.step, "nonfinite_total": t.nonfinite_total,
                                                       "history": t.history}}))
except SystemExit as e:
    code = e.code
(hd / f"exit{{rank}}").write_text(str(code))
sys.exit(code)
'''


@pytest.fixture(scope="module")
def setup(train_setup):
    (train_setup["dir"] / "harness.py").write_text(HARNESS.format(root=str(ROOT)))
    return train_setup


def launch(setup, hd: Path, mode: str, out: Path, *extra, processes: int = 2) -> subprocess.Popen:
    hd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HARNESS_DIR": str(hd),
           "HARNESS_MODE": mode}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(setup["dir"] / "harness.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", setup["pipe"],
           "--regression.pairs_dir", setup["pairs"], "--data.prompts", setup["prompts"], "--output_dir", str(out),
           *extra]
    log = open(hd / "launch.log", "w")  # a file, not a pipe: a hung worker holding a pipe would hang the test
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.harness_dir = hd
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> str:
    hd = proc.harness_dir
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in hd.glob("pid*"):  # the workers may sit in sessions of their own
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        proc.wait()
        pytest.fail(f"the multi-process run hung (killed after {timeout} s):\n{(hd / 'launch.log').read_text()[-3000:]}")
    return (hd / "launch.log").read_text()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > end:
            out = finish(proc, 1)
            pytest.fail(f"{path.name} never appeared:\n{out[-3000:]}")
        time.sleep(0.1)


def test_sigterm_on_one_rank_during_validation_stops_both_with_a_checkpoint(setup, tmp_path):
    hd, out = tmp_path / "h", tmp_path / "run"
    proc = launch(setup, hd, "slow_validation", out, "--train.max_steps", "40", "--logging.validation_every", "1",
                  "--checkpointing.every", "100")
    wait_for(hd / "validating", proc, 240)
    os.kill(int((hd / "pid1").read_text()), signal.SIGTERM)  # rank 1 now; rank 0 only after its validation
    wait_for(hd / "validated", proc, 60)
    time.sleep(1.0)
    try:
        os.kill(int((hd / "pid0").read_text()), signal.SIGTERM)
    except ProcessLookupError:
        pass
    log = finish(proc, 180)
    assert [(hd / f"exit{r}").read_text() for r in (0, 1)] == ["143", "143"], log[-3000:]
    done = ckpt.list_checkpoints(out)
    assert done, log[-3000:]
    state = json.loads((done[-1][1] / ckpt.STATE_FILE).read_text())
    assert state["step"] == done[-1][0] < 40
    assert not list(out.glob("checkpoint-*.tmp"))


def test_nan_on_one_rank_skips_the_step_on_both(setup, tmp_path):
    hd, out = tmp_path / "h", tmp_path / "run"
    log = finish(launch(setup, hd, "nan", out, "--train.max_steps", "3"), 300)
    assert [(hd / f"exit{r}").read_text() for r in (0, 1)] == ["0", "0"], log[-3000:]
    s0, s1 = (json.loads((hd / f"state{r}.json").read_text()) for r in (0, 1))
    assert s0["step"] == s1["step"] == 3
    assert s0["nonfinite_total"] == s1["nonfinite_total"] == 1
    a, b = load_file(str(hd / "rank0.safetensors")), load_file(str(hd / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)
    assert "non-finite loss or gradient on some process; step skipped" in log


def test_resume_on_another_process_count_continues(setup, tmp_path):
    """A preempted 2-GPU run comes back on 1, then on 2 again (issue 17): it finishes, the ranks agree, the
    schedule and the curve continue, and the history says where the global batch changed."""
    out = tmp_path / "run"
    for i, (processes, steps) in enumerate([(2, 4), (1, 6), (2, 8)]):
        hd = tmp_path / f"h{i}"
        extra = ["--checkpointing.resume_from", "latest"] if i else []
        log = finish(launch(setup, hd, "plain", out, "--train.max_steps", str(steps), "--checkpointing.every", "2",
                            *extra, processes=processes), 300)
        assert all((hd / f"exit{r}").read_text() == "0" for r in range(processes)), log[-3000:]
        states = [json.loads((hd / f"state{r}.json").read_text()) for r in range(processes)]
        assert all(s["step"] == steps for s in states)
        if processes == 2:
            a, b = load_file(str(hd / "rank0.safetensors")), load_file(str(hd / "rank1.safetensors"))
            assert all(torch.equal(a[k], b[k]) for k in a)
    history = states[0]["history"]
    notes = [h for h in history if "note" in h]
    assert [(h["step"], "global batch" in h["note"]) for h in notes] == [(4, True), (6, True)], notes
    assert "on 1 process(es) x 1 micro-batch(es) of 2, saved with 2 process(es)" in notes[0]["note"]
    assert "global batch 4 -> 2" in notes[0]["note"] and "global batch 2 -> 4" in notes[1]["note"]
    curve = [h for h in history if "note" not in h]
    assert [h["step"] for h in curve] == list(range(1, 9))  # no step lost or repeated
    assert all(torch.isfinite(torch.tensor(h["loss_dm"])) and torch.isfinite(torch.tensor(h["loss_fake"]))
               for h in curve)
    final_state = json.loads((out / "checkpoint-8" / ckpt.STATE_FILE).read_text())
    assert final_state["sched_generator"]["last_epoch"] == 8 and final_state["num_processes"] == 2
    assert "global batch 2 -> 4" in (out / "final" / "README.md").read_text()
