"""Measuring what INT4 lost: perplexity/agreement/KL, and the off-grid reference model."""
