"""Other model formats: Hugging Face Llama folders (`hf.py`: `cpmtp convert`; `llama.py`: names, layouts and
config; `safetensors_io.py`: weight files)."""
