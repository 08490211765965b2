"""Crash safety: ``lefusion train`` and ``lefusion enlarge`` killed with SIGKILL at random moments, then resumed.

The commands run as real subprocesses (``python -m lefusion_nnunet.cli.main``). Kill points are drawn from a
``random.Random`` with a fixed seed so a failure reproduces; they are expressed as progress the process
must have made (checkpoints written, source cases completed) plus a random delay, so a kill always lands
while work is still going on, also on a loaded machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import NNUNET_ENV

from lefusion_nnunet.data.dataset import load_raw_dataset
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom
from lefusion_nnunet.training.lesion import train_lesion_model
from lefusion_nnunet.training.loop import TrainConfig

SPACING = (2.5, 1.5, 1.5)
CMD = [sys.executable, "-m", "lefusion_nnunet.cli.main"]
TIMEOUT = 300


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """nnU-Net folders with an 8-case phantom (4 lesion-free) and a tiny lesion checkpoint, plus the env of the
    subprocesses (single-threaded, so runs are reproducible)."""
    root = tmp_path_factory.mktemp("kill")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEFUSION_")}
    for var in NNUNET_ENV:
        (root / var).mkdir()
        env[var] = str(root / var)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    folder = generate_chest_phantom(root / "nnUNet_raw", 990, "Tiny", PhantomConfig(
        num_cases=8, lesion_free_fraction=0.5, shape_zyx=(24, 48, 48), spacing_zyx=SPACING,
        nodule_diameter_mm=(8.0, 14.0), seed=3))
    cfg = TrainConfig(preset="tiny", steps=3, batch_size=2, checkpoint_every=3, num_train_timesteps=20,
                      texture_clusters=2, device="cpu")
    ckpt = train_lesion_model(load_raw_dataset(folder), [2], root / "ckpt_run", cfg,
                              RoiGeometry((16, 32, 32), SPACING), region_label=1, progress=False)
    manifest = json.loads((folder / "phantom_manifest.json").read_text())
    free = sorted(c["case_id"] for c in manifest["cases"] if not c["has_lesion"])
    return dict(root=root, env=env, source=folder, ckpt=ckpt, free=free)


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(CMD + args, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the process had already ended with status {proc.returncode}"


def finish(args: list[str], env: dict, log: Path) -> str:
    proc = start(args, env, log)
    rc = proc.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


# ------------------------------------------------------------------------------------------------ training

def checkpoint_step(path: Path) -> int:
    from lefusion_nnunet.checkpoints.format import load_checkpoint_content

    try:
        return int(load_checkpoint_content(path, expected_kind="lesion")["step"])
    except Exception:  # not there yet
        return -1


def test_train_killed_at_random_moments_resumes_to_the_end(world, tmp_path):
    rng = random.Random(20250101)
    steps, every = 60, 10
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    args = ["train", "-d", "990", "--lesion-label", "2", "--region-label", "1", "--preset", "tiny", "--steps",
            str(steps), "--batch-size", "2", "--roi-size", "32", "32", "16", "--checkpoint-every", str(every),
            "--device", "cpu", "-o", str(run)]
    latest = run / "checkpoint_latest.pt"
    proc = start(args, world["env"], log)
    wait_until(lambda: checkpoint_step(latest) > 0, proc, "the first checkpoint")
    time.sleep(rng.uniform(0.0, 0.5))
    kill(proc)
    killed_at = checkpoint_step(latest)
    assert 0 < killed_at < steps and killed_at % every == 0
    assert not (run / "checkpoint_final.pt").exists()
    rows_before = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()
                   if line.strip().endswith("}")]

    finish(args + ["--resume"], world["env"], log)

    from lefusion_nnunet.checkpoints.format import load_checkpoint_content
    from lefusion_nnunet.checkpoints.loaders import load_lesion_checkpoint

    final = load_checkpoint_content(run / "checkpoint_final.pt", expected_kind="lesion")
    assert final["step"] == steps
    assert load_checkpoint_content(latest)["step"] == steps
    loaded = load_lesion_checkpoint(run / "checkpoint_final.pt")
    assert loaded.data.lesion_labels == (2,) and loaded.training_summary["num_lesions"] > 0
    rows = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)) and logged[-1] == steps, "log steps repeat or miss the end"
    kept = [r for r in rows_before if r["step"] <= killed_at]
    assert rows[:len(kept)] == kept, "the log up to the resumed checkpoint was not kept"
    assert (run / "loss.png").is_file()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name], "temporary files were left behind"


# ------------------------------------------------------------------------------------------------ enlargement

def journal_completed(partial: Path) -> int:
    try:
        return len(json.loads((partial / "lefusion_progress.json").read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return -1


def test_enlarge_killed_at_random_moments_leaves_no_destination_and_resumes_identically(world, tmp_path):
    rng = random.Random(7)
    raw = world["root"] / "nnUNet_raw"
    dst = raw / "Dataset991_TinyLeFusion"
    partial = raw / ".Dataset991_TinyLeFusion.partial"
    log = tmp_path / "enlarge.log"
    args = ["enlarge", "-d", "990", "--destination", "991", "--checkpoint", str(world["ckpt"]), "--per-case", "2",
            "--batch-size", "2", "--steps", "4", "--size-mm", "6", "10", "--device", "cpu", "--seed", "11"]
    n_cases = len(world["free"])
    assert n_cases == 4  # 4 chunks of one source case each (batch size 2 / 2 variants per case)
    source_before = tree(world["source"])

    # the uninterrupted reference (in this process, single-threaded like the subprocesses), moved out of the way
    import torch

    from lefusion_nnunet.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in NNUNET_ENV:
                mp.setenv(var, world["env"][var])
            assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    reference = tree(dst)
    assert sum(1 for k in reference if k.startswith("imagesTr/")) == 2 * n_cases
    shutil.move(str(dst), str(tmp_path / "reference"))

    targets = sorted(rng.sample(range(n_cases), 2))  # kill after this many source cases were completed
    for round_, target in enumerate(targets):
        proc = start(args + (["--resume"] if round_ else []), world["env"], log)
        wait_until(lambda: journal_completed(partial) >= target, proc, f"{target} completed case(s)")
        time.sleep(rng.uniform(0.0, 0.05))
        kill(proc)
        assert not dst.exists(), "a killed run left a destination dataset"
        assert partial.is_dir()
        assert tree(world["source"]) == source_before, "the source dataset was modified"

    text = finish(args + ["--resume"], world["env"], log)
    assert "resumed:" in text or targets[-1] == 0
    assert not partial.exists()
    assert tree(world["source"]) == source_before
    assert tree(dst) == reference, "the resumed dataset differs from the uninterrupted one"


# ------------------------------------------------------------------------------------------------ trainer bank

BANK_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from lefusion_nnunet.integration import bank

    root, progress = Path(sys.argv[1]), Path(sys.argv[2])
    spec = bank.BankSpec(checkpoint_sha256="c", variants={"per_case": 2}, fold="0", configuration="3d_fullres",
                         plans_name="nnUNetPlans", data_identifier="d", plans_sha256="p", lesion_labels=(2,),
                         case_ids=("a", "b"))

    def build(folder):
        for i in range(400):
            (folder / f"v{i:03d}.npz").write_bytes(b"x" * 4096)
            (folder / f"v{i:03d}.pkl").write_bytes(b"p")
            progress.write_text(str(i))
            time.sleep(0.01)
        return {f"v{i:03d}": {"source_case": "a"} for i in range(400)}, []

    bank.ensure_bank(spec, root, build, log=lambda m: None)
''')


def test_bank_build_killed_midway_is_never_used_and_is_rebuilt(world, tmp_path):
    from lefusion_nnunet.integration import bank

    rng = random.Random(3)
    root, progress = tmp_path / "lefusion_bank", tmp_path / "progress"
    proc = subprocess.Popen([sys.executable, "-c", BANK_SCRIPT, str(root), str(progress)], env=world["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = rng.randrange(5, 100)

    def built_some() -> bool:
        try:
            return int(progress.read_text() or -1) >= target
        except (OSError, ValueError):
            return False
    wait_until(built_some, proc, f"{target} bank entries")
    kill(proc)
    spec = bank.BankSpec(checkpoint_sha256="c", variants={"per_case": 2}, fold="0", configuration="3d_fullres",
                         plans_name="nnUNetPlans", data_identifier="d", plans_sha256="p", lesion_labels=(2,),
                         case_ids=("a", "b"))
    assert not (root / spec.key).exists() and (root / f".{spec.key}.partial").is_dir()
    assert bank.SyntheticBank.load(root / spec.key, spec.key) is None

    def quick(folder):
        for v in ("a_lefusion000", "b_lefusion000"):
            (folder / f"{v}.npz").write_bytes(b"y")
            (folder / f"{v}.pkl").write_bytes(b"q")
        return {"a_lefusion000": {"source_case": "a"}, "b_lefusion000": {"source_case": "b"}}, []

    rebuilt = bank.ensure_bank(spec, root, quick, log=lambda m: None)  # the dead build's lock is free
    assert rebuilt.built and rebuilt.num_variants == 2
    assert sorted(p.name for p in rebuilt.folder.iterdir()) == sorted(
        ["a_lefusion000.npz", "a_lefusion000.pkl", "b_lefusion000.npz", "b_lefusion000.pkl", "bank.json"])
    assert not (root / f".{spec.key}.partial").exists()
