"""`python -m flmm` is `python -m flmm.train`."""

from flmm.train import main

main()
