"""``python -m llama_orch.io.provisioner``: run the daemon."""

from .supervisor import main

raise SystemExit(main())
