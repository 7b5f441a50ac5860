"""`python -m ferry …` is the `ferry` command (also what `torchrun -m ferry` runs)."""

from ferry.cli import main

if __name__ == "__main__":
    main()
