"""Stage 1 job: `python jobs/stage1.py --config jobs/configs/stage1.yaml [-v] [--run-name N] [--storage URL]
[--data URL] [--workers MIN,MAX] [key=value ...]`, directly (starts a local Ray) or via `ray job submit`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir `ray job submit` uploads

from ray_mmd import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["train", "--stage", "1", *sys.argv[1:]]))
