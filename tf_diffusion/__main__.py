"""``python -m tf_diffusion``: the ``tf-diffusion`` command."""

import sys

from tf_diffusion.cli import main

sys.exit(main())
