"""RAIN-Merging for Hugging Face models."""
