"""Thread settings of the entry points: defaults that never override the user, --threads that does."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.threads import WAIT_POLICY_DEFAULTS, available_cpus, configure_threads, default_threads

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")


def test_defaults_fill_an_empty_environment():
    env: dict = {}
    count = configure_threads(None, env)
    assert count == default_threads() == available_cpus() >= 1
    assert env == {"OMP_NUM_THREADS": str(count), "MKL_NUM_THREADS": str(count), "OMP_WAIT_POLICY": "PASSIVE",
                   "KMP_BLOCKTIME": "0"}


def test_users_explicit_settings_are_kept():
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "200"}
    assert configure_threads(None, env) == 1
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["KMP_BLOCKTIME"] == "200"
    # an unusable value is not a choice: the default applies to the count, the variable stays as given
    env = {"OMP_NUM_THREADS": "many"}
    assert configure_threads(None, env) == default_threads()
    assert env["OMP_NUM_THREADS"] == "many"


def test_threads_option_overrides_the_environment():
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert configure_threads(3, env) == 3
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["OMP_WAIT_POLICY"] == WAIT_POLICY_DEFAULTS["OMP_WAIT_POLICY"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_count_is_one_sentence(bad):
    with pytest.raises(LeFusionInputError, match="--threads"):
        configure_threads(bad, {})


def _fresh_process(code: str, **env_vars: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    env.update(env_vars)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_PROBE = ("import json, os, sys\n"
          "from lefusion_nnunet.threads import configure_threads\n"
          "n = configure_threads({arg})\n"
          "assert 'torch' not in sys.modules\n"
          "import torch\n"
          "print(json.dumps({{'returned': n, 'torch': torch.get_num_threads(), "
          "'policy': os.environ.get('OMP_WAIT_POLICY')}}))")


def test_before_torch_import_threads_option_sets_torch_threads():
    got = _fresh_process(_PROBE.format(arg=1))
    assert got == {"returned": 1, "torch": 1, "policy": "PASSIVE"}
    got = _fresh_process(_PROBE.format(arg=1), OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    assert got == {"returned": 1, "torch": 1, "policy": "ACTIVE"}


def test_before_torch_import_default_keeps_users_omp_num_threads():
    got = _fresh_process(_PROBE.format(arg=None), OMP_NUM_THREADS="1")
    assert got == {"returned": 1, "torch": 1, "policy": "PASSIVE"}
    got = _fresh_process(_PROBE.format(arg=None))
    assert got["returned"] == got["torch"] == available_cpus()


def test_after_torch_import_the_count_still_applies(monkeypatch):
    for name in _THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option_reaches_torch(tmp_path):
    code = ("import json, os, sys\n"
            "from lefusion_nnunet.cli.main import main\n"
            "rc = main(['--threads', '1', 'train', '-d', '999', '--lesion-label', '2'])\n"
            "import torch\n"
            "print(json.dumps({'rc': rc, 'torch': torch.get_num_threads(), 'policy': os.environ['OMP_WAIT_POLICY']}))")
    got = _fresh_process(code, OMP_NUM_THREADS="2", nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path),
                         nnUNet_results=str(tmp_path))
    assert got == {"rc": 2, "torch": 1, "policy": "PASSIVE"}   # rc 2: no dataset 999, after the settings applied


def test_cli_bad_threads_is_one_sentence(capsys):
    from lefusion_nnunet.cli.main import main

    assert main(["--threads", "0", "phantom", "--id", "999"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err
