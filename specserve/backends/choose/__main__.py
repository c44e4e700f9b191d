"""`python -m specserve.backends.choose --backend B --model M --rows 1,2,...`: the child `auto` measures in."""

import sys

from specserve.backends.choose.measure import main

sys.exit(main())
