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
    import sys, time, zlib
    from pathlib import Path
    import numpy as np
    from lefusion_nnunet.integration import bank, bank_store
    from lefusion_nnunet.integration.swap_dataset import Patch, save_patch

    root, made_log = Path(sys.argv[1]), Path(sys.argv[2])
    sources = [f"s{i:02d}" for i in range(12)]
    spec = bank.BankSpec(checkpoint_sha256="c", variants={"per_case": 3}, fold="0", configuration="3d_fullres",
                         plans_name="nnUNetPlans", data_identifier="d", plans_sha256="p", lesion_labels=(2,),
                         case_ids=tuple(sources))

    def build(folder):  # the protocol of bank.build_bank_contents: patches, then the source's record
        records = bank_store.read_records(folder)
        for source in sources:
            if source in records:
                continue
            with open(made_log, "a") as f:
                f.write(source + "\\n")
            entries = {}
            for k in range(3):  # depends only on (source, k), as the variants do
                rng = np.random.default_rng(zlib.crc32(f"{source}/{k}".encode()))
                patch = Patch(rng.normal(size=(1, 20, 30, 30)).astype(np.float32),
                              rng.integers(0, 3, (1, 20, 30, 30)).astype(np.int16),
                              np.array([[k, k + 20], [0, 30], [0, 30]]), {2: np.zeros((0, 4), np.int64)})
                vid = f"{source}_lefusion{k:03d}"
                entries[vid] = {"source_case": source, "patch_bytes": save_patch(bank_store.patch_path(folder, vid),
                                                                                 patch)}
                time.sleep(0.01)
            bank_store.write_record(folder, source, entries, [])
            records[source] = {"variants": entries, "warnings": []}
        return {v: e for s in sources for v, e in records[s]["variants"].items()}, []

    bank.ensure_bank(spec, root, build, log=lambda m: None)
''')


def _bank_patches(folder: Path) -> dict:
    from lefusion_nnunet.integration.swap_dataset import load_patch

    return {p.name: (load_patch(p).data, load_patch(p).seg, load_patch(p).bbox) for p in sorted(folder.glob("*.npz"))}


def test_bank_build_killed_midway_keeps_finished_sources_and_resumes_to_the_same_bank(world, tmp_path):
    """SIGKILL during a bank build: no bank.json, a record only for sources whose patches are all stored; the next
    build makes only the other sources and its bank equals an uninterrupted one array for array."""
    import numpy as np

    from lefusion_nnunet.integration import bank, bank_store

    rng = random.Random(3)
    root, made = tmp_path / "lefusion_bank", tmp_path / "made.txt"
    script = [sys.executable, "-c", BANK_SCRIPT]
    proc = subprocess.Popen(script + [str(root), str(made)], env=world["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = rng.randrange(2, 8)

    def recorded() -> int:
        folders = [p for p in root.glob("3d_fullres_fold0_*") if p.is_dir()] if root.is_dir() else []
        return len(bank_store.read_records(folders[0])) if folders else 0
    wait_until(lambda: recorded() >= target, proc, f"{target} finished sources")
    time.sleep(rng.uniform(0.0, 0.03))
    kill(proc)
    proc.wait()
    (folder,) = [p for p in root.glob("3d_fullres_fold0_*") if p.is_dir()]
    key = folder.name
    assert not (folder / "bank.json").exists() and bank.SyntheticBank.load(folder, key) is None
    records = bank_store.read_records(folder)
    assert len(records) >= target
    for source, record in records.items():  # every recorded patch is complete
        assert sorted(record["variants"]) == [f"{source}_lefusion{k:03d}" for k in range(3)]
        for vid in record["variants"]:
            assert bank_store.patch_path(folder, vid).stat().st_size == record["variants"][vid]["patch_bytes"]
    first = made.read_text().split()

    finish = subprocess.run(script + [str(root), str(made)], env=world["env"], capture_output=True, text=True,
                            timeout=TIMEOUT)  # the dead build's lock is free
    assert finish.returncode == 0, finish.stderr[-3000:]
    remade = made.read_text().split()[len(first):]
    assert remade == [s for s in (f"s{i:02d}" for i in range(12)) if s not in records]  # finished ones kept
    resumed = bank.SyntheticBank.load(folder, key)
    assert resumed is not None and resumed.num_variants == 36
    assert not [p for p in folder.rglob(".*")]  # no temporary file left

    other = tmp_path / "uninterrupted"
    done = subprocess.run(script + [str(other), str(tmp_path / "made2.txt")], env=world["env"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _bank_patches(folder), _bank_patches(other / key)
    assert sorted(a) == sorted(b) and len(a) == 36
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in (folder / "cases").iterdir()) == \
        sorted(p.name for p in (other / key / "cases").iterdir())
