"""python -m client ...: the command line of smart_diffusion_client."""

import sys

from smart_diffusion_client.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
