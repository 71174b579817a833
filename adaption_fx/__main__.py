"""``python -m adaption_fx``: the ``adaption-fx`` command line."""

import sys

from adaption_fx.app.cli import main

sys.exit(main())
