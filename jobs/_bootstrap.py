"""Make `import distilpose, pipeline` work when a job runs from a Ray working_dir.

`ray job submit --working-dir . -- python jobs/x.py` runs from an unpacked copy of the
repo; Python puts `jobs/` on sys.path, not the repo root. An installed package (the
Docker image, `pip install -e .`) wins; this only fills the gap.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
