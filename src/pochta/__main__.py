"""`python -m pochta` runs the command line."""

from pochta.cli import main

raise SystemExit(main())
