"""Stage 1: dataset -> WebDataset shards.  python -m jobs.shard SOURCE OUT [options]"""

from jobs._entry import run

if __name__ == "__main__":
    run(["shard"])
