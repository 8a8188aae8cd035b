"""Traces of runs: recording (to a Perfetto file, or in memory), and summaries computed from the file alone."""
