"""Benchmarks, hardware peaks and FLOPs accounting for tritongpt."""
