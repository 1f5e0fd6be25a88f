"""``python -m llama_orch.io.pool_managerd``: run the daemon."""

from .manager import main

raise SystemExit(main())
