"""Inputs and outputs: text and token blocks, tensors and JSON on disk, output paths, provenance, tables, figures."""
