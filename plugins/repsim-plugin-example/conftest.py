"""Let the plugin's unit tests import it from source without installing it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
