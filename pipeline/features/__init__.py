"""Frozen-backbone features: the backbones, extraction into the Zarr feature store, and streaming the
store into training steps."""
