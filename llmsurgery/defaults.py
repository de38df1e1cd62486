"""Default knobs of the trained passes, in one light module: pass configs, recipe options and CLI read them here.

Windows are (count, tokens each). The figures these defaults reach are in the README.
"""

KV_TRAIN_STEPS = 200
KV_LR = 1e-3
KV_BATCH_SIZE = 2
KV_PCA_WINDOWS = (16, 512)
KV_TRAIN_WINDOWS = (200, 256)  # the news calibration part holds 232 windows of 256 tokens
KV_SEARCH_WINDOWS = (
    20,
    256,
)  # the first three quarters profile the rank moves, the rest accept or reject them

HEAL_STEPS = 200
HEAL_LR = 3e-4
HEAL_BATCH_SIZE = 2
HEAL_TRAIN = ("norms", "mlp-near-gaps")
HEAL_WINDOWS = (200, 256)
HEAL_HELD_OUT_WINDOWS = 4  # after the training ones: the KL there decides whether the new weights stay

# Upper bounds on the integer knobs: beyond them a value is a typo, not a plan (and would overflow torch's int64).
MAX_SEED = 2**62  # seeds of the train/search/heal windows are offset from the one given
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_WINDOWS = 1_000_000
MAX_SEQ_LEN = 1_048_576
MAX_DIM = 65_536  # ranks, rank steps, layers
