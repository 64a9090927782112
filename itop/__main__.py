"""``python -m itop ...`` (also ``torchrun --nproc_per_node N -m itop train ...``): the ``itop``
command line of :mod:`itop.app.cli`."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
