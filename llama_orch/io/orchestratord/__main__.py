"""``python -m llama_orch.io.orchestratord``: run the daemon."""

from .app import main

raise SystemExit(main())
