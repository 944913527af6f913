import sys

from PromiseSegmentLib.cli.main import main

sys.exit(main())
