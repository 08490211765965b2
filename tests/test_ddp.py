"""`lefusion train` under torchrun: PyTorch DDP with the gloo backend and 2 CPU processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lefusion_nnunet.data.phantom import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.training.checkpoint import load_checkpoint_content


@pytest.mark.slow
def test_train_with_two_ddp_ranks(tmp_path):
    raw = tmp_path / "raw"
    generate_chest_phantom(raw, 993, "Ddp", PhantomConfig(num_cases=4, lesion_free_fraction=0.25,
                                                           shape_zyx=(24, 48, 48), spacing_zyx=(2.5, 1.5, 1.5),
                                                           nodule_diameter_mm=(8.0, 12.0), seed=2))
    env = dict(os.environ, nnUNet_raw=str(raw), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lefusion_nnunet.cli.main", "train", "-d", "993", "--lesion-label", "2", "--preset", "tiny",
           "--steps", "4", "--batch-size", "1", "--roi-size", "32", "32", "16", "--spacing", "1.5", "1.5", "2.5",
           "--checkpoint-every", "2", "-o", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    content = load_checkpoint_content(out / "checkpoint_final.pt")
    assert content["training_summary"]["world_size"] == 2
    assert content["step"] == 4
    # DDP keeps the replicas identical, so the saved weights moved away from the seeded initialisation
    assert any(not torch.equal(content["model_state"][k], content["ema_state"][k]) for k in content["model_state"])
    log = (out / "training_log.jsonl").read_text().splitlines()
    assert len(log) >= 1  # only rank 0 writes the log
