"""Runner for the multi-device check scripts (sharding_check.py, sampler_mesh_check.py).

They run in a subprocess because the fake device count must be set before
jax is imported: `python tests/support/<script>.py OUT.json [CHECK ...]` writes
{check: 'ok' | traceback} to OUT.json for the pytest side to assert on.
"""

import json
import sys
import time
import traceback


def run_checks(checks: dict, argv: list[str], num_devices: int = 8) -> None:
  import jax
  out, names = argv[1], argv[2:] or list(checks)
  assert len(jax.devices()) == num_devices, jax.devices()
  results = {}
  for name in names:
    start = time.time()
    try:
      checks[name]()
      results[name] = 'ok'
    except Exception:  # Reported per check to the test that asked.
      results[name] = traceback.format_exc()
    print(f'{name}: {time.time() - start:.1f}s', file=sys.stderr)
  with open(out, 'w') as f:
    json.dump(results, f)
  for name, r in results.items():
    print(name, 'ok' if r == 'ok' else 'FAILED\n' + r)
