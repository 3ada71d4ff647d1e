"""The data stage: `phi3flow data` (prepare.py) writes the train/test JSONL here; azureml/ registers them."""

# One name per module: this folder is linked into the package as phi3flow.data; imported by its bare folder name (from the
# repository root) every module in it would exist twice, with two sets of globals.
if __name__ != "phi3flow.data":
    raise ImportError(f"import phi3flow.data, not {__name__}")
