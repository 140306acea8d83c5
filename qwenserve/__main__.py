"""`python -m qwenserve ...` is the `qwenserve` command."""

import sys

from qwenserve.cli import main

sys.exit(main())
