"""Entry point for `ray job submit ... -- python -m jobs.curate ARGS`: the same commands as `curate`."""
from curate.cli import main

if __name__ == "__main__":
    main()
