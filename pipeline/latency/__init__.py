"""Latency of a network on a named target, predicted from per-layer tables (issue 14).

units: what one table row describes, read off a model; probes: the one-layer ONNX models a row is
measured with; table: the rows, their grid, lookups and the calibrated whole-network model.
Measuring needs a target, so it lives in targets/latency_probe.py; this package only computes.
"""
