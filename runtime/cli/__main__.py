"""`python -m vbatt.cli`: the vbatt command."""

from vbatt.cli.main import main

raise SystemExit(main())
