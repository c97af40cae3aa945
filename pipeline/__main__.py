"""`python -m pipeline ...` is the `supsup` command."""

from pipeline.cli import main

raise SystemExit(main())
