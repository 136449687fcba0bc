"""``python -m zhllama`` (and ``accelerate launch -m zhllama``) run the CLI."""

import sys

from zhllama.cli import main

sys.exit(main())
