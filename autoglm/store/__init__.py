"""Ollama-style local model store: Modelfiles (`modelfile.py`) and named model manifests (`store.py`)."""
