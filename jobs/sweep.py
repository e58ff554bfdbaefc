"""Stage 6: many students from one cache.  python -m jobs.sweep CONFIG key=value ... --space beta=grid:0.5,2 ..."""

from jobs._entry import run

if __name__ == "__main__":
    run(["sweep"])
