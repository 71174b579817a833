"""``python -m adaption_fx``: the demo on the embedded default model."""

import sys

from adaption_fx.demo import main

sys.exit(main())
