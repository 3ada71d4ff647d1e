"""The data stage: `phi3flow data` (prepare.py) writes the train/test JSONL here; azureml/ registers them."""
