import sys

from fastis.cli import main

sys.exit(main())
