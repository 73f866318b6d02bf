import sys

from d2r.cli import main
from d2r.sweep.local import watch_parent

watch_parent()  # a sweep's cell: stop when the sweep is gone
sys.exit(main())
