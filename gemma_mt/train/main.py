"""`python -m gemma_mt.train`: a config file, then any field as a flag.

    python -m gemma_mt.train --config configs/mtnt_gemma3_270m.py \\
        --mtnt_dir ../shared/data/mtnt --max_steps 20 --eval_max_batches 4
"""

from __future__ import annotations

import shlex
import sys

from gemma_mt import cli, signals
from gemma_mt.train.config import TrainingConfig, load_config_file


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
  """`--config FILE` (a `get_config()` file), then `--field value` overrides."""
  p = cli.ArgumentParser(prog='python -m gemma_mt.train',
                         description=__doc__.split('\n')[0])
  p.add_argument('--config', default=None, metavar='FILE',
                 help='python file with get_config() -> TrainingConfig')
  cli.add_fields(p, TrainingConfig, only_given=True)
  args = p.parse_args(argv)
  base = load_config_file(args.config) if args.config else TrainingConfig()
  config = cli.from_args(TrainingConfig, args, base=base)
  config.check()
  return config


def run(argv: list[str] | None = None) -> int:
  config = parse_args(argv)  # --help and bad flags answer before jax loads.
  from gemma_mt import sharding
  from gemma_mt.train.loop import train_loop
  sharding.maybe_initialize_distributed()  # Before anything touches devices.
  try:
    train_loop(config)
  except (signals.Interrupted, KeyboardInterrupt) as e:
    # Interrupted: stopped at a step boundary, with a checkpoint. A signal
    # outside the step loop (set-up, the final save) arrives as
    # KeyboardInterrupt: what was saved before is all there is.
    from gemma_mt.train.checkpoints import saved_steps
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if a != '--resume']
    saved = saved_steps(config.workdir)
    what = str(e).strip() or (f'checkpoints up to step {saved[-1]} are kept'
                              if saved else 'nothing was saved')
    again = shlex.join(['python', '-m', 'gemma_mt.train', *args,
                        *(['--resume'] if saved else [])])
    raise signals.Interrupted(f'{what}; {"resume" if saved else "start again"}'
                              f' with: {again}') from None
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.main_guard(run, argv)


if __name__ == '__main__':
  sys.exit(main())
