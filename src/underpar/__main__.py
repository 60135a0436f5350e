"""`python -m underpar` (and `torchrun -m underpar`) run the CLI."""

from underpar.cli import main

main()
