"""`python -m thermoscope.cli ...` is the `thermoscope` command."""

from thermoscope.cli.main import main

raise SystemExit(main())
