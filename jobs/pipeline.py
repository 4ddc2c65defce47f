"""Stages 1 -> 2 -> 3 in order, each resumable: `python jobs/pipeline.py [--configs a.yaml,b.yaml,c.yaml]
[--run-name BASE] [--storage URL] [--data URL] [--workers MIN,MAX] [key=value ...]`. Run names are
BASE-stage1..3 and each stage's parent is the previous one; re-running skips finished stages' work."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir `ray job submit` uploads

from ray_mmd import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli.main(["pipeline", *sys.argv[1:]]))
