"""``python -m cloud_hub`` is the same as the ``cloud-hub`` command."""

import sys

from cloud_hub.cli import main

sys.exit(main())
