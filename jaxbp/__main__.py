"""``python -m jaxbp compare | explain | train``: the same as the ``jaxbp`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
