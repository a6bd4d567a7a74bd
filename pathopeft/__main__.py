"""`python -m pathopeft` is the same as the `pathopeft` console script."""

from pathopeft.cli import main

raise SystemExit(main())
