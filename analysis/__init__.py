"""Research analyses behind docs/experiments.md: each a ``main(argv)`` run as ``python -m analysis.<name>``,
reading what a ``dvc repro`` left in a checkout. The pipeline never imports them."""
