"""``python -m normgrowth`` and ``torchrun --nproc-per-node N -m normgrowth ...``: the command line."""

from .cli import main

if __name__ == "__main__":
    main()
