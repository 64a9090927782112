"""``python -m itop ...`` (also ``torchrun --nproc_per_node N -m itop train ...``): the ``itop``
command line of :mod:`itop.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
