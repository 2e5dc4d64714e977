"""examples/train.py, the script users start from: on the bundled byte-level dataset the tiny
model's loss falls within 40 steps on CPU (2 ranks, sharded state, a ring plan), it writes
checkpoints, and a run resumed from one takes the same steps with the same losses, bit for bit.

Failures point at: the example (data windows not the same on every rank or after a resume: the
losses differ from the resumed step on), torch.distributed.checkpoint with sharded state
(seqshard/planner/state.py: parameters or AdamW state not restored), or training itself (the
loss does not fall)."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "train.py"
STEPS = 40


def run_example(out: str, *extra: str):
    spec = importlib.util.spec_from_file_location("train_example", EXAMPLE)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train.main(["--steps", str(STEPS), "--seq", "64", "--batch", "8", "--plan", "ring",
                       "--model-state", "sharded", "--warmup", "10", "--save-every", "20",
                       "--log-every", "20", "--out", out, *extra])


def test_loss_falls_and_resume_repeats_it(pool2, tmp_path):
    out = str(tmp_path / "run")
    losses = pool2.run(run_example, out)[0]
    first, last = (sum(v for _, v in losses[k]) / 10 for k in (slice(0, 10), slice(-10, None)))
    assert last < 0.75 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
    assert (tmp_path / "run" / "step20").is_dir() and (tmp_path / "run" / "loss.json").exists()
    resumed = pool2.run(run_example, str(tmp_path / "again"), "--resume", f"{out}/step20")[0]
    assert resumed == losses[20:], (resumed[:3], losses[20:23])
