"""`python -m smadlrp`."""

from smadlrp.cli import main

main()
