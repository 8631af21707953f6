"""The benchmarks' own logic (output agreement, profile arithmetic, FLOPs)
and tiny CPU runs of each benchmark, for both model families."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import benchmark_train as btrain
from benchmarks import benchmark_translate as bt
from benchmarks import common

ROOT = Path(__file__).resolve().parents[2]
MODELS = ('tiny', 'tiny_gemma4')


def run_module(module: str, *args, timeout: int = 300):
  """`python -m benchmarks.<module> args` from the repo root."""
  proc = subprocess.run(
      [sys.executable, '-m', f'benchmarks.{module}', *map(str, args)],
      cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
      timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


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
  assert common.busy_ns([(0, 10), (5, 15), (6, 7), (20, 30)]) == 25
  assert common.busy_ns([]) == 0
  cat = common.kernel_category
  assert cat('cudnn_generated_fort_native_sdpa_sm90_flash_fprop') == 'attention'
  assert cat('nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT') == 'matmul'
  assert cat('gemm_fusion_dot_92') == 'matmul'
  assert cat('input_reduce_fusion_1') == 'reduce'
  assert cat('loop_add_fusion_19') == 'elementwise'
  assert common.trace_summary('/nonexistent', 1) == {
      'error': 'no .xplane.pb under /nonexistent'}


def test_tutorial_baseline_refuses_gemma4():
  from gemma_mt import models
  assert common.tutorial_refusal(models.from_name('tiny')) is None
  why = common.tutorial_refusal(models.from_name('tiny_gemma4'))
  assert why and 'Gemma 1-3 only' in why
  with pytest.raises(ValueError, match='Gemma 1-3 only'):
    common.tutorial_config(models.from_name('gemma4_e2b'))


@pytest.mark.parametrize('name', MODELS)
def test_step_flops(name):
  """One packed row: 6 x the weights a token multiplies through (the LM head
  on targets only) plus 3 x forward attention over each token's context."""
  from gemma_mt import models
  cfg = models.from_name(name)
  batch = {'input_tokens': np.array([[2, 5, 6, 2, 7, 0]]),
           'segment_ids': np.array([[1, 1, 1, 2, 2, 0]]),
           'positions': np.array([[0, 1, 2, 0, 1, 0]]),
           'target_mask': np.array([[0, 0, 1, 0, 1, 0]], bool)}
  matmul = cfg.matmul_params()
  head = cfg.vocab_size * cfg.embed_dim
  per_token = models.flops_per_token(cfg, 0, training=True) - 6 * head
  attn = 3 * (2 * cfg.attention_flops(1) + 2 * cfg.attention_flops(2)
              + cfg.attention_flops(3))
  assert btrain.step_flops(cfg, batch, matmul) == pytest.approx(
      5 * per_token + 2 * 6 * head + attn)
  lora = btrain.step_flops(cfg, batch, matmul, frozen_base=True,
                           adapter_params=10)
  assert lora == pytest.approx(5 * (4 * (matmul - head) + 60) + 2 * 4 * head
                               + attn)


@pytest.mark.parametrize('model', MODELS)
def test_translate_benchmark_runs_tiny(tmp_path, mtnt_dir, tokenizer, model):
  """Ours only: the tutorial baseline is turned off for Gemma 3 (the
  gemma 2.0.8 wheel is absent) and skips itself for Gemma 4."""
  del tokenizer  # Built (and cached) before the subprocess needs it.
  out = tmp_path / 'bench.json'
  baseline = '--baseline' if model == 'tiny_gemma4' else '--no-baseline'
  proc = run_module('benchmark_translate', '--model', model, '--batch_sizes',
                    '1,4', '--limit', 8, '--bs1_limit', 2, '--max_new_tokens',
                    4, '--max_length_ratio', 0.2, baseline, '--mtnt_dir',
                    mtnt_dir, '--out', out)
  assert ('no baseline: ' in proc.stdout) == (model == 'tiny_gemma4')
  res = json.loads(out.read_text())
  assert res['check'] is None
  assert res['complete'] and res['skipped_batch_sizes'] == []
  rows = {(r['impl'], r['batch_size']): r for r in res['rows']}
  assert set(rows) == {('ours', 1), ('ours', 4), ('ours_length_cap', 1),
                       ('ours_length_cap', 4)}
  assert rows['ours', 1]['sentences'] == 2 and rows['ours', 4]['sentences'] == 8
  for (impl, _), r in rows.items():
    assert r['sentences_per_s'] > 0 and r['decode_step_ms'] > 0
    assert r['bandwidth_floor_ms'] > 0
    if impl == 'ours_length_cap':  # The cap only ever shortens an output.
      assert r['prefix_of_uncapped'] == r['sentences']


@pytest.mark.parametrize('model', MODELS)
def test_decode_step_benchmark_runs_tiny(tmp_path, model):
  out = tmp_path / 'step.json'
  run_module('benchmark_decode_step', '--model', model, '--batch', 2,
             '--prompt', 16, '--new_tokens', 8, '--repeats', 1, '--out', out)
  res = json.loads(out.read_text())
  assert set(res['variants']) == {'fast_decode=False', 'fast_decode=True'}
  for v in res['variants'].values():
    assert v['steps'] == 8 and v['ms_per_step'] > 0  # EOS-only: full budget.


@pytest.mark.parametrize('model', MODELS)
def test_train_benchmark_runs_tiny(tmp_path, mtnt_dir, tokenizer, model):
  """ours_packed trains; the tutorial variant (gemma 2.0.8, Gemma 1-3 only)
  is skipped for Gemma 4 and not asked for Gemma 3 (the wheel is absent)."""
  del tokenizer
  out = tmp_path / 'train.json'
  variants = 'ours_packed' + (',tutorial' if model == 'tiny_gemma4' else '')
  run_module('benchmark_train', '--model', model, '--variants', variants,
             '--batch_size', 2, '--seq_len', 32, '--steps', 2, '--warmup', 1,
             '--mtnt_dir', mtnt_dir, '--out', out)
  res = {r['variant']: r for r in json.loads(out.read_text())}
  ours = res['ours_packed']
  assert ours['status'] == 'ok', ours.get('error')
  assert ours['steps_timed'] == 2
  assert ours['tokens_per_s'] > 0 and 0 < ours['mfu'] == ours['mfu_actual']
  assert np.isfinite(ours['final_loss'])
  if model == 'tiny_gemma4':
    assert res['tutorial']['status'] == 'skipped'
    assert 'Gemma 1-3 only' in res['tutorial']['error']


@pytest.mark.parametrize('model', MODELS)
def test_service_benchmark_runs_tiny(tmp_path, mtnt_dir, tokenizer, model):
  """The load test against `gemma_mt.serve` serving a saved random toy."""
  from gemma_mt import models, weights
  from gemma_mt.train.state import random_params
  ckpt = tmp_path / 'model'
  weights.save(ckpt, model, random_params(models.from_name(model).module()),
               tokenizer)
  out = tmp_path / 'service.json'
  run_module('benchmark_service', '--mtnt_dir', mtnt_dir, '--clients', '1,2',
             '--requests', 2, '--max_tokens', 4, '--output', out, '--',
             '--checkpoint', ckpt, '--batch_size', 2)
  rows = json.loads(out.read_text())
  assert [r['clients'] for r in rows] == [1, 2]
  assert all(r['statuses'] == {'200': 2} and r['sentences_per_s'] > 0
             for r in rows)


def test_recipe_search_runs_tiny(tmp_path, mtnt_dir):
  """A one-run grid selected by chrF, then the decoding table of its best."""
  grid = tmp_path / 'grid.json'
  grid.write_text(json.dumps([{'name': 'one', 'learning_rate': 0.01}]))
  out = tmp_path / 'out.json'
  overrides = dict(max_steps=2, eval_bleu_every_n=1, eval_bleu_sentences=2,
                   eval_bleu_batch_size=2, eval_every_n=0, batch_size=2,
                   max_seq_len=48, checkpoint_every_n=2)
  run_module('recipe_search', '--config', ROOT / 'configs' / 'tiny_test.py',
             '--mtnt_dir', mtnt_dir, '--grid', grid, '--workdir',
             tmp_path / 'rs', '--overrides', json.dumps(overrides),
             '--decode_winner', '--decode_limit', 2, '--mbr', 2,
             '--sampled_mbr', 2, '--pooled_mbr', 4,
             '--length_penalties', 0.5, '--batch_size', 2,
             '--max_new_tokens', 8, '--out', out, timeout=900)
  res = json.loads(out.read_text())
  run = res['grid'][0]
  assert res['winner'] == 'one' and [s for s, _ in run['chrf_curve']] == [0, 1, 2]
  best_step, best_chrf = max(run['chrf_curve'], key=lambda x: (x[1], -x[0]))
  assert (run['best']['step'], run['best']['chrf']) == (best_step, best_chrf)
  assert [(r['decode'], r['guard']) for r in res['decoding']] == [
      (d, g) for d in ('greedy', 'beam4', 'beam4_lp0.5', 'beam_mbr2',
                       'sampled_mbr2', 'pooled_mbr4') for g in (False, True)]
  assert all('error' not in r and 'tok:intl' in r['bleu_intl_signature']
             and {'copied', 'off_target', 'runaway'} <= set(r)
             for r in res['decoding'])


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))


def test_startup_benchmark_runs_tiny(tmp_path, mtnt_dir):
  """Cold compiles the decoders, warm loads every one of them and compiles
  nothing, an emptied store compiles them again; all translate the same."""
  out = tmp_path / 'startup.json'
  run_module('benchmark_startup', '--random_init', '--model', 'tiny',
             '--mtnt_dir', mtnt_dir, '--limit', 12, '--max_new_tokens', 4,
             '--batch_size', 4, '--no_guard', '--in_process', 2, '--out', out)
  rows = {r['run']: r for r in json.loads(out.read_text())['rows']}
  cold, warm, miss = rows['cold'], rows['warm'], rows['store_miss']
  assert cold['loaded'] == 0 and cold['decoders_compiled'] >= 3  # Continuous.
  assert warm['loaded'] == cold['decoders_compiled']
  assert warm['decoders_compiled'] == warm['xla_compiled'] == 0
  assert miss['loaded'] == 0 and miss['decoders_compiled'] == cold['decoders_compiled']
  assert rows['in_process_2']['compiled'] == 0
  assert len({r['bleu'] for r in rows.values()}) == 1
  # The time split: decoders ready within translating, and nothing to get
  # ready in process the second time.
  for r in (cold, warm, miss):
    assert 0 < r['decoders_ready_s'] <= r['translating_s']
    assert r['setup_s'] > 0 and r['other_s'] > 0
  assert rows['in_process_2']['decoders_ready_s'] == 0


def test_hf_peer_benchmark_runs_tiny(tmp_path, mtnt_dir):
  """Our export in transformers (.venv-hf) against ours, on the same prompt
  ids: both engines stop at the same ids and budget, and agree where the
  random tiny model has no near-ties (float32 on both sides here)."""
  hf_py = ROOT / '.venv-hf/bin/python'
  if not hf_py.exists():
    pytest.skip('.venv-hf missing: run scripts/setup_interop_env.sh')
  from benchmarks.benchmark_translate import load_model
  from gemma_mt import weights
  import argparse
  cfg, params, tok = load_model(argparse.Namespace(
      random_init=True, checkpoint=None, model='tiny'))
  ckpt = weights.save(tmp_path / 'model', cfg, params, tok)
  out = tmp_path / 'peer.json'
  run_module('benchmark_hf_peer', '--checkpoint', ckpt, '--model', 'tiny',
             '--mtnt_dir', mtnt_dir, '--limit', 8, '--max_new_tokens', 6,
             '--hf_batch', 4, '--hf_python', hf_py, '--out', out, timeout=600)
  r = json.loads(out.read_text())
  assert r['sentences'] == 8 and [x['engine'] for x in r['rows']] == ['ours', 'hf']
  assert all(x['sentences_per_s'] > 0 for x in r['rows'])
  assert r['identical_outputs'] >= 6
