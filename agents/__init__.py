"""Search methods over pruning policies: SB3 learners and the seed papers' methods (see agents issue)."""
