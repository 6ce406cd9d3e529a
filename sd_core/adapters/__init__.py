"""Adapters pinned for a whole run: LoRA-family deltas fused into the weights, textual-inversion tokens."""
