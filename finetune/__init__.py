"""The fine-tuning stage: `phi3flow finetune` (train.py), its configs and its AzureML job specs."""

# One name per module: this folder is linked into the package as phi3flow.finetune; imported by its bare folder name (from the
# repository root) every module in it would exist twice, with two sets of globals.
if __name__ != "phi3flow.finetune":
    raise ImportError(f"import phi3flow.finetune, not {__name__}")
