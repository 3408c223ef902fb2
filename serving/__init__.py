"""Inference server: engines behind one interface and an OpenAI-compatible HTTP API (issue 5)."""
