#!/usr/bin/env python
"""Translate sentences (arguments, --input FILE or stdin); see gemma_mt/translate.py."""

import sys

from gemma_mt.translate import main

if __name__ == '__main__':
  sys.exit(main())
