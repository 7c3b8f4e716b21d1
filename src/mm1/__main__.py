"""`python -m mm1 ...`, which is what `torchrun -m mm1 train ...` runs."""

from mm1.cli import main

raise SystemExit(main())
