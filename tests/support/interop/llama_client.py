"""What a llama.cpp user does with our GGUF exports (runs in .venv-llama:
llama.cpp's C API from llama-cpp-cffi's CPU library; never imports gemma_mt).

    python llama_client.py REQUEST.json OUT.npz

REQUEST: {"model": gguf, "greedy": [[prompt ids], ...], "max_new_tokens": n,
"texts": [...]}. OUT: greedy_<i> (new ids, stopping at EOS/<end_of_turn>),
logits_<i> (the logits after each prompt), text_<i> (llama.cpp's
tokenization, BOS added), and the model's chat template if it has one.
"""

import ctypes
import glob
import importlib.util
import json
import os
import sys

import numpy as np


def load_lib():
  venv = sys.prefix
  ctypes.CDLL(os.path.join(venv, 'libcxa_shim.so'), mode=ctypes.RTLD_GLOBAL)
  so, = glob.glob(os.path.join(venv, 'lib', 'python3*', 'site-packages',
                               'llama', '_llama_cpp_cpu*.so'))
  spec = importlib.util.spec_from_file_location('_llama_cpp_cpu', so)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.lib, module.ffi


def main(request_path: str, out_path: str) -> None:
  req = json.loads(open(request_path).read())
  lib, ffi = load_lib()
  lib.llama_backend_init()
  model = lib.llama_model_load_from_file(req['model'].encode(),
                                         lib.llama_model_default_params())
  if model == ffi.NULL:
    raise SystemExit(f'llama.cpp could not load {req["model"]}')
  vocab = lib.llama_model_get_vocab(model)
  n_vocab = lib.llama_vocab_n_tokens(vocab)
  out = {}
  for i, text in enumerate(req.get('texts', [])):
    raw = text.encode()
    buf = ffi.new('llama_token[]', 4 * len(raw) + 8)
    n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
    out[f'text_{i}'] = np.asarray([buf[j] for j in range(n)])
  stops = {lib.llama_vocab_eos(vocab), lib.llama_vocab_eot(vocab)}
  for i, prompt in enumerate(req.get('greedy', [])):
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = len(prompt) + req['max_new_tokens'] + 8
    params.n_threads = params.n_threads_batch = 2
    ctx = lib.llama_init_from_model(model, params)
    toks = ffi.new('llama_token[]', prompt)
    batch = lib.llama_batch_get_one(toks, len(prompt))
    new = []
    for step in range(req['max_new_tokens']):
      if lib.llama_decode(ctx, batch) != 0:
        raise SystemExit('llama_decode failed')
      logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1),
                                        4 * n_vocab), np.float32).copy()
      if step == 0:
        out[f'logits_{i}'] = logits
      t = int(logits.argmax())
      new.append(t)
      if t in stops:
        break
      one = ffi.new('llama_token[1]', [t])
      batch = lib.llama_batch_get_one(one, 1)
    out[f'greedy_{i}'] = np.asarray(new)
    lib.llama_free(ctx)
  template = lib.llama_model_chat_template(model, ffi.NULL)
  if template != ffi.NULL:
    out['chat_template'] = np.frombuffer(ffi.string(template), np.uint8)
  lib.llama_model_free(model)
  np.savez(out_path, **out)


if __name__ == '__main__':
  main(*sys.argv[1:])
