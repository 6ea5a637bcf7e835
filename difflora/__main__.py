"""`python -m difflora ...`: the same as the `difflora` command (and what `accelerate launch -m difflora`
or `torchrun -m difflora` runs in each process)."""

from difflora.cli import main

if __name__ == "__main__":
    main()
