import sys

from densedet.cli import main

sys.exit(main())
