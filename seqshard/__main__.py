import sys

from seqshard.cli import main

sys.exit(main())
