"""`python -m kvprobe ...` runs the kvprobe command."""

import sys

from .cli import main

sys.exit(main())
