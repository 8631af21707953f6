"""Export a model for other runtimes: Hugging Face, llama.cpp, PEFT/vLLM.

    python -m gemma_mt.export --checkpoint runs/x/final --to hf OUT/
    python -m gemma_mt.export --checkpoint runs/x/final --to gguf OUT.gguf
    python -m gemma_mt.export --checkpoint runs/x/adapters --to peft OUT/

`hf`: safetensors + config.json + generation_config.json + tokenizer, for
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (a LoRA dir is
merged first). `gguf`: Gemma 3 for llama.cpp, `--outtype q8_0` (default),
bf16, f16 or f32. `peft`: a LoRA run's adapters alone, loaded by PEFT/vLLM
onto the HF base named by `--base`. The prompt format the model was tuned
with goes along as the chat template. An existing OUT is kept unless
`--overwrite`; everything is written beside OUT and renamed at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from gemma_mt import cli, fs

log = logging.getLogger(__name__)

# Where the embedded model came from (its GGUF is llama.cpp's conversion).
HF_ORIGIN = {'gemma3_270m': 'google/gemma-3-270m'}


def parse_args(argv=None):
  p = cli.ArgumentParser(prog='python -m gemma_mt.export',
                         description=__doc__.split('\n')[0])
  p.add_argument('out', help='output dir (hf, peft) or file (gguf)')
  p.add_argument('--to', required=True, choices=('hf', 'gguf', 'peft'))
  p.add_argument('--checkpoint', default=None,
                 help='model dir (a training final/ or best/, adapters/, an '
                      'HF dir); default: the --model released model')
  p.add_argument('--model', default='gemma3_270m',
                 help='released model name, or the arch of --checkpoint')
  p.add_argument('--dtype', default='bfloat16',
                 choices=('bfloat16', 'float16', 'float32'),
                 help='hf: weight dtype (default bfloat16)')
  p.add_argument('--outtype', default='q8_0', choices=('q8_0', 'bf16', 'f16', 'f32'),
                 help='gguf: weight type (norms stay f32)')
  p.add_argument('--base', default=None,
                 help='peft: the HF base the adapters load onto (hub id or '
                      'dir; default: the base model\'s hub id)')
  p.add_argument('--lang_pair', default='en-fr',
                 help='the pair the chat template prompts for')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing output')
  args = p.parse_args(argv)
  if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
    p.error(f'--checkpoint {args.checkpoint}: no such directory')
  base = args.base if args.base and Path(args.base).exists() else None
  try:  # Refused before anything is loaded.
    fs.check_outputs({'OUT': args.out},
                     {'--checkpoint': args.checkpoint, '--base': base})
    fs.check_replaceable(args.out, args.overwrite, 'OUT',
                         directory=args.to != 'gguf')
  except (ValueError, OSError) as e:
    p.error(str(e))
  return args


def _bar(total: int, what: str):
  from tqdm import tqdm
  return lambda it: tqdm(it, total=total, desc=what, unit='tensor',
                         file=sys.stderr, leave=False)


def _prompt(fmt: str, lang_pair: str) -> dict:
  from gemma_mt.data import prompts
  return {'chat_template': prompts.chat_template(fmt, lang_pair),
          'stop': prompts.answer_end(fmt) or None}


def export_peft(args) -> Path:
  from gemma_mt import models, weights
  from gemma_mt.weights import adapters, peft

  if not adapters.is_adapter_dir(args.checkpoint or ''):
    raise ValueError(f'--to peft needs a LoRA adapter dir (with '
                     f'{adapters.CONFIG_FILE}) as --checkpoint')
  params, lcfg, meta = adapters.load(args.checkpoint)
  cfg = models.resolve(weights.arch_from_meta(
      meta, None, Path(args.checkpoint)))
  base = args.base or meta.get('base_checkpoint') or HF_ORIGIN.get(
      meta['base_model']) or weights.spec(meta['base_model']).hf
  if base is None:
    raise ValueError('--base: name the HF base of these adapters')
  if lcfg.quant:
    log.warning('these adapters were trained on a %s-quantized base; PEFT '
                'applies them to the unquantized HF base', lcfg.quant)
  return peft.write_peft(args.out, cfg, params, lcfg, base,
                         overwrite=args.overwrite)


def run(argv=None) -> int:
  args = parse_args(argv)
  with fs.RunLock(args.out, for_output=True):
    return _export(args)


def _export(args) -> int:
  t0 = time.time()
  if args.to == 'peft':
    out = export_peft(args)
  else:
    from gemma_mt import weights
    pre = weights.load(args.model, args.checkpoint)
    log.info('loaded %s in %.1fs', args.checkpoint or args.model,
             time.time() - t0)
    prompt = _prompt(pre.prompt_format, args.lang_pair)
    if args.to == 'hf':
      from gemma_mt.weights import hf
      n = hf.num_tensors(pre.config)
      out = hf.write_dir(args.out, pre.config, pre.params, pre.tokenizer,
                         dtype=args.dtype, overwrite=args.overwrite,
                         prompt=prompt, progress=_bar(n, 'hf'),
                         meta=weights.model_meta(pre.arch, pre.prompt_format))
    else:
      from gemma_mt.weights import gguf, hf
      out = gguf.write_gguf(args.out, pre.config, pre.params, pre.tokenizer,
                            args.outtype, chat_template=prompt['chat_template'],
                            overwrite=args.overwrite,
                            progress=_bar(hf.num_tensors(pre.config),
                                          args.outtype))
  size = sum(f.stat().st_size for f in ([out] if out.is_file()
                                        else out.rglob('*')))
  print(f'wrote {out} ({size / 1e6:.1f} MB, {args.to}) in '
        f'{time.time() - t0:.1f}s', file=sys.stderr)
  return 0


def main(argv=None) -> int:
  return cli.main_guard(run, argv)


if __name__ == '__main__':
  sys.exit(main())
