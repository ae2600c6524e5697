import sys

from r1pipe.cli import main

sys.exit(main())
