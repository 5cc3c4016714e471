import sys

from seld.cli import main

sys.exit(main())
