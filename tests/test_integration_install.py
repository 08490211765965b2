"""Registration of LeFusionTrainer with nnU-Net: the guarded shim and the nnUNet_extTrainer folder."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.integration import install
from lefusion_nnunet.integration.install import (SHIM_NAME, install_trainer_shim, nnunet_trainer_folder, shim_installed,
                                                 trainer_dir, uninstall_trainer_shim)

REPO = Path(__file__).resolve().parents[1]


def test_install_is_idempotent_and_uninstall_removes_shim_and_bytecode(tmp_path):
    path = install_trainer_shim(tmp_path)
    assert path == tmp_path / SHIM_NAME
    text = path.read_text()
    assert "from nnunet_trainers import *" in text and "except ImportError:" in text
    mtime = path.stat().st_mtime_ns
    assert install_trainer_shim(tmp_path) == path  # second install: untouched
    assert path.stat().st_mtime_ns == mtime and path.read_text() == text
    assert shim_installed(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    pyc = tmp_path / "__pycache__" / "zz_lefusion_trainers.cpython-311.pyc"
    pyc.write_bytes(b"x")
    other_pyc = tmp_path / "__pycache__" / "nnUNetTrainer.cpython-311.pyc"
    other_pyc.write_bytes(b"x")
    assert uninstall_trainer_shim(tmp_path) == path
    assert not path.exists() and not pyc.exists() and other_pyc.exists()
    assert uninstall_trainer_shim(tmp_path) is None  # idempotent
    assert not shim_installed(tmp_path)


def test_install_replaces_an_older_shim_but_never_a_foreign_file(tmp_path):
    old = tmp_path / SHIM_NAME
    old.write_text(install.SHIM_MARKER + " v0\nfrom nnunet_trainers import *\n")
    install_trainer_shim(tmp_path)
    assert old.read_text() == install.SHIM_TEXT
    old.write_text("print('someone else')\n")
    with pytest.raises(LeFusionInputError, match="not written by lefusion-nnunet"):
        install_trainer_shim(tmp_path)
    with pytest.raises(LeFusionInputError, match="not written by lefusion-nnunet"):
        uninstall_trainer_shim(tmp_path)
    assert old.read_text() == "print('someone else')\n"


def test_install_into_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(install.os, "access", lambda *a, **k: False)
    with pytest.raises(LeFusionInputError, match="nnUNet_extTrainer"):
        install_trainer_shim(tmp_path)
    assert not (tmp_path / SHIM_NAME).exists()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(LeFusionInputError, match="not a folder"):
        install_trainer_shim(not_a_folder)


def test_shim_is_found_by_nnunet_class_search(tmp_path, monkeypatch):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    monkeypatch.syspath_prepend(str(REPO))
    install_trainer_shim(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cls = recursive_find_python_class(str(tmp_path), "LeFusionTrainer_1epoch", None)
    finally:
        sys.modules.pop("zz_lefusion_trainers", None)
    from lefusion_nnunet.integration.nnunet_trainer import LeFusionTrainer_1epoch

    assert cls is LeFusionTrainer_1epoch


def test_shim_defines_nothing_when_the_package_is_missing(tmp_path):
    install_trainer_shim(tmp_path)
    code = ("import sys; sys.modules['nnunet_trainers'] = None; import zz_lefusion_trainers as m; "
            "print(sorted(k for k in vars(m) if not k.startswith('__')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.stdout.strip() == "[]"


def test_trainer_dir_works_as_nnunet_ext_trainer_folder():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = trainer_dir()
    assert folder == REPO / "nnunet_trainers" or (folder / "lefusion_trainers.py").is_file()
    # what nnU-Net does for each nnUNet_extTrainer folder (its own package folder is searched first)
    cls = recursive_find_python_class(str(folder), "LeFusionTrainer", None, base_folder=str(folder),
                                      cleanup_imports_from_base_folder=True)
    assert cls is not None and cls.__module__ == "lefusion_nnunet.integration.nnunet_trainer"
    assert pickle.loads(pickle.dumps(cls)) is cls


@pytest.fixture
def real_shim():
    """Install the shim into the installed nnunetv2 for one test; restore the previous state afterwards."""
    was_installed = shim_installed()
    try:
        path = install_trainer_shim()
    except LeFusionInputError as exc:
        pytest.skip(f"nnunetv2 folder not writable here: {exc}")
    yield path
    if not was_installed:
        uninstall_trainer_shim()
        assert not path.exists()


def test_installed_shim_serves_nnunet_lookup_on_this_install(real_shim):
    """nnU-Net's own lookup (as nnUNetv2_train/predict call it) finds the trainer; works without torchvision."""
    assert real_shim.parent == nnunet_trainer_folder()
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "import sys; c = f('LeFusionTrainer_p075'); print(c.__module__, c.lefusion_probability); "
            "c0 = f('nnUNetTrainer'); print(c0.__name__, 'lefusion_nnunet' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("nnUNet_extTrainer", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "lefusion_nnunet.integration.nnunet_trainer 0.75"
    assert lines[1].startswith("nnUNetTrainer")
