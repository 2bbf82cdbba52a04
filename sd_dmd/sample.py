"""``python -m sd_dmd.sample``: the command; its code is in :mod:`sd_dmd.outputs.sample`."""
from sd_dmd.outputs.sample import main

if __name__ == "__main__":
    main()
