import sys

from gemma_mt.train.main import main

sys.exit(main())
