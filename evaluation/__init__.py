"""The evaluation stage: `phi3flow eval` (compare.py), its metrics and the Prompt Flow evaluation flow."""

# One name per module: this folder is linked into the package as phi3flow.evaluation; imported by its bare folder name (from the
# repository root) every module in it would exist twice, with two sets of globals.
if __name__ != "phi3flow.evaluation":
    raise ImportError(f"import phi3flow.evaluation, not {__name__}")
