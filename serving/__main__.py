"""`python -m serving`: the Triton server (serving.triton_server); `--help` lists its flags."""

import sys

from serving.triton_server import main

sys.exit(main())
