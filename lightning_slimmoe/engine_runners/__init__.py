"""Scripts that ``slimmoe check-serving`` runs in an engine's own interpreter (engine_check.py): each decodes token ids
greedily in one engine and writes JSON. They import nothing of lightning_slimmoe, so any environment that has the
engine runs them (a vLLM venv with another transformers, a llama.cpp build)."""
