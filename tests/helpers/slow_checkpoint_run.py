"""Runs a profile headless with every trainer-state write slowed down, so a test can kill the
process while a checkpoint is half written."""

import sys
import time

import torch

import lowmem_tune.train.checkpoint as checkpoint
from lowmem_tune.profile import load_profile
from lowmem_tune.train import run_headless

_save = torch.save


def slow_save(*args, **kwargs):
    time.sleep(0.5)
    return _save(*args, **kwargs)


checkpoint.torch.save = slow_save  # the model file is on disk, the trainer state not yet
sys.exit(run_headless(load_profile(sys.argv[1]), resume=False))
