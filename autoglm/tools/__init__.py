"""Offline tools that write model files (quantize, prune, convert, plan): kept apart from the load path."""
