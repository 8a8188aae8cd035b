"""Perfetto traces of runs: recording, and summaries computed from the file alone."""
