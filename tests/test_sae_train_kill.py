"""A real kill: a training process SIGKILLed after its first checkpoint resumes on the uninterrupted loss curve.

The test starts this file as a script (a training run on synthetic rows, a metrics line per step), kills it with
SIGKILL once ``checkpoint.pt`` exists, runs it again to the end, and compares every logged step with a run that was
never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS, CHECKPOINT_EVERY = 600, 20


def _train(out: Path) -> None:
    torch.set_num_threads(1)
    from test_sae_train_models import optim, synthetic, train_sae

    from sae_train.batches import TensorRows
    from sae_train.config import RunConfig
    from sae_train.trainer import Trainer

    x = synthetic()
    o = optim(steps=STEPS, warmup_steps=10, decay_fraction=0.2)
    run = RunConfig(checkpoint_every=CHECKPOINT_EVERY, log_every=1)
    Trainer(train_sae(), o, TensorRows(x, x), out, run=run).fit()


def _start(out: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen([sys.executable, __file__, str(out)], env=env, stderr=subprocess.PIPE)


def _curve(out: Path) -> list[dict[str, float]]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


def test_a_sigkilled_run_resumes_on_the_uninterrupted_loss_curve(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = _start(killed)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] < STEPS, state["step"]  # killed mid-run, after a checkpoint
    assert len(_curve(killed)) >= state["step"]

    resumed = _start(killed)
    clean = _start(tmp_path / "clean")
    for p in (resumed, clean):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == STEPS
    want = _curve(tmp_path / "clean")
    assert [m["step"] for m in want] == list(range(1, STEPS + 1))
    assert _curve(killed) == want  # every step's loss, FVU, L0, AuxK and dead fraction, exactly


if __name__ == "__main__":
    _train(Path(sys.argv[1]))
