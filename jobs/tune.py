"""Sweep job: `python jobs/tune.py --config jobs/configs/sweep.yaml [--name N] [--storage URL] [--resume]`,
directly (starts a local Ray) or via `ray job submit`. The same command again resumes the sweep."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir `ray job submit` uploads

from ray_mmd.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
