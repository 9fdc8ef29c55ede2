"""The initialization study: measure schemes instead of trusting claims (docs/init-study.md).

verify        per-layer activations and gradients at initialization, plus the seed's plain-chain experiment
compare_init  train layers × schemes × seeds through the pretraining code and compare validation loss
grid_report   one report over every finished compare_init run in a folder (grids extended over several invocations)
visualize     plots of a saved checkpoint (activation variance, gradients, attention maps, expert load)
"""

# The block every scheme of the study is measured in: the plain pre-norm Llama block the study was run with. The
# `tiny` presets now add QK-norm and zero-initialized output projections (the training recipe's choice,
# docs/benchmarks.md "Time to target"); a zero output projection would overwrite every scheme's own rule there, so
# the study's models set both off unless a variant sets them itself.
STUDY_ARCHITECTURE = {"qk_norm": False, "zero_init_output_projections": False}
