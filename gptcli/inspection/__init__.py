"""Looking at what a model computes: distributions, scores, the lens, attention, comparisons."""
