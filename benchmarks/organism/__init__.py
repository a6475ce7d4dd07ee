"""Self-trained model organism: a tiny (base, instruct, reasoning) Qwen2 triple and its data."""
