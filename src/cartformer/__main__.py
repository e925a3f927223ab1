"""Allow ``python -m cartformer``."""

from cartformer.cli import main

raise SystemExit(main())
