"""Importers of published checkpoints (Hugging Face safetensors, PyTorch state dicts)."""
