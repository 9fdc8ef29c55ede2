"""The initialization study: measure schemes instead of trusting claims (docs/init-study.md).

verify        per-layer activations and gradients at initialization, plus the seed's plain-chain experiment
compare_init  train layers × schemes × seeds through the pretraining code and compare validation loss
visualize     plots of a saved checkpoint (activation variance, gradients, attention maps, expert load)
"""
