import os
import sys

# `python -m r1pipe` puts the current directory first on sys.path. Run from a source checkout, that
# would expose the repository's `kernels/`, `model/` and `rewards/` folders as top-level packages
# (installed, they are r1pipe.kernels, ...), and transformers probes for the PyPI `kernels` package.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]

from r1pipe.cli import main  # noqa: E402

sys.exit(main())
