"""``python -m pipeline.predict``: the command users' scripts call; the code is :mod:`pipeline.cli.predict`."""

from pipeline.cli.predict import console

if __name__ == "__main__":
    console()
