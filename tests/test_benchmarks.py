"""The benchmark scripts' own logic: output agreement, profile arithmetic,
and a tiny end-to-end run of the translation benchmark (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import benchmark_translate as bt  # noqa: E402


def test_cut_and_agreement():
  stop = {1, 107}
  assert bt.cut([5, 6, 107, 8, 9], stop) == [5, 6, 107]
  assert bt.cut([5, 6, 8], stop) == [5, 6, 8]
  tutorial = [[5, 6, 107, 8], [5, 7, 1, 0], [4, 4, 4, 4]]
  ours = [[5, 6, 107], [5, 6, 1], [4, 4]]  # Prefix, differs, prefix (capped).
  assert bt.agreement(ours, tutorial, stop) == 2
  assert bt.agreement([[5, 6, 107, 8]], [[5, 6, 107, 8]], stop) == 0  # Past the stop.


def test_busy_time_and_kernel_categories():
  # Overlapping and nested kernels count once; gaps do not count.
  assert bench_common._busy_ns([(0, 10), (5, 15), (6, 7), (20, 30)]) == 25
  assert bench_common._busy_ns([]) == 0
  cat = bench_common.kernel_category
  assert cat('cudnn_generated_fort_native_sdpa_sm90_flash_fprop') == 'attention'
  assert cat('nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT') == 'matmul'
  assert cat('gemm_fusion_dot_92') == 'matmul'
  assert cat('input_reduce_fusion_1') == 'reduce'
  assert cat('loop_add_fusion_19') == 'elementwise'
  assert bench_common.trace_summary('/nonexistent', 1) == {
      'error': 'no .xplane.pb under /nonexistent'}


def test_translate_benchmark_runs_tiny(tmp_path, mtnt_dir, tokenizer):
  del tokenizer  # Built (and cached) before the subprocess needs it.
  out = tmp_path / 'bench.json'
  env = dict(os.environ, PYTHONPATH=str(SCRIPTS.parent))
  subprocess.run(
      [sys.executable, str(SCRIPTS / 'benchmark_translate.py'), '--model',
       'tiny', '--batch_sizes', '1,4', '--limit', '8', '--bs1_limit', '2',
       '--max_new_tokens', '4', '--max_length_ratio', '0.2', '--no-baseline',
       '--mtnt_dir', str(mtnt_dir), '--out', str(out)],
      check=True, env=env, capture_output=True, timeout=600)
  res = json.loads(out.read_text())
  assert res['complete'] and res['skipped_batch_sizes'] == []
  rows = {(r['impl'], r['batch_size']): r for r in res['rows']}
  assert set(rows) == {('ours', 1), ('ours', 4), ('ours_length_cap', 1),
                       ('ours_length_cap', 4)}
  assert rows['ours', 1]['sentences'] == 2 and rows['ours', 4]['sentences'] == 8
  for (impl, _), r in rows.items():
    assert r['sentences_per_s'] > 0 and r['decode_step_ms'] > 0
    if impl == 'ours_length_cap':  # The cap only ever shortens an output.
      assert r['prefix_of_uncapped'] == r['sentences']


def test_decode_step_benchmark_runs_tiny(tmp_path):
  out = tmp_path / 'step.json'
  env = dict(os.environ, PYTHONPATH=str(SCRIPTS.parent))
  subprocess.run(
      [sys.executable, str(SCRIPTS / 'benchmark_decode_step.py'), '--model',
       'tiny', '--batch', '2', '--prompt', '16', '--new_tokens', '8',
       '--repeats', '1', '--out', str(out)],
      check=True, env=env, capture_output=True, timeout=600)
  res = json.loads(out.read_text())
  assert set(res['variants']) == {'fast_decode=False', 'fast_decode=True'}
  for v in res['variants'].values():
    assert v['steps'] == 8 and v['ms_per_step'] > 0  # EOS-only: full budget.


def test_recipe_search_runs_tiny(tmp_path, mtnt_dir):
  """A one-run grid selected by chrF, then the decoding table of its best."""
  grid = tmp_path / 'grid.json'
  grid.write_text(json.dumps([{'name': 'one', 'learning_rate': 0.01}]))
  out = tmp_path / 'out.json'
  overrides = dict(max_steps=2, eval_bleu_every_n=1, eval_bleu_sentences=2,
                   eval_bleu_batch_size=2, eval_every_n=0, batch_size=2,
                   max_seq_len=48, checkpoint_every_n=2)
  env = dict(os.environ, PYTHONPATH=str(SCRIPTS.parent))
  subprocess.run(
      [sys.executable, str(SCRIPTS / 'recipe_search.py'), '--config',
       str(SCRIPTS.parent / 'configs' / 'tiny_test.py'), '--mtnt_dir',
       str(mtnt_dir), '--grid', str(grid), '--workdir', str(tmp_path / 'rs'),
       '--overrides', json.dumps(overrides), '--decode_winner',
       '--decode_limit', '2', '--mbr', '2', '--length_penalties', '0.5',
       '--batch_size', '2', '--out', str(out)],
      check=True, env=env, capture_output=True, timeout=900)
  res = json.loads(out.read_text())
  run = res['grid'][0]
  assert res['winner'] == 'one' and [s for s, _ in run['chrf_curve']] == [0, 1, 2]
  best_step, best_chrf = max(run['chrf_curve'], key=lambda x: (x[1], -x[0]))
  assert (run['best']['step'], run['best']['chrf']) == (best_step, best_chrf)
  assert [r['decode'] for r in res['decoding']] == [
      'greedy', 'beam4', 'beam4_lp0.5', 'mbr2']
  assert all('error' not in r and 'tok:intl' in r['bleu_intl_signature']
             for r in res['decoding'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
