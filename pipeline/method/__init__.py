"""The method: the TopK SAE (sae, resume), the guides, scoring a token map, the deployable detector,
the training-free nearest-patch scorers (baselines) and the reductions across processes (distributed)."""
