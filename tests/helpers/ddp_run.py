"""One process of a run under torchrun that records, after every optimizer step, a digest of all
its weights (so a test can check the processes stay bitwise identical), and its final weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/helpers/ddp_run.py PROFILE.json OUT
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from lowmem_tune.profile import profile_from_dict
from lowmem_tune.train import RunControl
from lowmem_tune.train.run import TrainingRun


class Quiet:
    def emit(self, event):
        pass


class RecordingRun(TrainingRun):
    def train_step(self):
        metrics = super().train_step()
        digest = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        with open(self.out / f"rank{self.world.rank}.digests", "a") as f:
            f.write(f"{metrics['step']} {digest.hexdigest()} {metrics['loss']!r}\n")
        return metrics


profile = profile_from_dict(json.loads(Path(sys.argv[1]).read_text()))
run = RecordingRun(profile, False, Quiet(), RunControl())
run.out = Path(sys.argv[2])
try:
    run.setup()
    run.train()
    torch.save({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, run.out / f"rank{run.world.rank}.pt")
finally:
    run.cleanup()
