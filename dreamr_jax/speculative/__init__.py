"""Speculative reasoning: step segmentation, the CPN/TBVM judge, and the decoding modes."""
