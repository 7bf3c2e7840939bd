"""Experiment sweeps over compressors, bit widths and seeds, and the reports built from their results."""
