"""The training run: its config, the random draws of a step, checkpoint state, start checks and the loop.

What scales (issue 34; docs/RELIABILITY.md, "What scales"): a run that scales out changes only its speed. 1 process x
1 micro-batch of B, 1 x 2 of B/2 and 2 processes x 1 of B/2 train the same model, and a resume on any split equals
the run that was never stopped. For contributors adding a stateful part:

- **per sample**: its random numbers come from :class:`draws.Draws`, keyed by the *global* sample index (never a
  per-process stream);
- **per step, shared**: decisions every process must take alike are keyed by (seed, step), or read the step counter;
- **global**: any statistic that steers training (today: the gradients, the adaptive GAN ratio, the non-finite flag,
  the logged stats) is computed once per update over the global batch, from sums over micro-batches and processes
  after the all-reduce (``turns.apply_gradients``), never per micro-batch or per process;
- **positions** a checkpoint saves count updates; one whose unit a config key changes (``dmd.fake_updates_per_step``
  for the fake score's and the head's schedules) is converted on resume (``state._convert_fake_positions``) or the
  resume is refused naming the key;
- its state goes into the checkpoint, and it is switched on in one of ``tests/test_invariance.py``'s ``FEATURES``:
  the matrix then compares it across splits and resumes.
"""
