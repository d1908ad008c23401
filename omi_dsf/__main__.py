import sys

from omi_dsf.cli import main

if __name__ == "__main__":   # not when a worker process (the gateway's transcoder) imports it
    sys.exit(main())
