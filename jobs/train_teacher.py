"""Stage 2: train a teacher (cross-entropy).  python -m jobs.train_teacher [CONFIG] key=value ...

The mode is forced to ``ce``; everything else comes from the config and overrides.
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    args = sys.argv[1:]
    config = args[:1] if args and "=" not in args[0] else []
    run(["train"], [*config, *args[len(config) :], "mode=ce"])
