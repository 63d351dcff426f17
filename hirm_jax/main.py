"""`python -m hirm_jax.main --config=configs/X.py[:arg] --workdir=DIR` is `hirm-jax erase`."""

import sys

from hirm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["erase", *sys.argv[1:]]))
