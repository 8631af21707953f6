"""Data-parallel decoding: greedy ids on 8 fake devices (data=8 and
data=4 x fsdp=2) == one device, with inputs, outputs and the KV cache split
by rows (tests/support/sampler_mesh_check.py in a subprocess, since the fake device
count must be set before jax is imported)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECK_SCRIPT = Path(__file__).resolve().parents[1] / 'support' / 'sampler_mesh_check.py'
CHECKS = ['greedy_equals_single_device', 'beam_equals_single_device',
          'translator']


@pytest.fixture(scope='module')
def device_checks(tmp_path_factory):
  out = tmp_path_factory.mktemp('sampler_mesh') / 'results.json'
  proc = subprocess.run([sys.executable, str(CHECK_SCRIPT), str(out), *CHECKS],
                        capture_output=True, text=True, timeout=600,
                        cwd=CHECK_SCRIPT.parents[2])
  if not out.exists():
    pytest.fail(f'sampler_mesh_check.py crashed:\n{proc.stdout}\n{proc.stderr}')
  return json.loads(out.read_text())


@pytest.mark.parametrize('check', CHECKS)
def test_on_8_devices(device_checks, check):
  assert device_checks[check] == 'ok', device_checks[check]
