"""``python -m havir``: the command line, e.g. ``accelerate launch --num_processes 8 -m havir train ...``."""

from havir.cli import main

if __name__ == "__main__":
    main()
