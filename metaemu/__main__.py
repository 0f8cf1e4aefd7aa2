"""`python -m metaemu` is the same as the `metaemu` console script."""

from metaemu.cli import main

raise SystemExit(main())
