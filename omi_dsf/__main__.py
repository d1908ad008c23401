import sys

from omi_dsf.cli import main

sys.exit(main())
