"""The data a pipeline reads: sample tables per layout (tables), image and mask decoding (images), the
embedded generated sets (synthetic), the seeded few-shot draws (draws)."""
