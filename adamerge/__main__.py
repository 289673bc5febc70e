"""`python -m adamerge`: the command line."""
from adamerge.cli import main

raise SystemExit(main())
