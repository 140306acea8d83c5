"""Built-in demo model: a tiny trained Qwen3-MoE with the real Qwen3-Coder tokenizer and template.

``qwenserve serve`` without a model serves this checkpoint; it loads through the same code path as a
real Hugging Face checkpoint. Rebuild it with ``python -m qwenserve.demo.build``.
"""

from pathlib import Path

DEMO_MODEL_NAME = "qwen3-coder-demo"
DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "assets" / DEMO_MODEL_NAME

__all__ = ["DEMO_MODEL_DIR", "DEMO_MODEL_NAME"]
