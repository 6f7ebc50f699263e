"""`python -m benchmarks …`: the harness's own command line, `codellama-serve bench …`."""

import sys

from benchmarks.cli import main

sys.exit(main())
