"""Inference: sampling settings, loading a model or adapter, generation, the chat session, reward
scoring, the serving engine and its OpenAI-compatible API."""
