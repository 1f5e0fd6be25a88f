"""``python -m llama_orch.io.bench``: the same as ``llama-orch bench load``."""

import sys

from .load import main

sys.exit(main())
