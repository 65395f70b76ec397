import sys

from .battery import main

sys.exit(main())
