"""qwenserve: an OpenAI-compatible inference server for Qwen3-Coder models."""

__version__ = "0.1.0"
