"""Entry point of ``python -m declnet.apps.pointcloud``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
