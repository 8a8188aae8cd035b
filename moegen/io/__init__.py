"""Datasets in, results out: the file formats of `moegen serve-offline`."""
