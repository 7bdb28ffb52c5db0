"""``python -m convert``: the pipeline's command line (``rnnify.cli``), under the spelling users know."""
import sys

from rnnify.cli import main

sys.exit(main())
