"""Calibration data for GPTQ: sources (wikitext2, c4, local files) sampled into [n, seq_len] token blocks.

Built in the GPTQ issue; the package exists now so that the distribution's layout is fixed.
"""
