"""Stage 4: distill a student from a cache.  python -m jobs.distill CONFIG key=value ...

Resources: ``num_workers=N use_gpu=true`` (one GPU per Ray Train worker); ``min_workers=M``
makes the run elastic, from M to N workers (docs/training.md, "Elastic runs").
"""

from jobs._entry import run

if __name__ == "__main__":
    run(["train"])
