"""Stage 5: top-1/top-5 of a checkpoint.  python -m jobs.evaluate CHECKPOINT --data URL [--split test]"""

from jobs._entry import run

if __name__ == "__main__":
    run(["eval"])
