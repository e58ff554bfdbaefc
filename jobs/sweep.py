"""Stage 6: many students from one cache.  python -m jobs.sweep CONFIG key=value ... --students ... --betas ..."""

from jobs._entry import run

if __name__ == "__main__":
    run(["sweep"])
