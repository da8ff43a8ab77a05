"""Commands outside the DAG: predict (score a folder with a detector), check (a dataset and params),
preset (apply a config), sweep (a table of experiments)."""
