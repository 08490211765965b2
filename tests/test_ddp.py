"""`lefusion train` under torchrun: PyTorch DDP with the gloo backend and 2 CPU processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom


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


def _tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_enlarge_sharded_over_two_ranks_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 ... enlarge`: cases dealt out to 2 gloo ranks, one combined dataset that is
    byte-identical to a single-process run (case randomness depends only on the case id)."""
    import json

    raw = tmp_path / "raw"
    generate_chest_phantom(raw, 994, "Shard", PhantomConfig(num_cases=8, lesion_free_fraction=0.5,
                                                            shape_zyx=(24, 48, 48), spacing_zyx=(2.5, 1.5, 1.5),
                                                            nodule_diameter_mm=(8.0, 12.0), seed=3))
    env = dict(os.environ, nnUNet_raw=str(raw), OMP_NUM_THREADS="1")
    ckpt_dir = tmp_path / "run"
    train = [sys.executable, "-m", "lefusion_nnunet.cli.main", "train", "-d", "994", "--lesion-label", "2",
             "--preset", "tiny", "--steps", "2", "--batch-size", "1", "--roi-size", "32", "32", "16",
             "--spacing", "1.5", "1.5", "2.5", "-o", str(ckpt_dir), "--device", "cpu"]
    proc = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --batch-size 1: 4 lesion-free cases x 2 variants -> 8 chunks, 4 per rank
    enlarge = ["enlarge", "-d", "994", "--checkpoint", str(ckpt_dir / "checkpoint_final.pt"), "--per-case", "2",
               "--batch-size", "1", "--size-mm", "6", "9", "--region-label", "1", "--device", "cpu",
               "--steps", "3"]
    single = subprocess.run([sys.executable, "-m", "lefusion_nnunet.cli.main", *enlarge, "--destination", "995"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "lefusion_nnunet.cli.main", *enlarge, "--destination", "996"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count("wrote 8 synthetic case(s)") == 1  # the summary, printed once
    (one,) = raw.glob("Dataset995_*")
    (two,) = raw.glob("Dataset996_*")
    assert not list(raw.glob(".*partial"))
    a, b = _tree_bytes(one), _tree_bytes(two)
    cases = sorted(k for k in a if k.startswith("imagesTr/"))
    assert len(cases) == 8 and sorted(a) == sorted(b)
    assert not any("progress" in k for k in b)                   # journals (rank 0 + rank 1) are not left behind
    for k in a:
        if k.startswith(("imagesTr/", "labelsTr/")):
            assert a[k] == b[k], k
    pa, pb = (json.loads(d[k]) for d, k in ((a, "lefusion_provenance.json"), (b, "lefusion_provenance.json")))
    assert pa["synthetic_cases"] == pb["synthetic_cases"]
