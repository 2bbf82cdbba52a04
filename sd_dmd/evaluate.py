"""``python -m sd_dmd.evaluate``: the command; its code is in :mod:`sd_dmd.evaluation.evaluate`."""
from sd_dmd.evaluation.evaluate import main

if __name__ == "__main__":
    main()
