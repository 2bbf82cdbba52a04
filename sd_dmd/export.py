"""``python -m sd_dmd.export``: the command; its code is in :mod:`sd_dmd.outputs.export`."""
from sd_dmd.outputs.export import main

if __name__ == "__main__":
    main()
