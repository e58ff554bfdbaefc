"""Stage 3: run the teacher once and cache its targets.

python -m jobs.build_cache --data ... --teacher ... --weights ... --root ...

Resources: ``--actors N --gpus-per-actor G`` (one teacher per GPU on a GPU cluster).
"""

from jobs._entry import run

if __name__ == "__main__":
    run(["cache", "build"])
