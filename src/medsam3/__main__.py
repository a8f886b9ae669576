import sys

from medsam3.cli import main

sys.exit(main())
