"""Translator (prompt, stop rules, clean-up, limits), the CLI and the JSON request interface."""

import io
import json
import sys

import jax
import numpy as np
import pytest
from support.tiny import forcing, make_tiny_translator

from gemma_mt import cli as cli_lib
from gemma_mt import json_api
from gemma_mt import translate as T
from gemma_mt.data import mtnt as data
from gemma_mt.decoding import postprocess
from gemma_mt.decoding.options import SamplingOptions
from gemma_mt.translator import InputTooLongError, Translator


@pytest.fixture(scope='module')
def tr(tokenizer):
  return make_tiny_translator(tokenizer)


@pytest.fixture
def forced(tr, monkeypatch):
  """Set the sampler's params so the model always emits one token."""
  base = tr.sampler.params
  def force(token):
    monkeypatch.setattr(tr.sampler, 'params', forcing(base, token))
  return force


def word_id(tokenizer, word):
  ids = tokenizer.tokenize(word, add_bos=False, add_eos=False)
  assert len(ids) == 1, ids
  return int(ids[0])


# --- Pure functions ----------------------------------------------------------------
@pytest.mark.parametrize('raw,source,stops,expected,cut', [
    ("C'est Bonjour.\nC'est Bonjour.", 'Hi', (), "C'est Bonjour.", False),
    ('Bonjour\r\nencore', 'Hi', (), 'Bonjour', False),
    ('Here is the translation: Bonjour, Morgane.', 'Hi', (), 'Bonjour, Morgane.', False),
    ("Sure! Here's the French translation: « Bonjour »", 'Hi', (), 'Bonjour', False),
    ('Voici la traduction : "Bonjour"', 'Hi', (), 'Bonjour', False),
    ('Traduction : Bonjour', 'Hi', (), 'Bonjour', False),
    ('"Bonjour"', '"Hello"', (), '"Bonjour"', False),  # quoted source
    ('"a" et "b"', 'x', (), '"a" et "b"', False),
    ('Bonjour ### Salut END x', 'Hi', ('END', '###'), 'Bonjour', True),
    ('Bonjour', 'Hi', ('zz', ''), 'Bonjour', False),
    ('', 'Hi', (), '', False),
])
def test_clean_translation(raw, source, stops, expected, cut):
  assert postprocess.clean_translation(raw, source, stops) == (expected, cut)


def test_stop_token_ids_come_from_the_tokenizer(tokenizer):
  ids = postprocess.stop_token_ids(tokenizer)
  assert {tokenizer.eos_id, 106, 107, 108, 248} <= set(ids)  # 248 = <0x0A>
  assert tokenizer.processor.EncodeAsIds('\n') == [107]
  assert word_id(tokenizer, 'Bonjour') not in ids


def test_sampling_options_greedy_unless_sampling_options():
  assert SamplingOptions().temperature == 0.0
  assert SamplingOptions(top_k=40).temperature == 1.0
  assert SamplingOptions(top_p=0.9, temperature=0.3).temperature == 0.3
  args = T.parse_args(['x', '--top_k', '40', '--stop', 'a', '--stop', 'b'])
  assert args.options == SamplingOptions(top_k=40, stop_sequences=('a', 'b'),
                                         max_length_ratio=3.0)
  assert T.parse_args(['x', '--max_length_ratio', '0']).options.max_length_ratio is None


def test_split_lines_keeps_alignment(caplog):
  assert T.split_lines('a\r\nb\u2028c\n\nd\n') == ['a', 'b\u2028c', '', 'd']
  # One undecodable line is skipped by number; the others are kept.
  assert T.split_lines(b'Hello\n\xff\xfe bad\nCats\n', 'in.txt') == [
      'Hello', '', 'Cats']
  assert 'in.txt line 2: invalid UTF-8 at byte 0' in caplog.text


# --- Translator ----------------------------------------------------------------------
def test_prompt_is_the_training_prompt(tr, tokenizer):
  builder = data.MTNTDatasetBuilder(tokenizer, 64)
  seq, n = builder.encode_pair('Hello world', 'Bonjour le monde')
  assert tr.prompt_tokens('  Hello world \n').tolist() == seq[:n].tolist()
  assert tr.prompt_tokens('x')[0] == tokenizer.bos_id


def test_translate_batch_usage_and_blank(tr):
  src = ['Hello', '', 'I love cats.', 'Good morning!']
  compiles = tr.num_compiles
  gen = tr.generate(src, max_new_tokens=5)
  assert gen.input_tokens[1] == 0 and gen.stop_reasons[1] == 'blank'
  for i in (0, 2, 3):
    assert gen.input_tokens[i] == len(tr.prompt_tokens(src[i]))
    assert 1 <= gen.output_tokens[i] == len(gen.token_ids[i]) <= 5
  out = tr.translate(src, max_new_tokens=5)
  assert len(out) == 4 and out[1] == '' and all('\n' not in t for t in out)
  assert tr.translate(src[2:3], max_new_tokens=5) == out[2:3]  # batch-independent
  assert tr.num_compiles - compiles <= 2  # (4, 16, 16) and (1, 16, 16)


def test_stop_rules_end_to_end(tr, tokenizer, forced):
  forced(107)  # "\n"
  [t] = tr.translate_detailed(['Hello'], max_new_tokens=8)
  assert (t.text, t.output_tokens, t.stop_reason) == ('', 1, 'newline')
  forced(tokenizer.eos_id)
  [t] = tr.translate_detailed(['Hello'], max_new_tokens=8)
  assert (t.text, t.output_tokens, t.stop_reason) == ('', 1, 'eos')
  forced(word_id(tokenizer, 'Bonjour'))
  [t] = tr.translate_detailed(['Hello'], max_new_tokens=3)
  assert (t.text, t.output_tokens, t.stop_reason) == (
      'BonjourBonjourBonjour', 3, 'max_tokens')
  [t] = tr.translate_detailed(['Hello'], max_new_tokens=3,
                              stop_sequences=['jourBon'])
  assert (t.text, t.output_tokens, t.stop_reason) == ('Bon', 3, 'stop_sequence')
  n = len(tr.prompt_tokens('Hello'))
  [t] = tr.translate_detailed(['Hello'], max_new_tokens=8,
                              max_length_ratio=2.5 / n)  # ceil(2.5) = 3
  assert (t.output_tokens, t.stop_reason) == (3, 'max_tokens')


def test_over_long_inputs(tr, monkeypatch):
  monkeypatch.setattr(tr, 'max_input_tokens', 14)
  long_src = 'one two three four five six seven eight nine ten'
  with pytest.raises(InputTooLongError, match=r'input 1 is \d+ tokens .* limit of 14'):
    tr.generate(['Hi', long_src], max_new_tokens=2)
  monkeypatch.setattr(tr, 'truncate', True)
  gen = tr.generate(['Hi', long_src], max_new_tokens=2)
  assert gen.truncated == [False, True] and gen.input_tokens[1] == 14


@pytest.mark.parametrize('kw,field', [
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(max_new_tokens=True), 'max_new_tokens'),
    (dict(temperature=-1.0), 'temperature'),
    (dict(temperature=float('nan')), 'temperature'),
    (dict(top_k=0), 'top_k'),
    (dict(top_p=0.0), 'top_p'),
    (dict(top_p=1.5), 'top_p'),
    (dict(seed=-1), 'seed'),
    (dict(max_length_ratio=-1), 'max_length_ratio'),
    (dict(stop_sequences='END'), 'stop_sequences'),
])
def test_option_validation(tr, kw, field):
  with pytest.raises(ValueError, match=field):
    tr.generate(['Hi'], **kw)


def test_sources_must_be_a_list(tr):
  with pytest.raises(TypeError):
    tr.generate('Hello')


# --- JSON interface ----------------------------------------------------------------
@pytest.mark.parametrize('request_text,field', [
    ('{"input_text": ', 'invalid JSON'),
    ('[1, 2]', 'JSON object'),
    ('{"temperature": 0}', 'input_text'),
    ('{"input_text": "Hi", "foo": 1}', "'foo'"),
    ('{"input_text": ""}', 'input_text is empty'),
    ('{"input_text": []}', 'input_text'),
    ('{"input_text": ["a", 3]}', 'input_text[1]'),
    ('{"input_text": "Hi", "temperature": "0.5"}', 'temperature'),
    ('{"input_text": "Hi", "temperature": 1.5}', 'temperature'),
    ('{"input_text": "Hi", "temperature": true}', 'temperature'),
    ('{"input_text": "Hi", "temperature": NaN}', 'NaN'),
    ('{"input_text": "Hi", "top_p": -0.1}', 'top_p'),
    ('{"input_text": "Hi", "top_k": 501}', 'top_k'),
    ('{"input_text": "Hi", "top_k": 5.0}', 'top_k'),
    ('{"input_text": "Hi", "max_tokens": 0}', 'max_tokens'),
    ('{"input_text": "Hi", "max_tokens": false}', 'max_tokens'),
    ('{"input_text": "Hi", "max_tokens": 100000}', 'max_tokens'),
    ('{"input_text": "Hi", "seed": true}', 'seed'),
    ('{"input_text": "Hi", "stop_sequences": "END"}', 'stop_sequences'),
    ('{"input_text": "Hi", "stop_sequences": [""]}', 'stop_sequences[0]'),
    ('{"input_text": "Hi", "seed": 1, "seed": 2}', "duplicate field 'seed'"),
    ('{"input_text": "Hi", "mbr_candidates": 5}', 'mbr_candidates'),
    ('{"input_text": "Hi", "mbr_candidates": "all"}', 'mbr_candidates'),
    ('{"input_text": "Hi", "mbr": 2, "mbr_candidates": "both"}', 'mbr'),
    ('{"input_text": "Hi", "mbr_utility": "ter"}', 'mbr_utility'),
    ('{"input_text": "Hi", "epsilon": 1.5}', 'epsilon'),
    ('{"input_text": "Hi", "guard": "no"}', 'guard'),
])
def test_json_request_errors(request_text, field):
  # Rejected before the model is touched: no translator needed.
  response = json_api.handle_request(None, request_text)
  assert response['status'] == 'FAIL' and field in response['error'], response
  assert set(response) == {'status', 'error'}


def test_json_mbr_and_guard_fields():
  _, opts = json_api.parse_request({
      'input_text': 'Hi', 'mbr': 16, 'mbr_candidates': 'sample',
      'mbr_utility': 'chrf+bleu', 'epsilon': 0.05, 'guard': False})
  assert (opts.mbr_samples, opts.search_width, opts.epsilon, opts.guard) == (
      16, 1, 0.05, False)
  assert opts.candidate_sampling().temperature == 1.0
  _, opts = json_api.parse_request({'input_text': 'Hi', 'mbr': 8,
                                    'mbr_candidates': 'both'})
  assert (opts.mbr_samples, opts.search_width) == (4, 4)


def test_json_defaults_and_sampling_implied():
  sources, opts = json_api.parse_request({'input_text': 'Hi'})
  assert sources == ['Hi'] and opts == SamplingOptions()
  _, opts = json_api.parse_request({'input_text': ['a'], 'top_k': 40, 'top_p': 1})
  assert (opts.temperature, opts.top_k, opts.top_p) == (1.0, 40, None)


def test_json_success_and_too_long(tr):
  response = json_api.handle_request(
      tr, {'input_text': ['Hello', 'Cats'], 'max_tokens': 4})
  assert response['status'] == 'SUCCESS' and len(response['translations']) == 2
  gen = tr.generate(['Hello', 'Cats'], max_new_tokens=4)
  assert response['usage'] == {'input_tokens': sum(gen.input_tokens),
                               'output_tokens': sum(gen.output_tokens)}
  response = json_api.handle_request(
      tr, {'input_text': ['Hi', 'word ' * 2000], 'max_tokens': 4})
  assert response['status'] == 'FAIL'
  assert 'input_text[1] is' in response['error'] and '1024' in response['error']


def test_jsonl_one_response_per_line_in_order(tr):
  lines = [b'{"input_text": "Hello", "max_tokens": 3}',
           b'{"input_text": ',
           b'',
           b'{"input_text": "Hi", "colour": "red"}',
           b'\xff\xfe',
           b'{"input_text": ["Hi", "Cats"], "max_tokens": 3}\r']
  out = io.StringIO()
  n = json_api.serve_jsonl(tr, io.BytesIO(b'\n'.join(lines) + b'\n'), out)
  responses = [json.loads(line) for line in out.getvalue().splitlines()]
  assert n == len(responses) == 6
  assert [r['status'] for r in responses] == [
      'SUCCESS', 'FAIL', 'FAIL', 'FAIL', 'FAIL', 'SUCCESS']
  assert responses[1]['error'].startswith('line 2: invalid JSON')
  assert responses[2]['error'] == 'line 3: empty line'
  assert "line 4: unknown field(s) 'colour'" in responses[3]['error']
  assert responses[4]['error'].startswith('line 5: invalid UTF-8')
  assert len(responses[5]['translations']) == 2


# --- CLI ---------------------------------------------------------------------------
@pytest.fixture
def cli(tr, monkeypatch):
  monkeypatch.setattr(cli_lib, 'build_translator', lambda args: tr)
  def run(argv, stdin=b''):
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(stdin)))
    return T.main(argv)
  return run


def test_cli_file_args_and_stdin(cli, capfd, tmp_path, tr, tokenizer, forced):
  forced(word_id(tokenizer, 'Bonjour'))
  path = tmp_path / 'in.txt'
  path.write_text('Hello\n\nCats\n', encoding='utf-8')
  assert cli(['--input', str(path), '--max_new_tokens', '2']) == 0
  assert capfd.readouterr().out == 'BonjourBonjour\n\nBonjourBonjour\n'
  assert cli(['Hello', 'Cats', '--max_new_tokens', '1', '--stop', 'jour']) == 0
  assert capfd.readouterr().out == 'Bon\nBon\n'
  assert cli(['--max_new_tokens', '1'], stdin=b'Hello\n') == 0
  assert capfd.readouterr().out == 'Bonjour\n'
  assert cli(['--jsonl'], stdin=b'{"input_text": "Hi", "max_tokens": 1}\n\n') == 0
  out = [json.loads(x) for x in capfd.readouterr().out.splitlines()]
  assert out[0]['translations'] == ['Bonjour'] and out[1]['status'] == 'FAIL'
  assert cli(['x', '--top_p', '0']) == 2  # A clear error, not a traceback.


def test_data_parallel_flag_builds_a_mesh(monkeypatch):
  """--data_parallel: a data-only mesh over the local devices (the 8-device
  decode itself is checked by tests/decoding/test_sampler_mesh.py)."""
  seen = []
  monkeypatch.setattr(Translator, 'from_pretrained',
                      lambda *a, **kw: seen.append(kw['mesh']) or 'tr')
  assert cli_lib.build_translator(T.parse_args(['x'])) == 'tr'
  assert cli_lib.build_translator(T.parse_args(['x', '--data_parallel'])) == 'tr'
  assert seen[0] is None
  n = jax.local_device_count()
  assert dict(seen[1].shape) == {'data': n, 'fsdp': 1}


@pytest.mark.parametrize('text, source, expected', [
    # A real loop from the fine-tuned 270M (valid.en-fr.tsv line 8).
    ("Des années de bouffe, des problèmes de prise de poids, des problèmes "
     "de prise de poids, des problèmes de prise de poids, des problèmes de",
     'Years of food, weight gain issues.',
     'Des années de bouffe, des problèmes de prise de poids'),
    ('non non non non non non non non', 'no', 'non'),
    # The unit is the loop's, not a shorter repeat inside it.
    ('oui oui non oui oui non oui oui non', 'yes yes no', 'oui oui non'),
    ('très très bien, ha ha ha', 'very very good, ha ha ha',
     'très très bien, ha ha ha'),            # short repeats are language
    ('lol lol lol lol lol lol', 'lol lol lol lol lol lol',
     'lol lol lol lol lol lol'),             # the source loops too
    ('Bonjour, je suis Morgane.', 'Hello, I am Morgane.',
     'Bonjour, je suis Morgane.'),
])
def test_cut_repetition(text, source, expected):
  assert postprocess.cut_repetition(text, source) == expected
  assert postprocess.clean_translation(text, source)[0] == expected


# --- Beam search and MBR through the Translator, CLI and JSON ----------------------
def test_beam_and_mbr_through_the_translator(tr):
  sources = ['Hello', 'Cats are nice']
  greedy = tr.translate(sources, max_new_tokens=4)
  assert tr.translate(sources, max_new_tokens=4, beam_size=1) == greedy
  beam = tr.translate_detailed(sources, max_new_tokens=4, beam_size=3,
                               length_penalty=0.6)
  for t in beam:
    assert len(t.candidates) == 3 and t.text == t.candidates[0]
  gen = tr.generate(sources, max_new_tokens=4, beam_size=3)
  for nbest in gen.nbest:
    assert [h.score for h in nbest] == sorted((h.score for h in nbest),
                                              reverse=True)
  mbr = tr.translate_detailed(sources, max_new_tokens=4, mbr=3)
  from gemma_mt.decoding import mbr as mbr_lib
  for t in mbr:
    assert t.text == t.candidates[mbr_lib.mbr_select(t.candidates)]
  with pytest.raises(ValueError, match='beam_size'):
    tr.translate(sources, beam_size=2, temperature=0.5)


def test_beam_options_in_json_and_cli(tr, cli, capfd):
  ok = json_api.handle_request(tr, {'input_text': 'Hi', 'max_tokens': 3,
                                    'beam_size': 2, 'length_penalty': 0.5})
  assert ok['status'] == 'SUCCESS'
  assert ok['translations'] == tr.translate(['Hi'], max_new_tokens=3,
                                            beam_size=2, length_penalty=0.5,
                                            max_length_ratio=None)
  for bad, field in (({'beam_size': 0}, 'beam_size'),
                     ({'beam_size': 99}, 'beam_size'),
                     ({'length_penalty': -1}, 'length_penalty'),
                     ({'mbr': 2.5}, 'mbr'),
                     ({'beam_size': 2, 'temperature': 0.7}, 'beam_size')):
    r = json_api.handle_request(None, {'input_text': 'Hi', **bad})
    assert r['status'] == 'FAIL' and field in r['error'], (bad, r)
  assert cli(['Hi', '--max_new_tokens', '3', '--beam_size', '2',
              '--length_penalty', '0.5', '--max_length_ratio', '0']) == 0
  assert capfd.readouterr().out.splitlines() == ok['translations']


def test_second_process_traces_and_compiles_nothing(tmp_path, tokenizer):
  """Every CLI keeps its compiled decoders (`decoding.executables`): a
  second process loads them all (no XLA cache hit for them, which would
  mean tracing and lowering again), compiles nothing, and prints the same.
  A damaged file is compiled again and replaced."""
  import re
  import subprocess

  from support.tiny import tiny_params

  from gemma_mt import weights
  weights.save(tmp_path / 'model', 'tiny', tiny_params(), tokenizer)
  cmd = [sys.executable, '-m', 'gemma_mt.translate', '--checkpoint',
         str(tmp_path / 'model'), '--compile_cache_dir', str(tmp_path / 'xla'),
         '--max_new_tokens', '3', 'Hello', 'Cats are nice']

  def run():
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(__import__('os').environ, JAX_PLATFORMS='cpu'))
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'compile cache: decoders (\d+) loaded, (\d+) compiled; '
                  r'XLA (\d+) hits, (\d+) compiled', r.stderr)
    return r.stdout, tuple(map(int, m.groups()))

  first, (loaded, built, hits, compiled) = run()
  assert loaded == 0 and built >= 1 and len(first.splitlines()) == 2
  # Nothing but decoders is compiled (no small array op, each of which a
  # new process would trace and fetch from XLA's cache).
  assert hits == compiled == 0
  store = sorted((tmp_path / 'xla' / 'executables').glob('*.exe'))
  assert len(store) == built
  warm = (first, (built, 0, hits + compiled, 0))
  assert run() == warm
  data = bytearray(store[0].read_bytes())
  data[len(data) // 2] ^= 0xFF
  store[0].write_bytes(bytes(data))
  assert run() == (first, (built - 1, 1, hits + compiled, 0))
  assert run() == warm  # Replaced at once: compiled past XLA's cache.


def test_jsonl_fuzz_one_response_each_and_never_internal(tr):
  """Random bytes and random JSON values: one response per line, in order,
  and never an internal error."""
  import random
  rng = random.Random(0)
  fields = list(json_api.FIELDS) + ['foo']
  atoms = [None, True, False, 0, -1, 1, 2.5, 1e400, -0.0, 10**30, '', 'Hi',
           '\ud800', '\x00', 'a' * 3000, [], {}, ['Hi', 3], [''], ['Hi']]

  def value(depth=0):
    r = rng.random()
    if depth < 3 and r < 0.15:
      return [value(depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.3:
      return {rng.choice(fields): value(depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(atoms)

  lines = []
  for i in range(200):
    kind = i % 4
    if kind == 0:
      lines.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
                   .replace(b'\n', b' '))
    elif kind == 1:
      lines.append(json.dumps(value()).encode())
    else:  # Mostly well-formed requests with random field values.
      req = {'input_text': rng.choice(['Hi', ['Hi', 'Cats'], value()])}
      for f in rng.sample(fields[1:], rng.randint(0, 3)):
        req[f] = value(2)
      req.setdefault('max_tokens', 2)
      lines.append(json.dumps(req).encode())
  lines.append(b'[' * 100000)  # Deep nesting.
  out = io.StringIO()
  n = json_api.serve_jsonl(tr, io.BytesIO(b'\n'.join(lines) + b'\n'), out)
  responses = [json.loads(x) for x in out.getvalue().splitlines()]
  assert n == len(responses) == len(lines)
  for r in responses:
    assert r['status'] in ('SUCCESS', 'FAIL')
    assert 'internal error' not in r.get('error', ''), r
  assert any(r['status'] == 'SUCCESS' for r in responses)


@pytest.mark.parametrize('argv,message', [
    (['x', '--batch_size', '0'], 'error: --batch_size must be >= 1, got 0'),
    (['x', '--max_new_tokens', '1000000000', '--max_length_ratio', '0'],
     'error: max_new_tokens must be an int in [1, 8192], got 1000000000'),
    (['x', '--checkpoint', '/no/such/dir'],
     'error: --checkpoint /no/such/dir: no such directory'),
    (['x', '--top_p', '2'], 'error: top_p must be None or a number in (0, 1]'),
    (['x', '--temperature', 'hot'], "--temperature: expects float, got 'hot'"),
])
def test_cli_bad_flags_one_line_before_loading(argv, message, capsys,
                                               monkeypatch):
  monkeypatch.setattr(cli_lib, 'build_translator',
                      lambda a: pytest.fail('loaded a model'))
  assert T.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1, err


def _bad_checkpoints(root, tokenizer):
  from support.tiny import tiny_params

  from gemma_mt import weights
  model = weights.save(root / 'run' / 'final', 'tiny', tiny_params(), tokenizer)
  (root / 'run' / 'checkpoints').mkdir()
  (root / 'a_file').write_text('x')
  (root / 'empty').mkdir()
  broken = root / 'broken_json'
  import shutil
  shutil.copytree(model, broken)
  (broken / 'gemma_mt.json').write_text('{bad')
  shutil.copytree(model, root / 'no_meta')
  (root / 'no_meta' / 'gemma_mt.json').unlink()
  # Without the package's checksums (an older or hand-edited dir), each
  # reader's own check names what is wrong.
  for d in (broken, root / 'no_meta'):
    (d / 'gemma_mt.files.json').unlink()


@pytest.mark.parametrize('ckpt,extra,message', [
    ('a_file', [], r'--checkpoint {root}/a_file: no such directory'),
    ('empty', [], r'{root}/empty: expected one orbax checkpoint directory in it, found none'),
    ('run', [], r'{root}/run is a training workdir; give its model: {root}/run/final'),
    ('broken_json', [], r'{root}/broken_json/gemma_mt.json: not valid JSON'),
    ('no_meta', ['--model', 'gemma3_270m'],
     r'{root}/no_meta: not a gemma3_270m checkpoint \(the checkpoint has 35 arrays, 200 expected\)'),
])
def test_bad_checkpoint_dirs_one_line(ckpt, extra, message, tmp_path, tokenizer,
                                      capsys):
  _bad_checkpoints(tmp_path, tokenizer)
  assert T.main(['hi', '--checkpoint', str(tmp_path / ckpt), *extra]) == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if 'compile cache' not in l]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  import re
  assert re.search(message.format(root=re.escape(str(tmp_path))), lines[0]), err


def test_turn_formats_stop_at_end_of_turn(tokenizer, forced):
  """A model that answers <end_of_turn> at once gives an empty translation
  after one step (the turn formats' end marker stops decoding); one that
  never does runs to the token budget."""
  tr = make_tiny_translator(tokenizer, prompt_format='chat')
  base = tr.sampler.params
  tr.sampler.params = forcing(base, 106)
  res = tr.translate_detailed(['Hello there'], SamplingOptions(max_new_tokens=12))
  assert res[0].text == '' and res[0].output_tokens == 1 and res[0].stop_reason == 'eos'
  tr.sampler.params = forcing(base, word_id(tokenizer, 'Bonjour'))
  res = tr.translate_detailed(['Hello there'], SamplingOptions(max_new_tokens=12))
  assert res[0].output_tokens == 12 and res[0].stop_reason == 'max_tokens'
  assert tr.prompt_tokens('Hi')[:2].tolist() == [tokenizer.bos_id, 105]


def test_checkpoint_records_its_prompt_format(tokenizer, tmp_path):
  """translate/evaluate prompt a model the way it was trained; a flag overrides."""
  from support.tiny import tiny_params

  from gemma_mt import weights
  path = weights.save(tmp_path / 'm', 'tiny', tiny_params(), tokenizer,
                      prompt_format='translategemma')
  assert Translator.from_pretrained(checkpoint=path).prompt_format == 'translategemma'
  assert Translator.from_pretrained(checkpoint=path, prompt_format='plain'
                                    ).prompt_format == 'plain'
  with pytest.raises(ValueError, match='unknown prompt format'):
    weights.save(tmp_path / 'bad', 'tiny', tiny_params(), tokenizer,
                 prompt_format='alpaca')
  assert not (tmp_path / 'bad').exists()


# --- The guard against untranslated output ------------------------------------------
COPY_SOURCE = 'Where is the nearest train station?'
FRENCH = 'Où est la gare la plus proche ?'


def hyp(tokenizer, text):
  from gemma_mt.decoding.sampler import Hypothesis
  ids = list(tokenizer.tokenize(text, add_bos=False, add_eos=False))
  return Hypothesis(np.asarray(ids + [tokenizer.eos_id], np.int32), 0.0, 0.0)


def test_acceptable_rejects_copies_other_languages_and_runaways():
  from gemma_mt.translator import acceptable
  assert acceptable(FRENCH, COPY_SOURCE)
  assert not acceptable(COPY_SOURCE, COPY_SOURCE)  # copied
  assert not acceptable('Where is the station near here?', COPY_SOURCE)
  assert not acceptable(FRENCH + ' ' + FRENCH.lower() * 3, COPY_SOURCE)  # long
  loop = 'la gare est là puis la gare est là et la gare est là'
  assert not acceptable(loop, 'The station is there, then there again')
  assert acceptable('Donald Trump', 'Donald Trump')  # Nothing to translate.
  assert acceptable('Merci beaucoup à tous !', 'Thanks!')  # Short: 3.3x.
  assert acceptable("C'est ce que c'est. " * 3,  # As the source does.
                    'It is what it is. ' * 3)


@pytest.mark.parametrize('mbr', [0, 3])
def test_guard_picks_the_candidate_in_the_target_language(tr, tokenizer, mbr):
  """The n-best (or MBR pool) holds a copy of the source, English that is
  not the source, and French: the guard answers French, though the copy is
  the best (and the consensus, for MBR); without the guard the copy."""
  pool = [hyp(tokenizer, t) for t in (
      COPY_SOURCE, COPY_SOURCE, 'Where is the train station near here?', FRENCH)]
  for guard, want in ((True, FRENCH), (False, COPY_SOURCE)):
    prep = tr.prepare([COPY_SOURCE], SamplingOptions(beam_size=4, mbr=mbr,
                                                     guard=guard))
    gen = tr.generation(prep, {0: pool[0].ids}, [pool])
    (out,) = tr.finish(prep, gen)
    assert out.text == want and len(out.candidates) == 4


def test_guard_samples_for_sources_with_only_untranslated_candidates(
    tr, tokenizer, monkeypatch):
  """A greedy copy, or a beam pool of copies and English, gets the guard's
  samples as further candidates (the decoder's own stay first) and the
  answer is the French one; a names-only source's copy and a French output
  are left alone, with no sampling."""
  from gemma_mt import translator as translator_lib
  calls = []
  n = translator_lib.GUARD_SAMPLES

  def generate(prompts, *, row_ids, **kw):  # The guard's one sampling call.
    calls.append((len(prompts), len(set(row_ids))))
    return [hyp(tokenizer, 'Where is it?' if j % 2 else FRENCH).ids
            for j in range(len(prompts))]

  monkeypatch.setattr(tr.sampler, 'generate', generate)
  monkeypatch.setattr(tr, 'continuous', False)  # Static: one call to count.
  thanks = 'Thank you all for the answers!'
  sources = [COPY_SOURCE, 'Donald Trump', 'Bonjour', thanks]
  prep = tr.prepare(sources, SamplingOptions())
  runaway = ('Merci à tous pour les réponses, vraiment, à tous et à toutes, '
             'du fond du cœur, merci encore pour tout ce que vous faites ici')
  outs = {0: hyp(tokenizer, COPY_SOURCE).ids, 1: hyp(tokenizer, sources[1]).ids,
          2: hyp(tokenizer, 'Salut à tous').ids, 3: hyp(tokenizer, runaway).ids}
  gen = tr.guard(prep, tr.generation(prep, outs))
  assert calls == [(2 * n, 2 * n)]  # The copy and the runaway.
  texts = [t.text for t in tr.finish(prep, gen)]
  assert texts == [FRENCH, 'Donald Trump', 'Salut à tous', FRENCH]
  assert tokenizer.decode(gen.nbest[0][0].ids).startswith(COPY_SOURCE)
  off = tr.prepare(sources, SamplingOptions(guard=False))
  assert tr.guard(off, tr.generation(off, outs)).nbest is None
  # A beam pool with no French in it.
  calls.clear()
  beam = tr.prepare([COPY_SOURCE], SamplingOptions(beam_size=2))
  pool = [hyp(tokenizer, COPY_SOURCE), hyp(tokenizer, 'Where is the station?')]
  gen = tr.guard(beam, tr.generation(beam, {0: pool[0].ids}, [pool]))
  assert calls == [(n, n)] and len(gen.nbest[0]) == 2 + n
  assert tr.finish(beam, gen)[0].text == FRENCH


def test_guard_on_the_real_decode_path(tr):
  """Unpatched: an output the guard reconsiders keeps its greedy text as
  the first candidate, and the answer is the first acceptable one."""
  from gemma_mt.translator import acceptable
  sources = [COPY_SOURCE, 'Thanks, it worked!', 'lol', 'r/france']
  plain = tr.translate_detailed(sources, guard=False, max_new_tokens=8)
  guarded = tr.translate_detailed(sources, max_new_tokens=8)
  for src, p, g in zip(sources, plain, guarded):
    if g.candidates is None:
      assert g.text == p.text and acceptable(p.text, src)
      continue
    assert g.candidates[0] == p.text and not acceptable(p.text, src)
    ok = [c for c in g.candidates if acceptable(c, src)]
    assert g.text in ok if ok else g.text == p.text


def test_guard_samples_on_the_real_decode_path(tr, forced, tokenizer):
  """A model forced to answer English ("the the ...", off-target): the
  guard draws its samples through the real sampler; when none of them is
  French either, the answer stays the model's own output."""
  from gemma_mt import language, translator as translator_lib
  forced(word_id(tokenizer, 'the'))
  (t,) = tr.translate_detailed([COPY_SOURCE], max_new_tokens=6)
  assert language.judge(t.text, COPY_SOURCE).off_target
  assert len(t.candidates) == 1 + translator_lib.GUARD_SAMPLES
  assert t.candidates[0] == t.text
  (plain,) = tr.translate_detailed([COPY_SOURCE], max_new_tokens=6,
                                   guard=False)
  assert plain.text == t.text and plain.candidates is None


def test_sampled_mbr_is_one_answer_per_seed(tr):
  sources = ['Hello there', 'Good morning, reddit']
  # The tiny model's distributions are peaked: a flatter, wider draw.
  kw = dict(mbr=4, mbr_candidates='sample', max_new_tokens=6, guard=False,
            temperature=3.0, epsilon=1e-7)
  a = tr.translate_detailed(sources, seed=3, **kw)
  assert [t.text for t in a] == [t.text for t in tr.translate_detailed(
      sources, seed=3, **kw)]
  assert all(len(t.candidates) == 4 for t in a)
  b = tr.translate_detailed(sources, seed=4, **kw)
  assert [t.candidates for t in a] != [t.candidates for t in b]
  # Pooled: the n-best of a beam of N/2, then N/2 samples.
  both = tr.translate_detailed(sources, seed=3, **{
      **kw, 'mbr_candidates': 'both', 'temperature': 0})
  beam = tr.translate_detailed(sources, mbr=2, max_new_tokens=6, guard=False)
  a = tr.translate_detailed(sources, seed=3, **{**kw, 'temperature': 0,
                                                'mbr': 2})
  for x, y, z in zip(both, beam, a):
    assert x.candidates == y.candidates + z.candidates


def test_rows_by_memory_default(tokenizer):
  """No batch_size: the rows follow the device (32 on this CPU), and a beam
  of K takes that many rows, batch_size / K prompts."""
  from support.tiny import CFG, tiny_params
  tr = Translator(CFG, tiny_params(), tokenizer)
  assert tr.rows_by_memory and tr.sampler.batch_size == 32
  tr.translate(['a b c'] * 9, beam_size=4, max_new_tokens=2, guard=False)
  chunk = next(k for k in tr.compiled_shapes if k[0] == 'beam_chunk')
  assert chunk[1] == 8  # 8 groups of 4 beams (9 prompts: one refill).
  tr.translate(['a b c'] * 3, beam_size=4, max_new_tokens=2, guard=False)
  assert max(k[0] for k in tr.compiled_shapes if isinstance(k[0], int)) == 4
  assert not Translator(CFG, tiny_params(), tokenizer, batch_size=5).rows_by_memory
